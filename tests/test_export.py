"""The export stage: three formats written, each measured against Keras through the runtime the
server uses, and the bars applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import Params
from pipelines.data import Dataset
from pipelines.export import (
    check,
    fold_batchnorm,
    representative_images,
    run_export,
    split_report,
)
from pipelines.model import build_model, to_model_input
from pipelines.runtime import FORMATS, METRICS_FILES, PARITY_REPORT, SPEED_REPORT, load_predictor
from tests.serving_support import SMALL_EXPORT, tiny_trained_model

SMALL = SMALL_EXPORT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.conftest import make_arrays

    x_train, y_train, x_test, y_test = make_arrays(n_train=300, n_test=200)
    model = tiny_trained_model(x_train, y_train)
    # MNIST digits reach 255, so the int8 input's calibrated scale is 1/255 and a pixel is its own
    # quantised value; these strokes stop short of it (180-255) unless one pixel is set
    x_train[:, 0, 0] = 255
    out = tmp_path_factory.mktemp("export")
    report = run_export(model, x_train, x_test, y_test, SMALL, out)
    return model, out, report, x_test


def test_writes_three_formats_that_agree_with_keras(exported):
    model, out, report, x_test = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(FORMATS)
    assert set(report["formats"]) == {"keras", *FORMATS}
    for name in ("model.onnx", "model_float.tflite"):
        row = report["formats"][name]
        assert row["agreement"] >= 0.999, (name, row)
        assert row["max_abs_prob_diff"] < 1e-4, (name, row)
        assert row["passed"] and not row["failures"]
    int8 = report["formats"]["model_int8.tflite"]
    # int8 weights take 1 byte instead of 4 (the real model: 254 KB against 952 KB; this tiny
    # one has relatively more fixed overhead)
    assert int8["size_bytes"] < 0.6 * report["formats"]["model_float.tflite"]["size_bytes"]
    for name in FORMATS:
        row = report["formats"][name]
        assert row["latency_1_ms"] > 0 and row["latency_batch_ms"] > 0
        assert row["batch_images_per_s"] > 0
    json.dumps(report)  # what the stage writes as parity.json


def test_report_splits_into_a_verdict_timings_and_one_headline_per_format(exported):
    # given the measured report
    _, _, report, _ = exported
    # when it is split into the stage's files
    files = split_report(report)
    # then the verdict holds no timing, the speed report every timing, the headlines two numbers
    assert set(files) == {PARITY_REPORT, SPEED_REPORT, *METRICS_FILES.values()}
    verdict, speed = files[PARITY_REPORT], files[SPEED_REPORT]
    assert verdict["passed"] == report["passed"] and verdict["bars"] == report["bars"]
    for name in FORMATS:
        assert verdict["formats"][name]["passed"] == report["formats"][name]["passed"]
        assert not {"latency_1_ms", "latency_batch_ms", "size_bytes"} & set(
            verdict["formats"][name]
        )
        assert speed["formats"][name]["latency_1_ms"] == report["formats"][name]["latency_1_ms"]
        assert files[METRICS_FILES[name]] == {
            "accuracy": report["formats"][name]["accuracy"],
            "agreement": report["formats"][name]["agreement"],
        }
    assert speed["fastest_single_image"] == report["fastest_single_image"]
    assert "fastest_single_image" not in verdict
    json.dumps(files)


@pytest.mark.parametrize(
    ("drop", "bar", "failed"),
    [(0.003, 0.002, True), (0.003, 0.05, False), (0.30, 0.05, True)],
    ids=["full-run-bar", "smoke-bar-weak-model", "smoke-bar-broken-export"],
)
def test_int8_bar_is_applied_as_set(params: Params, drop: float, bar: float, failed: bool) -> None:
    # params.yaml's bar judges a full run; params.smoke.yaml's wider one still stops a broken export
    export = params.export.model_copy(update={"max_int8_drop": bar})
    row = {"accuracy": 0.77 - drop, "agreement": 0.9}
    assert bool(check("model_int8.tflite", row, 0.77, export)) is failed


def test_smoke_bars_are_wider_than_the_full_runs_and_still_bars(params: Params) -> None:
    import yaml

    from tests.conftest import REPO

    smoke = yaml.safe_load((REPO / "params.smoke.yaml").read_text())
    assert params.export.max_int8_drop < smoke["export"]["max_int8_drop"] <= 0.05
    assert 0.95 <= smoke["export"]["min_agreement"] < params.export.min_agreement
    assert params.register.max_served_drop < smoke["register"]["max_served_drop"] <= 0.05


def test_runtime_predicts_like_keras_for_one_image_and_a_batch(exported):
    from pipelines.model import to_model_input

    model, out, _, x_test = exported
    x = to_model_input(x_test[:7])
    expected = model.predict(x, verbose=0)
    for name in FORMATS:
        predictor = load_predictor(out / name)
        for batch in (x[:1], x, x[:3]):  # TFLite resizes its input tensor between calls
            probs = predictor.predict(batch)
            assert probs.shape == (len(batch), 10)
            assert np.allclose(probs.sum(axis=1), 1.0, atol=0.02)
        tolerance = 0.02 if "int8" in name else 1e-4
        assert np.abs(predictor.predict(x) - expected).max() < tolerance, name
        # uint8 pixels 0-255 (what the server reads from most requests) predict exactly as the
        # same images in [0, 1]; the int8 model takes them as its input as they are
        pixels = np.asarray(x_test[:7], dtype=np.uint8)[..., None]
        assert np.array_equal(predictor.predict(pixels), predictor.predict(x)), name
    assert load_predictor(out / "model_int8.tflite").pixels_in


def test_runtime_refuses_bad_inputs_and_files(exported, tmp_path):
    _, out, _, _ = exported
    predictor = load_predictor(out / "model.onnx")
    with pytest.raises(ValueError, match=r"shape \(N>0, 28, 28, 1\)"):
        predictor.predict(np.zeros((2, 28, 28), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_predictor(tmp_path / "missing.onnx")
    (tmp_path / "model.pb").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown model format"):
        load_predictor(tmp_path / "model.pb")


def test_bars_name_the_failure(params: Params):
    bars = params.export  # params.yaml's bars: agreement 99.9%, int8 drop 0.2 points
    assert check("model.onnx", {"agreement": 0.9995}, 0.99, bars) == []
    failures = check("model.onnx", {"agreement": 0.998}, 0.99, bars)
    assert failures and "99.800%" in failures[0] and "99.9%" in failures[0]
    assert check("model_int8.tflite", {"accuracy": 0.9885}, 0.99, bars) == []
    failures = check("model_int8.tflite", {"accuracy": 0.987}, 0.99, bars)
    assert failures and "0.30%" in failures[0] and "0.20%" in failures[0]


def test_representative_images_are_spread_and_deterministic():
    images = np.arange(100)[:, None, None] * np.ones((1, 28, 28), dtype=np.int64)
    picked = representative_images(images, 5)
    assert [int(p[0, 0]) for p in picked] == [0, 24, 49, 74, 99]
    assert len(representative_images(images, 500)) == 100


def _with_random_batchnorm(model, rng: np.random.Generator, negative: str | None = None):
    """Give every BatchNorm non-trivial statistics (and ``negative`` a scale below zero)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            gamma = rng.uniform(0.5, 3.0, channels)
            if layer.name == negative:
                gamma[0] = -gamma[0]
            layer.set_weights(
                [gamma, rng.normal(0, 0.5, channels), rng.normal(0, 0.3, channels),
                 rng.uniform(0.01, 0.2, channels)]
            )  # fmt: skip
    return model


def test_fold_batchnorm_removes_batchnorm_and_keeps_the_function(
    params: Params, tiny_dataset: Dataset
) -> None:
    import keras

    rng = np.random.default_rng(3)
    x = to_model_input(tiny_dataset.x_test[:16])
    # given the default network with trained-looking BatchNorm statistics
    model = _with_random_batchnorm(build_model(params.train.model), rng)
    # when folded for export
    folded = fold_batchnorm(model)
    # then no BatchNorm is left and the outputs are those of the original
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert [layer.name for layer in folded.layers] == [
        layer.name for layer in model.layers if not layer.name.startswith("bn")
    ]
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-6
    )


def test_fold_batchnorm_keeps_what_cannot_fold_exactly(
    params: Params, tiny_dataset: Dataset
) -> None:
    rng = np.random.default_rng(4)
    x = to_model_input(tiny_dataset.x_test[:16])
    # a negative scale cannot pass through MaxPool (max does not commute with it): bn1 stays
    model = _with_random_batchnorm(build_model(params.train.model), rng, negative="bn1")
    folded = fold_batchnorm(model)
    assert [layer.name for layer in folded.layers if layer.name.startswith("bn")] == ["bn1"]
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-6
    )
    # "same" padding pads the normalised input with zeros: bn1 and bn2 stay, bn3 folds into Dense
    same = params.train.model.model_copy(update={"padding": "same"})
    model = _with_random_batchnorm(build_model(same), rng)
    folded = fold_batchnorm(model)
    assert [layer.name for layer in folded.layers if layer.name.startswith("bn")] == ["bn1", "bn2"]
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-6
    )
