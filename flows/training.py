"""Prefect flow ``mnist-training``: run the DVC stages of dvc.yaml, one Prefect task per stage.

The stage list and order come from DVC's own graph of dvc.yaml; nothing is retyped here. Each
task runs ``dvc repro --single-item <stage>``, so DVC still decides what is up to date, caches the
outputs and writes dvc.lock exactly as a plain ``dvc repro`` does; Prefect adds retries (from each
stage's ``meta.retries``), logs, parameters and schedules.

    python -m flows.training            # works without a Prefect server (ephemeral API)
    python -m flows.training --smoke    # the same flow on the small slice, in a scratch copy
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
from prefect import flow, get_run_logger, task

from flows.env import stage_env

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RETRY_DELAY_S = 10


@dataclass(frozen=True)
class StageSpec:
    """A stage as the flow needs it: its name and how often Prefect retries it."""

    name: str
    retries: int


def stage_order(root: Path) -> list[StageSpec]:
    """dvc.yaml's stages in dependency order (ties keep the file's order), with their retries."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        position = {stage.name: i for i, stage in enumerate(stages)}
        # DVC's edges point from a stage to what it depends on; reverse them to run dependencies first.
        graph = repo.index.graph.reverse()
        ordered = nx.lexicographical_topological_sort(graph, key=lambda s: position[s.name])
        return [StageSpec(s.name, int((s.meta or {}).get("retries", 0))) for s in ordered]


@task(name="dvc-stage", retry_delay_seconds=DEFAULT_RETRY_DELAY_S)
def run_stage(stage: str, root: str, force: bool = False) -> str:
    """``dvc repro --single-item <stage>`` in ``root``, streaming its output into the Prefect log."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (
        ["--force"] if force else []
    )
    logger.info("%s: %s", stage, " ".join(cmd[1:]))
    proc = subprocess.Popen(
        cmd, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info("%s | %s", stage, line)
            tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise RuntimeError(
            f"stage '{stage}' failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail)
        )
    return stage


@flow(name="mnist-training", log_prints=True)
def training(root: str | None = None, force: bool = False, smoke: bool = False) -> list[str]:
    """Run every stage of dvc.yaml in order; a failed stage stops the flow before the next one.

    Args:
        root: repo to run in (default: this checkout).
        force: rerun stages even when DVC finds them up to date.
        smoke: run on the small slice (params.smoke.yaml) in a scratch copy under ``.smoke/``.
    """
    logger = get_run_logger()
    workdir = Path(root or REPO_ROOT)
    if smoke:
        from flows.scratch import make_scratch_copy

        workdir = make_scratch_copy(workdir, workdir / ".smoke")
        logger.info("smoke run in %s", workdir)
    done = []
    for spec in stage_order(workdir):
        stage_task = run_stage.with_options(name=f"stage-{spec.name}", retries=spec.retries)
        done.append(stage_task(spec.name, str(workdir), force))
    logger.info("stages checked in order (DVC skipped those up to date): %s", ", ".join(done))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run the MNIST pipeline as the Prefect flow 'mnist-training'."
    )
    parser.add_argument("--root", default=None, help="repo to run in (default: this checkout)")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument(
        "--smoke", action="store_true", help="small slice, in a scratch copy (.smoke/)"
    )
    args = parser.parse_args()
    state = training(root=args.root, force=args.force, smoke=args.smoke, return_state=True)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    main()
