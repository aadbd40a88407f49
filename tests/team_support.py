"""What the team-profile tests share: free loopback ports and a private PostgreSQL cluster.

``postgres_cluster`` starts a cluster from Debian's binaries (flows/postgres.py) in a temporary
folder on a free port and removes it afterwards, even when the test fails. Without the binaries
the test is skipped with a message; with REQUIRE_TEAM_SERVERS=1 (set by .ci/run) it fails, so CI
never skips these tests silently.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

from flows import postgres


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def skip_or_fail(message: str) -> NoReturn:
    """A server a test needs is missing: skip with ``message``, or fail with it where
    REQUIRE_TEAM_SERVERS=1 (CI) forbids skipping."""
    if os.environ.get("REQUIRE_TEAM_SERVERS") == "1":
        pytest.fail(message + "; REQUIRE_TEAM_SERVERS=1 forbids skipping")
    pytest.skip(message)


def need_postgres() -> None:
    """Skip (or, in CI, fail) when there are no PostgreSQL server binaries."""
    if not postgres.available():
        skip_or_fail("no PostgreSQL server binaries: apt-get install postgresql (or set PG_BIN)")


@contextmanager
def postgres_cluster(*databases: str) -> Iterator[postgres.Cluster]:
    """A running private cluster with ``databases`` created; stopped and deleted on the way out."""
    need_postgres()
    # Not pytest's tmp_path: its parents are 0700 root, and the server runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
    folder.chmod(0o755)
    cluster = postgres.Cluster(folder / "data", free_port(), secrets.token_urlsafe(16))
    try:
        cluster.init()
        cluster.start()
        cluster.create_databases(*databases)
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
