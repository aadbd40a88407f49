"""The promotion gate against a real MLflow registry (sqlite in tmp_path)."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest

from pipelines import tracking
from pipelines.config import ModelParams, RegisterParams
from pipelines.evaluate import evaluate_probabilities, predict_probabilities
from pipelines.model import build_model, to_model_input
from pipelines.register import register_model

GATE = RegisterParams(
    model_name="mnist-classifier",
    champion_alias="champion",
    challenger_alias="challenger",
    min_accuracy=0.3,
)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts land under tmp_path
    tracking.setup("gate-test")
    return tracking.client()


@pytest.fixture(scope="module")
def digits():
    """Two easily separable 'digits' (0: left bar, 1: right bar), 64 of each, with noise."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, size=(128, 28, 28)).astype(np.uint8)
    labels = np.repeat([0, 1], 64).astype(np.uint8)
    images[labels == 0, :, 4:10] = 255
    images[labels == 1, :, 18:24] = 255
    return images, labels


def trained(images, labels, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = build_model(
        ModelParams(conv1_filters=4, conv2_filters=4, kernel_size=3, dense_units=8, dropout=0.0)
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    if epochs:
        model.fit(to_model_input(images), labels, epochs=epochs, batch_size=32, verbose=0)
    return model


def register(model, images, labels, gate: RegisterParams = GATE):
    probs = predict_probabilities(model, images, 64)
    result = evaluate_probabilities(probs, labels, 3)
    with mlflow.start_run() as run:
        pass
    metrics = {"accuracy": result.accuracy, "loss": result.loss, "data_source": "test"}
    return register_model(gate, run.info.run_id, model, metrics, images, labels, 64)


def test_worse_challenger_keeps_the_champion(store, digits):
    images, labels = digits
    # Given a good model registered first
    good = register(trained(images, labels, epochs=8), images, labels)
    assert good["alias"] == "champion" and good["test_accuracy"] >= 0.9
    # When a worse one (untrained, still above the 0.3 floor or not) is registered
    bad_model = trained(images, labels, epochs=0)
    bad = register(bad_model, images, labels)
    # Then the champion alias has not moved, and the reason is on the new version
    champion = store.get_model_version_by_alias("mnist-classifier", "champion")
    assert str(champion.version) == str(good["version"])
    newest = store.get_model_version("mnist-classifier", str(bad["version"]))
    assert bad["alias"] in {None, "challenger"}
    assert newest.tags["reason"] and newest.tags["decision"] in {"none", "challenger"}
    assert newest.tags["previous_champion"] == str(good["version"])


def test_equal_challenger_gets_challenger_alias_with_reason(store, digits):
    images, labels = digits
    model = trained(images, labels, epochs=8)
    first = register(model, images, labels)
    second = register(model, images, labels)
    assert first["alias"] == "champion" and second["alias"] == "challenger"
    version = store.get_model_version_by_alias("mnist-classifier", "challenger")
    assert str(version.version) == str(second["version"])
    assert f"does not beat champion v{first['version']}" in version.tags["reason"]
    assert str(store.get_model_version_by_alias("mnist-classifier", "champion").version) == str(
        first["version"]
    )


def test_better_model_takes_champion_and_records_previous(store, digits):
    images, labels = digits
    no_floor = GATE.model_copy(update={"min_accuracy": 0.0})
    # Given an untrained model as champion (floor 0, so it passes)
    weak = register(trained(images, labels, epochs=0), images, labels, no_floor)
    assert weak["alias"] == "champion" and weak["test_accuracy"] < 0.9
    # When a trained model is registered
    strong = register(trained(images, labels, epochs=8), images, labels, no_floor)
    # Then it takes the alias, and the version records whom it replaced and by how much
    assert strong["alias"] == "champion"
    champion = store.get_model_version_by_alias("mnist-classifier", "champion")
    assert str(champion.version) == str(strong["version"])
    assert champion.tags["previous_champion"] == str(weak["version"])
    assert float(champion.tags["champion_test_accuracy"]) == pytest.approx(
        weak["test_accuracy"], abs=1e-6
    )
    assert f"beats champion v{weak['version']}" in champion.tags["reason"]
