"""What the served model sees, summarised per image, and how confident it is: pure functions on
arrays and frames, shared by the server's inference log and the drift check against the training
data (the same columns on both sides, so a shift in one is a shift between them).

Features are computed on the 28x28 digit as the model receives it, scaled to 0-1 (light ink on
dark). A blank image has no bounding box or centre: those columns are NaN for it, never 0, so a
blank digit cannot pass for one in the corner.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.constants import IMAGE_SIDE

LOG_FILES = "date=*/hour=*/part-*.parquet"  # the inference log's files (serving.inference_log)
INK_THRESHOLD = 0.5  # a pixel at or above half intensity is stroke, not background
FEATURES = (
    "ink_mean",  # mean intensity: how much ink, thick or thin strokes
    "ink_share",  # share of pixels at or above INK_THRESHOLD
    "pixel_max",  # the brightest pixel: an inverted or faint image shows here
    "bbox_height",  # rows from the first to the last row holding ink
    "bbox_width",  # columns likewise: scale and slant
    "centre_row",  # centre of mass, in pixels from the top (MNIST centres it near 13.5)
    "centre_col",  # ... and from the left
    "spread_row",  # the intensity-weighted standard deviation of the row: stroke spread
    "spread_col",
)


def as_unit_images(images: np.ndarray) -> np.ndarray:
    """``images`` as float32 (n, 28, 28) in 0-1: uint8 pixels are divided by 255, a trailing
    channel of 1 is dropped. Anything else is refused with its shape or range named."""
    array = np.asarray(images)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"images must be (n, {IMAGE_SIDE}, {IMAGE_SIDE}), got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    unit = array.astype(np.float32)
    if unit.size and (np.nanmin(unit) < 0 or np.nanmax(unit) > 1):
        raise ValueError(f"float images must lie in 0-1, got {np.nanmin(unit)}-{np.nanmax(unit)}")
    return unit


def image_features(images: np.ndarray) -> pd.DataFrame:
    """One row per image, the columns of ``FEATURES``."""
    unit = as_unit_images(images)
    n = len(unit)
    flat = unit.reshape(n, -1)
    ink = unit >= INK_THRESHOLD
    rows_with_ink, cols_with_ink = ink.any(axis=2), ink.any(axis=1)
    has_ink = rows_with_ink.any(axis=1)
    mass = unit.sum(axis=(1, 2))
    index = np.arange(IMAGE_SIDE, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_mass, col_mass = unit.sum(axis=2), unit.sum(axis=1)
        centre_row = (row_mass @ index) / mass
        centre_col = (col_mass @ index) / mass
        spread_row = np.sqrt((row_mass @ index**2) / mass - centre_row**2)
        spread_col = np.sqrt((col_mass @ index**2) / mass - centre_col**2)
    blank = mass == 0
    for column in (centre_row, centre_col, spread_row, spread_col):
        column[blank] = np.nan
    return pd.DataFrame(
        {
            "ink_mean": flat.mean(axis=1) if n else np.zeros(0, np.float32),
            "ink_share": ink.reshape(n, -1).mean(axis=1) if n else np.zeros(0, np.float32),
            "pixel_max": flat.max(axis=1) if n else np.zeros(0, np.float32),
            "bbox_height": _extent(rows_with_ink, has_ink),
            "bbox_width": _extent(cols_with_ink, has_ink),
            "centre_row": centre_row,
            "centre_col": centre_col,
            "spread_row": spread_row,
            "spread_col": spread_col,
        },
        columns=list(FEATURES),
    ).astype(np.float32)


def _extent(lines_with_ink: np.ndarray, has_ink: np.ndarray) -> np.ndarray:
    """Lines from the first to the last holding ink (inclusive); NaN where an image has none."""
    first = lines_with_ink.argmax(axis=1)
    last = IMAGE_SIDE - 1 - lines_with_ink[:, ::-1].argmax(axis=1)
    return np.where(has_ink, last - first + 1, np.nan).astype(np.float32)


def answer_summary(probabilities: np.ndarray) -> pd.DataFrame:
    """Per answer: the digit, its probability and the margin to the runner-up."""
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probabilities must be (n, classes), got {probs.shape}")
    top_two = np.sort(probs, axis=1)[:, -2:]
    return pd.DataFrame(
        {
            "digit": probs.argmax(axis=1).astype(np.int8),
            "confidence": top_two[:, 1],
            "margin": top_two[:, 1] - top_two[:, 0],
        }
    )


def read_log(folder: Path, since: datetime | None = None) -> pd.DataFrame:
    """The inference log under ``folder``, oldest first (records from ``since`` on, if given);
    an empty frame when nothing has been logged."""
    files = sorted(Path(folder).glob(LOG_FILES))
    if not files:
        return pd.DataFrame()
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if since is not None:
        frame = frame[frame["time"] >= pd.Timestamp(since)]
    return frame.sort_values("time", ignore_index=True)
