"""Tuning on a Dask cluster: trials side by side on one shared study, and a worker lost mid-trial.

The clusters are real: a LocalCluster of two processes, and a `dask scheduler` with two
`dask worker` processes started as programs, on a study in a private PostgreSQL cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from pipelines.tune_cluster import worker_seed
from tests.team_support import free_port
from tests.test_tune import load_study, tiny_params, tune_cmd

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent


def overlapping(trials: list[optuna.trial.FrozenTrial]) -> bool:
    """Did any two trials run at the same time?"""
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials if t.datetime_complete)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def test_each_task_draws_with_its_own_seed() -> None:
    seeds = {worker_seed(42, i) for i in range(100)}
    assert len(seeds) == 100
    assert worker_seed(42, 7) == worker_seed(42, 7)
    assert worker_seed(42, 7) != worker_seed(43, 7)


@pytest.mark.e2e
def test_two_workers_run_trials_side_by_side_as_nested_runs(tmp_path, raw_dir) -> None:
    import mlflow

    # given a 4-trial study with tune.workers: 2 and no scheduler: a local cluster
    params = tiny_params(tmp_path, n_trials=4, pruner="none", workers=2)
    cmd, env = tune_cmd(tmp_path, params, raw_dir)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    # when the stage runs
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # then 4 trials finished, two of them at the same time, on two workers
    study = load_study(tmp_path)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4, done.stderr[-3000:]
    assert overlapping(finished), [(t.datetime_start, t.datetime_complete) for t in finished]
    assert "starting a local cluster of 2 workers" in done.stderr
    workers = {
        line.rsplit(" on ", 1)[1].split(" (")[0]
        for line in done.stderr.splitlines()
        if " complete " in line and " on tcp://" in line
    }
    assert len(workers) == 2, done.stderr[-3000:]
    # and every trial is a nested MLflow run under the one tuning run
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist-classifier").experiment_id], max_results=100
    )
    (parent,) = [r for r in runs if r.info.run_name == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [0, 1, 2, 3]
    assert all(c.info.status == "FINISHED" for c in children)
    summary = json.loads((tmp_path / "tune/summary.json").read_text())
    assert summary["trials_finished"] == 4


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def dask_cluster(tmp_path: Path, env: dict, workers: int = 2) -> tuple[str, list]:
    """`dask scheduler` and ``workers`` `dask worker` processes (no nanny: a killed worker stays
    dead) on loopback, as `make up PROFILE=team` runs them; returns the address and processes."""
    from pipelines.tune_cluster import WORKER_ENV

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        start(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
            + ["--no-dashboard"],
            env,
            tmp_path / "scheduler.log",
        )
    ]
    for i in range(workers):
        procs.append(
            start(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny"]
                + ["--no-dashboard", "--name", f"w{i}", "--host", "127.0.0.1"],
                {**env, **WORKER_ENV},
                tmp_path / f"worker{i}.log",
            )
        )
    return address, procs


def running_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    try:
        (name,) = optuna.get_all_study_names(storage)
    except ValueError:
        return []
    study = optuna.load_study(study_name=name, storage=storage)
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def team_tune(tmp_path: Path, raw_dir: Path, storage: str, n_trials: int):
    """The tune stage on a real scheduler with two workers, its study in PostgreSQL."""
    params = tiny_params(tmp_path, n_trials=n_trials, pruner="none", workers=2, trial_epochs=3)
    cmd, env = tune_cmd(tmp_path, params, raw_dir)
    address, procs = dask_cluster(tmp_path, env)
    env = {**env, "DASK_SCHEDULER_ADDRESS": address, "MNIST_TUNE_STORAGE": storage}
    return cmd, env, procs


def start_stage_until_two_trials_run(
    cmd: list[str], env: dict, storage: str, procs: list
) -> subprocess.Popen:
    """Start the tune stage (added to ``procs``) and return once both workers are in a trial."""
    stage = subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    procs.append(stage)
    deadline = time.monotonic() + 300
    while len(running_trials(storage)) < 2:
        assert stage.poll() is None and time.monotonic() < deadline, stage.stderr.read()
        time.sleep(0.5)
    return stage


def load_pg_study(storage: str) -> optuna.Study:
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.e2e
def test_a_worker_killed_mid_trial_loses_that_trial_and_the_study_finishes(
    tmp_path, raw_dir, postgres
) -> None:
    import mlflow

    postgres.create_databases("optuna_kill")
    storage = postgres.url("optuna_kill")
    cmd, env, procs = team_tune(tmp_path, raw_dir, storage, n_trials=4)
    try:
        stage = start_stage_until_two_trials_run(cmd, env, storage, procs)
        # when both workers are in a trial, one worker is killed
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGKILL)
        _, err = stage.communicate(timeout=400)
        # then the stage still ends well, with the 4 trials asked for finished
        assert stage.returncode == 0, err[-3000:]
    finally:
        stop(procs)
    study = load_pg_study(storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4, states
    # and the killed trial is failed (its heartbeat stopped) and its settings were queued again,
    # or, if no trial started after its grace period, it is still marked running: nothing else
    lost = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert len(lost) == 1, states
    if lost[0].state == optuna.trial.TrialState.FAIL:
        retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost[0].number]
        assert retried and retried[0].params == lost[0].params
        client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        run = client.get_run(lost[0].user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
    summary = json.loads((tmp_path / "tune/summary.json").read_text())
    assert summary["trials_finished"] == 4
    assert "***" in summary["storage"] and postgres.password not in summary["storage"]


@pytest.mark.e2e
def test_postgresql_restarted_mid_study_the_workers_reconnect_and_it_finishes(
    tmp_path, raw_dir
) -> None:
    from tests.team_support import postgres_cluster

    # its own cluster: restarting the session's would disturb other tests
    with postgres_cluster("optuna") as cluster:
        storage = cluster.url("optuna")
        cmd, env, procs = team_tune(tmp_path, raw_dir, storage, n_trials=4)
        try:
            stage = start_stage_until_two_trials_run(cmd, env, storage, procs)
            kept = {
                t.number: t.value
                for t in load_pg_study(storage).trials
                if t.state == optuna.trial.TrialState.COMPLETE
            }
            # when PostgreSQL stops under the running trials and comes back 3 s later
            cluster.stop("fast")
            time.sleep(3)
            cluster.start()
            _, err = stage.communicate(timeout=400)
            # then the study finishes the trials asked for
            assert stage.returncode == 0, err[-3000:]
        finally:
            stop(procs)
        study = load_pg_study(storage)
        states = [t.state for t in study.trials]
        assert states.count(optuna.trial.TrialState.COMPLETE) == 4, states
        # what finished before the restart is kept as it was; at most the two running are lost
        assert {n: study.trials[n].value for n in kept} == kept
        assert len(states) - 4 <= 2, states


def test_an_error_raised_while_a_storage_error_was_handled_is_retried(monkeypatch) -> None:
    """Optuna's _run_trial turns a storage error in its ``finally`` into an UnboundLocalError
    whose context is the storage error: that too means the database was away."""
    from pipelines import tune_cluster

    monkeypatch.setattr(tune_cluster, "STORAGE_RETRY_S", 0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            try:
                raise optuna.exceptions.StorageInternalError("the commit failed")
            finally:
                updated_state  # noqa: B018, F821 - what optuna's finally block meets
        return "done"

    assert tune_cluster.retrying("task 0", flaky, wait_s=5) == "done" and len(calls) == 2
    # an error of the trial's own is not retried
    with pytest.raises(ZeroDivisionError):
        tune_cluster.retrying("task 1", lambda: 1 / 0, wait_s=5)


def test_a_trial_the_heartbeat_failed_meanwhile_makes_the_task_ask_for_another(monkeypatch) -> None:
    """Back from an outage, Optuna refuses to finish a trial that another worker's stale-trial
    check has failed and re-queued: the task asks for another trial instead of failing."""
    from pipelines import tune_cluster

    calls = []

    def told_too_late():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("Cannot tell a FAIL trial.")
        return "done"

    assert tune_cluster.retrying("task 0", told_too_late, wait_s=5) == "done" and len(calls) == 2
    with pytest.raises(ValueError, match="Cannot tell a COMPLETE trial"):  # not this case
        tune_cluster.retrying("task 1", lambda: (_ for _ in ()).throw(
            ValueError("Cannot tell a COMPLETE trial.")), wait_s=5)  # fmt: skip
