"""The one module that talks to MLflow: which store, what every training run carries (params,
lineage tags), the run id passed from train to later stages, and the champion lookup. Against
real sqlite stores under pytest's tmp folders."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import RunStatus
from mlflow.tracking import _model_registry, _tracking_service, fluent

from pipelines import tracking
from pipelines.config import Params
from pipelines.data import DataError

LOCK = {  # a dvc.lock as DVC 3 writes it, cut down to what lineage reads
    "schema": "2.0",
    "stages": {
        "ingest": {
            "cmd": "python -m pipelines.ingest",
            "outs": [{"path": "data/raw", "md5": "a1"}],
        },
        "merge": {
            "cmd": "python -m pipelines.merge",
            "outs": [
                {"path": "data/dataset", "md5": "d4.dir", "nfiles": 4},
                {"path": "data/merge/report.json", "md5": "r7"},
            ],
        },
        "validate": {"cmd": "python -m pipelines.validate"},  # no outs
        "tune": {"cmd": "python -m pipelines.tune", "outs": [{"path": "data/tune"}]},  # no md5 yet
    },
}
SOURCE = {
    "data_source": "mnist",
    "files": {"train-images-idx3-ubyte.gz": "ab" * 32},
    "incoming": {"digits_added": 12},
}


@pytest.fixture(autouse=True)
def mlflow_state(monkeypatch):
    """Put MLflow's tracking and registry URIs, its active experiment and the environment
    variables it sets for them back as they were, whatever a test points it at."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.setenv(var, "")  # so that undo restores it (delenv of an unset one would not)
        monkeypatch.delenv(var)
    monkeypatch.setattr(
        _tracking_service.utils, "_tracking_uri", _tracking_service.utils._tracking_uri
    )
    monkeypatch.setattr(_model_registry.utils, "_registry_uri", _model_registry.utils._registry_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory) -> str:
    """One sqlite store for the tests that only need some store (creating one takes a second)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def store(shared_db, tmp_path, monkeypatch) -> str:
    """MLFLOW_TRACKING_URI on the shared store, working in this test's own folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_db)
    monkeypatch.chdir(tmp_path)
    return shared_db


# --- which store --------------------------------------------------------------------------------


def test_the_default_store_is_a_sqlite_file_under_the_roots_mlruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    # a relative root is resolved, so the URI does not depend on where a stage later chdirs to
    (tmp_path / "repo").mkdir()
    assert tracking.tracking_uri(Path("repo")) == f"sqlite:///{tmp_path}/repo/mlruns/mlflow.db"


def test_mlflow_tracking_uri_wins_over_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_use_store_points_tracking_and_registry_at_it_and_makes_its_folder(tmp_path):
    uri = tracking.use_store(tmp_path)
    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert (tmp_path / "mlruns").is_dir()
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri


def test_use_store_on_a_server_makes_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.use_store() == "http://127.0.0.1:5000"
    assert mlflow.get_registry_uri() == "http://127.0.0.1:5000"
    assert list(tmp_path.iterdir()) == []


def test_setup_creates_the_experiment_once_with_artifacts_beside_the_db(tmp_path, monkeypatch):
    # given a checkout with no store yet
    monkeypatch.chdir(tmp_path)
    # when setup runs twice
    first = tracking.setup("mnist-classifier")
    again = tracking.setup("mnist-classifier")
    # then one experiment exists, its artifacts under mlruns/artifacts, and it is the active one
    assert first == again
    experiment = mlflow.get_experiment(first)
    assert experiment.name == "mnist-classifier"
    assert experiment.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    with mlflow.start_run() as run:
        pass
    assert run.info.experiment_id == first


# --- what every training run carries -------------------------------------------------------------


def test_flatten_joins_nested_keys_with_dots():
    nested = {"train": {"epochs": 3, "model": {"dropout": 0.5, "dense_units": 64}}, "seed": 7}
    assert tracking.flatten("", nested) == {
        "train.epochs": 3,
        "train.model.dropout": 0.5,
        "train.model.dense_units": 64,
        "seed": 7,
    }
    assert tracking.flatten("augment", {"shift": 0.1}) == {"augment.shift": 0.1}
    assert tracking.flatten("tune.enabled", False) == {"tune.enabled": False}


def git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    return subprocess.run([*command, *args], capture_output=True, text=True, check=True).stdout


def test_git_commit_is_heads_sha_and_says_when_tracked_files_changed(tmp_path, monkeypatch):
    # given a repo with one commit
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("epochs = 3\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    sha = git(tmp_path, "rev-parse", "HEAD").strip()
    monkeypatch.chdir(tmp_path)
    # then its commit is HEAD's sha; an untracked file does not make it dirty, an edit does
    assert tracking.git_commit() == sha
    (tmp_path / "notes.txt").write_text("untracked")
    assert tracking.git_commit() == sha
    (tmp_path / "train.py").write_text("epochs = 4\n")
    assert tracking.git_commit() == f"{sha}-dirty"


def test_git_commit_outside_git_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repo above tmp_path counts
    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path / "plain")
    assert tracking.git_commit() == "unknown"


def test_dvc_lock_hashes_are_each_outputs_md5_keyed_by_path(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump(LOCK))
    assert tracking.dvc_lock_hashes(lock) == {
        "dvc.data/raw": "a1",
        "dvc.data/dataset": "d4.dir",
        "dvc.data/merge/report.json": "r7",
        "dvc.data/tune": "",
    }


def test_dvc_lock_hashes_of_no_lock_or_an_empty_one_are_empty(tmp_path):
    assert tracking.dvc_lock_hashes(tmp_path / "dvc.lock") == {}
    (tmp_path / "dvc.lock").write_text("")
    assert tracking.dvc_lock_hashes(tmp_path / "dvc.lock") == {}
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n")
    assert tracking.dvc_lock_hashes(tmp_path / "dvc.lock") == {}


def test_lineage_tags_name_the_commit_the_data_and_its_dvc_version(tmp_path, monkeypatch):
    # given a checkout (outside git) whose dvc.lock records the merged dataset
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv(tracking.REASON_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    # when a training run's tags are built
    tags = tracking.lineage_tags(SOURCE)
    # then they say where the data came from, its checksums and DVC's hash of the training set
    assert tags == {
        "git_commit": "unknown",
        "data_source": "mnist",
        "sha256.train-images-idx3-ubyte.gz": "ab" * 32,
        "incoming.digits_added": "12",
        "dvc.data/raw": "a1",
        "dvc.data/dataset": "d4.dir",
        "dvc.data/merge/report.json": "r7",
        "dvc.data/tune": "",
        "data_version": "d4.dir",
        "training_reason": "not given",  # a plain dvc repro: no flow passed a reason
    }
    assert all(isinstance(value, str) for value in tags.values())  # what MLflow tags must be


def test_lineage_tags_before_any_stage_ran_say_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv(tracking.REASON_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.lineage_tags({}) == {
        "git_commit": "unknown",
        "data_source": "unknown",
        "data_version": "unknown",
        "training_reason": "not given",
    }
    # and a training the flow started for a reason carries it
    monkeypatch.setenv(tracking.REASON_ENV, "data drift: 6 of 9 features")
    assert tracking.lineage_tags({})["training_reason"] == "data drift: 6 of 9 features"


# --- the training run, and the later stages that log onto it -----------------------------------


def with_experiment(params: Params, name: str) -> Params:
    return params.model_copy(
        update={"tracking": params.tracking.model_copy(update={"experiment": name})}
    )


def test_a_new_training_run_logs_params_and_lineage_and_leaves_its_id(store, tmp_path, params):
    # given the real params, in an experiment of its own
    params = with_experiment(params, "new-run")
    run_file = tmp_path / "data" / "model" / "run.json"
    # when a training run completes
    with tracking.training_run(params, run_file, SOURCE) as run_id:
        mlflow.log_metric("val_accuracy", 0.98, step=1)
    # then it holds every param flattened, the lineage tags and its metric, and finished
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "train"
    assert run.info.status == RunStatus.to_string(RunStatus.FINISHED)
    assert run.data.params["train.epochs"] == str(params.train.epochs)
    assert run.data.params["train.model.dropout"] == str(params.train.model.dropout)
    assert run.data.params["tracking.experiment"] == "new-run"
    assert run.data.tags["data_source"] == "mnist"
    assert run.data.tags["sha256.train-images-idx3-ubyte.gz"] == "ab" * 32
    assert run.data.metrics == {"val_accuracy": 0.98}
    # and its id, for evaluate and register, is in the run file
    assert json.loads(run_file.read_text()) == {
        "run_id": run_id,
        "experiment_id": mlflow.get_experiment_by_name("new-run").experiment_id,
    }
    assert tracking.read_run_id(run_file) == run_id


def test_a_resumed_training_run_continues_the_same_run_without_relogging(store, tmp_path, params):
    # given a training run that was killed after epoch 1 (its run file never written)
    params = with_experiment(params, "resumed-run")
    with mlflow.start_run(experiment_id=tracking.setup("resumed-run"), run_name="train") as run:
        mlflow.log_param("train.epochs", 3)
        mlflow.log_metric("val_accuracy", 0.9, step=1)
    # when it resumes with params that differ (a param logged again with a new value would fail)
    run_file = tmp_path / "run.json"
    with tracking.training_run(params, run_file, SOURCE, run_id=run.info.run_id) as run_id:
        mlflow.log_metric("val_accuracy", 0.95, step=2)
    # then the same run holds both epochs, keeps its params and has no lineage added afterwards
    assert run_id == run.info.run_id
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.95)]
    resumed = mlflow.get_run(run_id)
    assert resumed.data.params == {"train.epochs": "3"}
    assert "data_source" not in resumed.data.tags
    assert tracking.read_run_id(run_file) == run_id


def test_a_training_that_fails_leaves_no_run_file_and_a_failed_run(store, tmp_path, params):
    params = with_experiment(params, "failed-run")
    run_file = tmp_path / "run.json"
    with (
        pytest.raises(RuntimeError, match="out of memory"),
        tracking.training_run(params, run_file, SOURCE),
    ):
        raise RuntimeError("out of memory")
    assert not run_file.exists()  # evaluate must not pick up a half-trained run
    (run,) = mlflow.search_runs(experiment_names=["failed-run"], output_format="list")
    assert run.info.status == RunStatus.to_string(RunStatus.FAILED)


def test_a_missing_run_file_is_named_with_what_to_do(tmp_path):
    run_file = tmp_path / "data" / "model" / "run.json"
    with pytest.raises(FileNotFoundError) as error:
        tracking.read_run_id(run_file)
    assert str(error.value) == f"{run_file}: no training run id; run the train stage first"


@pytest.mark.parametrize(
    ("content", "what"),
    [("{", "JSONDecodeError"), ("{}", "KeyError"), ("[]", "TypeError"), ('{"run_id": ""}', "''")],
    ids=["truncated", "no-run-id", "not-a-mapping", "empty-id"],
)
def test_a_bad_run_file_is_a_data_error_naming_the_file(tmp_path, content, what):
    # given a run.json that is not what train writes
    run_file = tmp_path / "run.json"
    run_file.write_text(content)
    # then the stage's expected error, naming the file and what is wrong (not a traceback)
    with pytest.raises(DataError) as error:
        tracking.read_run_id(run_file)
    assert str(error.value).startswith(f"{run_file}: ") and what in str(error.value)
    assert "rerun the train stage" in str(error.value)


def test_attach_run_logs_a_later_stage_onto_the_training_run(store, tmp_path, params):
    # given a finished training run
    params = with_experiment(params, "attached-run")
    run_file = tmp_path / "run.json"
    with tracking.training_run(params, run_file, SOURCE) as train_id:
        pass
    # when evaluate attaches to it and logs
    with tracking.attach_run(run_file, "attached-run") as run_id:
        mlflow.log_metric("test_accuracy", 0.991)
    # then the metric is on the training run, which is closed again
    assert run_id == train_id
    assert mlflow.get_run(train_id).data.metrics["test_accuracy"] == 0.991
    assert mlflow.active_run() is None


def test_attach_run_without_a_training_run_names_the_file(store, tmp_path):
    with (
        pytest.raises(FileNotFoundError, match="run.json: no training run id"),
        tracking.attach_run(tmp_path / "run.json", "attached-run"),
    ):
        pytest.fail("no run to attach to")
    assert mlflow.active_run() is None


# --- the registry -------------------------------------------------------------------------------


def test_current_champion_is_the_version_holding_the_alias_or_none(store):
    # given the project's client on the store
    tracking.setup("champion-test")
    client = tracking.client()
    assert client.tracking_uri == store
    # then a model that does not exist has no champion
    assert tracking.current_champion(client, "never-registered", "champion") is None
    # nor does a registered one whose versions hold no alias
    with mlflow.start_run() as run:
        pass
    client.create_registered_model("digits")
    for _ in range(2):
        client.create_model_version(
            "digits", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
    assert tracking.current_champion(client, "digits", "champion") is None
    # once version 2 holds the alias, it is the champion (and not under another alias)
    client.set_registered_model_alias("digits", "champion", "2")
    assert str(tracking.current_champion(client, "digits", "champion").version) == "2"
    assert tracking.current_champion(client, "digits", "challenger") is None
    # and the registry it used is the store's own
    own = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    assert own.get_model_version_by_alias("digits", "champion").run_id == run.info.run_id
