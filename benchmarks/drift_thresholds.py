"""Benchmark: where the drift check's thresholds sit between MNIST itself and shifted digits.

Baseline: windows of MNIST's own test digits (random samples, and the test set's second half,
written by other people than most of the training set) against the reference the check uses
(``monitor.reference_images`` training images, the flow's fixed sample). Compared: the same
windows after each shift of ``pipelines/shifts.py``. Printed per window: the largest feature
distance, the drift share and whether the check calls it data drift; with the served export in
``data/export`` (after ``make run``), also the low-confidence share and the prediction distance
of the model's answers. Ratios are each window's drift share against the baseline's largest.

    python -m benchmarks.drift_thresholds --raw data/raw           # needs MNIST in data/raw
    python -m benchmarks.drift_thresholds --raw data/raw --window 500 --windows 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flows.monitoring import REFERENCE_SEED
from pipelines.config import load_params
from pipelines.data import load_raw
from pipelines.monitoring import Thresholds, check_window, image_features
from pipelines.shifts import SHIFTS


def answers(predictor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digits and top probabilities of the served export on uint8 images."""
    probs = np.concatenate(
        [predictor.predict(images[i : i + 256, ..., None]) for i in range(0, len(images), 256)]
    )
    return probs.argmax(axis=1), probs.max(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--export", default="data/export", help="where the served export is")
    parser.add_argument("--window", type=int, default=1000, help="answers per window")
    parser.add_argument("--windows", type=int, default=3, help="random windows of each kind")
    args = parser.parse_args()
    params = load_params(args.params)
    monitor = params.monitor
    data = load_raw(Path(args.raw), params.ingest.file_names)
    rng = np.random.default_rng(REFERENCE_SEED)
    sample = rng.choice(len(data.x_train), min(monitor.reference_images, len(data.x_train)), False)
    reference = image_features(data.x_train[sample])

    predictor = None
    export = Path(args.export) / params.serve.format
    if export.exists():
        from pipelines.runtime import load_predictor

        predictor = load_predictor(export, threads=1)

    picks = np.random.default_rng(1)
    windows: list[tuple[str, np.ndarray]] = []
    for i in range(args.windows):
        windows.append((f"MNIST test, random {i + 1}", picks.choice(len(data.x_test), args.window)))
    second_half = np.arange(len(data.x_test) // 2, len(data.x_test))
    windows.append(("MNIST test, 2nd half", picks.choice(second_half, args.window)))

    thresholds = Thresholds.of(monitor)
    rows = []
    for label, index in windows:
        for shift in ("none", *SHIFTS):
            images = data.x_test[index]
            if shift != "none":
                images = SHIFTS[shift](images, np.random.default_rng(2))
            window = image_features(images)
            if predictor is not None:
                window["digit"], window["confidence"] = answers(predictor, images)
            else:  # no model: the labels stand in, every answer sure
                window["digit"], window["confidence"] = data.y_test[index], 1.0
            check = check_window(reference, data.y_train, window, thresholds, feedback=0)
            rows.append((label, shift, check))

    base = max(c.drift_share for _, s, c in rows if s == "none") or 1 / len(reference.columns)
    print(
        f"reference: {len(reference)} training images; windows of {args.window}; thresholds: "
        f"feature {thresholds.feature_distance}, share {thresholds.drift_share}, prediction "
        f"{thresholds.prediction_distance}, low confidence {thresholds.max_low_confidence_share} "
        f"under {thresholds.low_confidence}; model: {export if predictor else 'none (labels)'}"
    )
    print(
        f"{'window':24} {'shift':9} {'max dist':>8} {'share':>6} {'vs base':>8} {'pred':>6} "
        f"{'low conf':>8}  reasons"
    )
    for label, shift, check in rows:
        kinds = ", ".join(r.split(":")[0] for r in check.reasons) or "-"
        print(
            f"{label:24} {shift:9} {max(check.features.values()):8.3f} {check.drift_share:6.2f} "
            f"{check.drift_share / base:7.1f}x {check.prediction_distance:6.3f} "
            f"{check.low_confidence_share:8.1%}  {kinds}"
        )


if __name__ == "__main__":
    main()
