"""A private PostgreSQL cluster from Debian's ``postgresql`` package: one data folder, one port.

The team profile of `make up` (flows/servers.py) runs ``postgres`` in the foreground under
supervisord, with its data in ``.run/postgres``; tests start one with ``pg_ctl`` in a temporary
folder on a free port, and stop it even when a test fails (tests/conftest.py). Either way the
cluster listens on 127.0.0.1 only, its unix socket sits in its own folder (not /var/run), and every
connection over TCP must give a password (scram-sha-256): the superuser ``postgres``, whose
password the caller chooses, creates one database per service (MLflow, Prefect, Optuna).

PostgreSQL refuses to run as root. Run as root (CI, this machine), the server and ``initdb`` run as
the ``postgres`` user that the Debian package creates, and the data folder is given to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"
START_TIMEOUT_S = 60


class PostgresError(RuntimeError):
    """PostgreSQL is missing, or a cluster did not initialise, start or answer."""


def bin_dir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: $PG_BIN, else the newest
    /usr/lib/postgresql/<major>/bin, else the one on PATH."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    candidates += reversed(majors)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "postgres").exists() and (folder / "initdb").exists():
            return folder
    raise PostgresError(
        "no PostgreSQL server binaries (initdb, postgres): install Debian's package "
        "(apt-get install postgresql) or set PG_BIN to the folder that holds them"
    )


def available() -> bool:
    try:
        bin_dir()
    except PostgresError:
        return False
    return True


def server_user() -> str | None:
    """Who the server runs as: ``postgres`` when we are root (PostgreSQL refuses root), else us."""
    return SUPERUSER if os.geteuid() == 0 else None


def as_server_user(command: list[str]) -> list[str]:
    """``command`` as the ``postgres`` user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SUPERUSER, "--", *command]


@dataclass(frozen=True)
class Cluster:
    """A cluster in ``data_dir`` on 127.0.0.1:``port``; its socket in ``data_dir``/../socket."""

    data_dir: Path
    port: int
    password: str

    @property
    def socket_dir(self) -> Path:
        return self.data_dir.parent / "socket"

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL for ``database`` as the superuser (driver: e.g. postgresql+asyncpg)."""
        return f"{driver}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _give_to_server_user(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(path, SUPERUSER, SUPERUSER)
        path.chmod(0o700)

    def init(self) -> bool:
        """``initdb`` when ``data_dir`` holds no cluster; True if it made one."""
        if (self.data_dir / "PG_VERSION").exists():
            return False
        self._give_to_server_user(self.data_dir)
        self._give_to_server_user(self.socket_dir)
        pwfile = self.data_dir.parent / ".pgpass-init"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(pwfile, SUPERUSER, SUPERUSER)
        try:
            result = subprocess.run(
                as_server_user(
                    [str(bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER]
                    + ["--pwfile", str(pwfile), "--auth-host=scram-sha-256"]
                    + ["--auth-local=peer", "--encoding=UTF8", "--no-locale"]
                ),
                capture_output=True,
                text=True,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise PostgresError(f"initdb {self.data_dir} failed: {result.stderr.strip()}")
        return True

    def server_command(self) -> list[str]:
        """``postgres`` in the foreground, loopback only, its own socket; supervisord runs it as
        ``server_user()`` (a wrapper such as runuser would turn supervisord's stop into a kill)."""
        return (
            [str(bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
            + ["-c", "listen_addresses=127.0.0.1"]
            + ["-c", f"unix_socket_directories={self.socket_dir}"]
            # a team server: Optuna workers, MLflow, Prefect and its workers each hold a pool
            + ["-c", "max_connections=200"]
        )

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start it in the background with ``pg_ctl`` and wait until it accepts connections."""
        log = self.data_dir.parent / "postgres.log"
        log.touch()
        if os.geteuid() == 0:
            shutil.chown(log, SUPERUSER, SUPERUSER)
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.socket_dir} -c max_connections=200"
        )
        result = subprocess.run(
            as_server_user(
                [str(bin_dir() / "pg_ctl"), "start", "-D", str(self.data_dir), "-w"]
                + ["-t", str(int(timeout_s)), "-l", str(log), "-o", options]
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise PostgresError(f"pg_ctl start {self.data_dir} failed: {result.stderr}\n{tail}")
        self.wait_ready(timeout_s)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``: ``fast`` ends open sessions, ``immediate`` is a crash (a fault test)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        subprocess.run(
            as_server_user(
                [str(bin_dir() / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"]
            ),
            capture_output=True,
            text=True,
        )

    def ready(self) -> bool:
        """Does it accept connections (``pg_isready`` on its TCP port)?"""
        result = subprocess.run(
            [str(bin_dir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            capture_output=True,
        )
        return result.returncode == 0

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"PostgreSQL on port {self.port} did not answer in {timeout_s:.0f} s"
                )
            time.sleep(0.2)

    def create_databases(self, *names: str) -> None:
        """Create each database that does not exist yet (over TCP, as the superuser)."""
        import psycopg

        with (
            psycopg.connect(self.url("postgres"), autocommit=True) as conn,
            conn.cursor() as cur,
        ):
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
