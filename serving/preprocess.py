"""Turn a photo or drawing of one handwritten digit into an MNIST-style 28x28 image.

The image is read as ink on paper (``ink_map``), its paper level taken away and its ink stretched,
then put in MNIST's frame by ``pipelines.digits.fit_to_frame``. ``POST /predict/image`` and the
drawing page (which uploads its canvas as a PNG) both go through ``mnist_digit``; ``POST
/predict/number`` takes the same ink (``ink_levels``) to ``pipelines.segment``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.digits import ImageError, fit_to_frame

MIN_CONTRAST = 0.1  # an image whose ink and paper differ by less than this is blank
MAX_PIXELS = 40_000_000  # decoded size limit: larger images are refused, not decoded


def decode(data: bytes) -> Image.Image:
    """PNG or JPEG bytes -> a PIL image, with errors that say what is wrong."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise ImageError(f"a {image.format} image; send a PNG or JPEG")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"not a PNG or JPEG image ({exc})") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image has more than {MAX_PIXELS:,} pixels") from None
    return image


def ink_map(image: Image.Image) -> np.ndarray:
    """(H, W) float in [0, 1]: 1 = ink, 0 = paper, whichever way round the image was drawn.

    An image with transparent pixels is read by its alpha channel (opaque = ink), as a drawing on
    a transparent canvas has no paper colour. Otherwise the grey levels are used, inverted when the
    border (the paper) is lighter than mid-grey: dark ink on light paper or light ink on dark.
    """
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
        if alpha.min() < 1.0:
            return alpha
    grey = np.asarray(ImageOps.grayscale(image.convert("RGB")), dtype=np.float32) / 255.0
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return 1.0 - grey if np.median(border) > 0.5 else grey


def ink_levels(image: Image.Image) -> np.ndarray:
    """(H, W) float32 ink in [0, 1]: ``ink_map`` with the paper level (the border's median) taken
    away and the ink stretched to 1, so a light background, a grey pencil or a dim photo reads as
    ink on blank paper. Raises ImageError for a blank image."""
    ink = ink_map(image)
    border = np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
    paper = float(np.median(border))
    span = float(ink.max()) - paper
    if span < MIN_CONTRAST:
        raise ImageError("no ink found: the image is blank (or has no contrast)")
    return np.clip((ink - paper) / span, 0.0, 1.0).astype(np.float32)


def mnist_digit(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any-size image of one digit -> (28, 28) uint8, white ink on black, centred like MNIST.

    Steps: the ink on blank paper (``ink_levels``); crop to the ink's bounding box; scale to fit
    20x20 keeping the aspect ratio; place in a 28x28 frame with the centre of mass at the centre.
    Raises ImageError for a blank image.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise ImageError(f"expected a 2-D grey array, got shape {image.shape}")
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return fit_to_frame(ink_levels(image))
