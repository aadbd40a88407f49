"""`make up` / `make down` / `make status`: the Prefect server, the MLflow tracking server and the
served deployments (flows/deploy.py), on 127.0.0.1, in the background, under supervisord.

    python -m flows.servers up [--prefect-port 4200] [--mlflow-port 5000]
    python -m flows.servers status
    python -m flows.servers down

The processes are data: ``Layout.programs()`` lists them, and flows/supervise.py runs that list
under supervisord (config, socket, logs and pid file in ``.run/``; each program's output in
``.run/<name>.log``). Prefect keeps its sqlite database in ``.run/prefect/`` (PREFECT_HOME, so
~/.prefect is left alone); MLflow serves ``mlruns/``, the same store that runs without a server
write to, so its UI shows both. ``up`` starts only what is not already running, then waits until
each one answers. ``down`` cancels the deployments' runs in progress through Prefect, then stops
each program's process group and supervisord; the data stays.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from flows.supervise import POLL_S, Program, ServerError, Supervisor
from flows.supervise import down as stop_all
from flows.supervise import status as show_status
from flows.supervise import up as start_all

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
FLOW_NAME = "mnist-training"
# flows/deploy.py's names, repeated so that `down` and `status` need not import Prefect (slow)
DEPLOYMENTS = ("manual", "scheduled-retrain")
# Per program, until it answers: generous, for a Prefect server on a small machine is slow to.
START_TIMEOUT_S = 180.0
# Per program: after SIGTERM to its process group, how long it has to exit before SIGKILL; also
# how long `down` waits for the runs it cancels to end.
STOP_TIMEOUT_S = 60


@dataclass(frozen=True)
class Layout:
    """Where the processes live and which ports they take; tests point it at a tmp folder."""

    repo: Path = REPO_ROOT
    run_dir: Path = REPO_ROOT / ".run"
    mlruns: Path = REPO_ROOT / "mlruns"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    root: Path | None = None  # the deployments' default `root` parameter (default: this checkout)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. a faster runner poll in tests
    profile: str = (
        "local"  # "team": PostgreSQL, MLflow with auth, Prefect workers, Dask (flows/team.py)
    )
    postgres_port: int = 5433
    dask_port: int = 8786
    dask_workers: int = 2
    prefect_workers: int = 2

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    def programs(self) -> list[Program]:
        """What `make up` runs, one entry a process (or a set of copies); `after` orders them."""
        if self.profile == "team":
            from flows import team

            return team.programs(self)
        bin_dir = Path(sys.executable).parent
        env = {
            **self.extra_env,
            "PREFECT_HOME": str(self.run_dir / "prefect"),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # MLflow's job runner (GenAI features, several more processes) has no use here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        artifacts = str(self.mlruns / "artifacts")
        return [
            Program(
                name="prefect-server",
                command=[str(bin_dir / "prefect"), "server", "start", "--host", HOST]
                + ["--port", str(self.prefect_port)],
                env=env,
                url=f"http://{HOST}:{self.prefect_port}",
                answers=lambda _: http_ok(f"{self.prefect_api}/health"),
                owns_port=True,
                stop_timeout_s=STOP_TIMEOUT_S,
            ),
            Program(
                name="mlflow-server",
                command=[str(bin_dir / "mlflow"), "server", "--host", HOST]
                + ["--port", str(self.mlflow_port), "--workers", "1"]
                + ["--backend-store-uri", f"sqlite:///{self.mlruns / 'mlflow.db'}"]
                + ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts],
                env=env,
                url=self.mlflow_url,
                answers=lambda _: http_ok(f"{self.mlflow_url}/health"),
                owns_port=True,
                stop_timeout_s=STOP_TIMEOUT_S,
            ),
            Program(
                name="deployments",
                command=[sys.executable, "-m", "flows.deploy"]
                + (["--root", str(self.root)] if self.root else []),
                env=env,
                url=", ".join(f"{FLOW_NAME}/{d}" for d in DEPLOYMENTS),
                answers=lambda started: deployments_polled(self.prefect_api, started),
                # On SIGTERM it pauses the schedules through the Prefect API: it stops first.
                after=("prefect-server", "mlflow-server"),
                stop_timeout_s=STOP_TIMEOUT_S,
            ),
        ]

    def prefect_headers(self) -> dict[str, str]:
        """What a request to this profile's Prefect API must carry (the team's auth string)."""
        if self.profile != "team":
            return {}
        from flows import team

        secret = team.team_secrets(self.run_dir)
        return {"Authorization": team.basic_auth(team.PREFECT_USER, secret["PREFECT_PASSWORD"])}

    def supervisor(self) -> Supervisor:
        return Supervisor(run_dir=self.run_dir, programs=tuple(self.programs()), cwd=self.repo)


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bytes | None:
    """The body of a 200 answer from ``url``; None for anything else (refused, 404, timeout)."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def http_ok(url: str) -> bool:
    return http_get(url) is not None


def http_post(
    url: str, payload: dict, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> object | None:
    """POST ``payload`` as JSON; the decoded answer, or None if there was no 2xx answer."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def deployments_polled(prefect_api: str, since: float) -> bool:
    """Both deployments exist and a runner polled them after ``since`` (a process start time)."""
    for name in DEPLOYMENTS:
        body = http_get(f"{prefect_api}/deployments/name/{FLOW_NAME}/{name}")
        last_polled = body and json.loads(body).get("last_polled")
        if not last_polled or datetime.fromisoformat(last_polled).timestamp() < since - 1:
            return False  # an old deployment record from an earlier `make up` does not count
    return True


def cancel_runs_in_progress(layout: Layout, timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Cancel the deployments' pending and running flow runs through Prefect; return their names.

    Killing the serving process alone would leave such a run Running in Prefect for good, and
    holding its deployment's concurrency slot (until its lease expires), so that the next run of
    that deployment is refused. Cancelling lets the runner stop the run's processes and record
    Cancelled. A run that no live process answers for (its runner died) is set Cancelled here.
    """
    api = layout.prefect_api
    auth = layout.prefect_headers()
    deployment_ids = []
    for name in DEPLOYMENTS:
        body = http_get(f"{api}/deployments/name/{FLOW_NAME}/{name}", headers=auth)
        if body:
            deployment_ids.append(json.loads(body)["id"])
    if not deployment_ids:
        return []
    in_progress = {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}
    found = http_post(
        f"{api}/flow_runs/filter",
        {
            "deployments": {"id": {"any_": deployment_ids}},
            "flow_runs": {"state": in_progress},
            "sort": "ID_DESC",
            "limit": 100,
        },
        headers=auth,
    )
    runs = {run["id"]: run["name"] for run in found or []}
    for run_id, name in runs.items():
        print(f"deployments: cancelling flow run '{name}' ({run_id})", flush=True)
        http_post(
            f"{api}/flow_runs/{run_id}/set_state",
            {"state": {"type": "CANCELLING", "message": "stopped by make down"}},
            headers=auth,
        )
    deadline = time.monotonic() + timeout_s
    open_runs = set(runs)
    while open_runs and time.monotonic() < deadline:
        time.sleep(POLL_S)
        for run_id in list(open_runs):
            body = http_get(f"{api}/flow_runs/{run_id}", headers=auth)
            if body and json.loads(body)["state_type"] not in {"PENDING", "RUNNING", "CANCELLING"}:
                open_runs.discard(run_id)
    for run_id in open_runs:
        http_post(
            f"{api}/flow_runs/{run_id}/set_state",
            {
                "state": {"type": "CANCELLED", "message": "stopped by make down (no process)"},
                "force": True,
            },
            headers=auth,
        )
    for run_id, name in runs.items():
        how = "set Cancelled: no process answered" if run_id in open_runs else "cancelled"
        print(f"deployments: flow run '{name}' {how}", flush=True)
    return list(runs.values())


def up(layout: Layout, timeout_s: float = START_TIMEOUT_S) -> dict[str, int]:
    """Start what is not running, wait until everything answers; return {name: pid}. The team
    profile then registers the deployments on its work pool."""
    pids = start_all(layout.supervisor(), timeout_s)
    if layout.profile == "team":
        from flows.team import register_deployments

        register_deployments(layout)
    return pids


def down(layout: Layout, timeout_s: float = STOP_TIMEOUT_S) -> list[int]:
    """Cancel the deployments' runs in progress, then stop the deployments (they pause their
    schedules on the way out), the servers and supervisord; return the pids stopped."""
    sup = layout.supervisor()
    state = {name: info["statename"] for name, info in sup.processes().items()}
    if state.get("prefect-server") == "RUNNING":
        # Without a runner nobody would act on Cancelling: go straight to Cancelled.
        runners = [n for n in state if n == "deployments" or n.startswith("prefect-worker")]
        runner_alive = any(state[n] == "RUNNING" for n in runners)
        cancel_runs_in_progress(layout, timeout_s if runner_alive else 0)
    return stop_all(sup)


def status(layout: Layout) -> bool:
    """Print each process's state, pid, uptime and whether it answers; True if all do."""
    return show_status(layout.supervisor())


def print_next_steps(layout: Layout) -> None:
    conf = layout.supervisor().conf
    conf = conf.relative_to(Path.cwd()) if conf.is_relative_to(Path.cwd()) else conf
    if layout.profile == "team":
        from flows.team import SECRETS_FILE, WORK_POOL

        env_file = conf.parent / SECRETS_FILE
        print(
            f"""
Team servers (make status PROFILE=team):
  MLflow UI:   {layout.mlflow_url}   (user admin or reader; passwords in {env_file})
  Prefect UI:  http://{HOST}:{layout.prefect_port}   (work pool {WORK_POOL}, {layout.prefect_workers} workers)
  Dask:        tcp://{HOST}:{layout.dask_port}   ({layout.dask_workers} workers)
  PostgreSQL:  127.0.0.1:{layout.postgres_port}   (MLflow, Prefect, Optuna, the gate's lock)
Clients take their addresses and credentials from the environment:
  set -a; . {env_file}; set +a
  make run     # logs to the team's MLflow; tune.workers: 2 runs trials on Dask
Stop everything with: make down PROFILE=team""",
            flush=True,
        )
        return
    print(
        f"""
Prefect UI:  http://{HOST}:{layout.prefect_port}   (deployments, runs, schedule, logs)
MLflow UI:   {layout.mlflow_url}
To use them from a shell:
  export PREFECT_API_URL={layout.prefect_api} MLFLOW_TRACKING_URI={layout.mlflow_url}
  .venv/bin/prefect deployment run '{FLOW_NAME}/manual' --param smoke=true
Processes: make status, or .venv/bin/supervisorctl -c {conf} status|tail -f NAME
Stop everything with: make down""",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument(
        "--profile",
        choices=["local", "team"],
        default="local",
        help="team: PostgreSQL, MLflow with users, Prefect workers and Dask (flows/team.py)",
    )
    parser.add_argument("--postgres-port", type=int, default=5433)
    parser.add_argument("--dask-port", type=int, default=8786)
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="up: seconds to wait for each program to answer; down: for cancelled runs to end",
    )
    args = parser.parse_args()
    layout = Layout(
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        profile=args.profile,
        postgres_port=args.postgres_port,
        dask_port=args.dask_port,
        # each profile its own supervisord, logs and data
        run_dir=REPO_ROOT / ".run" / ("team" if args.profile == "team" else ""),
    )
    try:
        if args.action == "up":
            up(layout, args.timeout or START_TIMEOUT_S)
            print_next_steps(layout)
        elif args.action == "down":
            down(layout, args.timeout or STOP_TIMEOUT_S)
        else:
            status(layout)
    except ServerError as exc:
        sys.exit(f"make {args.action}: {exc}")


if __name__ == "__main__":
    main()
