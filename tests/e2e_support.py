"""Helpers for the end-to-end tests: scratch copies of the repo and running DVC in them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from flows.env import stage_env
from flows.scratch import make_scratch_copy

REPO = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((REPO / "params.smoke.yaml").read_text())
MODEL_NAME = SMOKE["register"]["model_name"]  # scratch repos register under the smoke names
EXPERIMENT = SMOKE["tracking"]["experiment"]
STAGES = [  # dvc.yaml's stages in the order they run
    "ingest",
    "merge",
    "validate",
    "augment",
    "tune",
    "train",
    "evaluate",
    "export",
    "numbers",
    "register",
]


def scratch_repo(dest: Path, extra_overrides: dict | None = None) -> Path:
    """A copy of this repo under ``dest`` with params.smoke.yaml (plus ``extra_overrides``) applied."""
    overrides = yaml.safe_load((REPO / "params.smoke.yaml").read_text())
    if extra_overrides:
        from pipelines.config import deep_merge

        overrides = deep_merge(overrides, extra_overrides)
    override_file = dest.parent / f"{dest.name}-overrides.yaml"
    override_file.write_text(yaml.safe_dump(overrides))
    return make_scratch_copy(REPO, dest, override_file)


def run_in(
    workdir: Path, *args: str, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in ``workdir`` with its own MLflow store; output captured as text."""
    full_env = stage_env({"TF_CPP_MIN_LOG_LEVEL": "3"})
    for leaked in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # mlflow.set_*_uri set them
        full_env.pop(leaked, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=workdir,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tracking_uri(workdir: Path) -> str:
    """The sqlite store a scratch copy's stages write to."""
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


def stages_run(output: str) -> list[str]:
    """Names of the stages DVC actually ran, from its "Running stage 'x'" lines."""
    return [
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    ]


def client_for(workdir: Path):
    """An MLflow client on a scratch copy's store, for tracking and registry alike."""
    import mlflow

    uri = tracking_uri(workdir)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
