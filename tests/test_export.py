"""The export stage: three formats written, each measured against Keras through the runtime the
server uses, and the bars applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.export import check, representative_images, run_export
from pipelines.runtime import FORMATS, load_predictor
from tests.serving_support import SMALL_EXPORT, tiny_trained_model

SMALL = SMALL_EXPORT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tests.conftest import make_arrays

    x_train, y_train, x_test, y_test = make_arrays(n_train=300, n_test=200)
    model = tiny_trained_model(x_train, y_train)
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


def test_bars_name_the_failure():
    assert check("model.onnx", {"agreement": 0.9995}, 0.99, SMALL) == []
    failures = check("model.onnx", {"agreement": 0.998}, 0.99, SMALL)
    assert failures and "99.800%" in failures[0] and "99.9%" in failures[0]
    assert check("model_int8.tflite", {"accuracy": 0.9885}, 0.99, SMALL) == []
    failures = check("model_int8.tflite", {"accuracy": 0.987}, 0.99, SMALL)
    assert failures and "0.30%" in failures[0] and "0.20%" in failures[0]


def test_representative_images_are_spread_and_deterministic():
    images = np.arange(100)[:, None, None] * np.ones((1, 28, 28), dtype=np.int64)
    picked = representative_images(images, 5)
    assert [int(p[0, 0]) for p in picked] == [0, 24, 49, 74, 99]
    assert len(representative_images(images, 500)) == 100
