"""What the served model sees, summarised per image, and how confident it is: pure functions on
arrays and frames, shared by the server's inference log and the drift check against the training
data (the same columns on both sides, so a shift in one is a shift between them).

Features are computed on the 28x28 digit as the model receives it, scaled to 0-1 (light ink on
dark). A blank image has no bounding box or centre: those columns are NaN for it, never 0, so a
blank digit cannot pass for one in the corner.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, fields
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
    flat = unit.reshape(n, IMAGE_SIDE * IMAGE_SIDE)
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
            "ink_mean": flat.mean(axis=1),
            "ink_share": ink.reshape(n, IMAGE_SIDE * IMAGE_SIDE).mean(axis=1),
            "pixel_max": flat.max(axis=1, initial=0),
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


# --- the drift check: a window of the log against the training data ----------------------------


@dataclass(frozen=True)
class Thresholds:
    """When a window calls for retraining (``monitor`` in params.yaml)."""

    feature_distance: float  # a feature drifts past this distance (see ``feature_distances``)
    drift_share: float  # drift: at least this share of the features drifted
    prediction_distance: float  # predicted digits against the training labels (Jensen-Shannon)
    low_confidence: float  # an answer whose top probability is under this is a low-confidence one
    max_low_confidence_share: float
    max_feedback: int  # corrections waiting for review

    @classmethod
    def of(cls, monitor) -> Thresholds:
        """The thresholds of a ``MonitorParams`` (params.yaml's ``monitor`` section)."""
        return cls(**{f.name: getattr(monitor, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class DriftCheck:
    """One window's figures, and the reasons to retrain (empty: none)."""

    records: int
    features: dict[str, float]  # each feature's distance from the reference
    drifted: list[str]
    drift_share: float
    prediction_distance: float
    low_confidence_share: float
    feedback: int
    reasons: list[str]

    def metrics(self) -> dict[str, float]:
        """Flat figures for MLflow."""
        return {
            "records": self.records,
            "drift_share": self.drift_share,
            "prediction_distance": self.prediction_distance,
            "low_confidence_share": self.low_confidence_share,
            "feedback": self.feedback,
            **{f"distance.{name}": value for name, value in self.features.items()},
        }


def feature_distances(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, float]:
    """Per feature, the Wasserstein distance between the two samples in units of the reference's
    standard deviation: 0.1 means the distribution moved by a tenth of its spread.

    A distance, not a test's p-value: with thousands of images any test calls the smallest shift
    significant, while this stays put as a window grows (Evidently's default for large samples
    is the same normed distance). NaN (blank images) is its own share: a feature's distance adds
    the difference between the two samples' shares of NaN.
    """
    from scipy.stats import wasserstein_distance

    distances = {}
    for name in FEATURES:
        ref, cur = reference[name].to_numpy(), current[name].to_numpy()
        ref_ok, cur_ok = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
        nan_gap = abs(np.isnan(ref).mean() - np.isnan(cur).mean()) if len(cur) else 0.0
        if len(ref_ok) == 0 or len(cur_ok) == 0:
            distances[name] = float(nan_gap if len(cur_ok) == len(ref_ok) == 0 else 1.0)
            continue
        spread = float(np.std(ref_ok)) or 1.0  # a constant reference: distance in its units
        distances[name] = float(wasserstein_distance(ref_ok, cur_ok) / spread + nan_gap)
    return distances


def prediction_distance(digits: np.ndarray, reference_labels: np.ndarray, classes: int) -> float:
    """Jensen-Shannon distance (base 2: 0 same, 1 disjoint) between the digits answered and the
    training labels' class shares."""
    from scipy.spatial.distance import jensenshannon

    answered = np.bincount(np.asarray(digits, dtype=np.int64), minlength=classes)
    prior = np.bincount(np.asarray(reference_labels, dtype=np.int64), minlength=classes)
    return float(jensenshannon(answered / answered.sum(), prior / prior.sum(), base=2))


def check_window(
    reference: pd.DataFrame,
    reference_labels: np.ndarray,
    window: pd.DataFrame,
    thresholds: Thresholds,
    feedback: int,
    classes: int = 10,
) -> DriftCheck:
    """Compare a window of the inference log with the reference (``image_features`` of training
    images) and say which thresholds it passed."""
    if window.empty:
        raise ValueError("the window holds no records")
    missing = [c for c in (*FEATURES, "digit", "confidence") if c not in window.columns]
    if missing:
        raise ValueError(f"the inference log lacks the columns {missing}")
    distances = feature_distances(reference, window)
    drifted = [name for name, d in distances.items() if d > thresholds.feature_distance]
    share = len(drifted) / len(distances)
    predicted = prediction_distance(window["digit"].to_numpy(), reference_labels, classes)
    low = float((window["confidence"] < thresholds.low_confidence).mean())
    reasons = []
    if share >= thresholds.drift_share:
        reasons.append(
            f"data drift: {len(drifted)} of {len(distances)} features moved past "
            f"{thresholds.feature_distance} ({', '.join(drifted)})"
        )
    if predicted > thresholds.prediction_distance:
        reasons.append(
            f"prediction drift: the digits answered are {predicted:.3f} (Jensen-Shannon) from "
            f"the training labels, past {thresholds.prediction_distance}"
        )
    if low > thresholds.max_low_confidence_share:
        reasons.append(
            f"low confidence: {low:.1%} of answers under {thresholds.low_confidence}, past "
            f"{thresholds.max_low_confidence_share:.0%}"
        )
    if feedback > thresholds.max_feedback:
        reasons.append(f"feedback: {feedback} corrections waiting, past {thresholds.max_feedback}")
    return DriftCheck(
        records=len(window),
        features=distances,
        drifted=drifted,
        drift_share=share,
        prediction_distance=predicted,
        low_confidence_share=low,
        feedback=feedback,
        reasons=reasons,
    )


def report_html(check: DriftCheck, thresholds: Thresholds, title: str) -> str:
    """A self-contained HTML page of one check: the verdict, each feature's distance as a bar
    against its threshold, and the other figures (pandas' Styler renders it)."""
    features = pd.DataFrame(
        {
            "distance": pd.Series(check.features),
            "threshold": thresholds.feature_distance,
            "drifted": [name in check.drifted for name in check.features],
        }
    ).rename_axis("feature")
    limit = max(thresholds.feature_distance * 2, max(check.features.values(), default=0))
    styled = (
        features.style.bar(subset=["distance"], vmin=0, vmax=limit, color="#f4a582")
        .format({"distance": "{:.3f}", "threshold": "{:.3f}"})
        .set_caption("Feature drift: Wasserstein distance in reference standard deviations")
    )
    figures = pd.DataFrame(
        {
            "value": [
                check.records,
                f"{check.drift_share:.2f}",
                f"{check.prediction_distance:.3f}",
                f"{check.low_confidence_share:.1%}",
                check.feedback,
            ],
            "threshold": [
                "",
                f">= {thresholds.drift_share}",
                f"> {thresholds.prediction_distance}",
                f"> {thresholds.max_low_confidence_share:.0%} under {thresholds.low_confidence}",
                f"> {thresholds.max_feedback}",
            ],
        },
        index=["records", "drift share", "prediction drift", "low confidence", "feedback"],
    )
    verdict = (
        "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in check.reasons) + "</ul>"
        if check.reasons
        else "<p>No threshold passed: no retraining.</p>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:4px 10px;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><h2>Verdict</h2>{verdict}"
        f"<h2>Figures</h2>{figures.to_html()}<h2>Features</h2>{styled.to_html()}</body></html>"
    )
