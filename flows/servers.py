"""`make up` / `make down` / `make status`: the Prefect server, the MLflow tracking server and the
served deployments (flows/deploy.py), on 127.0.0.1, in the background.

    python -m flows.servers up [--prefect-port 4200] [--mlflow-port 5000]
    python -m flows.servers status
    python -m flows.servers down

Each process gets its own session (process group); its pid goes to ``.run/<name>.pid`` and its
output to ``.run/<name>.log``. Prefect keeps its sqlite database in ``.run/prefect/``
(PREFECT_HOME, so ~/.prefect is left alone); MLflow serves ``mlruns/``, the same store that runs
without a server write to, so its UI shows both. ``up`` starts only what is not already running
(its pid file names a live process that is still ours), then waits until each one answers. ``down`` cancels the deployments'
runs in progress through Prefect, then stops exactly the pids in the pid files and whatever they
started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
FLOW_NAME = "mnist-training"
# flows/deploy.py's names, repeated so that `down` and `status` need not import Prefect (slow)
DEPLOYMENTS = ("manual", "scheduled-retrain")
START_TIMEOUT_S = 180.0  # a Prefect server takes ~25 s to answer on two cores; MLflow ~5 s
STOP_TIMEOUT_S = 60.0  # SIGTERM, then this long for a graceful exit, then SIGKILL
POLL_S = 0.5


class ServerError(RuntimeError):
    """A process did not start or answer; the message says which and ends with its log."""


@dataclass(frozen=True)
class Service:
    """One background process: how to start it, how to tell it answers, and a word of its cmdline."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    url: str  # what `up` prints
    answers: Callable[[float], bool]  # given its process's start time: does it answer yet?
    marker: str  # in its command line; guards against a reused pid


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

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def services(self) -> list[Service]:
        """In start order: the two servers, then the process serving the deployments."""
        bin_dir = Path(sys.executable).parent
        base = {
            **os.environ,
            **self.extra_env,
            "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),
            "PREFECT_HOME": str(self.run_dir / "prefect"),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # MLflow's job runner (GenAI features: 8 more processes, ~1 GB) has no use here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        artifacts = str(self.mlruns / "artifacts")
        return [
            Service(
                name="prefect-server",
                cmd=[str(bin_dir / "prefect"), "server", "start", "--host", HOST]
                + ["--port", str(self.prefect_port)],
                env=base,
                url=f"http://{HOST}:{self.prefect_port}",
                answers=lambda _: http_ok(f"{self.prefect_api}/health"),
                marker="prefect",
            ),
            Service(
                name="mlflow-server",
                cmd=[str(bin_dir / "mlflow"), "server", "--host", HOST]
                + ["--port", str(self.mlflow_port), "--workers", "1"]
                + ["--backend-store-uri", f"sqlite:///{self.mlruns / 'mlflow.db'}"]
                + ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts],
                env=base,
                url=self.mlflow_url,
                answers=lambda _: http_ok(f"{self.mlflow_url}/health"),
                marker="mlflow",
            ),
            Service(
                name="deployments",
                cmd=[sys.executable, "-m", "flows.deploy"]
                + (["--root", str(self.root)] if self.root else []),
                env=base,
                url=", ".join(f"{FLOW_NAME}/{d}" for d in DEPLOYMENTS),
                answers=lambda started: deployments_polled(self.prefect_api, started),
                marker="flows.deploy",
            ),
        ]


def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    """The body of a 200 answer from ``url``; None for anything else (refused, 404, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def http_ok(url: str) -> bool:
    return http_get(url) is not None


def http_post(url: str, payload: dict, timeout: float = 10.0) -> object | None:
    """POST ``payload`` as JSON; the decoded answer, or None if there was no 2xx answer."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
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


def alive(pid: int) -> bool:
    """Is ``pid`` a live process (reaping it first if it is our exited child)?"""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running_pid(layout: Layout, service: Service) -> int | None:
    """The pid in the service's pid file if that process is alive and still ours; else None."""
    pid_file = layout.pid_file(service.name)
    try:
        pid = int(pid_file.read_text().split()[0])
        proc = psutil.Process(pid)
        ours = (
            service.marker in " ".join(proc.cmdline())
            and proc.create_time() <= pid_file.stat().st_mtime + 1
        )
        if ours and alive(pid):
            return pid
    except (FileNotFoundError, IndexError, ValueError, psutil.Error):
        pass
    return None


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(layout: Layout, service: Service) -> tuple[int, float, bool]:
    """Start ``service`` unless it already runs; return (pid, its start time, started now?)."""
    pid = running_pid(layout, service)
    if pid is not None:
        print(f"{service.name}: already running (pid {pid})", flush=True)
        return pid, psutil.Process(pid).create_time(), False
    if service.name != "deployments" and service.answers(0):
        raise ServerError(
            f"{service.name}: {service.url} already answers, but not from a process of ours "
            f"({layout.pid_file(service.name)} names none): stop that process, or pick another "
            "port (make up PREFECT_PORT=... MLFLOW_PORT=...)"
        )
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = layout.log_file(service.name)
    with log_path.open("ab") as log:
        log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')}: ".encode())
        log.write((" ".join(service.cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            service.cmd,
            cwd=layout.repo,
            env=service.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: `down` stops it and its children
        )
    layout.pid_file(service.name).write_text(f"{proc.pid}\n")
    shown = log_path.relative_to(Path.cwd()) if log_path.is_relative_to(Path.cwd()) else log_path
    print(f"{service.name}: started (pid {proc.pid}, log {shown})", flush=True)
    return proc.pid, psutil.Process(proc.pid).create_time(), True


def wait_until_answers(
    layout: Layout, service: Service, pid: int, started: float, timeout_s: float
) -> None:
    """Block until ``service`` answers; exit with its log's tail if it dies or takes too long."""
    t0 = time.monotonic()
    while not service.answers(started):
        if not alive(pid):
            layout.pid_file(service.name).unlink(missing_ok=True)
            raise ServerError(
                f"{service.name}: exited before answering; the end of "
                f"{layout.log_file(service.name)}:\n{log_tail(layout.log_file(service.name))}"
            )
        if time.monotonic() - t0 > timeout_s:
            raise ServerError(
                f"{service.name}: no answer after {timeout_s:.0f} s (pid {pid} still runs; "
                f"`make down` stops it); the end of {layout.log_file(service.name)}:\n"
                + log_tail(layout.log_file(service.name))
            )
        time.sleep(POLL_S)
    print(f"{service.name}: ready after {time.monotonic() - t0:.0f} s: {service.url}", flush=True)


def up(layout: Layout, timeout_s: float = START_TIMEOUT_S) -> dict[str, int]:
    """Start what is not running, wait until everything answers; return {name: pid}."""
    prefect, mlflow, deployments = layout.services()
    pids: dict[str, int] = {}
    # The two servers start side by side; the deployments need the Prefect API first.
    begun = {s.name: start(layout, s) for s in (prefect, mlflow)}
    for service in (prefect, mlflow):
        pid, started, _ = begun[service.name]
        wait_until_answers(layout, service, pid, started, timeout_s)
        pids[service.name] = pid
    pid, started, _ = start(layout, deployments)
    wait_until_answers(layout, deployments, pid, started, timeout_s)
    pids[deployments.name] = pid
    return pids


def stop(layout: Layout, service: Service, timeout_s: float = STOP_TIMEOUT_S) -> list[int]:
    """SIGTERM the service's process group, wait, SIGKILL what is left; return the pids stopped."""
    pid_file = layout.pid_file(service.name)
    pid = running_pid(layout, service)
    if pid is None:
        stale = pid_file.exists()
        pid_file.unlink(missing_ok=True)
        print(f"{service.name}: not running" + (" (stale pid file removed)" if stale else ""))
        return []
    leader = psutil.Process(pid)
    # The whole group gets SIGTERM: signalled alone, the runner of Prefect 3.8.8 leaves the DVC
    # stages of a run orphaned. Any child that left the group is stopped below.
    family = [leader] + leader.children(recursive=True)
    t0 = time.monotonic()
    os.killpg(pid, signal.SIGTERM)  # start_new_session made pid the group id
    gone, left = psutil.wait_procs(family, timeout=timeout_s)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        psutil.wait_procs(left, timeout=10)
    alive(pid)  # reap it if it is our child (the tests start and stop in one process)
    pid_file.unlink(missing_ok=True)
    how = f", {len(left)} killed after {timeout_s:.0f} s" if left else ""
    print(
        f"{service.name}: stopped pid {pid} ({len(family)} process(es){how}) "
        f"in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    return [p.pid for p in family]


def cancel_runs_in_progress(layout: Layout, timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Cancel the deployments' pending and running flow runs through Prefect; return their names.

    Killing the serving process alone would leave such a run Running in Prefect for good, and
    holding its deployment's concurrency slot (until its lease expires), so that the next run of
    that deployment is refused. Cancelling lets the runner stop the run's processes and record
    Cancelled. A run that no live process answers for (its runner died) is set Cancelled here.
    """
    api = layout.prefect_api
    deployment_ids = []
    for name in DEPLOYMENTS:
        body = http_get(f"{api}/deployments/name/{FLOW_NAME}/{name}")
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
    )
    runs = {run["id"]: run["name"] for run in found or []}
    for run_id, name in runs.items():
        print(f"deployments: cancelling flow run '{name}' ({run_id})", flush=True)
        http_post(
            f"{api}/flow_runs/{run_id}/set_state",
            {"state": {"type": "CANCELLING", "message": "stopped by make down"}},
        )
    deadline = time.monotonic() + timeout_s
    open_runs = set(runs)
    while open_runs and time.monotonic() < deadline:
        time.sleep(POLL_S)
        for run_id in list(open_runs):
            body = http_get(f"{api}/flow_runs/{run_id}")
            if body and json.loads(body)["state_type"] not in {"PENDING", "RUNNING", "CANCELLING"}:
                open_runs.discard(run_id)
    for run_id in open_runs:
        http_post(
            f"{api}/flow_runs/{run_id}/set_state",
            {
                "state": {"type": "CANCELLED", "message": "stopped by make down (no process)"},
                "force": True,
            },
        )
    for run_id, name in runs.items():
        how = "set Cancelled: no process answered" if run_id in open_runs else "cancelled"
        print(f"deployments: flow run '{name}' {how}", flush=True)
    return list(runs.values())


def down(layout: Layout, timeout_s: float = STOP_TIMEOUT_S) -> list[int]:
    """Cancel runs in progress, stop the deployments (they pause their schedules on the way out),
    then the servers; return the pids stopped."""
    prefect, _, deployments = layout.services()
    if running_pid(layout, prefect):
        # Without a runner nobody would act on Cancelling: go straight to Cancelled.
        runner_alive = running_pid(layout, deployments) is not None
        cancel_runs_in_progress(layout, timeout_s if runner_alive else 0)
    stopped: list[int] = []
    for service in reversed(layout.services()):
        stopped += stop(layout, service, timeout_s)
    return stopped


def status(layout: Layout) -> bool:
    """Print each service's pid and whether it answers; True if all three run and answer."""
    ok = True
    for service in layout.services():
        pid = running_pid(layout, service)
        if pid is None:
            ok = False
            print(f"{service.name:15s} stopped")
            continue
        answers = service.answers(psutil.Process(pid).create_time())
        ok = ok and answers
        state = "answers" if answers else "does not answer (yet)"
        print(f"{service.name:15s} running  pid {pid:<7d} {service.url}  {state}")
    return ok


def print_next_steps(layout: Layout) -> None:
    print(
        f"""
Prefect UI:  http://{HOST}:{layout.prefect_port}   (deployments, runs, schedule, logs)
MLflow UI:   {layout.mlflow_url}
To use them from a shell:
  export PREFECT_API_URL={layout.prefect_api} MLFLOW_TRACKING_URI={layout.mlflow_url}
  .venv/bin/prefect deployment run '{FLOW_NAME}/manual' --param smoke=true
Stop everything with: make down""",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait per process")
    args = parser.parse_args()
    layout = Layout(prefect_port=args.prefect_port, mlflow_port=args.mlflow_port)
    if args.action == "up":
        try:
            up(layout, args.timeout or START_TIMEOUT_S)
        except ServerError as exc:
            sys.exit(f"make up: {exc}")
        print_next_steps(layout)
    elif args.action == "down":
        down(layout, args.timeout or STOP_TIMEOUT_S)
    else:
        status(layout)


if __name__ == "__main__":
    main()
