"""Turn a photo or drawing of one handwritten digit into an MNIST-style 28x28 image.

MNIST's own recipe (LeCun et al.): white ink on black, the digit scaled to fit a 20x20 box keeping
its aspect ratio, then placed in a 28x28 frame so that its centre of mass is at the centre.
``mnist_digit`` is the one implementation; ``POST /predict/image`` and the drawing page (which
uploads its canvas as a PNG) both go through it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.constants import IMAGE_SIDE

FRAME = IMAGE_SIDE  # output side
BOX = 20  # the digit's longest side after scaling
INK_THRESHOLD = 0.2  # share of the ink range above which a pixel counts as ink for cropping
MIN_CONTRAST = 0.1  # an image whose ink and paper differ by less than this is blank
MAX_PIXELS = 40_000_000  # decoded size limit: larger images are refused, not decoded


class ImageError(ValueError):
    """The upload is not a usable image of a digit; the message says why."""


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


def mnist_digit(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any-size image of one digit -> (28, 28) uint8, white ink on black, centred like MNIST.

    Steps: grey and invert if needed (``ink_map``); subtract the paper level and stretch the ink to
    [0, 1]; crop to the ink's bounding box; scale to fit 20x20 keeping the aspect ratio; place in a
    28x28 frame with the centre of mass at the centre. Raises ImageError for a blank image.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise ImageError(f"expected a 2-D grey array, got shape {image.shape}")
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    ink = ink_map(image)
    border = np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])
    paper = float(np.median(border))
    span = float(ink.max()) - paper
    if span < MIN_CONTRAST:
        raise ImageError("no ink found: the image is blank (or has no contrast)")
    ink = np.clip((ink - paper) / span, 0.0, 1.0)

    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (width, height)
    digit = np.asarray(
        Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS),
        dtype=np.float32,
    )
    digit = np.clip(digit, 0.0, 1.0)

    total = digit.sum()
    if total <= 0:
        raise ImageError("no ink left after scaling to 20x20")
    grid_r, grid_c = np.indices(digit.shape)
    centre_r = (grid_r * digit).sum() / total
    centre_c = (grid_c * digit).sum() / total
    # Top-left corner that puts the centre of mass at the frame's centre, kept inside the frame.
    top = int(np.clip(round(FRAME / 2 - centre_r), 0, FRAME - digit.shape[0]))
    left = int(np.clip(round(FRAME / 2 - centre_c), 0, FRAME - digit.shape[1]))
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    frame[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return np.round(frame * 255.0).astype(np.uint8)
