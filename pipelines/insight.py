"""Looking inside a trained model: Grad-CAM, error analysis, FGSM robustness and calibration.

Pure functions for the evaluate stage (issue 6); nothing here parses arguments or logs to MLflow.
Image arguments take either the test-set convention, (N, 28, 28) uint8 in [0, 255], or the
model's own input, (N, 28, 28, 1) float32 in [0, 1] (``pipelines.model.to_model_input``).
The model is the Sequential CNN of ``pipelines.model.build_model``, as trained or as loaded from
a ``.keras`` file: Grad-CAM and FGSM read the pre-softmax logits from its final softmax Dense.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.adversarial import fgsm_batch, logits_function, signed_gradient
from pipelines.config import EvaluateParams
from pipelines.constants import IMAGE_SIDE, NUM_CLASSES
from pipelines.data import save_figure
from pipelines.scoring import confusion_matrix, most_confused_pairs

FIGURE_DPI = 90  # as evaluate.plot_confusion


def as_model_input(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) integers in [0, 255], or floats in [0, 1] with or without the channel axis,
    -> (N, 28, 28, 1) float32 in [0, 1]."""
    from pipelines.model import to_model_input

    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.integer):
        return to_model_input(images)
    x = images.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"expected images of shape (N, 28, 28) or (N, 28, 28, 1), got {x.shape}")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"float images must be the model's input in [0, 1], got values in "
            f"[{x.min():.3g}, {x.max():.3g}]; pass uint8 images in [0, 255] instead"
        )
    return x


def seeded_sample(n_total: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``size`` out of ``n_total`` (all if fewer)."""
    if size >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=size, replace=False))


def gradcam_selection(
    y_true: np.ndarray, y_pred: np.ndarray, n_correct: int, max_errors: int, seed: int
) -> np.ndarray:
    """Indices for the Grad-CAM grids: the misclassified images (the first ``max_errors`` by
    index), then a fixed, seeded sample of ``n_correct`` correctly classified ones."""
    wrong = np.flatnonzero(y_true != y_pred)[:max_errors]
    right = np.flatnonzero(y_true == y_pred)
    return np.concatenate([wrong, right[seeded_sample(len(right), n_correct, seed)]])


# --- the model's logits --------------------------------------------------------------------------


def last_conv_layer(model) -> str:
    """Name of the model's last Conv2D layer (Grad-CAM's default target)."""
    import keras

    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        raise ValueError(
            f"model {model.name!r} has no Conv2D layer; its layers are "
            f"{[layer.name for layer in model.layers]}"
        )
    return convs[-1]


# --- Grad-CAM ------------------------------------------------------------------------------------


def grad_cam(
    model, images: np.ndarray, batch_size: int, layer_name: str | None = None
) -> np.ndarray:
    """Grad-CAM heatmaps for each image's predicted digit, (N, 28, 28) float32 in [0, 1].

    Heat = ReLU(sum over channels of map * mean gradient of the predicted digit's logit over
    the map), on ``layer_name`` (default: the last Conv2D), resized bilinearly to the image and
    divided by its maximum per image (no positive evidence anywhere: all zeros). One tape per
    batch, no loop over images. The resize stretches the map over the whole image, as Grad-CAM
    does; with valid padding the cells' receptive fields are centred on a smaller central square
    (the 3x3 map of conv3 on rows/columns 8.5 to 16.5), so the heat is placed coarsely.
    """
    import tensorflow as tf

    x = as_model_input(images)  # (N, 28, 28, 1)
    run = logits_function(model, layer_name or last_conv_layer(model))
    heat = []
    for lo in range(0, len(x), batch_size):
        batch = tf.constant(x[lo : lo + batch_size])
        with tf.GradientTape() as tape:
            features, logits = run(batch)  # (B, h, w, C), (B, 10)
            # Images do not interact in inference mode: the sum's gradient is per image.
            score = tf.reduce_sum(tf.gather(logits, tf.argmax(logits, axis=1), batch_dims=1))
        weights = tf.reduce_mean(tape.gradient(score, features), axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1, keepdims=True))  # (B, h, w, 1)
        heat.append(tf.image.resize(cam, x.shape[1:3], method="bilinear")[..., 0].numpy())
    heat = np.concatenate(heat) if heat else np.zeros((0, *x.shape[1:3]), np.float32)
    peak = heat.max(axis=(1, 2), keepdims=True)  # (N, 1, 1)
    heat = np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0)
    return np.clip(np.nan_to_num(heat), 0.0, 1.0).astype(np.float32)


# --- figures -------------------------------------------------------------------------------------


def _gray(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28[, 1]) uint8 or [0, 1] float -> (N, 28, 28) float in [0, 1]."""
    return as_model_input(images)[..., 0]


def _mosaic(tiles: np.ndarray, cols: int, pad: int) -> np.ndarray:
    """(N, h, w, 3) tiles -> one white (rows*(h+pad), cols*(w+pad), 3) sheet, row-major; each
    tile sits at the bottom of its cell, leaving ``pad`` pixels above it for a caption."""
    n, h, w, _ = tiles.shape
    rows = max(1, -(-n // cols))
    sheet = np.ones((rows * (h + pad), cols * (w + pad), 3), dtype=np.float32)
    for i in range(n):
        top, left = _cell_origin(i, cols, h, w, pad)
        sheet[top + pad : top + pad + h, left + pad // 2 : left + pad // 2 + w] = tiles[i]
    return sheet


def _cell_origin(i: int, cols: int, h: int, w: int, pad: int) -> tuple[int, int]:
    """(top, left) sheet pixel of cell ``i``."""
    r, c = divmod(i, cols)
    return r * (h + pad), c * (w + pad)


def _sheet_figure(sheet: np.ndarray, inch_per_px: float, title: str, left_in: float = 0.05):
    """A figure holding ``sheet`` at a fixed scale, a title above and ``left_in`` inches for
    labels on the left. Axes placed by hand: tight_layout would draw the figure twice."""
    import matplotlib.pyplot as plt

    h_in, w_in = sheet.shape[0] * inch_per_px, sheet.shape[1] * inch_per_px
    width, height = max(left_in + w_in + 0.05, 4.0), h_in + 0.35
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((left_in / width, 0.02 / height, w_in / width, h_in / height))
    ax.imshow(sheet, interpolation="nearest")
    fig.text(0.5, 1 - 0.06 / height, title, ha="center", va="top", fontsize=9)
    return fig, ax


def _caption(ax, cell: int, cols: int, pad: int, text: str, **style) -> None:
    """A caption centred above the ``cell``-th 28x28 tile of a ``_mosaic``."""
    top, left = _cell_origin(cell, cols, IMAGE_SIDE, IMAGE_SIDE, pad)
    ax.text(left + pad // 2 + 13.5, top + pad - 1, text, ha="center", va="bottom", **style)


def overlay_grid(
    images: np.ndarray,
    heatmaps: np.ndarray,
    true: np.ndarray,
    pred: np.ndarray,
    confidence: np.ndarray,
    path: Path,
    cols: int = 8,
    title: str = "Grad-CAM",
) -> None:
    """One PNG grid: each cell is the digit under its heatmap, titled "true t / pred p (conf%)"
    (red where wrong). ``confidence`` is the probability of the predicted digit."""
    import matplotlib

    matplotlib.use("Agg")

    gray = _gray(images)[..., np.newaxis]  # (N, 28, 28, 1)
    colour = matplotlib.colormaps["jet"](np.asarray(heatmaps))[..., :3]  # (N, 28, 28, 3)
    tiles = 0.55 * gray + 0.45 * colour  # the ink stays visible under the heat
    cols, pad = max(1, min(cols, len(tiles))), 8
    fig, ax = _sheet_figure(_mosaic(tiles, cols, pad), 1.45 / (IMAGE_SIDE + pad), title)
    for i, (t, p, c) in enumerate(zip(true, pred, confidence, strict=True)):
        text = f"true {int(t)} / pred {int(p)} ({float(c):.0%})"
        _caption(ax, i, cols, pad, text, fontsize=6.5, color="black" if t == p else "red")
    ax.set_axis_off()
    save_figure(fig, Path(path), dpi=FIGURE_DPI)


# --- error analysis ------------------------------------------------------------------------------


def error_groups(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray
) -> list[tuple[int, int, np.ndarray]]:
    """Misclassified images as (true, predicted, indices): pairs in evaluate's most-confused
    order (count, then digits), indices within a pair by confidence, most confident first."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n = max(NUM_CLASSES, probs.shape[1])
    pairs = most_confused_pairs(confusion_matrix(y_true, y_pred, n), top=n * n)
    confidence = probs[np.arange(len(y_pred)), y_pred]
    groups = []
    for t, p in zip(pairs["true"], pairs["predicted"], strict=True):
        idx = np.flatnonzero((y_true == t) & (y_pred == p))
        groups.append((int(t), int(p), idx[np.argsort(-confidence[idx], kind="stable")]))
    return groups


def most_confident_errors(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, k: int
) -> pd.DataFrame:
    """The ``k`` misclassified images the model was surest of: index, true, predicted,
    confidence (the probability of the predicted digit), most confident first, ties by index."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    wrong = np.flatnonzero(y_true != y_pred)
    confidence = probs[wrong, y_pred[wrong]]
    order = np.argsort(-confidence, kind="stable")[:k]  # stable: ties keep index order
    return pd.DataFrame(
        {
            "index": wrong[order],
            "true": y_true[wrong[order]],
            "predicted": y_pred[wrong[order]],
            "confidence": confidence[order].astype(float),
        }
    )


def misclassified_gallery(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    path: Path,
    max_per_pair: int = 20,
) -> list[tuple[int, int, np.ndarray]]:
    """One PNG of the misclassified images: a row per (true, predicted) pair, largest pair on
    top, at most ``max_per_pair`` images a row (the most confident), each captioned with its
    test index and confidence. Returns ``error_groups`` (all indices, not only those drawn)."""
    import matplotlib

    matplotlib.use("Agg")

    groups = error_groups(y_true, y_pred, probs)
    gray = _gray(images)
    cols = max(1, min(max_per_pair, max((len(idx) for *_, idx in groups), default=1)))
    rows = max(1, len(groups))
    tiles = np.ones(
        (rows * cols, IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.float32
    )  # white where a row is short
    captions = []
    for r, (_, p, idx) in enumerate(groups):
        shown = idx[:max_per_pair]
        tiles[r * cols : r * cols + len(shown)] = gray[shown, ..., np.newaxis]
        captions += [(r, c, i, probs[i, p]) for c, i in enumerate(shown)]
    pad = 8
    n_wrong = sum(len(idx) for *_, idx in groups)
    fig, ax = _sheet_figure(
        _mosaic(tiles, cols, pad),
        0.9 / (IMAGE_SIDE + pad),
        f"{n_wrong} misclassified of {len(y_true)} (true as predicted: count)",
        left_in=1.3,
    )
    for r, c, i, conf in captions:
        _caption(ax, r * cols + c, cols, pad, f"#{i} {conf:.0%}", fontsize=6)
    ax.set_yticks([r * (IMAGE_SIDE + pad) + pad + (IMAGE_SIDE - 1) / 2 for r in range(len(groups))])
    ax.set_yticklabels(
        [
            f"{t} as {p}: {len(idx)}"
            + (f" (top {max_per_pair})" if len(idx) > max_per_pair else "")
            for t, p, idx in groups
        ],
        fontsize=7,
    )
    ax.tick_params(length=0)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(fig, Path(path), dpi=FIGURE_DPI)
    return groups


# --- FGSM ----------------------------------------------------------------------------------------


def _check_labels(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) int64 labels, one per image, or a ValueError that says both lengths."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(x),):
        raise ValueError(f"expected {len(x)} labels (one per image), got shape {labels.shape}")
    return labels


def _batch_signature(x: np.ndarray):
    """tf.function signature (images, labels) with a free batch size: one trace per call."""
    import tensorflow as tf

    return [
        tf.TensorSpec((None, *x.shape[1:]), tf.float32),
        tf.TensorSpec((None,), tf.int64),
    ]


def fgsm(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    epsilons: list[float],
    batch_size: int,
) -> dict[float, float]:
    """Accuracy under FGSM for each epsilon: x_adv = clip(x + eps * sign(grad_x loss), 0, 1).

    The gradient is taken once per batch and reused for every epsilon; eps is on the [0, 1]
    pixel scale. The loss is the cross-entropy of the logits (``pipelines.adversarial``). The batch
    step is a tf.function, faster than eager on CPU for the price of one tracing per call
    (autograph off: the step has no Python control flow to convert).
    """
    import tensorflow as tf

    x = as_model_input(images)
    labels = _check_labels(x, labels)
    run = logits_function(model)
    epsilons = [float(eps) for eps in epsilons]

    @tf.function(input_signature=_batch_signature(x), autograph=False)
    def correct_per_eps(batch, y):
        sign = signed_gradient(run, batch, y)
        # every epsilon in one forward pass: (E*B, 28, 28, 1), epsilon-major
        adversarial = tf.concat([tf.clip_by_value(batch + e * sign, 0.0, 1.0) for e in epsilons], 0)
        (logits,) = run(adversarial)
        hits = tf.argmax(logits, axis=1) == tf.tile(y, [len(epsilons)])
        return tf.reduce_sum(tf.cast(tf.reshape(hits, (len(epsilons), -1)), tf.int64), axis=1)

    correct = np.zeros(len(epsilons), dtype=np.int64)
    for lo in range(0, len(x), batch_size):
        correct += correct_per_eps(x[lo : lo + batch_size], labels[lo : lo + batch_size]).numpy()
    return {eps: float(n) / max(1, len(x)) for eps, n in zip(epsilons, correct, strict=True)}


def fgsm_examples(
    model, images: np.ndarray, labels: np.ndarray, eps: float, batch_size: int
) -> np.ndarray:
    """FGSM-perturbed copies of ``images``, (N, 28, 28, 1) float32 in [0, 1] (model input)."""
    import tensorflow as tf

    x = as_model_input(images)
    labels = _check_labels(x, labels)
    run = logits_function(model)

    @tf.function(input_signature=_batch_signature(x), autograph=False)
    def perturb(batch, y):
        return fgsm_batch(run, batch, y, eps)

    out = np.empty_like(x)
    for lo in range(0, len(x), batch_size):
        out[lo : lo + batch_size] = perturb(x[lo : lo + batch_size], labels[lo : lo + batch_size])
    return out


# --- calibration ---------------------------------------------------------------------------------


def calibration_table(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per equal-width confidence bin (lower, upper]: count, mean confidence and accuracy of the
    top prediction (NaN in an empty bin). Confidence 0 falls in the first bin, 1 in the last."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")  # (lower, upper]
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    return pd.DataFrame(
        {
            "lower": edges[:-1],
            "upper": edges[1:],
            "count": count,
            "confidence": mean_conf,
            "accuracy": accuracy,
        }
    )


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over confidence bins of (share of images) * |accuracy - mean confidence|."""
    table = calibration_table(probs, y_true, bins)
    used = table[table["count"] > 0]
    gap = (used["accuracy"] - used["confidence"]).abs()
    return float((used["count"] * gap).sum() / max(1, table["count"].sum()))


def reliability_diagram(probs: np.ndarray, y_true: np.ndarray, path: Path, bins: int = 15) -> None:
    """PNG: accuracy per confidence bin (bars; mean confidence as red dots) against the
    diagonal, and below it the count of images per bin, on a log scale (MNIST's images crowd
    into the last bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = calibration_table(probs, y_true, bins)
    ece = expected_calibration_error(probs, y_true, bins)
    width = 1.0 / bins
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    used = table["count"] > 0
    top.bar(
        table["lower"][used],
        table["accuracy"][used],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="accuracy",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.plot(table["confidence"][used], table["accuracy"][used], "o", color="tab:red", ms=3)
    top.set_ylim(0, 1.05)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability: ECE {ece:.4f} over {bins} bins (n={int(table['count'].sum())})")
    top.legend(loc="upper left", fontsize=7)
    bottom.bar(table["lower"], table["count"], width=width, align="edge", color="gray")
    for row in table[used].itertuples(index=False):
        bottom.text(row.lower + width / 2, row.count, str(row.count), ha="center", fontsize=6)
    bottom.set_yscale("symlog")
    bottom.set_ylim(0, max(10.0, 8.0 * float(table["count"].max())))
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (probability of the predicted digit)")
    bottom.set_ylabel("images")
    fig.subplots_adjust(left=0.13, right=0.97, top=0.94, bottom=0.09, hspace=0.08)
    save_figure(fig, Path(path), dpi=FIGURE_DPI)


def robustness_curve(accuracy: dict[float, float], n_images: int, path: Path) -> None:
    """PNG: accuracy against FGSM epsilon (0 = clean), with each point's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps, acc = zip(*sorted(accuracy.items()), strict=True)
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.plot(eps, acc, "o-", color="tab:red")
    for e, a in zip(eps, acc, strict=True):
        ax.annotate(f"{a:.1%}", (e, a), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("FGSM epsilon (pixel scale 0-1)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"robustness under FGSM (n={n_images})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.13, right=0.96, top=0.9, bottom=0.15)
    save_figure(fig, Path(path), dpi=FIGURE_DPI)


# --- the evaluate stage's insight, in one call ----------------------------------------------------


@dataclass(frozen=True)
class Insight:
    """What ``analyse`` found; its figures and tables are files in ``out``."""

    out: Path
    gradcam_layer: str
    gradcam_indices: np.ndarray  # test indices in the Grad-CAM grid, errors first
    groups: list[tuple[int, int, np.ndarray]]  # error_groups
    confident_errors: pd.DataFrame  # most_confident_errors
    robustness: dict[float, float]  # epsilon -> accuracy on the FGSM sample; 0.0 = clean
    robustness_images: int
    calibration: pd.DataFrame  # calibration_table
    ece: float

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow and metrics.json."""
        flat = {"ece": self.ece}
        flat.update({f"fgsm_accuracy_eps_{e:g}": a for e, a in self.robustness.items() if e > 0})
        return flat


def analyse(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    params: EvaluateParams,
    out: Path,
) -> Insight:
    """Grad-CAM grid, error gallery and tables, FGSM robustness and calibration of ``model`` on the
    test set (``probs``: its predicted probabilities). Writes into ``out``: gradcam.png,
    errors.png, misclassified.csv, confident_errors.csv, robustness.png, robustness.csv,
    reliability.png, calibration.csv."""
    from pipelines.data import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(len(predicted)), predicted]

    # FGSM (TensorFlow, which releases the GIL) runs on a thread while the figures below are
    # drawn (matplotlib, single-threaded).
    sample = seeded_sample(len(images), params.fgsm_images or len(images), params.seed)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgsm")
    attack = pool.submit(
        fgsm, model, images[sample], labels[sample], params.fgsm_epsilons, params.insight_batch_size
    )
    pool.shutdown(wait=False)

    layer = last_conv_layer(model)
    pick = gradcam_selection(
        labels, predicted, params.gradcam_correct, params.gradcam_errors, params.seed
    )
    n_wrong = int((labels[pick] != predicted[pick]).sum())
    overlay_grid(
        images[pick],
        grad_cam(model, images[pick], params.insight_batch_size, layer),
        labels[pick],
        predicted[pick],
        confidence[pick],
        out / "gradcam.png",
        title=f"Grad-CAM on {layer}: {n_wrong} misclassified, then {len(pick) - n_wrong} correct "
        f"(seeded sample); red captions are errors",
    )

    groups = misclassified_gallery(
        images, labels, predicted, probs, out / "errors.png", params.gallery_per_pair
    )
    rows = [
        {"index": int(i), "true": t, "predicted": p, "confidence": float(confidence[i])}
        for t, p, idx in groups
        for i in idx
    ]
    frame = pd.DataFrame(rows, columns=["index", "true", "predicted", "confidence"])
    atomic_write_text(out / "misclassified.csv", frame.to_csv(index=False, float_format="%.6f"))
    confident = most_confident_errors(labels, predicted, probs, params.confident_errors)
    atomic_write_text(
        out / "confident_errors.csv", confident.to_csv(index=False, float_format="%.6f")
    )

    calibration = calibration_table(probs, labels, params.calibration_bins)
    ece = expected_calibration_error(probs, labels, params.calibration_bins)
    reliability_diagram(probs, labels, out / "reliability.png", params.calibration_bins)
    atomic_write_text(out / "calibration.csv", calibration.to_csv(index=False, float_format="%.6f"))

    robustness = {0.0: float((predicted[sample] == labels[sample]).mean())}
    robustness.update(attack.result())
    robustness_curve(robustness, len(sample), out / "robustness.png")
    atomic_write_text(
        out / "robustness.csv",
        pd.DataFrame({"epsilon": list(robustness), "accuracy": list(robustness.values())}).to_csv(
            index=False, float_format="%.6f"
        ),
    )
    return Insight(
        out=out,
        gradcam_layer=layer,
        gradcam_indices=pick,
        groups=groups,
        confident_errors=confident,
        robustness=robustness,
        robustness_images=len(sample),
        calibration=calibration,
        ece=ece,
    )
