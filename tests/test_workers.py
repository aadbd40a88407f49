"""serving.workers.BalancedListener: least-connections accepting across worker processes.

Two listeners on one socket (two descriptors, one shared table) stand in for two workers; the
multi-process server itself is tested in test_serving.py."""

from __future__ import annotations

import os
import socket
import time

import pytest

from serving.workers import BalancedListener


@pytest.fixture
def two_workers():
    first = BalancedListener.from_socket(socket.create_server(("127.0.0.1", 0)), max_defer_s=0.2)
    second = BalancedListener(
        first.family, first.type, first.proto, os.dup(first.fileno()), table=first.table
    )
    for listener in (first, second):
        listener.listen(16)
        listener.setblocking(False)
    clients: list[socket.socket] = []

    def connect(n: int) -> None:
        for _ in range(n):
            clients.append(socket.create_connection(first.getsockname(), timeout=5))
        time.sleep(0.05)  # let the handshakes complete

    yield first, second, connect
    for sock in clients:
        sock.close()
    first.close()
    second.close()


def test_a_worker_holding_more_connections_leaves_the_next_to_the_other(two_workers):
    first, second, connect = two_workers
    connect(4)
    held = [first.accept()[0]]
    with pytest.raises(BlockingIOError):  # first holds 1, second 0
        first.accept()
    held.append(second.accept()[0])
    held.append(first.accept()[0])  # 1 each: either may take it
    with pytest.raises(BlockingIOError):
        first.accept()
    held.append(second.accept()[0])
    assert first.table.get_obj()[1::2][:2] == [2, 2]
    held[0].close()  # a closed connection no longer counts
    connect(1)
    held.append(first.accept()[0])  # first holds 1, second 2
    for conn in held:
        conn.close()


def test_a_worker_takes_the_connection_itself_after_max_defer_s(two_workers):
    first, second, connect = two_workers
    connect(2)
    held = [first.accept()[0]]
    started = time.monotonic()
    while True:  # second never accepts (a busy or stuck worker)
        try:
            held.append(first.accept()[0])
            break
        except BlockingIOError:
            time.sleep(0.01)
    assert 0.2 <= time.monotonic() - started < 2
    for conn in held:
        conn.close()


def test_a_closed_worker_is_no_longer_waited_for(two_workers):
    first, second, connect = two_workers
    connect(3)
    held = [first.accept()[0]]
    second.close()  # stops serving: its slot is released
    held += [first.accept()[0], first.accept()[0]]  # no deferral
    for conn in held:
        conn.close()
