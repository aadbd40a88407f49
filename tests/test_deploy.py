"""`make up`'s servers and deployments, and one training at a time.

The lock and override tests need no server. The rest start a real Prefect server and a real MLflow
server on free loopback ports (through flows/servers.py, the code behind `make up` / `make down`),
serve the two deployments against them, and trigger runs through the Prefect client. One smoke
training serves every server test: three triggers at once plus a run started by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from uuid import UUID

import psutil
import pytest
import yaml

from flows.servers import DEPLOYMENTS, Layout, cancel_runs_in_progress, down, status, up
from flows.supervise import alive
from flows.training import (
    LOCK_FILE,
    SKIPPED_EXIT,
    TrainingBusy,
    param_overrides,
    prepare_workdir,
    read_holder,
    training_lock,
)
from pipelines.config import ParamsError, load_params
from tests.e2e_support import scratch_repo
from tests.team_support import free_port

FLOW_RUN_TIMEOUT_S = 900  # several smoke trainings, with room for a slow machine
DEPLOYMENT_LIMIT_MESSAGE = "Deployment concurrency limit reached."  # Prefect's CANCEL_NEW message


# --- the training lock, no servers ------------------------------------------------------------


def test_a_held_lock_makes_a_second_training_skip_naming_the_holder(tmp_path):
    lock = tmp_path / LOCK_FILE
    with training_lock(lock, "first-run") as holder:
        assert read_holder(lock) == holder
        t0 = time.monotonic()
        with pytest.raises(TrainingBusy) as busy, training_lock(lock, "second-run", wait_s=0.6):
            pytest.fail("the second training must not get the lock")
        assert time.monotonic() - t0 >= 0.6  # it waited lock_wait_s before giving up
    assert str(busy.value) == (
        f"another training is running: pid {os.getpid()}, flow run 'first-run', "
        f"since {holder['since']}; skipped"
    )
    assert read_holder(lock) == {}  # released and emptied
    with training_lock(lock, "third-run", wait_s=0):
        assert read_holder(lock)["flow_run"] == "third-run"


def test_make_run_takes_the_same_lock(tmp_path):
    """`make run` is `python -m flows.locked dvc repro`: it runs its command only when no training
    holds the lock, and otherwise exits 75 naming the holder."""
    from tests.conftest import PARAMS_PATH, REPO

    (tmp_path / "params.yaml").write_text(PARAMS_PATH.read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "flows.locked", sys.executable, "-c", "raise SystemExit(3)"]
    free = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert free.returncode == 3, free.stderr  # the command ran, and its status is passed on
    with training_lock(tmp_path / LOCK_FILE, "scheduled-run"):
        busy = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert busy.returncode == SKIPPED_EXIT
    assert "another training is running" in busy.stderr and "'scheduled-run'" in busy.stderr


def test_a_waiting_training_gets_the_lock_when_the_holder_finishes_in_time(tmp_path):
    lock = tmp_path / LOCK_FILE
    held = threading.Event()

    def hold_briefly() -> None:
        with training_lock(lock, "short-run"):
            held.set()
            time.sleep(0.5)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    held.wait(5)
    with training_lock(lock, "patient-run", wait_s=10) as got:
        assert got["flow_run"] == "patient-run"
    holder.join()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / LOCK_FILE
    code = (
        "import sys, time\n"
        "from flows.training import training_lock\n"
        f"with training_lock({str(lock)!r}, 'doomed-run'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with (
            pytest.raises(TrainingBusy, match="flow run 'doomed-run'"),
            training_lock(lock, "too-early"),
        ):
            pass
    finally:
        proc.kill()
        proc.wait()
    with training_lock(lock, "after-the-kill", wait_s=0):  # the kernel dropped the dead one's lock
        pass


# --- overrides and deployment definitions, no servers -----------------------------------------


def test_overrides_run_in_a_scratch_copy_and_leave_params_yaml_alone(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    before = (repo / "params.yaml").read_bytes()
    assert prepare_workdir(repo, smoke=False, overrides={}, run_name="plain") == repo

    overrides = param_overrides(epochs=3, trials=2)
    copy = prepare_workdir(repo, smoke=False, overrides=overrides, run_name="brave-otter")
    assert copy == repo / ".run" / "runs" / "brave-otter"
    params = load_params(copy / "params.yaml")
    assert (params.train.epochs, params.tune.n_trials) == (3, 2)

    smoke = prepare_workdir(repo, smoke=True, overrides=param_overrides(4, None), run_name="x")
    assert smoke == repo / ".smoke"
    params = load_params(smoke / "params.yaml")
    assert (params.train.epochs, params.train.max_images) == (4, 2000)  # smoke slice + override

    with pytest.raises(ParamsError, match="train.epochs"):
        prepare_workdir(repo, smoke=False, overrides=param_overrides(0, None), run_name="bad")
    assert (repo / "params.yaml").read_bytes() == before


def test_deployments_follow_params_yaml():
    from flows.deploy import SCHEDULED, SCHEDULED_REASON, build_deployments
    from flows.training import REPO_ROOT

    deploy = load_params(REPO_ROOT / "params.yaml").deploy
    deployments = {d.name: d for d in build_deployments(deploy, root="/some/repo")}
    assert tuple(deployments) == DEPLOYMENTS  # the names flows/servers.py waits for
    (schedule,) = deployments[SCHEDULED].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (
        deploy.retrain_cron,
        deploy.timezone,
    )
    for d in deployments.values():
        assert d.concurrency_limit == 1
        assert d.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert d.entrypoint == "flows.training.training"
    assert deployments["manual"].parameters == {"root": "/some/repo"}
    assert deployments[SCHEDULED].parameters == {"root": "/some/repo", "reason": SCHEDULED_REASON}


def test_the_drift_check_runs_on_monitor_cron():
    from flows.deploy import monitoring_deployment
    from flows.training import REPO_ROOT

    params = load_params(REPO_ROOT / "params.yaml")
    drift = monitoring_deployment(params.monitor, params.deploy.timezone, "/some/repo")
    assert (drift.flow_name, drift.name) == ("mnist-monitoring", "drift-check")
    (schedule,) = drift.schedules
    assert schedule.schedule.cron == params.monitor.cron
    assert drift.parameters == {"root": "/some/repo"}
    assert drift.entrypoint == "flows.monitoring.monitoring"


# --- real servers -----------------------------------------------------------------------------


def processes_of(layout: Layout) -> list[psutil.Process]:
    """Every live process started for ``layout``: they all carry its PREFECT_API_URL."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PREFECT_API_URL") == layout.prefect_api and alive(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[Layout]:
    """`make up` on free ports in a tmp folder, serving runs in a scratch repo; always `down`."""
    tmp = tmp_path_factory.mktemp("servers")
    layout = Layout(
        run_dir=tmp / ".run",
        mlruns=tmp / "mlruns",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        root=scratch_repo(tmp / "repo"),
        extra_env={"PREFECT_RUNNER_POLL_FREQUENCY": "2", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        up(layout, timeout_s=240)
        yield layout
    finally:
        try:
            down(layout)
        finally:
            leftovers = processes_of(layout)
            for proc in leftovers:  # never leave one behind, but fail the test that caused it
                proc.kill()
        assert not leftovers, f"still running after down: {[p.cmdline() for p in leftovers]}"
        assert layout.supervisor().pid() is None, "supervisord still answers after down"


@contextmanager
def prefect_client(layout: Layout):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: layout.prefect_api}),
        get_client(sync_client=True) as client,
    ):
        yield client


@dataclass
class Outcome:
    """A triggered flow run once it is final: its name, state and the stages it ran."""

    name: str
    deployment: str
    state_type: str
    message: str | None
    stages: list[str]


@dataclass
class Runs:
    outcomes: list[Outcome]
    by_hand: subprocess.CompletedProcess
    holder: dict


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def runs(servers: Layout) -> Runs:
    """Trigger manual, manual and scheduled-retrain at once (smoke, in the scratch repo); while the
    one that got through trains, start a training by hand; wait until all three runs are final."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    lock = servers.root / LOCK_FILE
    with prefect_client(servers) as client:
        ids: dict[UUID, str] = {}
        for name in ("manual", "manual", "scheduled-retrain"):
            deployment = client.read_deployment_by_name(f"mnist-training/{name}")
            run = client.create_flow_run_from_deployment(deployment.id, parameters={"smoke": True})
            ids[run.id] = name
        holder = wait_for(lambda: read_holder(lock), 180, "a run to take the training lock")

        env = {**os.environ, "PREFECT_API_URL": servers.prefect_api, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.pop("MLFLOW_TRACKING_URI", None)
        by_hand = subprocess.run(
            [sys.executable, "-m", "flows.training", "--root", str(servers.root), "--smoke"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

        def all_final():
            found = [client.read_flow_run(i) for i in ids]
            return found if all(r.state and r.state.is_final() for r in found) else None

        final = wait_for(all_final, FLOW_RUN_TIMEOUT_S, "the three flow runs to end")
        outcomes = []
        for flow_run in final:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                # explicit: 3.8.8's client sends null for both, and its server answers 422
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=100,
            )
            outcomes.append(
                Outcome(
                    name=flow_run.name,
                    deployment=ids[flow_run.id],
                    state_type=flow_run.state.type.value,
                    message=flow_run.state.message,
                    stages=sorted(t.name.split("-")[1] for t in task_runs),
                )
            )
    return Runs(outcomes=outcomes, by_hand=by_hand, holder=holder)


@pytest.mark.e2e
def test_up_again_starts_no_duplicates(servers, capsys):
    before = {p.pid for p in processes_of(servers)}
    pids = up(servers)
    out = capsys.readouterr().out
    assert out.count("already running") == 4, out  # supervisord and its three programs
    assert {p.pid for p in processes_of(servers)} == before
    assert set(pids.values()) <= before
    assert status(servers)


@pytest.mark.e2e
def test_manual_smoke_run_trains_and_logs_to_the_mlflow_server(servers, runs):
    from mlflow import MlflowClient

    (trained,) = [o for o in runs.outcomes if o.state_type == "COMPLETED"]
    assert "train" in trained.stages and "register" in trained.stages

    params = load_params(servers.root / "params.yaml")
    client = MlflowClient(tracking_uri=servers.mlflow_url, registry_uri=servers.mlflow_url)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    (train_run,) = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name = 'train'"
    )
    assert train_run.info.status == "FINISHED"
    assert train_run.data.params["train.epochs"] == "1"  # the smoke slice

    champion = client.get_model_version_by_alias(params.register_.model_name, "champion")
    assert champion.run_id == train_run.info.run_id
    registration = json.loads((servers.root / ".smoke/data/register/registration.json").read_text())
    assert registration["version"] == int(champion.version) == 1
    # Logged to the server (whose store is the tmp mlruns), not to the scratch copy's own file.
    assert not (servers.root / ".smoke/mlruns/mlflow.db").exists()
    assert (servers.mlruns / "mlflow.db").exists()
    # The scratch repo's params.yaml is untouched: smoke ran in its .smoke/ copy.
    assert yaml.safe_load((servers.root / "params.yaml").read_text())["deploy"]


@pytest.mark.e2e
def test_only_one_of_three_simultaneous_triggers_trains(runs):
    by_state = sorted(runs.outcomes, key=lambda o: o.state_type)
    assert [o.state_type for o in by_state] == ["CANCELLED", "CANCELLED", "COMPLETED"]
    trained = by_state[2]
    assert runs.holder["flow_run"] == trained.name
    cancelled = {o.message: o for o in by_state[:2]}
    # Prefect's own limit: the second manual run never started (limit 1 per deployment).
    refused = cancelled.pop(DEPLOYMENT_LIMIT_MESSAGE)
    assert refused.deployment == "manual" and refused.stages == []
    # The flow's lock: the other deployment's run started, found the lock held and skipped.
    ((message, skipped),) = cancelled.items()
    assert message == (
        f"another training is running: pid {runs.holder['pid']}, flow run '{trained.name}', "
        f"since {runs.holder['since']}; skipped"
    )
    assert skipped.stages == []


@pytest.mark.e2e
def test_a_training_started_by_hand_collides_with_a_deployment_run(runs):
    assert runs.by_hand.returncode == SKIPPED_EXIT, runs.by_hand.stdout + runs.by_hand.stderr
    assert (
        f"mnist-training: another training is running: pid {runs.holder['pid']}, "
        f"flow run '{runs.holder['flow_run']}'"
    ) in runs.by_hand.stderr


@pytest.mark.e2e
def test_down_cancels_a_run_in_progress(servers, runs):
    """`down` first cancels through Prefect: the run ends Cancelled, not Running for good."""
    lock = servers.root / LOCK_FILE
    with prefect_client(servers) as client:
        deployment = client.read_deployment_by_name("mnist-training/manual")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"smoke": True})
        wait_for(
            lambda: read_holder(lock).get("flow_run") == run.name, 120, "the run to take the lock"
        )
        assert cancel_runs_in_progress(servers) == [run.name]
        assert client.read_flow_run(run.id).state.is_cancelled()

    def stages_left() -> list[str]:
        left = []
        for proc in processes_of(servers):
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:  # ended meanwhile
                continue
            if any(m in cmdline for m in ("prefect.engine", "dvc", "pipelines.")):
                left.append(cmdline)
        return left

    wait_for(lambda: not stages_left(), 30, "the cancelled run's processes to end")
    with training_lock(lock, "after-the-cancel", wait_s=10):  # and its lock with them
        pass


def test_tune_workers_is_a_flow_parameter_merged_with_the_others():
    """`--param tune_workers=2` reaches params.yaml's tune.workers in the run's scratch copy."""
    from flows.training import param_overrides

    assert param_overrides(None, None, tune_workers=2) == {"tune": {"workers": 2}}
    assert param_overrides(3, 2, tune_workers=2) == {
        "train": {"epochs": 3},
        "tune": {"workers": 2, "n_trials": 2},
    }
