"""The Keras-free inference path, on tiny hand-built models (a linear softmax over the pixels, in
ONNX and TFLite): what a predictor reads and returns, several threads at once, what it refuses,
and loading a pinned registry version behind its parity report.

(Predicting like Keras with the real exports, and the basic refusals, are in test_export.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import _model_registry, _tracking_service

from pipelines.runtime import (
    PARITY_REPORT,
    _checked,
    check_parity,
    load_predictor,
    load_registered,
)

RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(0, 0.05, size=(784, 10)).astype(np.float32)
BIAS = RNG.normal(0, 0.1, size=10).astype(np.float32)
PIXELS = RNG.integers(0, 256, size=(5, 28, 28, 1)).astype(np.uint8)
PASSED = {"formats": {"model.onnx": {"passed": True, "failures": []}}, "passed": True}


def expected(images01: np.ndarray, weights: np.ndarray = WEIGHTS) -> np.ndarray:
    """What the linear softmax gives, in numpy."""
    logits = images01.reshape(len(images01), -1).astype(np.float64) @ weights + BIAS
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def write_onnx(path: Path, weights: np.ndarray = WEIGHTS) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["images", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits0"]),
            helper.make_node("Add", ["logits0", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 28, 28, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(BIAS, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def write_tflite(path: Path, int_output: bool = False) -> Path:
    """The same linear softmax as TFLite; ``int_output``: its argmax as int32 instead."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])
    def linear(images):
        probabilities = tf.nn.softmax(tf.reshape(images, [-1, 784]) @ WEIGHTS + BIAS)
        return (
            tf.argmax(probabilities, axis=1, output_type=tf.int32) if int_output else probabilities
        )

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [linear.get_concrete_function()], linear
    )
    path.write_bytes(converter.convert())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "model.onnx": write_onnx(folder / "model.onnx"),
        "model_float.tflite": write_tflite(folder / "model_float.tflite"),
    }


# --- what a predictor reads and returns -------------------------------------------------------


@pytest.mark.parametrize("name", ["model.onnx", "model_float.tflite"])
def test_a_predictor_returns_the_models_probabilities_for_floats_and_pixels(models, name):
    predictor = load_predictor(models[name], threads=2)
    floats = PIXELS.astype(np.float32) / 255
    probs = predictor.predict(floats)
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected(floats), rtol=1e-4, atol=1e-6)
    # uint8 pixels 0-255 are read as pixel / 255: the same probabilities, to the bit
    np.testing.assert_array_equal(predictor.predict(PIXELS), probs)
    # a float64 batch is computed in float32, not refused
    np.testing.assert_array_equal(predictor.predict(floats.astype(np.float64)), probs)
    assert predictor.path == models[name]


@pytest.mark.parametrize("name", ["model.onnx", "model_float.tflite"])
def test_a_predictor_is_safe_to_call_from_several_threads(models, name):
    # given one predictor and batches of different sizes (TFLite resizes its input for each)
    predictor = load_predictor(models[name])
    batches = [PIXELS[: 1 + i % 5] for i in range(40)]
    wanted = [predictor.predict(batch) for batch in batches]
    got: list[np.ndarray | None] = [None] * len(batches)

    def work(start: int) -> None:
        for i in range(start, len(batches), 4):
            got[i] = predictor.predict(batches[i])

    # when four threads call it at once
    threads = [threading.Thread(target=work, args=(start,)) for start in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # then each call got its own batch's answer
    for i, (answer, want) in enumerate(zip(got, wanted, strict=True)):
        np.testing.assert_array_equal(answer, want, err_msg=f"batch {i}")


@pytest.mark.parametrize(
    "shape", [(0, 28, 28, 1), (28, 28, 1), (2, 28, 28), (2, 28, 28, 3), (2, 1, 28, 28)]
)
def test_images_of_another_shape_are_refused_naming_the_shape(shape):
    with pytest.raises(ValueError) as error:
        _checked(np.zeros(shape, dtype=np.float32))
    assert str(error.value) == f"expected images of shape (N>0, 28, 28, 1), got {shape}"


def test_the_check_keeps_pixels_only_when_asked():
    as_floats = _checked(PIXELS)
    assert as_floats.dtype == np.float32 and as_floats.max() <= 1.0
    np.testing.assert_array_equal(as_floats * 255, PIXELS.astype(np.float32))
    assert _checked(PIXELS, keep_pixels=True) is PIXELS
    floats = PIXELS.astype(np.float32)
    assert _checked(floats) is floats  # float32 is not copied


def test_a_folder_is_no_exported_model(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{folder}: no exported model there"):
        load_predictor(folder)


def test_a_tflite_model_with_integer_outputs_is_refused_naming_the_file(tmp_path):
    path = write_tflite(tmp_path / "argmax.tflite", int_output=True)
    with pytest.raises(ValueError, match=f"{path}: unsupported output type int32"):
        load_predictor(path)


# --- the parity report ------------------------------------------------------------------------


def test_an_export_that_passed_its_bars_is_accepted():
    check_parity(PASSED, "model.onnx", "models:/digits/3")  # no error


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ({}, "model.onnx of models:/digits/3: its parity.json has no entry for it"),
        (
            {"formats": {"model_int8.tflite": {"passed": True}}},
            "model.onnx of models:/digits/3: its parity.json has no entry for it",
        ),
        (
            {"formats": {"model.onnx": {"passed": False, "failures": ["agreement 98.0%", "x"]}}},
            "model.onnx of models:/digits/3 failed its parity bars at export: agreement 98.0%; x",
        ),
        (
            {"formats": {"model.onnx": {"passed": False}}},
            "model.onnx of models:/digits/3 failed its parity bars at export: no reason recorded",
        ),
        (  # a row that does not say it passed did not pass
            {"formats": {"model.onnx": {"failures": []}}},
            "model.onnx of models:/digits/3 failed its parity bars at export: no reason recorded",
        ),
    ],
    ids=["no formats", "other format only", "failed", "failed, no reason", "no verdict"],
)
def test_parity_refusals_name_the_file_the_version_and_why(report, message):
    with pytest.raises(ValueError) as error:
        check_parity(report, "model.onnx", "models:/digits/3")
    assert str(error.value) == message


# --- a pinned registry version ------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """One sqlite store for this file's registry tests (creating one takes a second)."""
    return tmp_path_factory.mktemp("registry")


@pytest.fixture
def registry(store_dir, monkeypatch) -> mlflow.MlflowClient:
    """That store as MLflow's tracking and registry store, for this test only."""
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, uri)
    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", uri)
    monkeypatch.setattr(_model_registry.utils, "_registry_uri", uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def publish(client: mlflow.MlflowClient, files: dict[str, Path | dict], tmp_path: Path) -> str:
    """A new version of model 'digits' whose files are ``files`` (a dict is written as JSON)."""
    folder = tmp_path / f"upload-{len(list(tmp_path.glob('upload-*')))}"
    folder.mkdir()
    for name, content in files.items():
        target = folder / name
        if isinstance(content, dict):
            target.write_text(json.dumps(content))
        else:
            target.write_bytes(content.read_bytes())
    artifacts = Path(client.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
    experiment = client.get_experiment_by_name("runtime") or client.get_experiment(
        client.create_experiment("runtime", artifact_location=artifacts.as_uri())
    )
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "export")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models("name = 'digits'"):
        client.create_registered_model("digits")
    source = f"{run.info.artifact_uri}/export"
    return client.create_model_version("digits", source, run.info.run_id).version


def test_a_registered_export_that_passed_is_downloaded_and_served(registry, models, tmp_path):
    # given two versions of the model, each with its own ONNX file that passed its bars
    first = publish(registry, {"model.onnx": models["model.onnx"], PARITY_REPORT: PASSED}, tmp_path)
    retrained = -WEIGHTS
    other = write_onnx(tmp_path / "retrained" / "model.onnx", weights=retrained)
    second = publish(registry, {"model.onnx": other, PARITY_REPORT: PASSED}, tmp_path)
    # when each is loaded by its number
    one = load_registered("digits", first, "model.onnx", tmp_path / "v1")
    two = load_registered("digits", int(second), "model.onnx", tmp_path / "v2")
    # then each is its own version's file, downloaded into dst, predicting as that model does
    assert one.path.parent == tmp_path / "v1" and two.path.parent == tmp_path / "v2"
    floats = PIXELS.astype(np.float32) / 255
    np.testing.assert_allclose(one.predict(floats), expected(floats), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        two.predict(floats), expected(floats, retrained), rtol=1e-4, atol=1e-6
    )
    assert not np.allclose(one.predict(floats), two.predict(floats))


def test_a_version_without_the_file_or_its_report_is_named(registry, models, tmp_path):
    no_report = publish(registry, {"model.onnx": models["model.onnx"]}, tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"models:/digits/{no_report}/parity\.json: "):
        load_registered("digits", no_report, "model.onnx", tmp_path / "a")
    no_tflite = publish(
        registry, {"model.onnx": models["model.onnx"], PARITY_REPORT: PASSED}, tmp_path
    )
    with pytest.raises(
        FileNotFoundError, match=rf"models:/digits/{no_tflite}/model_float\.tflite: cannot download"
    ):
        load_registered("digits", no_tflite, "model_float.tflite", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match=r"models:/digits/99/parity\.json: cannot download"):
        load_registered("digits", 99, "model.onnx", tmp_path / "c")


def test_a_registered_export_missing_from_its_parity_report_is_refused(registry, models, tmp_path):
    report = {"formats": {"model_int8.tflite": {"passed": True}}}  # says nothing of model.onnx
    version = publish(
        registry, {"model.onnx": models["model.onnx"], PARITY_REPORT: report}, tmp_path
    )
    with pytest.raises(
        ValueError, match=f"model.onnx of models:/digits/{version}: its parity.json has no entry"
    ):
        load_registered("digits", version, "model.onnx", tmp_path / "cache")
