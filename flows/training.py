"""Prefect flow ``mnist-training``: run the DVC stages of dvc.yaml, one Prefect task per stage.

The stage list and order come from DVC's own graph of dvc.yaml; nothing is retyped here. Each
task runs ``dvc repro --single-item <stage>``, so DVC still decides what is up to date, caches the
outputs and writes dvc.lock exactly as a plain ``dvc repro`` does; Prefect adds retries (from each
stage's ``meta.retries``), logs, parameters and schedules.

One training at a time per checkout: a run in the checkout (or in .smoke/) holds an exclusive
lock on ``.run/training.lock`` for its whole duration, so a run started by hand collides with a
deployment run as well. A run with overrides trains in a scratch copy of its own and takes no
lock: experiments run side by side, as many as there are workers.

    python -m flows.training                      # works without a Prefect server (ephemeral API)
    python -m flows.training --smoke              # the same flow on the small slice, in .smoke/
    python -m flows.training --epochs 3 --trials 2    # overrides: run in a scratch copy
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import networkx as nx
import yaml
from prefect import flow, get_run_logger, task
from prefect.states import Cancelled, State

from flows.env import stage_env
from pipelines.config import deep_merge, load_params, read_yaml
from pipelines.tracking import REASON_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RETRY_DELAY_S = 10
LOCK_FILE = Path(".run") / "training.lock"  # under the repo a training runs in (its `root`)
RUNS_DIR = Path(".run") / "runs"  # scratch copies of runs with overrides, one per flow run name
LOCK_POLL_S = 1.0  # how often a waiting training retries the lock
SKIPPED_EXIT = 75  # EX_TEMPFAIL: `python -m flows.training` skipped because another training runs


@dataclass(frozen=True)
class StageSpec:
    """A stage as the flow needs it: its name and how often Prefect retries it."""

    name: str
    retries: int


class TrainingBusy(RuntimeError):
    """Another training holds the lock; the message names it (pid, flow run, start time)."""


def read_holder(path: Path) -> dict[str, Any]:
    """Who holds the training lock, as its holder wrote it; {} if nobody or not yet written."""
    for _ in range(5):  # the holder writes right after it locks: give it a moment
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return {}
        if text:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return {"raw": text}
        time.sleep(0.05)
    return {}


def busy_message(holder: dict[str, Any]) -> str:
    """'another training is running: pid 12, flow run 'calm-fox', since ...; skipped'."""
    if not holder.get("pid"):
        who = "holder unknown"
    else:
        who = (
            f"pid {holder['pid']}, flow run '{holder.get('flow_run', '?')}', "
            f"since {holder.get('since', '?')}"
        )
    return f"another training is running: {who}; skipped"


@contextmanager
def training_lock(path: Path, flow_run: str, wait_s: float = 0) -> Iterator[dict[str, Any]]:
    """Hold the exclusive training lock at ``path`` (flock), waiting up to ``wait_s`` seconds for it.

    The file holds the holder's pid, flow run name and start time, so a training that finds it
    taken can say who runs. The kernel drops a flock when its process dies, so a killed training
    leaves no stale lock behind.

    Raises:
        TrainingBusy: still held by another process (or another open of it) after ``wait_s``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the stages' subprocesses
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TrainingBusy(busy_message(read_holder(path))) from None
                time.sleep(min(LOCK_POLL_S, left))
        holder = {
            "pid": os.getpid(),
            "flow_run": flow_run,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield holder
        finally:
            os.ftruncate(fd, 0)  # empty: nobody holds it
    finally:
        os.close(fd)  # releases the flock


def param_overrides(
    epochs: int | None, trials: int | None, tune_workers: int | None = None
) -> dict[str, Any]:
    """The flow's parameters as a params.yaml override: {"train": {"epochs": 3}, ...}."""
    overrides: dict[str, Any] = {}
    if tune_workers is not None:
        overrides["tune"] = {"workers": tune_workers}
    if epochs is not None:
        overrides["train"] = {"epochs": epochs}
    if trials is not None:
        overrides.setdefault("tune", {})["n_trials"] = trials
    return overrides


def prepare_workdir(source: Path, smoke: bool, overrides: dict[str, Any], run_name: str) -> Path:
    """Where the stages run: ``source`` itself, or a scratch copy when the params must differ.

    Without smoke or overrides the checkout's params.yaml is the one to run, so the stages run in
    place and dvc.lock is updated there. Otherwise the checkout's tracked params.yaml must stay as
    it is: smoke runs in ``.smoke/`` (as ``make smoke``), and other overrides in
    ``.run/runs/<flow run name>/``; both are copies with the overrides merged into params.yaml.
    """
    if not smoke and not overrides:
        return source
    from flows.scratch import SMOKE_OVERRIDES, make_scratch_copy

    merged = deep_merge(read_yaml(source / SMOKE_OVERRIDES), overrides) if smoke else overrides
    if smoke:
        dest = source / ".smoke"
    else:
        dest = source / RUNS_DIR / (re.sub(r"[^A-Za-z0-9_.-]", "_", run_name) or "run")
    with tempfile.TemporaryDirectory() as tmp:
        overrides_file = Path(tmp) / "flow-parameters.yaml"  # the name params errors cite
        overrides_file.write_text(yaml.safe_dump(merged, sort_keys=False))
        return make_scratch_copy(source, dest, overrides_file)


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
def run_stage(stage: str, root: str, force: bool = False, reason: str | None = None) -> str:
    """``dvc repro --single-item <stage>`` in ``root``, streaming its output into the Prefect log.
    ``reason`` reaches the stages as MNIST_TRAINING_REASON (tagged on the run and the version)."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (
        ["--force"] if force else []
    )
    logger.info("%s: %s", stage, " ".join(cmd[1:]))
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=stage_env({REASON_ENV: reason} if reason else None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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
def training(
    root: str | None = None,
    force: bool = False,
    smoke: bool = False,
    epochs: int | None = None,
    trials: int | None = None,
    tune_workers: int | None = None,
    reason: str | None = None,
) -> list[str] | State:
    """Run every stage of dvc.yaml in order; a failed stage stops the flow before the next one.

    Args:
        root: repo to run in (default: this checkout).
        force: rerun stages even when DVC finds them up to date.
        smoke: run on the small slice (params.smoke.yaml) in a scratch copy under ``.smoke/``.
        epochs: override ``train.epochs`` (the run goes to a scratch copy; params.yaml stays).
        trials: override ``tune.n_trials`` (likewise).
        tune_workers: override ``tune.workers``: trials at a time on the Dask cluster (likewise).
        reason: why this training runs (a drift check's findings, from the monitoring
            automation): the tag ``training_reason`` of the MLflow run and the model version.

    Returns:
        The stages checked, in order; or a Cancelled state when another training held the lock.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    source = Path(root or REPO_ROOT).resolve()
    run_name = flow_run.get_name() or "unnamed"
    wait_s = load_params(source / "params.yaml").deploy.lock_wait_s
    overrides = param_overrides(epochs, trials, tune_workers)
    # A run with overrides (not smoke) trains in a scratch copy of its own, .run/runs/<run name>:
    # it touches none of the checkout's files, so it runs beside other trainings, lock-free.
    own_copy = bool(overrides) and not smoke
    if wait_s and not own_copy:
        logger.info("taking the training lock %s (waiting up to %g s)", source / LOCK_FILE, wait_s)
    with ExitStack() as stack:
        try:
            if not own_copy:
                stack.enter_context(training_lock(source / LOCK_FILE, run_name, wait_s))
        except TrainingBusy as busy:
            logger.warning("%s", busy)
            # Cancelled, not Completed: nothing was trained, and a Completed scheduled retrain would
            # read as "the model is up to date" in the UI, to automations and to is_completed().
            # Not Failed either: nothing broke, and Cancelled is what Prefect itself gives a second
            # run of a deployment at its concurrency limit (flows/deploy.py).
            return Cancelled(message=str(busy))
        workdir = prepare_workdir(source, smoke, overrides, run_name)
        if workdir != source:
            logger.info("running in %s", workdir)
        if reason:
            logger.info("reason: %s", reason)
        done = []
        for spec in stage_order(workdir):
            stage_task = run_stage.with_options(name=f"stage-{spec.name}", retries=spec.retries)
            done.append(stage_task(spec.name, str(workdir), force, reason))
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
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--trials", type=int, default=None, help="override tune.n_trials")
    parser.add_argument(
        "--tune-workers", type=int, default=None, help="override tune.workers (trials at a time)"
    )
    parser.add_argument("--reason", default=None, help="why: tagged on the run and the version")
    args = parser.parse_args()
    state = training(
        root=args.root,
        force=args.force,
        smoke=args.smoke,
        epochs=args.epochs,
        trials=args.trials,
        tune_workers=args.tune_workers,
        reason=args.reason,
        return_state=True,
    )
    if state.is_cancelled():
        print(f"mnist-training: {state.message}", file=sys.stderr)
        sys.exit(SKIPPED_EXIT)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    main()
