"""The one module that talks to MLflow: where runs live, what every run carries, and the registry.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``.
``MLFLOW_TRACKING_URI`` switches to any other store, a tracking server included.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import Params
from pipelines.data import DataError, write_json

MLRUNS_DIR = Path("mlruns")
DATASET_DIR = "data/dataset"  # the merge stage's output, the data every later stage reads
RUN_FILE = "run.json"  # the training run's id, passed from train to evaluate and register


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the sqlite file under ``<root>/mlruns``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(root or Path.cwd()).resolve()
    return f"sqlite:///{root / MLRUNS_DIR / 'mlflow.db'}"


def use_store(root: Path | None = None) -> str:
    """Point MLflow's tracking and registry at the project's store (``tracking_uri``); return it."""
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def setup(experiment: str, root: Path | None = None) -> str:
    """Point MLflow at the project's store and experiment; return the experiment id."""
    uri = use_store(root)
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        experiment_id = existing.experiment_id
    else:
        artifact_location = None
        if uri.startswith("sqlite:///"):  # keep the artifacts beside the db, under mlruns/
            artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"train": {"model": {"dropout": 0.5}}} -> {"train.model.dropout": 0.5}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


def git_commit() -> str:
    """HEAD's sha, with ``-dirty`` when the work tree has uncommitted changes; "unknown" outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_lock_hashes(lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of every output recorded in dvc.lock so far, keyed ``dvc.<path>``: the data lineage."""
    if not lock_path.exists():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            hashes[f"dvc.{out['path']}"] = out.get("md5", "")
    return hashes


REASON_ENV = "MNIST_TRAINING_REASON"  # set by the mnist-training flow from its `reason` parameter


def training_reason() -> str:
    """Why this training runs: the flow's ``reason`` (a drift check's findings, the schedule),
    or "not given" for a plain ``dvc repro``."""
    return os.environ.get(REASON_ENV, "").strip() or "not given"


def lineage_tags(source_record: dict) -> dict[str, str]:
    """Tags every training run carries: commit, data source, data checksums and DVC hashes.

    ``data_version`` is DVC's hash of data/dataset (the merge stage's output): the training set
    the model saw. ``incoming.digits_added`` says how many digits the merge stage added from data/incoming.
    """
    tags = {
        "git_commit": git_commit(),
        "data_source": source_record.get("data_source", "unknown"),
        "training_reason": training_reason(),
    }
    tags.update({f"sha256.{name}": sha for name, sha in source_record.get("files", {}).items()})
    tags.update({f"incoming.{k}": str(v) for k, v in source_record.get("incoming", {}).items()})
    hashes = dvc_lock_hashes()
    tags.update(hashes)
    tags["data_version"] = hashes.get(f"dvc.{DATASET_DIR}", "unknown")
    return tags


@contextmanager
def training_run(
    params: Params, run_file: Path, source_record: dict, run_id: str | None = None
) -> Iterator[str]:
    """Start (or, with ``run_id``, resume) the training run; write its id to ``run_file`` on success."""
    setup(params.tracking.experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "train") as run:
        if run_id is None:
            mlflow.log_params(flatten("", params.model_dump(by_alias=True)))
            mlflow.set_tags(lineage_tags(source_record))
        yield run.info.run_id
    write_json(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})


def read_run_id(run_file: Path) -> str:
    """The training run id that train left in ``run_file``."""
    try:
        run_id = json.loads(Path(run_file).read_text())["run_id"]
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{run_file}: no training run id; run the train stage first"
        ) from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f"{run_file}: not a training run record ({type(exc).__name__}: {exc}); "
            "rerun the train stage"
        ) from exc
    if not isinstance(run_id, str) or not run_id:
        raise DataError(
            f"{run_file}: run_id is {run_id!r}, expected a run id; rerun the train stage"
        )
    return run_id


@contextmanager
def attach_run(run_file: Path, experiment: str) -> Iterator[str]:
    """Reopen the training run named in ``run_file`` so later stages log onto it."""
    setup(experiment)
    run_id = read_run_id(run_file)
    with mlflow.start_run(run_id=run_id):
        yield run_id


def client() -> MlflowClient:
    """A client on the configured tracking and registry URIs."""
    return MlflowClient(
        tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri()
    )


def current_champion(client: MlflowClient, model_name: str, alias: str):
    """The model version holding ``alias`` (the champion), or None if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
