"""Reading a whole handwritten number: its ink split into digits, each read in MNIST's frame.

A pure module (no server, no model of its own): ``read_number`` takes an ink map, a ``classify``
function and the rules (``numbers.segment`` in params.yaml), so the server and the numbers stage
read numbers the same way. Every aspect below is a width over the *line's* height (the median
height of the parts), so a short, wide digit is still one digit of its line.

1. **Parts.** Connected components of the ink (8-connected, ``scipy.ndimage.label``). A part with
   less ink than ``min_part_share`` of the largest is a speck or a dot, and is dropped. Parts
   whose columns overlap by more than ``merge_overlap`` of the narrower one are one digit drawn
   in several strokes (a 5's flag, a 4 lifted mid-stroke), and are merged. Each part keeps only
   its own pixels, so a neighbour's ink inside its box does not leak in. A part shorter than
   ``min_part_height`` of the median part's height is no digit (every digit spans its line's
   height) but a stroke of one drawn apart, such as a 5's flag, and joins its nearest neighbour.
2. **Touching digits.** A part wider than ``min_split_aspect`` may hold several digits. Its
   candidate cuts are the valleys of its column profile (the columns with least ink between two
   with more), at most ``max_cuts`` of them, the lowest first, each with the ``cut_spread``
   columns either side (where digits overlap, the best cut is rarely the valley itself). Every
   way of cutting it at those candidates into pieces of one digit's width (``min_piece_share``
   to ``max_piece_aspect``) is scored, and the best reading wins (dynamic programming over the
   cuts). A piece's score is the log of the classifier's top probability, less a penalty for a
   piece wider than ``digit_aspect`` (a half-normal in log units of ``aspect_spread``) and
   ``piece_cost``: without the width penalty fewer pieces always win, since each multiplies the
   reading by a probability below 1. A cut also costs ``crossing_cost`` for each stroke it goes
   through beyond the first: two touching digits meet in one stroke, while a cut through one
   digit crosses two or three (the classifier, which has no "no digit" answer, often reads both
   halves of a digit surely). One call of ``classify`` scores every candidate piece of the
   number.
3. **Each digit** goes through ``pipelines.digits.fit_to_frame``, the same normalisation as
   ``POST /predict/image``.

A number is refused (``NumberError``, with the reason) when it has no ink, more parts or digits
than ``max_digits``, or a digit read with less than ``min_confidence`` at its best cut. Ink taller
than ``max_line_height`` is scaled down first, which bounds the cost of a large photograph; the
boxes are given in the input's own pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.config import SegmentParams
from pipelines.digits import INK_THRESHOLD, fit_to_frame, ink_rows_cols

Classify = Callable[[np.ndarray], np.ndarray]  # (n, 28, 28) uint8 -> (n, 10) probabilities
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class NumberError(ValueError):
    """The image cannot be read as a number; the message says why."""


@dataclass(frozen=True)
class Box:
    """Rows top..bottom and columns left..right of the input image (bottom, right excluded)."""

    top: int
    left: int
    bottom: int
    right: int


@dataclass(frozen=True)
class Digit:
    box: Box
    digit: int
    probability: float
    runner_up: int
    runner_up_probability: float
    image: np.ndarray  # (28, 28) uint8, what the classifier saw
    probabilities: np.ndarray  # (10,), the classifier's answer


def digit_of(box: Box, probs: np.ndarray, image: np.ndarray) -> Digit:
    """The digit the classifier's ``probs`` for ``image`` name, with the runner-up."""
    first, second = (int(i) for i in np.argsort(probs)[::-1][:2])
    return Digit(box, first, float(probs[first]), second, float(probs[second]), image, probs)


@dataclass(frozen=True)
class Reading:
    digits: list[Digit]

    @property
    def text(self) -> str:
        return "".join(str(d.digit) for d in self.digits)

    @property
    def confidence(self) -> float:
        """The product of the digits' probabilities: the chance every digit is right, if the
        classifier's probabilities are calibrated and its errors independent."""
        return math.prod(d.probability for d in self.digits)


@dataclass(frozen=True)
class _Part:
    ink: np.ndarray  # the part's own pixels, cropped to its box
    box: Box


@dataclass(frozen=True)
class _Piece:
    image: np.ndarray  # in MNIST's frame
    rows: tuple[int, int]  # its ink's first and last row in the part
    penalty: float  # the shape's log-penalty and piece_cost


def parts(ink: np.ndarray, rules: SegmentParams) -> list[_Part]:
    """The ink's parts, left to right, specks dropped and one digit's strokes merged."""
    mask = ink > INK_THRESHOLD
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if not count:
        raise NumberError("no ink found: the image is blank (or has no contrast)")
    index = np.arange(1, count + 1)
    amounts = ndimage.sum_labels(ink, labels, index)
    slices = ndimage.find_objects(labels)
    keep = [i for i in index if amounts[i - 1] >= rules.min_part_share * amounts.max()]
    groups: list[list[int]] = []  # labels per part, by left edge
    for label in sorted(keep, key=lambda i: slices[i - 1][1].start):
        cols = slices[label - 1][1]
        if groups:
            last = slices_of(slices, groups[-1])[1]
            overlap = -column_gap(cols, last)
            narrower = min(cols.stop - cols.start, last.stop - last.start)
            if overlap > rules.merge_overlap * narrower:
                groups[-1].append(label)
                continue
        groups.append([label])
    groups = fragments_merged(groups, slices, rules.min_part_height)
    found = []
    for group in groups:
        rows, cols = slices_of(slices, group)
        own = np.isin(labels[rows, cols], group)
        box = Box(rows.start, cols.start, rows.stop, cols.stop)
        found.append(_Part(np.where(own, ink[rows, cols], 0.0), box))
    return found


def fragments_merged(groups: list[list[int]], slices: list, share: float) -> list[list[int]]:
    """``groups`` with each part shorter than ``share`` of the median part's height merged into
    the neighbour nearest it in columns: every digit spans its line's height, so a short part is
    a piece of one (a 5's flag drawn apart, a 4's stroke), not a digit of its own."""
    groups = [list(g) for g in groups]
    while len(groups) > 1:
        boxes = [slices_of(slices, g) for g in groups]
        heights = [rows.stop - rows.start for rows, _ in boxes]
        line = float(np.median(heights))
        short = [k for k, h in enumerate(heights) if h < share * line]
        if not short:
            break
        k = min(short, key=lambda k: heights[k])
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < len(groups)]
        j = min(neighbours, key=lambda j: column_gap(boxes[k][1], boxes[j][1]))
        low, high = sorted((k, j))
        groups[low : high + 1] = [groups[low] + groups[high]]
    return groups


def column_gap(a: slice, b: slice) -> int:
    """Blank columns between two column spans; below 0, they overlap."""
    return max(a.start, b.start) - min(a.stop, b.stop)


def slices_of(slices: list, labels: list[int]) -> tuple[slice, slice]:
    """The box around the components ``labels`` (1-based), as row and column slices."""
    rows = [slices[i - 1][0] for i in labels]
    cols = [slices[i - 1][1] for i in labels]
    return (
        slice(min(s.start for s in rows), max(s.stop for s in rows)),
        slice(min(s.start for s in cols), max(s.stop for s in cols)),
    )


def candidate_cuts(ink: np.ndarray, height: int, rules: SegmentParams) -> list[int]:
    """Columns of ``ink`` where a cut may fall: its column profile's valleys, lowest first, at
    most ``max_cuts``, each with ``cut_spread`` columns either side, none closer to an edge than
    the narrowest piece."""
    width = ink.shape[1]
    narrowest = max(1, math.ceil(rules.min_piece_share * height))
    profile = ink.sum(axis=0)
    valleys = [
        c
        for c in range(narrowest, width - narrowest + 1)
        if profile[c - 1] <= profile[max(0, c - 2)] and profile[c - 1] <= profile[min(width - 1, c)]
    ]
    lowest = sorted(valleys, key=lambda c: profile[c - 1])[: rules.max_cuts]
    spread = range(-rules.cut_spread, rules.cut_spread + 1)
    return sorted(
        {c + o for c in lowest for o in spread if narrowest <= c + o <= width - narrowest}
    )


def spans_of(part: _Part, height: int, rules: SegmentParams) -> tuple[list[int], list]:
    """The part's cut points (its two edges included) and the spans between them that may be one
    digit: the whole part alone when it is no wider than ``min_split_aspect``."""
    width = part.ink.shape[1]
    if width <= rules.min_split_aspect * height:
        return [0, width], [(0, width)]
    points = [0, *candidate_cuts(part.ink, height, rules), width]
    narrowest = max(1, math.ceil(rules.min_piece_share * height))
    widest = rules.max_piece_aspect * height
    spans = [(a, b) for a in points for b in points if narrowest <= b - a <= widest]
    return points, spans or [(0, width)]


def piece(ink: np.ndarray, height: int, rules: SegmentParams) -> _Piece | None:
    """A piece of a part in MNIST's frame, with its shape's penalty; None for a piece with no ink."""
    rows, cols = ink_rows_cols(ink)
    if not len(rows):
        return None
    aspect = (cols[-1] - cols[0] + 1) / height
    penalty = rules.piece_cost
    if aspect > rules.digit_aspect:
        z = math.log(aspect / rules.digit_aspect) / rules.aspect_spread
        penalty += 0.5 * z * z
    return _Piece(fit_to_frame(ink), (int(rows[0]), int(rows[-1])), penalty)


def best_cuts(points: list[int], scores: dict[tuple[int, int], float]) -> list[int] | None:
    """The cut points from 0 to the last point whose spans' scores add up highest; None if no
    chain of scored spans reaches it."""
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [0])}
    for b in points[1:]:
        options = [
            (best[a][0] + scores[(a, b)], [*best[a][1], b])
            for a in points
            if a in best and (a, b) in scores
        ]
        if options:
            best[b] = max(options, key=lambda option: option[0])
    return best[points[-1]][1] if points[-1] in best else None


def line_of_ink(ink: np.ndarray, rules: SegmentParams) -> tuple[np.ndarray, float, int, int]:
    """``ink`` cropped to its ink and scaled down to at most ``max_line_height`` rows: the map,
    its scale, and the top and left of the crop in ``ink``."""
    rows, cols = ink_rows_cols(ink)
    if not len(rows):
        raise NumberError("no ink found: the image is blank (or has no contrast)")
    top, left = int(rows[0]), int(cols[0])
    crop = ink[top : rows[-1] + 1, left : cols[-1] + 1]
    scale = min(1.0, rules.max_line_height / crop.shape[0])
    if scale < 1.0:
        size = (max(1, round(crop.shape[1] * scale)), rules.max_line_height)
        resized = Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR)
        crop = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    # one blank pixel around, so that a digit never touches the map's edge
    return np.pad(crop, 1), scale, top - 1, left - 1


def read_number(ink: np.ndarray, classify: Classify, rules: SegmentParams) -> Reading:
    """The number in ``ink`` ((H, W) in [0, 1], 1 = ink), read digit by digit with
    ``classify``. Raises NumberError with the reason when it cannot be read."""
    ink = np.asarray(ink, dtype=np.float32)
    if ink.ndim != 2:
        raise NumberError(f"expected a 2-D ink map, got shape {ink.shape}")
    line, scale, top, left = line_of_ink(ink, rules)
    found = parts(line, rules)
    if len(found) > rules.max_digits:
        raise NumberError(f"{len(found)} separate parts, more than max_digits ({rules.max_digits})")
    height = int(np.median([part.box.bottom - part.box.top for part in found]))
    # every candidate piece of every part, classified in one call
    candidates = []
    for part in found:
        points, spans = spans_of(part, height, rules)
        pieces = {span: piece(part.ink[:, span[0] : span[1]], height, rules) for span in spans}
        candidates.append((part, points, {s: p for s, p in pieces.items() if p is not None}))
    images = [p.image for _, _, pieces in candidates for p in pieces.values()]
    probs = iter(classify(np.stack(images)))
    digits = []
    for part, points, pieces in candidates:
        answers = {span: next(probs) for span in pieces}
        cut_costs = {point: cut_penalty(part.ink, point, rules) for point in points}
        scores = {
            span: math.log(max(float(answers[span].max()), 1e-12))
            - pieces[span].penalty
            - cut_costs[span[1]]
            for span in pieces
        }
        cuts = best_cuts(points, scores)
        if cuts is None:
            raise NumberError(
                f"the part at columns {back(part.box.left, left, scale)}-"
                f"{back(part.box.right, left, scale)} cannot be cut into digits"
            )
        for a, b in pairwise(cuts):
            p, chosen = answers[(a, b)], pieces[(a, b)]
            box = Box(
                back(part.box.top + chosen.rows[0], top, scale),
                back(part.box.left + a, left, scale),
                back(part.box.top + chosen.rows[1] + 1, top, scale),
                back(part.box.left + b, left, scale),
            )
            digits.append(digit_of(box, p, chosen.image))
    if len(digits) > rules.max_digits:
        raise NumberError(f"{len(digits)} digits, more than max_digits ({rules.max_digits})")
    weakest = min(digits, key=lambda d: d.probability)
    if weakest.probability < rules.min_confidence:
        box = weakest.box
        raise NumberError(
            f"the part at columns {box.left}-{box.right} is no digit at any cut: the best "
            f"reading, {weakest.digit}, has probability {weakest.probability:.2f} "
            f"(min_confidence {rules.min_confidence})"
        )
    return Reading(digits)


def crossings(column: np.ndarray) -> int:
    """How many strokes a vertical cut down ``column`` goes through: its runs of ink."""
    on = column > INK_THRESHOLD
    return int(on[0]) + int(np.count_nonzero(on[1:] & ~on[:-1]))


def cut_penalty(ink: np.ndarray, cut: int, rules: SegmentParams) -> float:
    """What a cut of ``ink`` (a part) before column ``cut`` costs: ``crossing_cost`` for each
    stroke it goes through beyond the first. Where two digits touch, a cut goes through one
    stroke (where they meet); a cut through a digit goes through two or three. The part's right
    edge is no cut, and costs nothing."""
    if cut >= ink.shape[1]:
        return 0.0
    return rules.crossing_cost * max(0, crossings(ink[:, cut]) - 1)


def back(coordinate: int, offset: int, scale: float) -> int:
    """A coordinate of the scaled line back in the input's pixels."""
    return offset + round(coordinate / scale)
