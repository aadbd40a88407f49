"""Benchmark: whole numbers read by ``pipelines.segment`` against the same digits cut where they
were drawn, and the time to read a 5-digit number, against issue 24's goals.

Baseline: ORACLE CUTS, each digit cut at the columns it was drawn in (``Number.boxes``) and read
by the same model: what the classifier alone gets right. Compared: SEGMENTED, the number read as
``POST /predict/number`` reads it (parts, cut search, the same rules from params.yaml). Their
ratio is the share of the classifier's accuracy the segmentation keeps, and the gap between them
is the cuts' errors. Printed per spacing for 5-digit numbers, with the errors by kind.

Time: each 5-digit number read in this process, the served export on one thread (``serve.format``,
``threads: 1``), median and 90th percentile, against ORACLE CUTS' time (the fit to MNIST's frame
and one model call for the five digits). The goals: whole-number accuracy of at least 99% apart
and 95% touching, and under 5 ms a number.

    python -m benchmarks.numbers              # needs an export (make run, or dvc repro export)
    python -m benchmarks.numbers --count 400  # 5-digit numbers per spacing
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from pipelines.config import load_params
from pipelines.numbers import SPACINGS, Number, judge, make_numbers, served_classifier, summary
from pipelines.segment import Box, NumberError, Reading, digit_of, piece, read_number

LENGTH = 5  # the goals are for 5-digit numbers
GOALS = {"apart": 0.99, "touching": 0.95}  # whole-number accuracy
GOAL_MS = 5.0


def oracle_reading(number: Number, classify, rules) -> Reading:
    """Each digit cut at the columns it was drawn in, and read by ``classify``."""
    height = max(bottom - top for top, _, bottom, _ in number.boxes)
    pieces = [
        piece(number.image[:, left:right], height, rules) for _, left, _, right in number.boxes
    ]
    probs = classify(np.stack([p.image for p in pieces]))
    return Reading(
        [
            digit_of(Box(*box), p, chosen.image)
            for box, p, chosen in zip(number.boxes, probs, pieces, strict=True)
        ]
    )


def timed(call) -> tuple[object, float]:
    start = time.perf_counter()
    try:
        result = call()
    except NumberError as exc:
        result = exc
    return result, time.perf_counter() - start


def main() -> None:
    from pipelines.data import load_raw

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default="data/dataset")
    parser.add_argument("--export", default="data/export")
    parser.add_argument("--count", type=int, default=200, help="5-digit numbers per spacing")
    parser.add_argument("--seed", type=int, default=1, help="not the stage's seed: other numbers")
    args = parser.parse_args()
    params = load_params(args.params)
    export = Path(args.export) / params.serve.format
    try:
        classify = served_classifier(export, threads=1)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc} (make run)") from None
    data = load_raw(Path(args.raw), params.ingest.file_names)

    rules = params.numbers.segment
    bench = params.numbers.benchmark.model_copy(
        update={"count": args.count, "seed": args.seed, "max_length": LENGTH}
    )
    numbers = [n for n in make_numbers(data.x_test, data.y_test, bench) if len(n.text) == LENGTH]
    print(
        f"{len(numbers)} {LENGTH}-digit numbers ({args.count} per spacing) from MNIST's test set,"
    )
    print(f"read with {export} on one thread; rules: params.yaml numbers.segment\n")
    for number in numbers[:3]:  # warm-up: the first model calls set up the runtime
        timed(lambda n=number: read_number(n.image, classify, rules))

    results: dict[str, dict[str, list]] = {s: {"segmented": [], "oracle": []} for s in SPACINGS}
    seconds: dict[str, list[float]] = {"segmented": [], "oracle": []}
    for number in numbers:
        reading, took = timed(lambda n=number: read_number(n.image, classify, rules))
        seconds["segmented"].append(took)
        refused = isinstance(reading, NumberError)
        results[number.spacing]["segmented"].append(
            judge(number, None if refused else reading, str(reading) if refused else "")
        )
        oracle, took = timed(lambda n=number: oracle_reading(n, classify, rules))
        seconds["oracle"].append(took)
        results[number.spacing]["oracle"].append(judge(number, oracle))

    header = f"{'spacing':<12} {'ORACLE CUTS':>12} {'SEGMENTED':>10} {'ratio':>6} {'per digit':>9} {'cuts':>5} {'classifier':>10} {'refused':>8}"
    print("whole-number accuracy (ORACLE CUTS is the baseline)")
    print(header)
    figures = {}
    for spacing in SPACINGS:
        oracle = summary(results[spacing]["oracle"])
        segmented = summary(results[spacing]["segmented"])
        figures[spacing] = segmented["whole_accuracy"]
        ratio = (
            segmented["whole_accuracy"] / oracle["whole_accuracy"]
            if oracle["whole_accuracy"]
            else float("nan")
        )
        print(
            f"{spacing:<12} {oracle['whole_accuracy']:>12.3f} {segmented['whole_accuracy']:>10.3f}"
            f" {ratio:>5.2f}x {segmented['digit_accuracy']:>9.3f} {segmented['errors_cuts']:>5}"
            f" {segmented['errors_classifier']:>10} {segmented['refused']:>8.3f}"
        )
    ms = {name: [1000 * s for s in values] for name, values in seconds.items()}
    median = {name: statistics.median(values) for name, values in ms.items()}
    p90 = {name: float(np.percentile(values, 90)) for name, values in ms.items()}
    print(f"\nms per {LENGTH}-digit number   median    p90")
    print(f"{'ORACLE CUTS (baseline)':<24} {median['oracle']:>7.2f} {p90['oracle']:>6.2f}")
    print(
        f"{'SEGMENTED':<24} {median['segmented']:>7.2f} {p90['segmented']:>6.2f}"
        f"   {median['segmented'] / median['oracle']:.1f}x the baseline"
    )
    print("\ngoals")
    for spacing, goal in GOALS.items():
        met = "met" if figures[spacing] >= goal else "missed"
        print(
            f"  {spacing} {LENGTH}-digit numbers read whole: {figures[spacing]:.3f} (goal >= {goal}): {met}"
        )
    met = "met" if median["segmented"] < GOAL_MS else "missed"
    print(
        f"  a {LENGTH}-digit number read in {median['segmented']:.2f} ms median (goal < {GOAL_MS:g} ms): {met}"
    )


if __name__ == "__main__":
    main()
