"""The registry lock: one writer at a time through the promotion gate's read-decide-write.

``registry_lock(model_name)`` is held around the part of the gate that reads the champion and moves
an alias (``pipelines.register.promote``). Which lock, the first that applies:

  ``MNIST_REGISTRY_LOCK=postgresql://user:pw@host:port/db``
      a PostgreSQL session advisory lock in that database, keyed by the model name: it orders the
      writers of every machine that can reach the database (the team profile sets it);
  ``MNIST_REGISTRY_LOCK=<path>`` (or ``file://<path>``)
      an exclusive flock on that file (on one machine, or on a file system with working flock);
  store ``sqlite:///X/mlflow.db``
      a flock on ``X/registry.lock``, next to the database, so every checkout and scratch copy
      that shares the store shares the lock;
  store ``postgresql[+driver]://...`` (MLflow on PostgreSQL directly)
      an advisory lock in the store's own database;
  store ``file:<dir>`` or a bare path (MLflow's file store)
      a flock on ``<dir>/registry.lock``;
  anything else (an http(s) tracking server, ...)
      a flock under the user's cache folder keyed by the store's address, with a warning: it orders
      the writers of this machine only, and ``MNIST_REGISTRY_LOCK=postgresql://...`` covers all.

Both kinds are freed by the kernel or the server when their holder dies: a flock when the process's
file descriptor closes, an advisory lock when its session ends (the session asks the server for TCP
keepalives, so a holder whose machine vanishes is dropped too). A writer that waits longer than
``timeout_s`` gets ``LockTimeout``, naming the lock, how long it waited and, where known, who
holds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("pipelines.locks")

ENV_VAR = "MNIST_REGISTRY_LOCK"
REGISTRY_LOCK_TIMEOUT_S = 600.0  # how long a registration waits for the gate by default
LOCK_FILE = "registry.lock"  # beside a sqlite store's database, or inside a file store
POLL_S = 0.05  # how often a waiting writer retries a flock
CONNECT_TIMEOUT_S = 10  # to reach the lock's PostgreSQL server
# The lock session asks the server to probe an idle client: a holder whose machine vanished is
# dropped (and its lock freed) after about idle + interval * count seconds.
KEEPALIVE = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}
_POSTGRES = re.compile(r"^postgres(?:ql)?(?:\+[^:/]+)?://", re.IGNORECASE)


class LockTimeout(TimeoutError):
    """The lock was still held by someone else when the wait ran out; the message says which."""


class LockLost(RuntimeError):
    """The lock was held, and is no longer (its PostgreSQL session ended)."""


@dataclass(frozen=True)
class HeldLock:
    """A lock being held: its kind (``file``, ``postgresql-advisory``), where it is, the wait."""

    kind: str
    where: str
    waited_s: float = 0.0
    _verify: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def check(self) -> None:
        """Raise ``LockLost`` unless the lock is still held (a no-op for a flock, which a live
        process cannot lose)."""
        self._verify()

    def describe(self) -> str:
        return f"{self.kind}: {self.where}"


def _holder(model_name: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "model": model_name,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _read_holder(path: Path) -> str:
    """Who holds the file lock at ``path``, as its holder wrote it."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    if not text:
        return "holder unknown"
    try:
        holder = json.loads(text)
        return (
            f"held by pid {holder.get('pid', '?')} on {holder.get('host', '?')} for "
            f"{holder.get('model', '?')} since {holder.get('since', '?')}"
        )
    except (json.JSONDecodeError, AttributeError):
        return f"holder wrote {text[:200]!r}"


@contextmanager
def file_lock(
    path: Path, timeout_s: float, holder: dict[str, Any] | None = None
) -> Iterator[HeldLock]:
    """Hold an exclusive flock on ``path`` (created if missing), waiting up to ``timeout_s``.

    While held, the file holds ``holder`` (JSON) so that a writer that times out can say who holds
    it; it is emptied on release. The kernel drops the flock when the holder's process dies.
    """
    path = Path(path).resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: not inherited by children
    except OSError as exc:
        raise OSError(f"registry lock file {path}: cannot open it ({exc})") from exc
    try:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout_s:
                    raise LockTimeout(
                        f"registry lock file {path}: still taken after waiting {waited:.1f} s "
                        f"(timeout {timeout_s:g} s), {_read_holder(path)}"
                    ) from None
                time.sleep(min(POLL_S, timeout_s - waited))
        waited = time.monotonic() - start
        if holder is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield HeldLock("file", str(path), waited)
        finally:
            os.ftruncate(fd, 0)  # empty: nobody holds it
    finally:
        os.close(fd)  # releases the flock


def advisory_key(model_name: str) -> int:
    """The advisory lock's key for ``model_name``: a signed 64-bit integer, the same in every
    process and on every machine (a hash of the name, not Python's salted ``hash()``)."""
    digest = hashlib.blake2b(f"mnist-mlops registry {model_name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://...`` (SQLAlchemy's form) -> ``postgresql://...`` (libpq's)."""
    return _POSTGRES.sub("postgresql://", url, count=1)


def redact(url: str) -> str:
    """``url`` without its password, for messages and tags."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _server_holder(conn, key: int) -> str:
    """Who holds advisory lock ``key``, as far as this session may see (best effort)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    try:
        row = conn.execute(
            "SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start "
            "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid",
            (unsigned >> 32, unsigned & 0xFFFFFFFF),
        ).fetchone()
    except Exception as exc:  # only a message is at stake
        return f"holder unknown ({exc})"
    if row is None:
        return "holder unknown (released just now?)"
    pid, app, addr, since = row
    return f"held by server pid {pid} ({app or 'no application_name'}, from {addr or 'local socket'}, since {since})"


@contextmanager
def advisory_lock(url: str, model_name: str, timeout_s: float) -> Iterator[HeldLock]:
    """Hold PostgreSQL's session advisory lock for ``model_name`` in the database at ``url``.

    The lock lives as long as the session: it is released on exit with ``pg_advisory_unlock``, and
    by the server when the session ends however it ends (the holder killed, its machine gone).
    """
    import psycopg

    key = advisory_key(model_name)
    parts = urlsplit(libpq_url(url))
    where = (
        f"key {key} ({model_name}) in database {parts.path.lstrip('/') or '?'} "
        f"on {parts.hostname or 'local socket'}:{parts.port or 5432}"
    )
    try:
        conn = psycopg.connect(
            libpq_url(url),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=f"mnist registry lock, {socket.gethostname()} pid {os.getpid()}"[:63],
        )
    except psycopg.Error as exc:
        raise ConnectionError(
            f"registry lock: cannot connect to {redact(url)} for the advisory lock {where}: "
            f"{str(exc).strip()}"
        ) from exc
    try:
        for name, value in KEEPALIVE.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        start = time.monotonic()
        if timeout_s <= 0:
            acquired = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
        else:
            # lock_timeout bounds the wait in the server; 0 would mean "wait forever"
            ms = max(1, int(timeout_s * 1000))
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{ms}ms",))
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
                acquired = True
            except psycopg.errors.LockNotAvailable:
                acquired = False
        waited = time.monotonic() - start
        if not acquired:
            raise LockTimeout(
                f"registry lock: PostgreSQL advisory lock {where} still taken after waiting "
                f"{waited:.1f} s (timeout {timeout_s:g} s), {_server_holder(conn, key)}"
            )

        def verify() -> None:
            try:
                held = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND objsubid = 1"
                ).fetchone()[0]
            except psycopg.Error as exc:
                raise LockLost(
                    f"registry lock: the session holding the advisory lock {where} ended: {exc}"
                ) from exc
            if not held:
                raise LockLost(f"registry lock: the advisory lock {where} is no longer held")

        try:
            yield HeldLock("postgresql-advisory", where, waited, verify)
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg.Error as exc:  # the session is gone, and the lock with it
                log.warning(
                    "registry lock: unlocking %s failed (%s); closing its session", where, exc
                )
    finally:
        conn.close()


def cache_lock_path(store_uri: str) -> Path:
    """A lock file for a store that has no place of its own: in the user's cache folder."""
    parts = urlsplit(store_uri)
    anonymous = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    digest = hashlib.sha256(anonymous.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mnist-mlops" / "registry-locks" / f"{digest}.lock"


def lock_target(store_uri: str) -> tuple[str, str]:
    """(``postgresql`` or ``file``, URL or path): the lock ``registry_lock`` takes for a store."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting:
        if _POSTGRES.match(setting):
            return "postgresql", setting
        if setting.startswith("file://"):
            return "file", urlsplit(setting).path
        if "://" in setting:
            raise ValueError(
                f"{ENV_VAR}={redact(setting)}: not a lock this project knows; give a "
                "postgresql://user:password@host:port/database URL (advisory lock) or a file path"
            )
        return "file", setting
    if store_uri.startswith("sqlite:///"):
        return "file", str(Path(store_uri.removeprefix("sqlite:///")).parent / LOCK_FILE)
    if _POSTGRES.match(store_uri):
        return "postgresql", store_uri
    if store_uri.startswith("file:"):
        return "file", str(Path(urlsplit(store_uri).path) / LOCK_FILE)
    if "://" not in store_uri and store_uri not in ("", "databricks"):
        return "file", str(Path(store_uri) / LOCK_FILE)
    path = cache_lock_path(store_uri)
    log.warning(
        "registry lock: the store %s has no lock of its own; using the file lock %s, which orders "
        "the writers on this machine only. Set %s=postgresql://... to order the writers of every "
        "machine.",
        redact(store_uri),
        path,
        ENV_VAR,
    )
    return "file", str(path)


@contextmanager
def registry_lock(
    model_name: str, timeout_s: float = REGISTRY_LOCK_TIMEOUT_S, store_uri: str | None = None
) -> Iterator[HeldLock]:
    """Hold the registry lock for ``model_name`` (which one: the module docstring).

    ``store_uri``: the registry the caller writes to; default ``pipelines.tracking.tracking_uri()``.

    Raises:
        LockTimeout: someone else held it for all of ``timeout_s`` seconds.
        ValueError: ``MNIST_REGISTRY_LOCK`` is neither a postgresql:// URL nor a path.
    """
    if store_uri is None:
        from pipelines.tracking import tracking_uri

        store_uri = tracking_uri()
    kind, target = lock_target(store_uri)
    if kind == "postgresql":
        with advisory_lock(target, model_name, timeout_s) as held:
            yield held
    else:
        with file_lock(Path(target), timeout_s, _holder(model_name)) as held:
            yield held
