"""The team profile (`make up PROFILE=team`): real PostgreSQL, MLflow with users, Prefect with its
auth string and a process work pool, and a Dask scheduler with workers; who may do what.

One stack for the module, on free ports, in a temporary folder; stopped even when a test fails.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from flows import team
from flows.servers import Layout, down, status, up
from pipelines.config import load_params
from tests.conftest import REPO
from tests.e2e_support import scratch_repo
from tests.team_support import free_port, need_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stack():
    need_postgres()
    folder = Path(tempfile.mkdtemp(prefix="mnist-team-"))
    folder.chmod(0o755)  # PostgreSQL runs as `postgres` and must reach its data folder
    layout = Layout(
        run_dir=folder / ".run",
        mlruns=folder / "mlruns",
        profile="team",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        postgres_port=free_port(),
        dask_port=free_port(),
        root=scratch_repo(folder / "repo"),  # smoke-sized params: the experiments stay cheap
    )
    try:
        up(layout, timeout_s=240)
        yield layout, team.read_env_file(layout.run_dir / team.SECRETS_FILE)
    finally:
        down(layout)
        shutil.rmtree(folder, ignore_errors=True)


def call(url: str, method: str = "GET", body: dict | None = None, auth: str | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def admin_client(layout: Layout, env: dict, monkeypatch):
    """An MLflow client on the team server, signed in as admin through MLflow's own variables."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.ADMIN_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_ADMIN_PASSWORD"])
    return mlflow.MlflowClient(tracking_uri=layout.mlflow_url, registry_uri=layout.mlflow_url)


def test_every_process_runs_and_answers(stack, capsys) -> None:
    layout, _ = stack
    assert status(layout)
    out = capsys.readouterr().out
    for name in ("postgres", "mlflow-server", "prefect-server", "dask-scheduler"):
        assert name in out
    assert "dask-worker-2" in out and "prefect-worker-2" in out


def test_secrets_live_in_a_private_file_and_not_in_the_config(stack) -> None:
    layout, env = stack
    path = layout.run_dir / team.SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(team.SECRET_KEYS) <= set(env)
    # supervisord's config hands the programs their environment, secrets included: owner only
    conf = layout.run_dir / "supervisord.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert stat.S_IMODE((layout.run_dir / "mlflow-auth.ini").stat().st_mode) == 0o600
    # and nothing in git holds them
    tracked = subprocess.run(
        ["git", "grep", "-l", "-F", "-e", env["MLFLOW_ADMIN_PASSWORD"]],
        cwd=REPO,
        capture_output=True,
    )
    assert tracked.returncode == 1, tracked.stdout
    # a second `up` keeps the same secrets: the databases' passwords must not change
    assert team.team_secrets(layout.run_dir) == {k: env[k] for k in team.SECRET_KEYS}


def test_mlflow_refuses_an_unauthenticated_write_with_401(stack) -> None:
    layout, _ = stack
    url = f"{layout.mlflow_url}/api/2.0/mlflow/experiments/create"
    assert call(url, "POST", {"name": "anonymous"}) == 401
    assert call(f"{layout.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5") == 401


def test_the_reader_browses_but_cannot_register_or_move_an_alias(
    stack, tmp_path, monkeypatch
) -> None:
    layout, env = stack
    admin = team.basic_auth(team.ADMIN_USER, env["MLFLOW_ADMIN_PASSWORD"])
    reader = team.basic_auth(team.READER_USER, env["MLFLOW_READER_PASSWORD"])
    api = f"{layout.mlflow_url}/api/2.0/mlflow"
    # the admin (what the stages use) logs a run with an artifact, through the server, and
    # registers a version with an alias
    client = admin_client(layout, env, monkeypatch)
    experiment = client.create_experiment("team-test")
    run = client.create_run(experiment)
    (tmp_path / "note.txt").write_text("through the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    # --serve-artifacts: the file went through the server into its artifact folder
    assert any((layout.run_dir / "mlflow-artifacts").rglob("note.txt"))
    client.create_registered_model("team-model")
    version = client.create_model_version("team-model", run.info.artifact_uri, run.info.run_id)
    client.set_registered_model_alias("team-model", "champion", version.version)
    # the reader sees runs and models
    assert call(f"{api}/experiments/search?max_results=5", auth=reader) == 200
    assert call(f"{api}/registered-models/get?name=team-model", auth=reader) == 200
    # but cannot add a version, move the alias or delete
    create = {"name": "team-model", "source": run.info.artifact_uri, "run_id": run.info.run_id}
    assert call(f"{api}/model-versions/create", "POST", create, auth=reader) == 403
    alias = {"name": "team-model", "alias": "champion", "version": "1"}
    assert call(f"{api}/registered-models/alias", "POST", alias, auth=reader) == 403
    assert call(f"{api}/registered-models/alias", "DELETE", alias, auth=reader) == 403
    # and a wrong password is refused outright
    wrong = team.basic_auth(team.READER_USER, "not-the-password")
    assert call(f"{api}/experiments/search?max_results=5", auth=wrong) == 401
    assert call(f"{api}/registered-models/alias", "POST", alias, auth=admin) == 200


def test_prefect_refuses_a_client_without_the_auth_string(stack) -> None:
    layout, env = stack
    good = team.basic_auth(*env["PREFECT_API_AUTH_STRING"].split(":", 1))
    assert call(f"{layout.prefect_api}/work_pools/{team.WORK_POOL}") == 401
    assert call(f"{layout.prefect_api}/work_pools/{team.WORK_POOL}", auth=good) == 200


def test_the_work_pool_has_two_workers_and_dask_two_workers(stack) -> None:
    from distributed import Client

    layout, env = stack
    good = team.basic_auth(*env["PREFECT_API_AUTH_STRING"].split(":", 1))
    request = urllib.request.Request(
        f"{layout.prefect_api}/work_pools/{team.WORK_POOL}/workers/filter",
        data=b"{}",
        headers={"Authorization": good, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        workers = json.loads(response.read())
    assert {w["name"] for w in workers} >= {"prefect-worker-1", "prefect-worker-2"}
    with Client(env["DASK_SCHEDULER_ADDRESS"], timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        assert len(client.scheduler_info()["workers"]) == 2


@pytest.mark.timeout(1500)
def test_two_experiments_run_at_once_on_the_two_workers_and_both_pass_the_gate(
    stack, monkeypatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    layout, env = stack
    settings = {
        PREFECT_API_URL: layout.prefect_api,
        PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"],
    }
    # when two manual runs with different params are triggered at the same moment
    with temporary_settings(settings), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("mnist-training/manual")
        assert deployment.work_pool_name == team.WORK_POOL
        ids = [
            client.create_flow_run_from_deployment(deployment.id, parameters=p).id
            for p in ({"epochs": 1}, {"epochs": 1, "trials": 1})
        ]
        deadline = time.monotonic() + 1200
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            if all(r.state.is_final() for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(5)
    # then both ran to completion, side by side, each in its own scratch copy
    logs = "".join(
        line
        for i in (1, 2)
        for line in (layout.run_dir / f"prefect-worker-{i}.log").read_text().splitlines(True)
        if "Error" in line or "error" in line or "failed" in line
    )
    assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"], (
        [(r.name, r.state.type.value, r.state.message) for r in runs],
        logs[-6000:],
    )
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, "the two experiments did not overlap"
    for run in runs:
        assert (layout.root / ".run" / "runs" / run.name / "dvc.lock").exists()
    # and both logged to the shared server and registered through the gate: two versions, each
    # with its decision, and one champion at most
    client = admin_client(layout, env, monkeypatch)
    name = load_params(layout.root / "params.yaml").register.model_name
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2
    decisions = [v.tags.get("decision") for v in versions]
    assert all(d in {"champion", "challenger", "none"} for d in decisions), decisions
    # both may be promoted, but one after the other: the gate holds the registry lock, so no two
    # promotions weigh themselves against the same previous champion, and the alias (there is
    # one alias, so one champion at most) ends on the one that no later promotion displaced
    promoted = [v for v in versions if v.tags["decision"] == "champion"]
    displaced = {v.tags["previous_champion"] for v in promoted}
    assert len(displaced) == len(promoted), [(v.version, v.tags) for v in promoted]
    if promoted:
        (last,) = [v for v in promoted if v.version not in displaced]
        assert client.get_model_version_by_alias(name, "champion").version == last.version


def test_down_keeps_the_data_and_the_next_up_finds_it(stack) -> None:
    layout, env = stack
    admin = team.basic_auth(team.ADMIN_USER, env["MLFLOW_ADMIN_PASSWORD"])
    api = f"{layout.mlflow_url}/api/2.0/mlflow"
    # when the stack goes down and comes up again on the same folder
    down(layout)
    assert not status(layout)
    up(layout, timeout_s=240)
    # then the cluster was not initialised again, the passwords still hold, and the experiment
    # and model logged before are there
    assert team.read_env_file(layout.run_dir / team.SECRETS_FILE) == env
    assert call(f"{api}/experiments/get-by-name?experiment_name=team-test", auth=admin) == 200
    assert call(f"{api}/registered-models/get?name=team-model", auth=admin) == 200
    reader = team.basic_auth(team.READER_USER, env["MLFLOW_READER_PASSWORD"])
    assert call(f"{api}/registered-models/get?name=team-model", auth=reader) == 200
