"""The evaluation report: one self-contained HTML page per trained model.

Everything a reviewer needs to judge a model, with no other file and no network: headline
metrics against the current champion, per-class metrics, the confusion matrix, the most confused
pairs with examples, the most confident errors, Grad-CAM, the error gallery, FGSM robustness,
calibration, and lineage (data version, git commit, params). Figures are embedded as PNG data
URIs. ``render_report`` is pure: it reads the figure files it is given and returns the page.

The numbers stage runs after evaluate, so its section (``render_numbers``: whole numbers read by
the segmentation, and the worst of them drawn with their boxes) is added to the page by the
register stage (``with_section``), before the version gets it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

EXAMPLES_PER_PAIR = 8  # thumbnails shown per confused pair

# (metric key, label, higher is better, shown as a percentage)
HEADLINE = [
    ("test_accuracy", "test accuracy", True, True),
    ("test_loss", "test loss (cross-entropy)", False, False),
    ("test_ece", "expected calibration error", False, False),
]

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px;
  border-bottom: 1px solid #ddd; padding-bottom: 3px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ddd;
  padding: 3px 8px; text-align: right; } th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.better { color: #0a7a2f; } .worse { color: #b3261e; } .muted { color: #777; }
img.fig { max-width: 100%; border: 1px solid #eee; } img.thumb { image-rendering: pixelated;
  width: 42px; height: 42px; margin: 1px; border: 1px solid #ccc; vertical-align: middle; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; } .card { border: 1px solid #ddd;
  border-radius: 6px; padding: 8px 14px; } .card b { font-size: 20px; display: block; }
details { margin: 8px 0; } code { background: #f4f4f4; padding: 0 3px; }
"""


@dataclass
class ReportInputs:
    """What the page shows. Paths are PNG files written by the evaluate stage."""

    model_label: str  # e.g. "run 1a2b... of experiment mnist-classifier"
    metrics: dict[str, float]  # test_accuracy, test_loss, test_ece, test_fgsm_accuracy_eps_<e>
    n_test: int
    per_class: pd.DataFrame  # digit, precision, recall, f1, support
    confused_pairs: pd.DataFrame  # true, predicted, count, share_of_true
    groups: list[tuple[int, int, np.ndarray]]  # misclassified indices per (true, predicted)
    confident_errors: pd.DataFrame  # index, true, predicted, confidence
    images: np.ndarray  # (N, 28, 28) uint8 test images (for the thumbnails)
    robustness: dict[float, float]  # epsilon -> accuracy; 0.0 = clean
    robustness_images: int
    calibration: pd.DataFrame  # lower, upper, count, confidence, accuracy
    figures: dict[str, Path]  # confusion, gradcam, errors, robustness, reliability
    gradcam_caption: str
    lineage: dict[str, str]  # git_commit, data_version, data_source, ...
    params: dict[str, str]  # the training run's params, flattened
    overrides: dict[str, object] = field(default_factory=dict)  # the tune stage's chosen overrides
    champion: dict | None = None  # {"version", "run_id", "metrics", "same_run"} or None
    generated_at: str = ""


def data_uri_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail(image: np.ndarray) -> str:
    """A 28x28 uint8 digit as a PNG data URI (shown enlarged, pixelated, by the CSS)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return data_uri_png(buffer.getvalue())


def _figure(path: Path, alt: str) -> str:
    return (
        f'<img class="fig" alt="{html.escape(alt)}" src="{data_uri_png(Path(path).read_bytes())}">'
    )


def _fmt(value: float | None, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span class="muted">not measured</span>'
    return f"{value:.2%}" if percent else f"{value:.4f}"


def _delta(ours: float | None, theirs: float | None, higher_better: bool, percent: bool) -> str:
    if ours is None or theirs is None:
        return ""
    diff = ours - theirs
    if diff == 0:
        return "same"
    better = (diff > 0) == higher_better
    shown = f"{100 * diff:+.2f} points" if percent else f"{diff:+.4f}"
    return f'<span class="{"better" if better else "worse"}">{shown}</span>'


def _table(frame: pd.DataFrame, formats: Mapping[str, str], left: tuple[str, ...] = ()) -> str:
    head = "".join(
        f'<th class="{"l" if c in left else ""}">{html.escape(str(c))}</th>' for c in frame
    )
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record, strict=True):
            text = formats.get(column, "{}").format(value)
            cells.append(f'<td class="{"l" if column in left else ""}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _headline(inputs: ReportInputs) -> str:
    champion = inputs.champion
    rows = list(HEADLINE) + [
        (f"test_fgsm_accuracy_eps_{e:g}", f"accuracy under FGSM, eps {e:g}", True, True)
        for e in sorted(inputs.robustness)
        if e > 0
    ]
    if champion is None:
        caption = (
            "There is no champion yet: the promotion gate compares against the accuracy floor."
        )
        head = "<tr><th class='l'>metric</th><th>this model</th></tr>"
    elif champion.get("same_run"):
        caption = f"This model is the current champion (v{champion['version']})."
        head = "<tr><th class='l'>metric</th><th>this model</th></tr>"
    else:
        caption = (
            f"Compared with the current champion, v{champion['version']} (run "
            f"<code>{html.escape(champion['run_id'])}</code>), as measured when it was evaluated. "
            "The register stage decides promotion on test accuracy (higher wins)."
        )
        head = (
            f"<tr><th class='l'>metric</th><th>this model</th><th>champion v{champion['version']}</th>"
            "<th>difference</th></tr>"
        )
    body = []
    for key, label, higher, percent in rows:
        ours = inputs.metrics.get(key)
        cells = f"<td class='l'>{label}</td><td>{_fmt(ours, percent)}</td>"
        if champion is not None and not champion.get("same_run"):
            theirs = champion["metrics"].get(key)
            cells += (
                f"<td>{_fmt(theirs, percent)}</td><td>{_delta(ours, theirs, higher, percent)}</td>"
            )
        body.append(f"<tr>{cells}</tr>")
    cards = "".join(
        f'<div class="card">{label}<b>{_fmt(inputs.metrics.get(key), percent)}</b></div>'
        for key, label, _, percent in rows
    )
    return f'<div class="cards">{cards}</div><p>{caption}</p><table>{head}{"".join(body)}</table>'


def _pairs(inputs: ReportInputs) -> str:
    examples = {(t, p): idx for t, p, idx in inputs.groups}
    if inputs.confused_pairs.empty:
        return "<p>No test image is misclassified.</p>"
    rows = []
    for row in inputs.confused_pairs.itertuples(index=False):
        idx = examples.get((int(row.true), int(row.predicted)), np.array([], dtype=int))
        thumbs = "".join(
            f'<img class="thumb" title="test #{i}" alt="test image {i}" src="{thumbnail(inputs.images[i])}">'
            for i in idx[:EXAMPLES_PER_PAIR]
        )
        rows.append(
            f"<tr><td>{int(row.true)}</td><td>{int(row.predicted)}</td><td>{int(row.count)}</td>"
            f"<td>{row.share_of_true:.2%}</td><td class='l'>{thumbs}</td></tr>"
        )
    return (
        "<table><tr><th>true</th><th>predicted</th><th>count</th><th>share of true digit</th>"
        f"<th class='l'>examples (most confident first)</th></tr>{''.join(rows)}</table>"
    )


def _confident(inputs: ReportInputs) -> str:
    if inputs.confident_errors.empty:
        return "<p>No test image is misclassified.</p>"
    rows = "".join(
        f'<tr><td><img class="thumb" alt="test image {int(r.index)}" src="{thumbnail(inputs.images[int(r.index)])}"></td>'
        f"<td>#{int(r.index)}</td><td>{int(r.true)}</td><td>{int(r.predicted)}</td><td>{r.confidence:.2%}</td></tr>"
        for r in inputs.confident_errors.itertuples(index=False)
    )
    return (
        "<table><tr><th>image</th><th>test index</th><th>true</th><th>predicted</th>"
        f"<th>confidence</th></tr>{rows}</table>"
    )


def render_report(inputs: ReportInputs) -> str:
    """The whole page as one HTML string."""
    esc = html.escape
    figures = inputs.figures
    robustness = pd.DataFrame(
        {"epsilon": list(inputs.robustness), "accuracy": list(inputs.robustness.values())}
    )
    calibration = inputs.calibration[inputs.calibration["count"] > 0]
    lineage_rows = "".join(
        f"<tr><td class='l'>{esc(k)}</td><td class='l'><code>{esc(str(v))}</code></td></tr>"
        for k, v in inputs.lineage.items()
    )
    overrides = (
        "".join(
            f"<tr><td class='l'>{esc(k)}</td><td class='l'>{esc(str(v))}</td></tr>"
            for k, v in inputs.overrides.items()
        )
        or "<tr><td class='l' colspan=2>none: params.yaml as it is</td></tr>"
    )
    params_rows = "".join(
        f"<tr><td class='l'>{esc(k)}</td><td class='l'>{esc(str(v))}</td></tr>"
        for k, v in sorted(inputs.params.items())
    )
    sections = [
        f"<h1>Evaluation report: {esc(inputs.model_label)}</h1>",
        f'<p class="muted">{inputs.n_test:,} test images. Generated {esc(inputs.generated_at)} '
        "by the evaluate stage (pipelines/evaluate.py).</p>",
        "<h2 id='headline'>Headline</h2>",
        _headline(inputs),
        "<h2 id='per-class'>Per class</h2>",
        _table(
            inputs.per_class,
            {"precision": "{:.4f}", "recall": "{:.4f}", "f1": "{:.4f}", "support": "{:,}"},
        ),
        "<h2 id='confusion'>Confusion matrix</h2>",
        _figure(figures["confusion"], "confusion matrix"),
        "<h2 id='pairs'>Most confused pairs</h2>",
        _pairs(inputs),
        "<h2 id='confident-errors'>Most confident errors</h2>",
        _confident(inputs),
        "<h2 id='gradcam'>Grad-CAM</h2>",
        f"<p>{esc(inputs.gradcam_caption)}</p>",
        _figure(figures["gradcam"], "Grad-CAM grid"),
        "<h2 id='errors'>Every misclassified image, by pair</h2>",
        _figure(figures["errors"], "misclassified gallery"),
        "<h2 id='robustness'>Robustness under FGSM</h2>",
        f"<p>Accuracy on {inputs.robustness_images:,} test images (a fixed, seeded sample) after one "
        "FGSM step of size epsilon on the [0, 1] pixel scale; epsilon 0 is the same images "
        "unperturbed.</p>",
        _table(robustness, {"epsilon": "{:g}", "accuracy": "{:.2%}"}),
        _figure(figures["robustness"], "robustness curve"),
        "<h2 id='calibration'>Calibration</h2>",
        f"<p>Expected calibration error {_fmt(inputs.metrics.get('test_ece'), False)} over "
        f"{len(inputs.calibration)} equal-width confidence bins (non-empty bins below).</p>",
        _table(
            calibration,
            {
                "lower": "{:.3f}",
                "upper": "{:.3f}",
                "count": "{:,}",
                "confidence": "{:.4f}",
                "accuracy": "{:.4f}",
            },
        ),
        _figure(figures["reliability"], "reliability diagram"),
        "<h2 id='lineage'>Lineage</h2>",
        f"<table>{lineage_rows}</table>",
        "<h3>Tuned overrides (data/tune/best_params.json)</h3>",
        f"<table>{overrides}</table>",
        f"<details><summary>All {len(inputs.params)} params of the training run</summary>"
        f"<table>{params_rows}</table></details>",
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Evaluation report: {esc(inputs.model_label)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(sections)}</body></html>\n"
    )


NUMBER_COLUMNS = {  # scores.json's keys, as the numbers section's table heads them
    "whole_accuracy": "whole accuracy",
    "digit_accuracy": "digit accuracy",
    "errors_cuts": "cut errors",
    "errors_classifier": "classifier errors",
}
SECTION_ANCHOR = "<h2 id='lineage'>"  # sections added later go before the lineage


def render_numbers(scores: dict, worst: Path) -> str:
    """The whole-numbers section, from the numbers stage's scores.json and worst.png."""
    overall = scores["all"]
    spacings = list(scores["by_spacing"])  # apart, touching, overlapping: as the stage wrote them
    spacing = pd.DataFrame([{"spacing": name, **scores["by_spacing"][name]} for name in spacings])
    columns = [
        "spacing",
        "numbers",
        "whole_accuracy",
        "digit_accuracy",
        "refused",
        "errors_cuts",
        "errors_classifier",
    ]
    lengths = sorted(scores["by_length"], key=int)
    by_both = scores["by_length_spacing"]
    head = "".join(f"<th>{name}</th>" for name in spacings)
    rows = "".join(
        f"<tr><td>{length}</td>"
        + "".join(
            f"<td>{_fmt(by_both[f'{length}_{name}']['whole_accuracy'], True)}</td>"
            if f"{length}_{name}" in by_both
            else "<td></td>"  # no number of that length and spacing
            for name in spacings
        )
        + "</tr>"
        for length in lengths
    )
    return "".join(
        [
            "<h2 id='numbers'>Whole numbers</h2>",
            f"<p>{overall['numbers']:,} numbers of 1 to {lengths[-1]} digits made from the test "
            "set's digits (scaled, jittered, slanted; apart, touching or overlapping), read by "
            "<code>pipelines/segment.py</code> with the served export, as "
            "<code>POST /predict/number</code> reads them. Whole-number accuracy "
            f"{_fmt(overall['whole_accuracy'], True)}, per digit "
            f"{_fmt(overall['digit_accuracy'], True)}, refused {_fmt(overall['refused'], True)}. "
            "An error is the cuts' when a drawn digit got no digit read or several, the "
            "classifier's when every digit got one and one was misread.</p>",
            _table(
                spacing[columns].rename(columns=NUMBER_COLUMNS),
                {
                    "whole accuracy": "{:.2%}",
                    "digit accuracy": "{:.2%}",
                    "refused": "{:.2%}",
                },
                left=("spacing",),
            ),
            "<h3>Whole-number accuracy by length</h3>",
            f"<table><tr><th>digits</th>{head}</tr>{rows}</table>",
            "<h3>The worst readings</h3>",
            "<p>The most confident wrong readings, then refusals, with the boxes read.</p>",
            _figure(worst, "the worst readings of whole numbers, with their boxes"),
        ]
    )


def with_section(page: str, section: str) -> str:
    """``page`` (``render_report``'s) with ``section`` added before its lineage, or at the end."""
    at = page.find(SECTION_ANCHOR)
    if at < 0:
        at = page.rfind("</body>")
    return page[:at] + section + page[at:]


def render_off_notice(metrics: dict) -> str:
    """The page written when ``evaluate.insight`` is false: headline numbers and where to look."""
    items = "".join(
        f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in sorted(metrics.items())
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Evaluation report "
        f"(insight off)</title><style>{CSS}</style></head><body><h1>Evaluation report</h1>"
        "<p>evaluate.insight is false in params.yaml: no Grad-CAM, error analysis, robustness or "
        f"calibration was computed. metrics.json:</p><ul>{items}</ul></body></html>\n"
    )
