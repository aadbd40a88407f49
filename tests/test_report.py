"""The HTML evaluation report (pipelines/report.py), from small hand-made inputs: its sections,
its embedded images, the champion comparison, lineage, escaping, and the page in a real headless
Chromium."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.insight import calibration_table, error_groups, most_confident_errors
from pipelines.report import (
    EXAMPLES_PER_PAIR,
    ReportInputs,
    render_numbers,
    render_off_notice,
    render_report,
    with_section,
)
from pipelines.scoring import evaluate_probabilities
from tests.browser import headless_chromium, needs_chromium
from tests.conftest import make_arrays

SECTIONS = [
    "headline",
    "per-class",
    "confusion",
    "pairs",
    "confident-errors",
    "gradcam",
    "errors",
    "robustness",
    "calibration",
    "lineage",
]
FIGURES = ["confusion", "gradcam", "errors", "robustness", "reliability"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 20 test images: 10 fours taken for 9s (the largest pair), 3 threes for 8s, a 7 for a 1, and 6
# right: accuracy 30%.
Y_TRUE = np.array([4] * 10 + [3] * 3 + [7] + [0, 1, 2, 5, 6, 8])
Y_PRED = np.array([9] * 10 + [8] * 3 + [1] + [0, 1, 2, 5, 6, 8])
CONFIDENCE = np.linspace(0.55, 0.99, 20)
ACCURACY = 0.3


def hand_made_probs() -> np.ndarray:
    probs = np.tile(((1 - CONFIDENCE) / 9)[:, None], (1, 10))
    probs[np.arange(20), Y_PRED] = CONFIDENCE
    return probs


def write_png(path: Path, width: int, height: int, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG")
    return path


def make_inputs(tmp_path: Path, **update) -> ReportInputs:
    probs = hand_made_probs()
    result = evaluate_probabilities(probs, Y_TRUE, top_pairs=10)
    assert result.accuracy == pytest.approx(ACCURACY)
    # distinct sizes, so the browser test can tell the figures apart
    figures = {
        name: write_png(tmp_path / f"{name}.png", 60 + 10 * i, 40 + 5 * i, seed=i)
        for i, name in enumerate(FIGURES)
    }
    images = make_arrays(n_train=10, n_test=20)[2]
    fields = {
        "model_label": "run 0123456789ab (mnist-classifier)",
        "metrics": {
            "test_accuracy": ACCURACY,
            "test_loss": 0.30,
            "test_ece": 0.02,
            "test_fgsm_accuracy_eps_0.1": 0.2,
            "test_fgsm_accuracy_eps_0.2": 0.1,
        },
        "n_test": len(Y_TRUE),
        "per_class": result.per_class,
        "confused_pairs": result.confused_pairs,
        "groups": error_groups(Y_TRUE, Y_PRED, probs),
        "confident_errors": most_confident_errors(Y_TRUE, Y_PRED, probs, k=5),
        "images": images,
        "robustness": {0.0: ACCURACY, 0.1: 0.2, 0.2: 0.1},
        "robustness_images": 20,
        "calibration": calibration_table(probs, Y_TRUE, bins=10),
        "figures": figures,
        "gradcam_caption": "Heat on conv2: the misclassified test images, then correct ones.",
        "lineage": {
            "MLflow run": "0123456789abcdef",
            "git commit": "5f3e2d1c0b9a",
            "data version (md5 of data/dataset)": "d41d8cd98f00b204e9800998ecf8427e",
            "data source": "mnist",
        },
        "params": {"train.epochs": "20", "train.note": "<script>alert('x')</script> & more"},
        "overrides": {"train.learning_rate": 0.002},
        "champion": None,
        "generated_at": "2025-01-01 12:00:00 UTC",
    }
    fields.update(update)
    return ReportInputs(**fields)


def expected_thumbnails(inputs: ReportInputs) -> int:
    """Thumbnails: up to EXAMPLES_PER_PAIR per shown confused pair, one per confident error."""
    sizes = {(t, p): len(idx) for t, p, idx in inputs.groups}
    pairs = sum(
        min(EXAMPLES_PER_PAIR, sizes[(int(t), int(p))])
        for t, p in zip(
            inputs.confused_pairs["true"], inputs.confused_pairs["predicted"], strict=True
        )
    )
    return pairs + len(inputs.confident_errors)


def image_sources(page: str) -> list[str]:
    tags = re.findall(r"<img\b[^>]*>", page)
    sources = [re.search(r'\bsrc="([^"]*)"', tag).group(1) for tag in tags]
    assert len(sources) == page.count("<img")
    return sources


def decode(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    return base64.b64decode(uri[len(prefix) :], validate=True)


# --- the page's structure ------------------------------------------------------------------------


def test_report_has_every_section_in_order(tmp_path: Path) -> None:
    page = render_report(make_inputs(tmp_path))
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert re.findall(r"<h2 id='([^']+)'>", page) == SECTIONS
    assert page.count("<h2") == len(SECTIONS)
    assert "<title>Evaluation report: run 0123456789ab (mnist-classifier)</title>" in page


def test_report_embeds_every_image_as_a_png_data_uri(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    page = render_report(inputs)
    sources = image_sources(page)
    assert len(sources) == len(FIGURES) + expected_thumbnails(inputs)
    assert expected_thumbnails(inputs) == 8 + 3 + 1 + 5  # 4 as 9 capped at 8, then 3, 1; 5 errors
    decoded = [decode(src) for src in sources]
    assert all(data.startswith(PNG_MAGIC) for data in decoded)
    # each figure is its file, byte for byte, in page order
    figure_bytes = [inputs.figures[name].read_bytes() for name in FIGURES]
    assert [d for d in decoded if d in figure_bytes] == figure_bytes
    # each thumbnail is a test image, pixel for pixel
    thumbnails = [d for d in decoded if d not in figure_bytes]
    shown = re.findall(r'<img class="thumb"[^>]*alt="test image (\d+)"', page)
    assert len(shown) == len(thumbnails)
    for index, data in zip(shown, thumbnails, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(pixels, inputs.images[int(index)])
    # the pair 4 as 9 shows its most confident images first
    assert [int(i) for i in shown[:8]] == inputs.groups[0][2][:8].tolist()


def test_report_needs_no_network(tmp_path: Path) -> None:
    page = render_report(make_inputs(tmp_path)).lower()
    for external in ('src="http', "src='http", "<link", "<script", "url(", "@import", "//cdn"):
        assert external not in page, external


def judged_numbers() -> dict:
    """scores.json of three numbers: "4" apart read right, "40" touching read right, "40"
    overlapping refused."""
    from pipelines.numbers import Number, judge, score
    from pipelines.segment import Box, Reading, digit_of

    def number(text, spacing):
        boxes = [(0, 15 * k, 20, 15 * k + 15) for k in range(len(text))]
        return Number(np.zeros((20, 15 * len(text)), np.float32), text, spacing, boxes)

    def right(n):
        probs = np.full(10, 0.01)
        return Reading(
            [
                digit_of(Box(*box), np.where(np.arange(10) == int(c), 0.91, probs), probs)
                for c, box in zip(n.text, n.boxes, strict=True)
            ]
        )

    apart, touching, overlapping = (
        number("4", "apart"),
        number("40", "touching"),
        number("40", "overlapping"),
    )
    return score(
        [
            judge(apart, right(apart)),
            judge(touching, right(touching)),
            judge(overlapping, None, "no digit at any cut"),
        ]
    )


def test_the_numbers_section_goes_before_the_lineage_with_its_figures(tmp_path: Path) -> None:
    worst = write_png(tmp_path / "worst.png", 90, 30, seed=9)
    section = render_numbers(judged_numbers(), worst)
    page = with_section(render_report(make_inputs(tmp_path)), section)
    assert re.findall(r"<h2 id='([^']+)'>", page) == [*SECTIONS[:-1], "numbers", "lineage"]
    numbers = page.split("id='numbers'")[1].split("<h2")[0]
    assert "3 numbers of 1 to 2 digits" in numbers
    assert "Whole-number accuracy 66.67%, per digit 60.00%, refused 33.33%" in numbers
    cells = r'<tr><td class="l">(\w+)</td><td class="">(\d+)</td><td class="">([\d.]+%)</td>'
    rows = re.findall(cells, numbers)
    assert rows == [
        ("apart", "1", "100.00%"),
        ("touching", "1", "100.00%"),
        ("overlapping", "1", "0.00%"),
    ]
    # by length: "4" apart is the only 1-digit number; the two others have 2 digits
    assert "<tr><td>1</td><td>100.00%</td><td></td><td></td></tr>" in numbers
    assert "<tr><td>2</td><td></td><td>100.00%</td><td>0.00%</td></tr>" in numbers
    assert [decode(src) for src in image_sources(numbers)] == [worst.read_bytes()]


def test_report_shows_tables_lineage_and_overrides(tmp_path: Path) -> None:
    page = render_report(make_inputs(tmp_path))
    # headline numbers, FGSM rows for each epsilon > 0, robustness table
    assert "30.00%" in page and "0.3000" in page and "0.0200" in page
    assert "accuracy under FGSM, eps 0.1" in page and "accuracy under FGSM, eps 0.2" in page
    assert "accuracy under FGSM, eps 0<" not in page
    assert "Accuracy on 20 test images" in page
    # per-class table: one row per digit
    per_class = page.split("id='per-class'")[1].split("<h2")[0]
    assert per_class.count("<tr>") == 1 + 10
    # the confused pairs, largest first, with share of the true digit
    pairs = page.split("id='pairs'")[1].split("<h2")[0]
    assert pairs.index("<td>4</td><td>9</td><td>10</td><td>100.00%</td>") < pairs.index(
        "<td>3</td><td>8</td><td>3</td><td>100.00%</td>"
    )
    # calibration: only the non-empty bins are listed
    calibration = page.split("id='calibration'")[1].split("<h2")[0]
    non_empty = int((calibration_table(hand_made_probs(), Y_TRUE, bins=10)["count"] > 0).sum())
    assert calibration.split("<table>")[1].count("<tr>") == 1 + non_empty
    assert "over 10 equal-width confidence bins" in calibration
    # lineage and overrides
    lineage = page.split("id='lineage'")[1]
    for key, value in {
        "git commit": "5f3e2d1c0b9a",
        "data version (md5 of data/dataset)": "d41d8cd98f00b204e9800998ecf8427e",
        "data source": "mnist",
    }.items():
        assert f"<td class='l'>{key}</td><td class='l'><code>{value}</code></td>" in lineage
    assert "<td class='l'>train.learning_rate</td><td class='l'>0.002</td>" in lineage
    assert "All 2 params of the training run" in lineage
    no_overrides = render_report(make_inputs(tmp_path, overrides={}))
    assert "none: params.yaml as it is" in no_overrides


def test_report_escapes_params_and_labels(tmp_path: Path) -> None:
    page = render_report(
        make_inputs(tmp_path, model_label="<b>bold</b> & co", gradcam_caption="a < b")
    )
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "<script" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page and "<b>bold</b>" not in page
    assert "<p>a &lt; b</p>" in page


def test_report_of_a_model_without_errors_says_so(tmp_path: Path) -> None:
    probs = np.eye(10)[Y_TRUE]
    result = evaluate_probabilities(probs, Y_TRUE, top_pairs=10)
    page = render_report(
        make_inputs(
            tmp_path,
            confused_pairs=result.confused_pairs,
            groups=error_groups(Y_TRUE, Y_TRUE, probs),
            confident_errors=most_confident_errors(Y_TRUE, Y_TRUE, probs, k=5),
        )
    )
    assert page.count("No test image is misclassified.") == 2
    assert len(image_sources(page)) == len(FIGURES)


# --- the champion comparison ---------------------------------------------------------------------


def headline(page: str) -> str:
    return page.split("id='headline'")[1].split("<h2")[0]


def test_report_without_a_champion_says_there_is_none(tmp_path: Path) -> None:
    part = headline(render_report(make_inputs(tmp_path, champion=None)))
    assert "There is no champion yet" in part
    assert "difference" not in part and "champion v" not in part


def test_report_compares_with_the_champion(tmp_path: Path) -> None:
    champion = {
        "version": "3",
        "run_id": "abcdef<1>",
        "same_run": False,
        "metrics": {
            "test_accuracy": 0.295,  # ours is 0.30: better, by half a point
            "test_loss": 0.35,  # ours is lower: better
            "test_ece": 0.01,  # ours is higher: worse
            "test_fgsm_accuracy_eps_0.1": 0.2,  # the same
            # no eps 0.2: the champion was evaluated before it was measured
        },
    }
    part = headline(render_report(make_inputs(tmp_path, champion=champion)))
    assert "Compared with the current champion, v3" in part
    assert "<code>abcdef&lt;1&gt;</code>" in part
    assert "<th>champion v3</th><th>difference</th>" in part
    rows = {re.search(r"<td class='l'>([^<]+)</td>", r).group(1): r for r in part.split("<tr>")[2:]}
    assert '<span class="better">+0.50 points</span>' in rows["test accuracy"]
    assert "29.50%" in rows["test accuracy"]
    assert '<span class="better">-0.0500</span>' in rows["test loss (cross-entropy)"]
    assert '<span class="worse">+0.0100</span>' in rows["expected calibration error"]
    assert "<td>same</td></tr>" in rows["accuracy under FGSM, eps 0.1"]
    assert "not measured" in rows["accuracy under FGSM, eps 0.2"]
    assert "<td></td></tr>" in rows["accuracy under FGSM, eps 0.2"]
    # a worse accuracy is marked so
    worse = dict(champion, metrics={**champion["metrics"], "test_accuracy": 0.31})
    part = headline(render_report(make_inputs(tmp_path, champion=worse)))
    assert '<span class="worse">-1.00 points</span>' in part


def test_report_of_the_champion_itself(tmp_path: Path) -> None:
    champion = {"version": "7", "run_id": "r", "same_run": True, "metrics": {"test_accuracy": 0.3}}
    part = headline(render_report(make_inputs(tmp_path, champion=champion)))
    assert "This model is the current champion (v7)." in part
    assert "difference" not in part and "points" not in part


def test_off_notice_lists_the_metrics_escaped() -> None:
    page = render_off_notice({"test_loss": 0.1, "test_accuracy": 0.99, "a<b": "x&y"})
    assert "evaluate.insight is false" in page
    items = re.findall(r"<li>(.*?)</li>", page)
    assert items == ["a&lt;b: x&amp;y", "test_accuracy: 0.99", "test_loss: 0.1"]
    assert "<img" not in page and "<script" not in page


# --- the page in a real headless Chromium --------------------------------------------------------


@needs_chromium
def test_report_renders_every_image_in_headless_chromium(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    page = render_report(inputs)
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")

    with headless_chromium() as driver:
        driver.get(path.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => "
            "[i.complete, i.naturalWidth, i.naturalHeight, i.className]);"
        )
        headings = driver.execute_script(
            "return Array.from(document.querySelectorAll('h2')).map(h => h.id);"
        )
        headline_text = driver.execute_script(
            "return document.querySelector('#headline ~ table').innerText;"
        )
    # every image decoded: complete and with its real size
    assert len(images) == page.count("<img") >= len(FIGURES) + expected_thumbnails(inputs)
    assert all(complete and width > 0 for complete, width, _, _ in images), images
    figures = [(w, h) for _, w, h, cls in images if cls == "fig"]
    assert figures == [(60 + 10 * i, 40 + 5 * i) for i in range(len(FIGURES))]
    assert all((w, h) == (28, 28) for _, w, h, cls in images if cls == "thumb")
    # one heading per section, and the headline table shows the accuracy
    assert headings == SECTIONS
    assert "test accuracy" in headline_text and "30.00%" in headline_text
