"""The monitoring functions on small arrays (pipelines/monitoring.py) and the server's inference log
(serving/inference_log.py) on a temporary folder."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pytest

from pipelines.monitoring import FEATURES, answer_summary, image_features, read_log
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
