"""MNIST's frame for one digit: the one normalisation that every image of a digit goes through.

MNIST's own recipe (LeCun et al.): white ink on black, the digit scaled to fit a 20x20 box keeping
its aspect ratio, then placed in a 28x28 frame so that its centre of mass is at the centre.
``fit_to_frame`` is the one implementation: ``POST /predict/image`` (``serving.preprocess``) and
each digit of a whole number (``pipelines.segment``) both go through it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.constants import IMAGE_SIDE

FRAME = IMAGE_SIDE  # output side
BOX = 20  # the digit's longest side after scaling
INK_THRESHOLD = 0.2  # share of the ink range above which a pixel counts as ink for cropping


class ImageError(ValueError):
    """The image is not a usable image of a digit; the message says why."""


def ink_rows_cols(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the rows and of the columns of ``ink`` that hold ink (empty for none)."""
    mask = ink > INK_THRESHOLD
    return np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))


def fit_to_frame(ink: np.ndarray) -> np.ndarray:
    """(H, W) ink in [0, 1] (1 = ink) -> (28, 28) uint8 in MNIST's frame: cropped to the ink,
    scaled to fit 20x20 keeping the aspect ratio, centre of mass at the centre. Raises ImageError
    when there is no ink."""
    rows, cols = ink_rows_cols(ink)
    if not len(rows):
        raise ImageError("no ink found: the image is blank (or has no contrast)")
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
