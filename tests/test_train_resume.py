"""A killed training resumes from its last epoch checkpoint, on the same MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.e2e_support import run_in, scratch_repo

pytestmark = pytest.mark.e2e


def train_cmd() -> list[str]:
    """The train stage's command, exactly as dvc.yaml declares it."""
    from tests.e2e_support import REPO

    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    return cmd.split()


def test_killed_training_resumes_from_checkpoint(tmp_path):
    from flows.env import stage_env

    # Given the data stages done, and a 3-epoch training on a small slice
    workdir = scratch_repo(
        tmp_path / "repo",
        {"train": {"epochs": 3, "max_images": 1000}, "tune": {"enabled": False}},
    )
    prep = run_in(workdir, "dvc", "repro", "tune")
    assert prep.returncode == 0, prep.stdout + prep.stderr
    cmd = [sys.executable if part == "python" else part for part in train_cmd()]
    env = stage_env({"TF_CPP_MIN_LOG_LEVEL": "3"})

    # When it is killed right after epoch 1 has been checkpointed
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
    first_lines = []
    for line in proc.stderr:
        first_lines.append(line)
        if "epoch 1/3" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0, "".join(first_lines)
    assert not (workdir / "data/model/model.keras").exists()
    (checkpoint,) = (workdir / "data/checkpoints").iterdir()
    killed_run_id = (checkpoint / "mlflow_run_id").read_text().strip()

    # Then a rerun resumes at epoch 2 on the same MLflow run, and finishes
    rerun = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from checkpoint" in rerun.stderr
    assert (
        "epoch 1/3" not in rerun.stderr
        and "epoch 2/3" in rerun.stderr
        and "epoch 3/3" in rerun.stderr
    )
    run_id = json.loads((workdir / "data/model/run.json").read_text())["run_id"]
    assert run_id == killed_run_id
    # the checkpoint is cleaned up once training completed
    assert not any((workdir / "data/checkpoints").iterdir())
