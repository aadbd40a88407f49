"""Digits that no longer look like MNIST, made from MNIST digits: the traffic shapes the drift check
must notice (tests/test_monitoring_loop.py sends them to a real server).

Each function takes uint8 images (n, 28, 28), light ink on dark, and returns uint8 images of the
same shape. The amounts are drawn from ``rng`` per image, so a batch is not one repeated transform.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage


def thicker(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes one or two pixels thicker (grey dilation)."""
    return np.stack([ndimage.grey_dilation(im, size=int(rng.integers(2, 4))) for im in images])


def thinner(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes eroded by one pixel: faint, broken digits."""
    return np.stack([ndimage.grey_erosion(im, size=2) for im in images])


def rotated(
    images: np.ndarray, rng: np.random.Generator, low: float = 25, high: float = 40
) -> np.ndarray:
    """Turned by ``low``-``high`` degrees, either way."""
    angles = rng.uniform(low, high, len(images)) * rng.choice([-1, 1], len(images))
    return np.stack(
        [
            np.clip(ndimage.rotate(im.astype(np.float32), a, reshape=False, order=1), 0, 255)
            for im, a in zip(images, angles, strict=True)
        ]
    ).astype(np.uint8)


def scaled(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shrunk to 45-65% of their size, about the centre: digits drawn small."""
    out = np.zeros_like(images)
    for i, im in enumerate(images):
        factor = rng.uniform(0.45, 0.65)
        small = ndimage.zoom(im.astype(np.float32), factor, order=1)
        top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
        out[i, top : top + small.shape[0], left : left + small.shape[1]] = np.clip(small, 0, 255)
    return out


def inverted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark ink on light: a scan the client forgot to invert."""
    return 255 - images


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "thicker": thicker,
    "thinner": thinner,
    "rotated": rotated,
    "scaled": scaled,
    "inverted": inverted,
}
