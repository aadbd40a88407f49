"""The team profile of `make up` (PROFILE=team): the servers a team shares, on real engines.

    make up PROFILE=team      # or: python -m flows.servers up --profile team

  postgres        PostgreSQL (Debian's package), a private cluster in .run/postgres, port 5433:
                  one database each for MLflow, MLflow's users, Prefect, Optuna and the gate's lock
  mlflow-server   MLflow on PostgreSQL with --serve-artifacts (clients send artifacts through it,
                  no shared disk) and MLflow's basic-auth app: user `admin` (writes) and user
                  `reader` (READ: browses runs and models, cannot register or move an alias)
  prefect-server  Prefect on PostgreSQL (asyncpg), refusing clients without its auth string
  prefect-worker-N  workers of the process work pool `mnist-team`, one flow run each
  dask-scheduler  the Dask scheduler, port 8786, and dask-worker-N, one thread each: the tune
                  stage's trials when tune.workers > 1

Secrets: ``.run/team.env`` (gitignored, mode 0600) is made on the first `up` with random passwords;
a variable already set in the environment wins over the file. The same file holds what a client
needs (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD, PREFECT_API_URL/AUTH_STRING,
DASK_SCHEDULER_ADDRESS, MNIST_TUNE_STORAGE, MNIST_REGISTRY_LOCK): ``set -a; . .run/team.env``.
Every program gets it too, so stages, flows and workers read their credentials from their
environment. On another machine, the same variables with this machine's address instead of
127.0.0.1 are all a worker needs (docs/team.md).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from flows.postgres import Cluster, server_user
from flows.supervise import Program

if TYPE_CHECKING:
    from flows.servers import Layout

HOST = "127.0.0.1"
SECRETS_FILE = "team.env"
ADMIN_USER = "admin"
READER_USER = "reader"
PREFECT_USER = "mnist"
WORK_POOL = "mnist-team"
DATABASES = ("mlflow", "mlflow_auth", "prefect", "optuna", "locks")
# generated on the first `up` unless set in the environment
SECRET_KEYS = (
    "POSTGRES_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_READER_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PREFECT_PASSWORD",
)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip().strip("'\"")
    return values


def team_secrets(run_dir: Path) -> dict[str, str]:
    """The profile's secrets: the environment's, else .run/team.env's, else new random ones."""
    stored = read_env_file(run_dir / SECRETS_FILE)
    return {
        key: os.environ.get(key) or stored.get(key) or secrets.token_urlsafe(24)
        for key in SECRET_KEYS
    }


def cluster(layout: Layout, secret: dict[str, str]) -> Cluster:
    return Cluster(
        layout.run_dir / "postgres" / "data", layout.postgres_port, secret["POSTGRES_PASSWORD"]
    )


def client_env(layout: Layout, secret: dict[str, str]) -> dict[str, str]:
    """What a client of the team servers needs, on this machine."""
    pg = cluster(layout, secret)
    return {
        "MLFLOW_TRACKING_URI": layout.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
        "MLFLOW_TRACKING_PASSWORD": secret["MLFLOW_ADMIN_PASSWORD"],
        "PREFECT_API_URL": layout.prefect_api,
        "PREFECT_API_AUTH_STRING": f"{PREFECT_USER}:{secret['PREFECT_PASSWORD']}",
        "DASK_SCHEDULER_ADDRESS": f"tcp://{HOST}:{layout.dask_port}",
        "MNIST_TUNE_STORAGE": pg.url("optuna"),
        "MNIST_REGISTRY_LOCK": pg.url("locks"),
    }


def write_env_file(layout: Layout, secret: dict[str, str]) -> Path:
    """.run/team.env: the secrets and the client variables, readable by this user only."""
    path = layout.run_dir / SECRETS_FILE
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# make up PROFILE=team wrote this; keep it out of git. Use: set -a; . .run/team.env"]
    lines += [f"{k}={v}" for k, v in {**secret, **client_env(layout, secret)}.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def write_auth_config(layout: Layout, secret: dict[str, str]) -> Path:
    """MLflow's basic-auth config: users in PostgreSQL, READ unless granted more."""
    pg = cluster(layout, secret)
    path = layout.run_dir / "mlflow-auth.ini"
    text = "\n".join(
        [
            "[mlflow]",
            "default_permission = READ",
            f"database_uri = {pg.url('mlflow_auth')}",
            f"admin_username = {ADMIN_USER}",
            f"admin_password = {secret['MLFLOW_ADMIN_PASSWORD']}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            "",
        ]
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def answers(url: str, auth: str | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status ``url`` answers with (None: no answer)."""
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def postgres_ready(pg: Cluster) -> bool:
    """It accepts connections and holds the profile's databases (made here when missing)."""
    if not pg.ready():
        return False
    pg.create_databases(*DATABASES)
    return True


def mlflow_ready(layout: Layout, secret: dict[str, str]) -> bool:
    """It answers, and the read-only user exists (made here, as admin, when missing)."""
    if answers(f"{layout.mlflow_url}/health") != 200:
        return False
    from mlflow.server.auth.client import AuthServiceClient

    env = {
        "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
        "MLFLOW_TRACKING_PASSWORD": secret["MLFLOW_ADMIN_PASSWORD"],
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        auth = AuthServiceClient(layout.mlflow_url)
        try:
            auth.get_user(READER_USER)
        except Exception:  # RESOURCE_DOES_NOT_EXIST: the first `up`
            auth.create_user(READER_USER, secret["MLFLOW_READER_PASSWORD"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return True


def programs(layout: Layout) -> list[Program]:
    """The team profile's processes, in start order by `after`."""
    secret = team_secrets(layout.run_dir)
    write_env_file(layout, secret)
    pg = cluster(layout, secret)
    (layout.run_dir / "postgres").mkdir(parents=True, exist_ok=True)
    (layout.run_dir / "postgres").chmod(0o755)  # the server runs as `postgres`
    pg.init()
    bin_dir = Path(sys.executable).parent
    clients = client_env(layout, secret)
    common = {
        **layout.extra_env,
        **clients,
        "PREFECT_HOME": str(layout.run_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    artifacts = layout.run_dir / "mlflow-artifacts"
    prefect_auth = basic_auth(PREFECT_USER, secret["PREFECT_PASSWORD"])
    from pipelines.tune_cluster import WORKER_ENV

    listed = [
        Program(
            name="postgres",
            command=pg.server_command(),
            url=f"postgresql://{HOST}:{layout.postgres_port}",
            answers=lambda _: postgres_ready(pg),
            owns_port=False,
            # supervisord switches to `postgres` itself; SIGINT is PostgreSQL's fast shutdown
            # (SIGTERM would wait for every client to leave)
            user=server_user(),
            stop_signal="INT",
            stop_timeout_s=60,
        ),
        Program(
            name="mlflow-server",
            command=[str(bin_dir / "mlflow"), "server", "--host", HOST]
            + ["--port", str(layout.mlflow_port), "--workers", "2"]
            + ["--backend-store-uri", pg.url("mlflow")]
            + ["--serve-artifacts", "--artifacts-destination", str(artifacts)]
            + ["--app-name", "basic-auth"],
            env={
                **common,
                "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(layout, secret)),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SERVER_SECRET_KEY"],
            },
            url=layout.mlflow_url,
            answers=lambda _: mlflow_ready(layout, secret),
            after=("postgres",),
            owns_port=True,
        ),
        Program(
            name="prefect-server",
            command=[str(bin_dir / "prefect"), "server", "start", "--host", HOST]
            + ["--port", str(layout.prefect_port)],
            env={
                **common,
                "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "postgresql+asyncpg"),
                "PREFECT_SERVER_API_AUTH_STRING": clients["PREFECT_API_AUTH_STRING"],
            },
            url=f"http://{HOST}:{layout.prefect_port}",
            answers=lambda _: answers(f"{layout.prefect_api}/health", prefect_auth) == 200,
            after=("postgres",),
            owns_port=True,
        ),
        Program(
            name="dask-scheduler",
            command=[str(bin_dir / "dask"), "scheduler", "--host", HOST]
            + ["--port", str(layout.dask_port), "--no-dashboard"],
            env=common,
            url=clients["DASK_SCHEDULER_ADDRESS"],
            answers=lambda _: port_open(layout.dask_port),
            owns_port=True,
        ),
    ]
    for i in range(1, layout.dask_workers + 1):
        listed.append(
            Program(
                name=f"dask-worker-{i}",
                command=[str(bin_dir / "dask"), "worker", clients["DASK_SCHEDULER_ADDRESS"]]
                + ["--nthreads", "1", "--name", f"dask-worker-{i}", "--host", HOST]
                + ["--no-dashboard"],
                env={**common, **WORKER_ENV},
                url=f"one thread, on {clients['DASK_SCHEDULER_ADDRESS']}",
                after=("dask-scheduler", "mlflow-server", "postgres"),
            )
        )
    for i in range(1, layout.prefect_workers + 1):
        listed.append(
            Program(
                name=f"prefect-worker-{i}",
                command=[str(bin_dir / "prefect"), "worker", "start", "--pool", WORK_POOL]
                + ["--type", "process", "--name", f"prefect-worker-{i}", "--limit", "1"],
                env=common,
                url=f"pool {WORK_POOL}",
                answers=lambda _, name=f"prefect-worker-{i}": worker_online(
                    layout, prefect_auth, name
                ),
                after=("prefect-server", "mlflow-server"),
            )
        )
    return listed


def worker_online(layout: Layout, auth: str, name: str) -> bool:
    """The Prefect worker ``name`` has sent the server its heartbeat in the pool."""
    import json

    request = urllib.request.Request(
        f"{layout.prefect_api}/work_pools/{WORK_POOL}/workers/filter",
        data=b"{}",
        headers={"Authorization": auth, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            workers = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(w["name"] == name and w.get("status") == "ONLINE" for w in workers)


def port_open(port: int) -> bool:
    import socket

    with contextlib.closing(socket.socket()) as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def register_deployments(layout: Layout) -> None:
    """mnist-training/manual and /scheduled-retrain on the work pool (flows/deploy.py --pool)."""
    import subprocess

    secret = team_secrets(layout.run_dir)
    env = {
        **os.environ,
        **layout.extra_env,
        **client_env(layout, secret),
        "PREFECT_HOME": str(layout.run_dir / "prefect"),
    }
    command = [sys.executable, "-m", "flows.deploy", "--pool", WORK_POOL]
    command += ["--experiments", str(layout.prefect_workers)]
    command += ["--root", str(layout.root or layout.repo)]
    done = subprocess.run(command, env=env, cwd=layout.repo, capture_output=True, text=True)
    if done.returncode != 0:
        from flows.supervise import ServerError

        raise ServerError(f"registering the deployments failed:\n{done.stderr[-3000:]}")
    print(done.stdout.strip(), flush=True)
