"""The promotion gate: its decision as a pure function, case by case, then against a real MLflow
registry (sqlite in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from pipelines import locks, tracking
from pipelines.config import ModelParams, RegisterParams
from pipelines.model import build_model, predict_probabilities, to_model_input
from pipelines.register import SHADOW_PENDING_TAG, Evidence, decide_promotion, register_model
from pipelines.scoring import evaluate_probabilities

GATE = RegisterParams(
    model_name="mnist-classifier",
    champion_alias="champion",
    challenger_alias="challenger",
    min_accuracy=0.3,
    serve_check_images=128,
    max_served_drop=0.002,
    shadow_min_requests=0,
    shadow_min_agreement=0.0,
)


# --- the decision: a pure function of the evidence ------------------------------------------


@pytest.fixture
def rparams(params) -> RegisterParams:
    return params.register  # params.yaml's gate: floor 0.99, aliases champion / challenger


def test_below_the_floor_gets_no_alias(rparams: RegisterParams) -> None:
    # given a candidate under the 99% floor, even with no champion to beat
    decision = decide_promotion(rparams, Evidence(candidate_accuracy=0.985))
    # then no alias, and the reason names the floor and the accuracy
    assert decision.alias is None
    assert "below the floor 99.0000%" in decision.reason and "98.5000%" in decision.reason


def test_below_the_floor_loses_even_against_a_worse_champion(rparams: RegisterParams) -> None:
    evidence = Evidence(candidate_accuracy=0.98, champion_accuracy=0.5, champion_version="3")
    assert decide_promotion(rparams, evidence).alias is None


def test_first_version_over_the_floor_becomes_champion(rparams: RegisterParams) -> None:
    decision = decide_promotion(rparams, Evidence(candidate_accuracy=0.992))
    assert decision.alias == "champion"
    assert "no current champion" in decision.reason


def test_exactly_the_floor_passes(rparams: RegisterParams) -> None:
    assert decide_promotion(rparams, Evidence(candidate_accuracy=0.99)).alias == "champion"


def test_strictly_better_candidate_takes_champion(rparams: RegisterParams) -> None:
    evidence = Evidence(candidate_accuracy=0.995, champion_accuracy=0.993, champion_version="4")
    decision = decide_promotion(rparams, evidence)
    assert decision.alias == "champion"
    assert "beats champion v4: 99.5000% > 99.3000%" in decision.reason


def test_with_the_shadow_on_a_better_candidate_is_challenger_in_shadow_first(rparams) -> None:
    shadow_on = rparams.model_copy(
        update={"shadow_min_requests": 500, "shadow_min_agreement": 0.98}
    )
    better = Evidence(candidate_accuracy=0.995, champion_accuracy=0.993, champion_version="4")
    decision = decide_promotion(shadow_on, better)
    assert decision.alias == "challenger" and decision.shadow
    assert "beats champion v4" in decision.reason and "in shadow of v4 first" in decision.reason
    assert (
        "register.shadow_min_requests (500) at an agreement of at least 98.00%" in decision.reason
    )
    # the first champion has nothing to be compared with, and a worse candidate waits for nothing
    assert decide_promotion(shadow_on, Evidence(candidate_accuracy=0.995)).alias == "champion"
    worse = Evidence(candidate_accuracy=0.991, champion_accuracy=0.993, champion_version="4")
    assert not decide_promotion(shadow_on, worse).shadow
    assert not decide_promotion(rparams, better).shadow  # off by default: champion at once


@pytest.mark.parametrize("candidate", [0.993, 0.991], ids=["equal", "worse"])
def test_equal_or_worse_candidate_is_challenger(rparams: RegisterParams, candidate: float) -> None:
    # given a champion v7 at 99.3%
    evidence = Evidence(candidate_accuracy=candidate, champion_accuracy=0.993, champion_version="7")
    decision = decide_promotion(rparams, evidence)
    # then the candidate is only a challenger, and the reason names the champion's version
    assert decision.alias == "challenger"
    assert "does not beat champion v7" in decision.reason


def test_registry_copy_that_drifts_gets_no_alias_whatever_it_scores(
    rparams: RegisterParams,
) -> None:
    # given the best candidate there is, whose registered copy predicts differently
    evidence = Evidence(candidate_accuracy=1.0, registry_drift=1e-3)
    decision = decide_promotion(rparams, evidence)
    # then no alias, and the reason gives the drift against the tolerance
    assert decision.alias is None
    assert "registry copy predicts differently" in decision.reason and "1.00e-03" in decision.reason


def test_drift_within_tolerance_does_not_block(rparams: RegisterParams) -> None:
    evidence = Evidence(candidate_accuracy=0.995, registry_drift=5e-5)
    assert decide_promotion(rparams, evidence).alias == "champion"


@pytest.mark.parametrize("champion", [None, 0.5], ids=["no-champion", "worse-champion"])
def test_served_export_failure_gets_no_alias_and_is_the_reason(
    rparams: RegisterParams, champion: float | None
) -> None:
    failure = "served export model_int8.tflite: int8 loses 0.30% accuracy"
    evidence = Evidence(
        candidate_accuracy=0.995,
        champion_accuracy=champion,
        champion_version="2" if champion else None,
        served_failure=failure,
    )
    decision = decide_promotion(rparams, evidence)
    assert decision.alias is None and decision.reason == failure


def test_floor_is_named_before_any_infra_failure(rparams: RegisterParams) -> None:
    # given a candidate that fails every step: the first step's reason is the one recorded
    evidence = Evidence(candidate_accuracy=0.5, registry_drift=1.0, served_failure="broken")
    assert "below the floor" in decide_promotion(rparams, evidence).reason


def test_unservable_champion_is_named_in_the_new_champions_reason(
    rparams: RegisterParams,
) -> None:
    # given the previous champion was set aside as unservable (so no champion accuracy)
    evidence = Evidence(candidate_accuracy=0.995, champion_unservable="v3 cannot be served (gone)")
    decision = decide_promotion(rparams, evidence)
    assert decision.alias == "champion"
    assert decision.reason.endswith("; the previous champion v3 cannot be served (gone)")


def test_aliases_come_from_params(rparams: RegisterParams) -> None:
    custom = rparams.model_copy(update={"champion_alias": "prod", "challenger_alias": "staging"})
    assert decide_promotion(custom, Evidence(candidate_accuracy=0.999)).alias == "prod"
    beaten = Evidence(candidate_accuracy=0.991, champion_accuracy=0.999, champion_version="2")
    assert decide_promotion(custom, beaten).alias == "staging"


def test_champion_score_is_reused_only_when_it_passed(monkeypatch) -> None:
    import pipelines.register as register

    calls, results = [], {"3": 0.97, "4": RuntimeError("download failed")}

    def fake_score(uri, images, labels, batch_size):
        calls.append(uri)
        result = results[uri.rsplit("/", 1)[1]]
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(register, "score_version", fake_score)
    score = register.champion_scorer(GATE, np.zeros((1, 28, 28)), np.zeros(1), 1, None, "m.onnx")
    # a champion scored before the lock is not scored again under it
    assert score("3") == (0.97, None) and score("3") == (0.97, None)
    # one that failed is tried again: the failure may have passed
    assert score("4") == (None, None) and score("4") == (None, None)
    assert calls == ["models:/mnist-classifier/3"] + ["models:/mnist-classifier/4"] * 2


# --- against a real registry ---------------------------------------------------------------


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(locks.ENV_VAR, raising=False)  # the gate's lock: tmp_path/registry.lock
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


def test_better_model_takes_champion_and_records_previous(store, digits, tmp_path):
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
    # decided under the store's lock, the file beside its database
    assert champion.tags["gate_lock"] == f"file: {tmp_path / 'registry.lock'}"
    assert float(champion.tags["gate_lock_waited_s"]) >= 0


def test_with_the_shadow_on_a_better_model_waits_as_challenger_tagged_with_its_rival(store, digits):
    images, labels = digits
    shadow_on = GATE.model_copy(update={"min_accuracy": 0.0, "shadow_min_requests": 10})
    weak = register(trained(images, labels, epochs=0), images, labels, shadow_on)
    strong = register(trained(images, labels, epochs=8), images, labels, shadow_on)
    assert (weak["alias"], strong["alias"]) == ("champion", "challenger")
    waiting = store.get_model_version("mnist-classifier", str(strong["version"]))
    assert waiting.tags[SHADOW_PENDING_TAG] == str(weak["version"])
    assert waiting.tags["decision"] == "challenger" and "in shadow of" in waiting.tags["reason"]
    champion = store.get_model_version_by_alias("mnist-classifier", "champion")
    assert str(champion.version) == str(weak["version"])
    assert SHADOW_PENDING_TAG not in champion.tags


def test_registration_that_cannot_get_the_lock_leaves_no_version(store, digits, tmp_path):
    images, labels = digits
    model = trained(images, labels, epochs=0)
    metrics = {"accuracy": 0.9, "loss": 0.1, "data_source": "test"}
    with mlflow.start_run() as run:
        pass
    # Given another writer in the gate's critical section, holding the lock, when a registration
    # waits for it longer than it may
    busy = pytest.raises(locks.LockTimeout, match="registry.lock: still taken after waiting")
    with locks.registry_lock(GATE.model_name, 1), busy:
        register_model(
            GATE, run.info.run_id, model, metrics, images, labels, 64, lock_timeout_s=0.2
        )
    # Then the version it registered is gone, and no alias moved
    assert store.search_model_versions(f"name = '{GATE.model_name}'") == []
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.get_model_version_by_alias(GATE.model_name, "champion")


# --- gate step 3: the served export, loaded from the registry by the server's code -------------


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    """A trained model and its real exports (parity measured on the digits)."""
    from pipelines.data import write_json
    from pipelines.export import run_export
    from tests.serving_support import SMALL_EXPORT

    images, labels = digits
    model = trained(images, labels, epochs=8)
    out = tmp_path_factory.mktemp("export")
    write_json(out / "parity.json", run_export(model, images, images, labels, SMALL_EXPORT, out))
    return model, out


def register_with(model, images, labels, export_dir, served="model.onnx"):
    probs = predict_probabilities(model, images, 64)
    result = evaluate_probabilities(probs, labels, 3)
    with mlflow.start_run() as run:
        pass
    metrics = {"accuracy": result.accuracy, "loss": result.loss, "data_source": "test"}
    return register_model(
        GATE,
        run.info.run_id,
        model,
        metrics,
        images,
        labels,
        64,
        export_dir=export_dir,
        served_format=served,
    )


@pytest.mark.parametrize("served", ["model.onnx", "model_float.tflite", "model_int8.tflite"])
def test_served_export_travels_with_the_version_and_passes_the_infra_check(
    store, digits, exported, served, tmp_path
):
    images, labels = digits
    model, export_dir = exported
    record = register_with(model, images, labels, export_dir, served)
    assert record["alias"] == "champion", record["reason"]
    version = store.get_model_version("mnist-classifier", str(record["version"]))
    assert version.tags["served_format"] == served
    assert float(version.tags["served_check_accuracy"]) >= record["test_accuracy"] - 0.002
    assert version.tags["parity_passed"] == "true"
    assert float(version.tags["export.model.onnx.agreement"]) >= 0.999
    # every export and the parity report are files of the version's model
    for name in ("model.onnx", "model_float.tflite", "model_int8.tflite", "parity.json"):
        local = mlflow.artifacts.download_artifacts(
            f"models:/mnist-classifier/{record['version']}/{name}", dst_path=str(tmp_path)
        )
        assert (tmp_path / name).stat().st_size > 0 and local.endswith(name)


def test_served_export_that_failed_parity_is_not_promoted(store, digits, exported, tmp_path):
    import json
    import shutil

    images, labels = digits
    model, export_dir = exported
    broken = tmp_path / "export"
    shutil.copytree(export_dir, broken)
    parity = json.loads((broken / "parity.json").read_text())
    parity["formats"]["model.onnx"].update(
        passed=False, failures=["agrees with Keras on 99.500% of test images (bar: 99.9%)"]
    )
    parity["passed"] = False
    (broken / "parity.json").write_text(json.dumps(parity))
    record = register_with(model, images, labels, broken)
    assert record["alias"] is None
    assert "failed its parity bars" in record["reason"] and "99.500%" in record["reason"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        store.get_model_version_by_alias("mnist-classifier", "champion")
    tags = store.get_model_version("mnist-classifier", str(record["version"])).tags
    assert tags["decision"] == "none" and "parity" in tags["reason"]


def test_the_version_gets_the_report_with_the_numbers_section_and_its_files(
    store, digits, params, tmp_path
):
    import json

    from pipelines.numbers import run_numbers

    images, labels = digits
    params_numbers = params.numbers
    bench = params_numbers.benchmark.model_copy(update={"count": 1, "max_length": 2})

    def always_seven(batch):
        probs = np.full((len(batch), 10), 0.02)
        probs[:, 7] = 0.82
        return probs

    numbers = tmp_path / "numbers"
    scores = run_numbers(images, labels, always_seven, params_numbers.segment, bench, numbers)
    report = tmp_path / "report.html"
    report.write_text("<html><body><h2 id='headline'>H</h2><h2 id='lineage'>L</h2></body></html>")
    model = trained(images, labels, epochs=0)
    probs = predict_probabilities(model, images, 64)
    result = evaluate_probabilities(probs, labels, 3)
    with mlflow.start_run() as run:
        pass
    metrics = {"accuracy": result.accuracy, "loss": result.loss, "data_source": "test"}
    gate = GATE.model_copy(update={"min_accuracy": 0.0})
    record = register_model(
        gate, run.info.run_id, model, metrics, images, labels, 64, report=report, numbers=numbers
    )
    version = store.get_model_version("mnist-classifier", str(record["version"]))
    for spacing, row in scores["by_spacing"].items():
        assert version.tags[f"numbers.{spacing}.whole_accuracy"] == f"{row['whole_accuracy']:.6f}"
    page = Path(mlflow.artifacts.download_artifacts(version.tags["evaluation_report"])).read_text()
    assert page.index("id='headline'") < page.index("id='numbers'") < page.index("id='lineage'")
    uri = f"models:/mnist-classifier/{record['version']}/numbers"
    files = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "got")))
    assert json.loads((files / "scores.json").read_text()) == scores
    assert (files / "worst.png").read_bytes() == (numbers / "worst.png").read_bytes()


def with_failed_parity(export_dir, tmp_path, name: str, failure: str):
    """A copy of ``export_dir`` whose parity report says ``name`` failed its bars."""
    import json
    import shutil

    copy = tmp_path / f"export-{name}"
    shutil.copytree(export_dir, copy)
    parity = json.loads((copy / "parity.json").read_text())
    parity["formats"][name].update(passed=False, failures=[failure])
    parity["passed"] = False
    (copy / "parity.json").write_text(json.dumps(parity))
    return copy


def test_export_that_failed_parity_is_never_served(store, digits, exported, tmp_path):
    from pipelines.runtime import load_registered
    from serving.champion import Champion

    images, labels = digits
    model, export_dir = exported
    # Given a champion served as ONNX whose int8 file failed its bar at export (not fatal then)
    failed = with_failed_parity(export_dir, tmp_path, "model_int8.tflite", "int8 lost 1.390 points")
    first = register_with(model, images, labels, failed, served="model.onnx")
    assert first["alias"] == "champion", first["reason"]
    version = str(first["version"])
    # Then the server's loader serves its ONNX file but refuses the int8 one, saying why
    assert load_registered("mnist-classifier", version, "model.onnx", tmp_path / "a") is not None
    with pytest.raises(ValueError, match="failed its parity bars at export: int8 lost 1.390"):
        load_registered("mnist-classifier", version, "model_int8.tflite", tmp_path / "b")
    # and a server set to int8 stays unready with the reason instead of serving it
    champion = Champion("mnist-classifier", "champion", "model_int8.tflite", cache_dir=tmp_path)
    assert champion.refresh() is False and champion.current is None
    assert "parity bars" in champion.last_error and f"v{version}" in champion.last_error
    # When serve.format becomes int8, an equally good candidate whose int8 file passed takes the
    # alias: a champion whose served export failed is no champion
    second = register_with(model, images, labels, export_dir, served="model_int8.tflite")
    assert second["alias"] == "champion", second["reason"]
    assert f"the previous champion v{version} cannot be served" in second["reason"]
    assert "parity" in second["reason"]


def test_served_export_that_does_not_load_is_not_promoted(store, digits, exported, tmp_path):
    import shutil

    images, labels = digits
    model, export_dir = exported
    # Given a champion, and then a candidate whose ONNX file is corrupt (parity said it passed)
    first = register_with(model, images, labels, export_dir)
    assert first["alias"] == "champion"
    broken = tmp_path / "export"
    shutil.copytree(export_dir, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    record = register_with(model, images, labels, broken)
    # Then it gets no alias, the reason says why, and the champion has not moved
    assert record["alias"] is None
    assert "model.onnx" in record["reason"] and "failed to load or predict" in record["reason"]
    champion = store.get_model_version_by_alias("mnist-classifier", "champion")
    assert str(champion.version) == str(first["version"])


def test_champion_without_a_served_export_gives_way_to_one_with(store, digits, exported):
    images, labels = digits
    model, export_dir = exported
    # Given a champion registered before the export stage existed (no exports in its files)
    old = register(model, images, labels)
    assert old["alias"] == "champion"
    # When an equally good candidate with exports is registered
    new = register_with(model, images, labels, export_dir)
    # Then it takes the alias (a champion the server cannot load is no champion), and says why
    assert new["alias"] == "champion"
    assert f"the previous champion v{old['version']} cannot be served" in new["reason"]
