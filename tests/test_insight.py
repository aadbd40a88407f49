"""Insight (issue 6): Grad-CAM, error analysis, FGSM and calibration, on hand-made numbers, a
hand-built network whose answer is known, and a tiny CNN trained for a moment on strokes."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from pipelines.config import ModelParams
from pipelines.insight import (
    as_model_input,
    calibration_table,
    error_groups,
    expected_calibration_error,
    fgsm,
    fgsm_examples,
    grad_cam,
    gradcam_selection,
    last_conv_layer,
    misclassified_gallery,
    most_confident_errors,
    overlay_grid,
    reliability_diagram,
    seeded_sample,
)
from pipelines.model import build_model, predict_probabilities, to_model_input
from pipelines.scoring import confusion_matrix, most_confused_pairs

EPSILONS = [0.0, 0.05, 0.1, 0.2, 0.3]
BATCH = 64  # images per gradient pass in these tests


def oriented_strokes(n: int, seed: int, classes: int = 4, length: float = 10.0):
    """(n, 28, 28) uint8 strokes, class k drawn at angle k * 180/classes degrees, anywhere in the
    middle of the image. conftest's make_arrays labels its strokes by position in the array, so a
    model can only memorise them; here the ink is the evidence, and it moves from image to image.
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.float32)
    for i, label in enumerate(labels):
        angle = np.pi * label / classes
        row, col = rng.uniform(8, 20, size=2)
        for t in np.linspace(-length / 2, length / 2, 30):
            r, c = int(round(row + t * np.sin(angle))), int(round(col + t * np.cos(angle)))
            images[i, r, c] = 1.0
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):  # a soft 2-pixel pen, as conftest's
                images[i, r + dr, c + dc] = max(images[i, r + dr, c + dc], 0.5)
    return (images * rng.uniform(180, 255, size=(n, 1, 1))).astype(np.uint8), labels


@pytest.fixture(scope="module")
def trained() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """A small CNN of the project's architecture that has learned the strokes (about 3 s):
    (model, test images, test labels). 100% on held-out strokes with seed 0."""
    from pipelines.train import recalibrate_batchnorm

    x_train, y_train = oriented_strokes(400, seed=0)
    x_test, y_test = oriented_strokes(100, seed=100)
    keras.utils.set_random_seed(0)
    model = build_model(
        ModelParams(conv1_filters=16, conv2_filters=16, kernel_size=3, dense_units=32, dropout=0.0)
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(to_model_input(x_train), y_train, epochs=5, batch_size=32, verbose=0)
    # Five epochs leave BatchNorm's moving statistics far from the data (inference mode scores
    # poorly on the training images themselves); the training stage recomputes them the same way.
    recalibrate_batchnorm(model, x_train)
    accuracy = (predict_probabilities(model, x_test, 100).argmax(axis=1) == y_test).mean()
    assert accuracy >= 0.95, f"the fixture model did not learn the strokes: {accuracy:.2f}"
    return model, x_test, y_test


def ink_check(heat: np.ndarray, images: np.ndarray) -> tuple[float, float]:
    """(share of images whose mean heat on ink beats that off ink, mean heat on ink / off ink)."""
    ink = images > 0
    on = np.array([h[m].mean() for h, m in zip(heat, ink, strict=True)])
    off = np.array([h[~m].mean() for h, m in zip(heat, ink, strict=True)])
    return float((on > off).mean()), float(on.mean() / off.mean())


def is_png_with_content(path: Path, min_bytes: int = 5_000) -> bool:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    return (
        path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        and path.stat().st_size >= min_bytes
        and float(pixels.std()) > 0.01
    )


# --- Grad-CAM ------------------------------------------------------------------------------------


def ink_detector() -> keras.Model:
    """By construction: the one conv channel is the image itself and only digit 0's logit reads
    it (mean ink), so Grad-CAM for the predicted 0 must be the image scaled to a peak of 1."""
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(1, 1, activation="relu", name="ink"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ]
    )
    model.get_layer("ink").set_weights([np.ones((1, 1, 1, 1)), np.zeros(1)])
    kernel = np.zeros((1, 10))
    kernel[0, 0] = 1.0
    model.get_layer("probs").set_weights([kernel, np.zeros(10)])
    return model


def test_grad_cam_of_an_ink_detector_is_the_ink() -> None:
    # given a network whose last conv map is the image and whose digit 0 sums the ink
    images = oriented_strokes(6, seed=1)[0]
    # when
    heat = grad_cam(ink_detector(), images, BATCH)
    # then the heatmap is exactly the image, scaled to a peak of 1
    expected = images / images.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(heat, expected, atol=1e-6)


def test_grad_cam_shape_range_and_default_layer(trained) -> None:
    model, images, _ = trained
    heat = grad_cam(model, images[:10], BATCH)
    assert last_conv_layer(model) == "conv2"
    assert heat.shape == (10, 28, 28) and heat.dtype == np.float32
    assert np.isfinite(heat).all()
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert np.allclose(heat.max(axis=(1, 2)), 1.0)  # each map is scaled to its own peak
    # the same maps from the model input (float, with the channel axis), batch by batch
    np.testing.assert_allclose(grad_cam(model, to_model_input(images[:10]), 3), heat, atol=1e-5)


def test_grad_cam_concentrates_on_the_ink_of_a_trained_model(trained) -> None:
    # given a model that tells stroke orientations apart, wherever the stroke is
    model, images, _ = trained
    # when
    heat = grad_cam(model, images, BATCH)
    # then its heat lies on the ink, image by image (0.92 and 3.6 with this seed)
    share, ratio = ink_check(heat, images)
    assert share >= 0.75 and ratio >= 2.0, (share, ratio)
    # ... and not because both sit in the middle: another image's heatmap fits far worse
    # (0.71, 2.25), as do a constant map (0, 1) and noise (0.52, 1.0)
    assert ink_check(np.roll(heat, 1, axis=0), images)[1] < 0.8 * ratio
    assert ink_check(np.full_like(heat, 0.5), images) == (0.0, pytest.approx(1.0))
    noise = np.random.default_rng(0).random(heat.shape)
    assert ink_check(noise, images)[1] == pytest.approx(1.0, abs=0.1)


def test_grad_cam_works_on_a_model_loaded_from_keras_file(trained, tmp_path: Path) -> None:
    # given the model saved and loaded back, as the evaluate stage gets it
    model, images, _ = trained
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    # then the loaded copy gives the same heatmaps, on any named conv layer
    np.testing.assert_allclose(
        grad_cam(loaded, images[:8], BATCH), grad_cam(model, images[:8], BATCH), atol=1e-5
    )
    assert grad_cam(loaded, images[:8], BATCH, layer_name="conv1").shape == (8, 28, 28)
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        grad_cam(loaded, images[:2], BATCH, layer_name="conv9")


def test_overlay_grid_writes_one_png(trained, tmp_path: Path) -> None:
    model, images, labels = trained
    probs = predict_probabilities(model, images[:12], 100)
    path = tmp_path / "gradcam.png"
    overlay_grid(
        images[:12],
        grad_cam(model, images[:12], BATCH),
        labels[:12],
        probs.argmax(axis=1),
        probs.max(axis=1),
        path,
    )
    assert is_png_with_content(path)
    assert [p.name for p in tmp_path.iterdir()] == ["gradcam.png"]  # no temporary file left


def test_gradcam_selection_takes_errors_then_a_seeded_sample() -> None:
    y_true = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    y_pred = np.array([0, 7, 2, 3, 9, 5, 6, 7, 8, 9])  # wrong at 1 and 4
    chosen = gradcam_selection(y_true, y_pred, n_correct=3, max_errors=5, seed=0)
    assert chosen[:2].tolist() == [1, 4]
    assert len(chosen) == 5 and set(chosen[2:]) <= {0, 2, 3, 5, 6, 7, 8, 9}
    assert chosen.tolist() == gradcam_selection(y_true, y_pred, 3, 5, seed=0).tolist()
    assert gradcam_selection(y_true, y_pred, n_correct=0, max_errors=1, seed=0).tolist() == [1]
    assert seeded_sample(5, 10, seed=3).tolist() == [0, 1, 2, 3, 4]
    sample = seeded_sample(1000, 10, seed=3)
    assert len(set(sample)) == 10 and (np.diff(sample) > 0).all()


# --- error analysis ------------------------------------------------------------------------------

# 10 images: 4 taken for 9 three times, 3 for 8 twice, 7 for 1 and 2 for 7 once each, 3 right.
Y_TRUE = np.array([4, 3, 4, 7, 3, 4, 2, 5, 1, 2])
Y_PRED = np.array([9, 8, 9, 1, 8, 9, 7, 5, 1, 2])
CONFIDENCE = np.array([0.6, 0.7, 0.95, 0.55, 0.99, 0.8, 0.7, 0.9, 0.97, 0.5])


def hand_made_probs() -> np.ndarray:
    """(10, 10): the predicted digit gets CONFIDENCE, the rest is spread evenly."""
    probs = np.tile(((1 - CONFIDENCE) / 9)[:, None], (1, 10))
    probs[np.arange(10), Y_PRED] = CONFIDENCE
    return probs


def test_error_groups_follow_the_confused_pairs_table() -> None:
    groups = error_groups(Y_TRUE, Y_PRED, hand_made_probs())
    # largest pair first, ties by true digit, images by confidence within a pair
    assert [(t, p, idx.tolist()) for t, p, idx in groups] == [
        (4, 9, [2, 5, 0]),
        (3, 8, [4, 1]),
        (2, 7, [6]),
        (7, 1, [3]),
    ]
    # the same order as evaluate's most-confused-pairs table (reused, not rewritten)
    table = most_confused_pairs(confusion_matrix(Y_TRUE, Y_PRED), top=100)
    assert [(t, p) for t, p, _ in groups] == list(
        zip(table["true"], table["predicted"], strict=True)
    )


def test_most_confident_errors_by_hand() -> None:
    frame = most_confident_errors(Y_TRUE, Y_PRED, hand_made_probs(), k=3)
    assert list(frame.columns) == ["index", "true", "predicted", "confidence"]
    assert frame[["index", "true", "predicted"]].values.tolist() == [
        [4, 3, 8],
        [2, 4, 9],
        [5, 4, 9],
    ]
    np.testing.assert_allclose(frame["confidence"], [0.99, 0.95, 0.8])
    # ties keep index order; k past the number of errors returns them all; none: empty
    tied = most_confident_errors(Y_TRUE, Y_PRED, np.full((10, 10), 0.1), k=10)
    assert tied["index"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    empty = most_confident_errors(Y_TRUE, Y_TRUE, hand_made_probs(), k=5)
    assert empty.empty and list(empty.columns) == list(frame.columns)


def test_misclassified_gallery_writes_every_group(tmp_path: Path) -> None:
    images = oriented_strokes(10, seed=2)[0]
    path = tmp_path / "errors.png"
    groups = misclassified_gallery(images, Y_TRUE, Y_PRED, hand_made_probs(), path, max_per_pair=2)
    assert is_png_with_content(path)
    # the cap limits the drawing, not what is returned
    assert [len(idx) for *_, idx in groups] == [3, 2, 1, 1]
    # a perfect model still gets a (nearly empty) page
    misclassified_gallery(images, Y_TRUE, Y_TRUE, hand_made_probs(), tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 0


# --- FGSM ----------------------------------------------------------------------------------------


def test_fgsm_at_zero_is_clean_accuracy_and_falls_with_epsilon(trained) -> None:
    model, images, labels = trained
    clean = float((predict_probabilities(model, images, 100).argmax(axis=1) == labels).mean())
    # batch 32: several batches and a short last one
    accuracy = fgsm(model, images, labels, EPSILONS, batch_size=32)
    assert list(accuracy) == EPSILONS
    assert accuracy[0.0] == clean
    values = [accuracy[eps] for eps in EPSILONS]
    # FGSM is not monotone by theorem; on a trained model it is in practice
    assert all(b <= a for a, b in zip(values[:-1], values[1:], strict=True)), accuracy
    assert accuracy[0.3] < clean - 0.3, accuracy  # the attack bites (1.0 -> 0.16 here)


def test_fgsm_examples_stay_within_epsilon_and_the_pixel_range(trained) -> None:
    model, images, labels = trained
    eps = 0.1
    adversarial = fgsm_examples(model, images, labels, eps, batch_size=32)
    x = to_model_input(images)
    assert adversarial.shape == x.shape and adversarial.dtype == np.float32
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    step = np.abs(adversarial - x)
    assert step.max() <= eps + 1e-6
    assert (np.isclose(step, eps, atol=1e-6)).mean() > 0.2  # most unclipped pixels move by eps
    # they are the images fgsm() scores
    adversarial_accuracy = (
        np.asarray(model.predict(adversarial, verbose=0)).argmax(axis=1) == labels
    ).mean()
    scored = fgsm(model, images, labels, [eps], batch_size=32)[eps]
    assert adversarial_accuracy == pytest.approx(scored)


def test_fgsm_refuses_mismatched_labels_and_unscaled_floats(trained) -> None:
    model, images, labels = trained
    with pytest.raises(ValueError, match="expected 10 labels"):
        fgsm(model, images[:10], labels[:9], [0.1], BATCH)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        as_model_input(images.astype(np.float32))  # 0-255 floats are not the model's input


# --- calibration ---------------------------------------------------------------------------------


def probs_for(confidence: list[float], predicted: list[int]) -> np.ndarray:
    """(N, 10) rows whose top digit is ``predicted`` with probability ``confidence``."""
    confidence = np.asarray(confidence, dtype=float)
    probs = np.tile(((1 - confidence) / 9)[:, None], (1, 10))
    probs[np.arange(len(confidence)), predicted] = confidence
    return probs


def test_ece_of_calibrated_predictions_is_zero() -> None:
    # sure and always right
    y = np.arange(10) % 10
    assert expected_calibration_error(probs_for([1.0] * 10, y), y) == 0.0
    # 80% sure and right 4 times in 5
    probs = probs_for([0.8] * 5, [1, 1, 1, 1, 1])
    assert expected_calibration_error(probs, np.array([1, 1, 1, 1, 2])) == pytest.approx(0.0)


def test_ece_by_hand() -> None:
    # given 10 bins: two at 0.95 (one right), one right at 0.65, one right at 0.35
    probs = probs_for([0.95, 0.95, 0.65, 0.35], [3, 3, 5, 7])
    y_true = np.array([3, 4, 5, 7])
    # then ECE = 2/4 * |0.5 - 0.95| + 1/4 * |1 - 0.65| + 1/4 * |1 - 0.35|
    expected = 0.5 * 0.45 + 0.25 * 0.35 + 0.25 * 0.65
    assert expected_calibration_error(probs, y_true, bins=10) == pytest.approx(expected)
    # and a wrong, sure prediction costs its full confidence
    assert expected_calibration_error(probs_for([1.0], [0]), np.array([1])) == 1.0


def test_calibration_bins_are_closed_on_the_right() -> None:
    # confidence on the edges of 10 bins: 0.5 and 0.6 (0.6000000000000001 in linspace) belong to
    # the bins they close, 1.0 to the last; 0.1 (the least a top digit of 10 can have) to the first
    probs = probs_for([0.5, 0.6, 1.0, 0.1], [0, 0, 0, 0])
    probs[3] = 0.1
    table = calibration_table(probs, np.zeros(4, dtype=int), bins=10)
    assert table["count"].tolist() == [1, 0, 0, 0, 1, 1, 0, 0, 0, 1]
    np.testing.assert_allclose(table["lower"], np.arange(10) / 10)
    assert table["confidence"].isna().sum() == 6  # empty bins have no mean
    assert table.loc[9, "accuracy"] == 1.0 and table.loc[4, "confidence"] == pytest.approx(0.5)
    # the default 15 bins hold every image
    assert calibration_table(probs, np.zeros(4, dtype=int))["count"].sum() == 4


def test_reliability_diagram_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, size=300)
    y_pred = rng.integers(0, 10, size=300)
    y_true = np.where(rng.random(300) < confidence, y_pred, (y_pred + 1) % 10)
    path = tmp_path / "reliability.png"
    reliability_diagram(probs_for(confidence, y_pred), y_true, path)
    assert is_png_with_content(path)
    assert isinstance(calibration_table(probs_for(confidence, y_pred), y_true), pd.DataFrame)


# --- the evaluate stage's analyse() --------------------------------------------------------------

INSIGHT_FILES = [
    "gradcam.png",
    "errors.png",
    "misclassified.csv",
    "confident_errors.csv",
    "robustness.png",
    "robustness.csv",
    "reliability.png",
    "calibration.csv",
]


@pytest.mark.parametrize("relabelled", [0, 12])
def test_analyse_writes_every_figure_and_table(trained, tmp_path: Path, relabelled: int) -> None:
    from pipelines.config import load_params
    from pipelines.insight import analyse

    # given the trained model, and labels of which the first `relabelled` are wrong, so that the
    # model "misclassifies" those images (0: as good as it is; 12: a non-trivial error analysis)
    model, images, true_labels = trained
    labels = true_labels.astype(np.int64).copy()
    labels[:relabelled] = (labels[:relabelled] + 5) % 10  # strokes are digits 0-3: never right
    probs = predict_probabilities(model, images, 100)
    params = load_params().evaluate.model_copy(
        update={"fgsm_images": 50, "gradcam_correct": 4, "gradcam_errors": 4}
    )
    out = tmp_path / "insight"
    # when
    found = analyse(model, images, labels, probs, params, out)
    # then every file is there, and nothing else
    assert sorted(p.name for p in out.iterdir()) == sorted(INSIGHT_FILES)
    assert all((out / name).stat().st_size > 0 for name in INSIGHT_FILES)
    for name in ("gradcam.png", "robustness.png", "reliability.png"):
        assert is_png_with_content(out / name), name
    assert is_png_with_content(out / "errors.png", min_bytes=1_000)

    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    assert len(wrong) >= relabelled
    # misclassified.csv: one row per misclassified image, the same as the groups
    table = pd.read_csv(out / "misclassified.csv")
    assert list(table.columns) == ["index", "true", "predicted", "confidence"]
    assert len(table) == len(wrong) == sum(len(idx) for *_, idx in found.groups)
    assert sorted(table["index"]) == wrong.tolist()
    rows = table["index"].to_numpy(dtype=int)
    assert (table["true"].to_numpy(dtype=int) == labels[rows]).all()
    assert (table["predicted"].to_numpy(dtype=int) == predicted[rows]).all()
    np.testing.assert_allclose(
        table["confidence"].to_numpy(dtype=float),
        probs.max(axis=1)[rows],
        atol=1e-6,
    )
    # confident_errors.csv: the k surest of them
    confident = pd.read_csv(out / "confident_errors.csv")
    assert len(confident) == min(params.confident_errors, len(wrong)) == len(found.confident_errors)
    assert confident["index"].tolist() == found.confident_errors["index"].tolist()
    assert confident["confidence"].is_monotonic_decreasing
    # Grad-CAM grid: the errors (up to gradcam_errors) first, then gradcam_correct correct images
    n_errors = min(params.gradcam_errors, len(wrong))
    assert found.gradcam_layer == "conv2"
    assert len(found.gradcam_indices) == n_errors + params.gradcam_correct
    assert (
        predicted[found.gradcam_indices[:n_errors]] != labels[found.gradcam_indices[:n_errors]]
    ).all()
    assert (
        predicted[found.gradcam_indices[n_errors:]] == labels[found.gradcam_indices[n_errors:]]
    ).all()

    # robustness: 0.0 is the clean accuracy of the sampled images, then one value per epsilon
    sample = seeded_sample(len(images), params.fgsm_images, params.seed)
    assert found.robustness_images == len(sample) == 50
    assert list(found.robustness) == [0.0, *params.fgsm_epsilons]
    assert found.robustness[0.0] == pytest.approx((predicted[sample] == labels[sample]).mean())
    assert all(0.0 <= a <= 1.0 for a in found.robustness.values())
    curve = pd.read_csv(out / "robustness.csv")
    assert curve["epsilon"].tolist() == pytest.approx(list(found.robustness))
    np.testing.assert_allclose(curve["accuracy"], list(found.robustness.values()), atol=1e-6)

    # calibration: one row per bin, every image in a bin, ECE as the function computes it
    calibration = pd.read_csv(out / "calibration.csv")
    assert len(calibration) == params.calibration_bins
    assert calibration["count"].sum() == len(images)
    assert found.ece == pytest.approx(
        expected_calibration_error(probs, labels, params.calibration_bins)
    )
    # the flat metrics
    assert set(found.metrics()) == {"ece"} | {
        f"fgsm_accuracy_eps_{e:g}" for e in params.fgsm_epsilons
    }
    assert found.metrics()["ece"] == found.ece
    for e in params.fgsm_epsilons:
        assert found.metrics()[f"fgsm_accuracy_eps_{e:g}"] == found.robustness[e]
