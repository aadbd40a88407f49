"""Stage numbers: score the champion-to-be on whole numbers made from MNIST's test digits only.

**The benchmark.** Each number is 1 to ``max_length`` digits, drawn at random (leading zeros
included: a cheque's amount field and a pupil's answer can both hold them). Every digit is a real
MNIST test image, so the model has never seen it, with its own scale and vertical jitter; all the
digits of a number lean by the same slant (a shear). Neighbours stand apart, touch, or overlap,
by the spacing kind of the number:

- ``apart``: a gap of ``gap`` columns (a range) between the ink of neighbours;
- ``touching``: neighbours placed so that their ink meets (the gap closed to 0 columns);
- ``overlapping``: their boxes overlap by ``overlap`` columns (a range), their ink kept by
  maximum, as pen strokes would cross.

``make_numbers`` gives the images, the strings and each digit's box, so a reading is judged digit
by digit (``judge``): each digit read is matched to the drawn digit its box overlaps most, if
their columns overlap by more than half of their union (so a box over two digits matches
neither). Per-digit accuracy is the share of drawn digits read right by exactly one digit read
(a digit read too many costs the number, not them). A number is right when every drawn digit got
exactly one digit read, the right one, and no digit read is left over; otherwise the error is the
**cuts'** (a drawn digit got none, or several) or the **classifier's** (one each, but a digit
misread), or the number was **refused** (422).

**The stage** reads every number with ``pipelines.segment.read_number`` and the served export
(``serve.format``), as ``POST /predict/number`` would. It writes ``scores.json`` (whole-number
accuracy, per-digit accuracy, the share refused and the errors by kind: overall, per length, per
spacing and per both), a file per spacing for ``dvc metrics show``, and ``worst.png`` (the most
confident wrong readings, then refusals, with their boxes), and logs them onto the training run.
Its goals are checked by ``make bench-numbers``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.config import NumberBenchParams, SegmentParams, load_params
from pipelines.digits import ink_rows_cols
from pipelines.segment import Classify, NumberError, Reading, read_number

log = logging.getLogger("pipelines.numbers")

SPACINGS = ("apart", "touching", "overlapping")
MARGIN = 6  # blank columns and rows around each number


@dataclass(frozen=True)
class Number:
    image: np.ndarray  # (H, W) float32 ink in [0, 1], 1 = ink
    text: str
    spacing: str
    boxes: list[tuple[int, int, int, int]]  # each digit's (top, left, bottom, right), as drawn


def ink_columns(image: np.ndarray) -> np.ndarray:
    """``image`` cropped to its columns and rows of ink."""
    rows, cols = ink_rows_cols(image)
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def scaled(image: np.ndarray, factor: float) -> np.ndarray:
    height, width = image.shape
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    out = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def sheared(image: np.ndarray, slant: float) -> np.ndarray:
    """``image`` slanted: its top row moved ``slant`` times its height to the right (left when
    negative) of its bottom row, cropped to its ink again."""
    height, width = image.shape
    extra = int(np.ceil(abs(slant) * height))
    # PIL's affine maps each output pixel (x, y) to the input's (x + slant * y + shift, y)
    shift = -slant * height if slant >= 0 else 0.0
    out = Image.fromarray(image).transform(
        (width + extra, height),
        Image.Transform.AFFINE,
        (1, slant, shift, 0, 1, 0),
        Image.Resampling.BILINEAR,
    )
    return ink_columns(np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0))


def make_number(
    images: np.ndarray, labels: np.ndarray, length: int, spacing: str, rng, rules: NumberBenchParams
) -> Number:
    """One number of ``length`` digits drawn from ``images`` (uint8 MNIST digits) with ``spacing``."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r}: expected one of {', '.join(SPACINGS)}")
    picks = rng.integers(0, len(images), length)
    slant = rng.uniform(-rules.slant, rules.slant)  # one pen, one slant for the whole number
    digits = [
        sheared(scaled(ink_columns(images[i] / np.float32(255)), rng.uniform(*rules.scale)), slant)
        for i in picks
    ]
    height = max(d.shape[0] for d in digits) + 2 * rules.jitter + 2 * MARGIN
    steps = []
    for _ in range(length - 1):
        if spacing == "apart":
            steps.append(int(rng.integers(rules.gap[0], rules.gap[1] + 1)))
        elif spacing == "touching":
            steps.append(0)
        else:
            steps.append(-int(rng.integers(rules.overlap[0], rules.overlap[1] + 1)))
    width = sum(d.shape[1] for d in digits) + sum(steps) + 2 * MARGIN
    canvas = np.zeros((height, width), dtype=np.float32)
    boxes, left = [], MARGIN
    for k, digit in enumerate(digits):
        top = MARGIN + rules.jitter + int(rng.integers(-rules.jitter, rules.jitter + 1))
        view = canvas[top : top + digit.shape[0], left : left + digit.shape[1]]
        np.maximum(view, digit, out=view)
        boxes.append((top, left, top + digit.shape[0], left + digit.shape[1]))
        left += digit.shape[1] + (steps[k] if k < len(steps) else 0)
    text = "".join(str(int(labels[i])) for i in picks)
    return Number(canvas, text, spacing, boxes)


def make_numbers(images: np.ndarray, labels: np.ndarray, rules: NumberBenchParams) -> list[Number]:
    """``rules.count`` numbers for each length 1..max_length and spacing, the same for the same
    ``rules.seed``."""
    rng = np.random.default_rng(rules.seed)
    return [
        make_number(images, labels, length, spacing, rng, rules)
        for length in range(1, rules.max_length + 1)
        for spacing in SPACINGS
        for _ in range(rules.count)
    ]


@dataclass(frozen=True)
class Outcome:
    number: Number
    reading: Reading | None  # None: refused
    verdict: str  # right | cuts | classifier | refused
    digits_right: int  # drawn digits read right, each by exactly one digit read
    refusal: str = ""


def judge(number: Number, reading: Reading | None, refusal: str = "") -> Outcome:
    """How ``reading`` of ``number`` went (see the module's docstring)."""
    if reading is None:
        return Outcome(number, None, "refused", 0, refusal)
    matched: dict[int, list[int]] = defaultdict(list)
    unmatched = 0
    for digit in reading.digits:
        overlaps = [
            column_iou(digit.box.left, digit.box.right, box[1], box[3]) for box in number.boxes
        ]
        best = int(np.argmax(overlaps))
        if overlaps[best] > 0.5:
            matched[best].append(digit.digit)
        else:
            unmatched += 1
    right = sum(matched.get(k) == [int(c)] for k, c in enumerate(number.text))
    one_each = not unmatched and all(len(matched.get(k, [])) == 1 for k in range(len(number.text)))
    verdict = (
        "right" if right == len(number.text) and one_each else "classifier" if one_each else "cuts"
    )
    return Outcome(number, reading, verdict, right)


def column_iou(left: int, right: int, other_left: int, other_right: int) -> float:
    """How much two column spans overlap: their intersection over their union."""
    inter = max(0, min(right, other_right) - max(left, other_left))
    return inter / (max(right, other_right) - min(left, other_left))


def read_all(numbers: list[Number], classify: Classify, rules: SegmentParams) -> list[Outcome]:
    """Every number read and judged."""
    outcomes = []
    for number in numbers:
        try:
            outcomes.append(judge(number, read_number(number.image, classify, rules)))
        except NumberError as exc:
            outcomes.append(judge(number, None, str(exc)))
    return outcomes


def summary(outcomes: list[Outcome]) -> dict:
    """Whole-number accuracy, per-digit accuracy, the share refused, and the errors by kind."""
    digits = sum(len(o.number.text) for o in outcomes)
    verdicts = [o.verdict for o in outcomes]
    return {
        "numbers": len(outcomes),
        "whole_accuracy": round(verdicts.count("right") / len(outcomes), 6),
        "digit_accuracy": round(sum(o.digits_right for o in outcomes) / digits, 6),
        "refused": round(verdicts.count("refused") / len(outcomes), 6),
        "errors_cuts": verdicts.count("cuts"),
        "errors_classifier": verdicts.count("classifier"),
    }


def score(outcomes: list[Outcome]) -> dict:
    """scores.json: the summary overall, per spacing, per length and per both."""
    groups: dict[str, dict[str, list[Outcome]]] = {
        "by_spacing": defaultdict(list),
        "by_length": defaultdict(list),
        "by_length_spacing": defaultdict(list),
    }
    for o in outcomes:
        length = len(o.number.text)
        groups["by_spacing"][o.number.spacing].append(o)
        groups["by_length"][str(length)].append(o)
        groups["by_length_spacing"][f"{length}_{o.number.spacing}"].append(o)
    return {
        "all": summary(outcomes),
        **{name: {k: summary(v) for k, v in group.items()} for name, group in groups.items()},
    }


def flat_metrics(scores: dict) -> dict[str, float]:
    """``score``'s figures as MLflow metric names: ``numbers.<group>.<key>.<figure>``."""
    flat = {f"numbers.{k}": v for k, v in scores["all"].items()}
    for group in ("by_spacing", "by_length", "by_length_spacing"):
        for key, row in scores[group].items():
            flat.update({f"numbers.{key}.{k}": v for k, v in row.items()})
    return flat


def worst(outcomes: list[Outcome], count: int) -> list[Outcome]:
    """The most confident wrong readings, then refusals, at most ``count``."""
    wrong = [o for o in outcomes if o.verdict in ("cuts", "classifier")]
    wrong.sort(key=lambda o: o.reading.confidence, reverse=True)
    refused = [o for o in outcomes if o.verdict == "refused"]
    return (wrong + refused)[:count]


def draw(outcomes: list[Outcome], path: Path, zoom: int = 2) -> None:
    """Each outcome's image, its boxes (green: read right, red: not) and what was read."""
    from pipelines.data import atomic_write_bytes

    rows = []
    for o in outcomes:
        ink = Image.fromarray(np.round(o.number.image * 255).astype(np.uint8))
        ink = ink.resize((ink.width * zoom, ink.height * zoom), Image.Resampling.NEAREST)
        row = Image.new("RGB", (max(ink.width, 360), ink.height + 16))
        row.paste(ink.convert("RGB"), (0, 16))
        pen = ImageDraw.Draw(row)
        said = "refused" if o.reading is None else f"read {o.reading.text}"
        pen.text((2, 2), f"true {o.number.text} ({o.number.spacing}), {said} [{o.verdict}]")
        for digit in o.reading.digits if o.reading else []:
            b = digit.box
            colour = (0, 200, 0) if o.verdict == "right" else (230, 40, 40)
            pen.rectangle(
                (b.left * zoom, 16 + b.top * zoom, b.right * zoom - 1, 16 + b.bottom * zoom - 1),
                outline=colour,
            )
            pen.text((b.left * zoom + 1, 16 + b.bottom * zoom - 11), str(digit.digit), fill=colour)
        rows.append(row)
    sheet = Image.new(
        "RGB", (max([r.width for r in rows], default=360), sum(r.height + 4 for r in rows) or 20)
    )
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + 4
    import io

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


SCORES_FILE = "scores.json"  # every figure: overall, per length, per spacing and per both
WORST_FILE = "worst.png"
# ``dvc metrics show``'s rows: a file per spacing, whole-number accuracy under the accuracy column
SPACING_FILES = {spacing: f"{spacing}.json" for spacing in SPACINGS}


def run_numbers(
    x_test: np.ndarray,
    y_test: np.ndarray,
    classify: Classify,
    segment: SegmentParams,
    benchmark: NumberBenchParams,
    out: Path,
) -> dict:
    """Make the benchmark, read it, and write its files into ``out``."""
    from pipelines.data import write_json

    start = time.perf_counter()
    numbers = make_numbers(x_test, y_test, benchmark)
    outcomes = read_all(numbers, classify, segment)
    scores = score(outcomes)
    log.info(
        "read %d numbers in %.1f s: whole %.2f%%, per digit %.2f%%, refused %.2f%%",
        len(numbers),
        time.perf_counter() - start,
        100 * scores["all"]["whole_accuracy"],
        100 * scores["all"]["digit_accuracy"],
        100 * scores["all"]["refused"],
    )
    for spacing, row in scores["by_spacing"].items():
        log.info(
            "  %-11s whole %.2f%%, per digit %.2f%%; errors: %d cuts, %d classifier, %.1f%% refused",
            spacing,
            100 * row["whole_accuracy"],
            100 * row["digit_accuracy"],
            row["errors_cuts"],
            row["errors_classifier"],
            100 * row["refused"],
        )
    write_json(out / SCORES_FILE, scores)
    for spacing, file_name in SPACING_FILES.items():
        write_json(out / file_name, {"accuracy": scores["by_spacing"][spacing]["whole_accuracy"]})
    draw(worst(outcomes, benchmark.worst_examples), out / WORST_FILE)
    return scores


def served_classifier(export: Path, threads: int) -> Classify:
    """``classify`` for ``read_number`` from an export file (the served format), as the server
    runs it. Raises FileNotFoundError when there is none."""
    from pipelines.runtime import load_predictor

    if not export.exists():
        raise FileNotFoundError(f"{export}: no served export; run the export stage first")
    predictor = load_predictor(export, threads)
    return lambda images: predictor.predict(images[..., None])


def main() -> None:
    import mlflow

    from pipelines import tracking
    from pipelines.cli import base_parser
    from pipelines.data import load_raw

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--model", required=True, help="the training run's folder (its run file)")
    parser.add_argument("--export", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    classify = served_classifier(Path(args.export) / params.serve.format, params.serve.threads)
    data = load_raw(Path(args.raw), params.ingest.file_names)
    out = Path(args.out)
    scores = run_numbers(
        data.x_test,
        data.y_test,
        classify,
        params.numbers.segment,
        params.numbers.benchmark,
        out,
    )
    with tracking.attach_run(Path(args.model) / tracking.RUN_FILE, params.tracking.experiment):
        mlflow.log_metrics(flat_metrics(scores))
        for name in (SCORES_FILE, WORST_FILE, *SPACING_FILES.values()):
            mlflow.log_artifact(str(out / name), artifact_path="numbers")


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("numbers", main)
