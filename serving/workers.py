"""Running the application under uvicorn, in one process or several.

With several worker processes, uvicorn's supervisor binds one listening socket and every worker
accepts from it. Two things about that socket are fixed here:

- **Nagle's algorithm.** uvicorn binds the socket with protocol 0, so asyncio does not set
  TCP_NODELAY on the connections it accepts: each response then waits for the client's delayed
  ACK, a timer far longer than the request itself, on every request of a kept-alive connection.
  The socket is rebuilt from its descriptor so that it reports TCP.
- **Balance.** asyncio accepts up to 100 waiting connections each time the socket wakes a worker,
  so the first worker to wake takes a whole burst: clients that connect at once nearly all land
  on one worker, and one core serves them while the others idle (see
  docs/results/2026-11-24-serving-load-unbalanced.md).
  ``BalancedListener`` accepts for a worker only while no live worker holds fewer open
  connections, so a burst of connections is spread evenly (least connections, as a load balancer
  would). A worker that holds more waits for a less loaded one to take the connection, for at most
  ``max_defer_s``, then takes it itself, so a stuck or busy worker cannot stall new connections.
  The workers run asyncio's own event loop: uvloop (which uvicorn picks when it is installed)
  accepts in C and would bypass ``accept`` here, leaving the bursts unevenly split again.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from multiprocessing import get_context
from multiprocessing.reduction import DupFd, ForkingPickler

SLOTS = 64  # workers (and restarted workers) that can share one listener


class BalancedListener(socket.socket):
    """A listening socket shared by worker processes, each holding about as many open connections
    as the others.

    The workers publish their number of open connections in a small shared table (pid, count per
    slot) that travels with the socket to each worker process. ``accept`` refuses, as if no
    connection were waiting, while another live worker holds fewer, for at most ``max_defer_s``;
    asyncio then tries again on its next loop turn, and the less loaded worker, woken by the same
    socket, takes the connection.
    """

    def __init__(self, *args, table=None, max_defer_s: float = 0.02, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = table if table is not None else get_context("spawn").Array("q", 2 * SLOTS)
        self._cells = self.table.get_obj()  # read and written without the lock (one int each)
        self.max_defer_s = max_defer_s
        self._slot: int | None = None
        self._accepted: list[socket.socket] = []
        self._deferred_since: float | None = None

    @classmethod
    def from_socket(cls, sock: socket.socket, max_defer_s: float = 0.02) -> BalancedListener:
        """Take over a bound socket (its descriptor): as TCP, whatever protocol it was made with."""
        return cls(
            sock.family, sock.type, socket.IPPROTO_TCP, sock.detach(), max_defer_s=max_defer_s
        )

    def listen(self, backlog: int = 128) -> None:
        """asyncio calls this once the worker's application has started: from then on the other
        workers count this one in."""
        super().listen(backlog)
        self._publish(self._open_connections())

    def close(self) -> None:
        """asyncio calls this when the worker stops serving: the others stop counting it."""
        if self._slot is not None and self._cells[2 * self._slot] == os.getpid():
            self._cells[2 * self._slot] = 0
            self._slot = None
        super().close()

    def accept(self):
        mine = self._open_connections()
        least = self._least_other(mine)
        if least is not None and mine > least:
            now = time.monotonic()
            if self._deferred_since is None:
                self._deferred_since = now
            if now - self._deferred_since < self.max_defer_s:
                raise BlockingIOError(errno.EAGAIN, "left to a less loaded worker")
        self._deferred_since = None
        conn, address = super().accept()
        self._accepted.append(conn)
        self._publish(mine + 1)
        return conn, address

    def _open_connections(self) -> int:
        """Connections this worker accepted and has not closed (a closed socket's fileno is -1)."""
        self._accepted = [conn for conn in self._accepted if conn.fileno() != -1]
        return len(self._accepted)

    def _least_other(self, mine: int) -> int | None:
        """Publish ``mine``; the fewest open connections any other live worker holds (None if it
        is alone)."""
        self._publish(mine)
        table, least = self._cells, None
        for slot in range(SLOTS):
            pid, count = table[2 * slot], table[2 * slot + 1]
            if pid and slot != self._slot and (least is None or count < least):
                if mine > count and not _alive(pid):
                    continue  # a dead worker's last count; its successor takes the slot
                least = count
        return least

    def _publish(self, count: int) -> None:
        if self._slot is None:
            self._slot = self._claim_slot()
        self._cells[2 * self._slot + 1] = count

    def _claim_slot(self) -> int:
        """A free slot (or a dead worker's) for this process's pid."""
        cells = self._cells
        with self.table.get_lock():
            for slot in range(SLOTS):
                pid = cells[2 * slot]
                if pid == 0 or (pid != os.getpid() and not _alive(pid)):
                    cells[2 * slot], cells[2 * slot + 1] = os.getpid(), 0
                    return slot
        raise RuntimeError(f"more than {SLOTS} worker processes on one listening socket")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reduce_listener(sock: BalancedListener):
    """Pickling for multiprocessing's spawn: the descriptor (duplicated), and the shared table."""
    return _rebuild_listener, (
        DupFd(sock.fileno()),
        sock.family,
        sock.type,
        sock.proto,
        sock.table,
        sock.max_defer_s,
    )


def _rebuild_listener(dup, family, kind, proto, table, max_defer_s) -> BalancedListener:
    return BalancedListener(family, kind, proto, dup.detach(), table=table, max_defer_s=max_defer_s)


ForkingPickler.register(BalancedListener, _reduce_listener)


def run_server(
    app, host: str, port: int, workers: int = 1, log_level: str = "info", http: str = "h11"
) -> None:
    """Serve ``app`` under uvicorn, parsing HTTP with ``http`` (``h11`` or ``httptools``), on
    asyncio's own event loop (see above: not uvloop). With ``workers`` above 1, ``app`` is the
    import string of an application factory, each worker process runs its own application, and
    the workers share one ``BalancedListener``."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    options = dict(
        host=host, port=port, log_level=log_level, access_log=False, loop="asyncio", http=http
    )
    if workers == 1:
        uvicorn.run(app, **options)
        return
    config = uvicorn.Config(app, factory=True, workers=workers, **options)
    listener = BalancedListener.from_socket(config.bind_socket())
    Multiprocess(config, sockets=[listener]).run()
