"""Benchmark: the REST server under load on loopback, against FastAPI's own ceiling.

Baseline: CONSTANT, a plain FastAPI endpoint that reads the same request and returns a constant
(benchmarks/constant_app.py), served by uvicorn with the same settings (``serve.workers`` processes
each, or ``--workers``): what the framework can do.
Compared: PREDICT, ``POST /predict`` of the real server (``python -m serving.app``) with one
28x28 image per request, predicting with the champion's ``serve.format`` export.

Each is measured with 1 client and with 32 concurrent clients (keep-alive connections, each sending
its next request when the last is answered), for at most ``--seconds`` and ``--max-requests`` per
server and setting, on 127.0.0.1 only; the servers are started here and stopped at the end. Both
servers run from the start, each setting opens its connections to both once, and its time is cut
into ``--rounds`` paired slices, CONSTANT and PREDICT in turn (the other's connections idle), so
that both see the same machine: a VM's speed drifts within a minute, and measured one after the
other the share moved more than any change of the server did
(docs/results/2026-11-25-serving-load.md).
Printed: p50 and p99 latency over all slices, requests per second, how many of the connections
each server process held (a uvicorn worker that takes them all leaves the other core idle), and
PREDICT's share of CONSTANT's requests per second: the median of the rounds' shares, and their
range.
Goals at 32 clients: p99 <= 15 ms and >= 50% of CONSTANT's rate. The client runs on the same
2 cores as the server, so both figures include its cost.

With ``--monitoring``, a third server joins the pairs: the real server with its metrics and its
inference log switched off (``serve.metrics`` and ``serve.log_inference`` false), the baseline
that PREDICT (both on, as params.yaml has them) is compared with, slice by slice, to price the
monitoring's cost on the request path. Its log goes to a temporary folder.

Then batch throughput at batch 256: the served runtime (and ONNX Runtime) against Keras ``predict``.

    python -m benchmarks.serve_load                 # needs a champion (make run) and data/export
    python -m benchmarks.serve_load --seconds 2 --max-requests 200   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

GOAL_P99_MS = 15.0
GOAL_SHARE = 0.5
UNMONITORED = "UNMONITORED"  # --monitoring: the real server, metrics and inference log off


def count_logged(folder: Path) -> int:
    """Rows in an inference log folder (0 when there is none)."""
    from pipelines.monitoring import read_log

    return len(read_log(folder))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv: list[str], port: int, ready_path: str, timeout_s: float = 120) -> subprocess.Popen:
    """Start a server process and wait until ``ready_path`` answers 200."""
    env = {**os.environ, "PORT": str(port), "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", *argv, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = f"GET {ready_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{' '.join(argv)} exited: {process.stderr.read()[-2000:]}")
        try:  # one request; counted only if it is answered 200
            if asyncio.run(asyncio.wait_for(load(port, ready, 1, 10.0, 1), 10))["requests"]:
                return process
        except OSError:  # refused while starting, or no answer in time (TimeoutError)
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{' '.join(argv)}: {ready_path} not 200 within {timeout_s:.0f} s")


class _Client(asyncio.Protocol):
    """One keep-alive connection. While a run drives it (``begin``), it sends the run's request
    again as soon as each answer is complete; between runs it stays open, idle.

    A bare protocol, not asyncio streams: the next request is written from ``data_received``
    itself, so the client takes less of the cores it shares with the server than asyncio streams
    would (docs/results/2026-11-24-serving-load-32-96-192.md)."""

    def __init__(self):
        self.run: _Run | None = None
        self.buffer, self.need, self.error = b"", -1, None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def begin(self, run: _Run) -> None:
        self.run = run
        self.send()

    def send(self) -> None:
        self.started = time.perf_counter()
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.run is not None:
            if self.need < 0:  # the head is not parsed yet
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buffer[:end].lower()  # b"http/1.1 200 ok\r\n...content-length: n..."
                at = head.find(b"content-length:")
                if at < 0:  # ends the run with this error
                    self.error = ValueError(f"answer without Content-Length: {head[:200]!r}")
                    self.transport.close()
                    return
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else None])
                self.status = int(head[9:12])
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return
            self.buffer, self.need = self.buffer[self.need :], -1
            if self.run.record(self.status, self.started, time.perf_counter()):
                self.send()
            else:
                run, self.run = self.run, None
                run.client_done()

    def connection_lost(self, exc) -> None:
        if self.run is not None:
            self.run.failed(exc or self.error or ConnectionError("the server closed a connection"))
        if not self.lost.done():
            self.lost.set_result(None)


class _Run:
    """One server's share of a setting: its clients, driven for ``seconds`` or ``max_requests``."""

    def __init__(self, request: bytes, clients: int, seconds: float, max_requests: int):
        self.request, self.active, self.max_requests = request, clients, max_requests
        self.began = time.perf_counter()
        self.stop_at = self.last_answer = self.began + seconds
        self.latencies: list[float] = []
        self.failures = 0
        self.done = asyncio.get_running_loop().create_future()

    def record(self, status: int, sent: float, answered: float) -> bool:
        """Count one answer; whether to send another."""
        if status == 200:
            self.latencies.append(answered - sent)
        else:
            self.failures += 1
        self.last_answer = answered
        return answered < self.stop_at and len(self.latencies) + self.failures < self.max_requests

    def client_done(self) -> None:
        self.active -= 1
        if self.active == 0 and not self.done.done():
            self.done.set_result(None)

    def failed(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def connect(port: int, clients: int) -> list[_Client]:
    loop = asyncio.get_running_loop()
    return [(await loop.create_connection(_Client, "127.0.0.1", port))[1] for _ in range(clients)]


async def close(clients: list[_Client]) -> None:
    for client in clients:
        client.transport.close()
    await asyncio.gather(*(client.lost for client in clients))


async def drive(
    clients: list[_Client],
    request: bytes,
    seconds: float,
    max_requests: int,
    port: int,
) -> dict:
    """Send ``request`` back to back on every connection (reopening any the server closed while
    they idled) for ``seconds`` or ``max_requests``: latencies and rate."""
    for i, client in enumerate(clients):
        if client.lost.done():
            clients[i] = (await connect(port, 1))[0]
    run = _Run(request, len(clients), seconds, max_requests)
    for client in clients:
        client.begin(run)
    await run.done
    elapsed = max(run.last_answer - run.began, 1e-9)
    return summary(len(clients), [np.array(run.latencies) * 1e3], run.failures, elapsed, ["-"])


def with_connections_held(figures: dict, server_pid: int, port: int) -> dict:
    """A slice's ``figures`` with how many of the open connections each server process holds:
    call it once every connection has been answered, so that all have been accepted."""
    return {**figures, "held": "+".join(str(n) for n in connections_held(server_pid, port))}


async def load(
    port: int,
    request: bytes,
    clients: int,
    seconds: float,
    max_requests: int,
    server_pid: int | None = None,
) -> dict:
    """``clients`` new keep-alive connections sending ``request`` back to back, then closed; given
    ``server_pid``, how many of them each server process held."""
    connections = await connect(port, clients)
    try:
        figures = await drive(connections, request, seconds, max_requests, port)
        return figures if server_pid is None else with_connections_held(figures, server_pid, port)
    finally:
        await close(connections)


async def paired_rounds(
    servers: dict[str, tuple[int, int, bytes]],
    clients: int,
    rounds: int,
    seconds: float,
    max_requests: int,
) -> dict[str, list[dict]]:
    """``clients`` connections to each server (port, pid, request), opened once and kept; then
    ``rounds`` times each server's in turn, the first server first in even rounds and last in
    odd ones, for ``seconds`` or ``max_requests`` each: every slice's figures, per server."""
    connections = {name: await connect(port, clients) for name, (port, _, _) in servers.items()}
    slices: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                port, pid, request = servers[name]
                figures = await drive(connections[name], request, seconds, max_requests, port)
                if round_ == 0:  # where the connections went: they stay open for every round
                    figures = with_connections_held(figures, pid, port)
                slices[name].append(figures)
    finally:
        for opened in connections.values():
            await close(opened)
    return slices


def summary(
    clients: int, latencies_ms: list[np.ndarray], failures: int, seconds: float, held: list[str]
) -> dict:
    """Figures from one or more slices: latencies pooled, the rate over their total time."""
    ms = np.concatenate(latencies_ms)
    return {
        "clients": clients,
        "requests": len(ms),
        "failures": failures,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "rps": len(ms) / seconds,
        "held": ",".join(dict.fromkeys(h for h in held if h != "-")) or "-",
        "latencies_ms": ms,
        "seconds": seconds,
    }


def pooled(parts: list[dict]) -> dict:
    """The slices of one server and setting, as one."""
    return summary(
        parts[0]["clients"],
        [p["latencies_ms"] for p in parts],
        sum(p["failures"] for p in parts),
        sum(p["seconds"] for p in parts),
        [p["held"] for p in parts],
    )


def warm_up(port: int, request: bytes, server_pid: int, workers: int, timeout_s: float = 60):
    """Load the server for a second at a time until every worker holds connections.

    A worker listens once its application has started (its model loaded); until the last one
    does, all connections land on the first (32+0), and ``start`` returns when one answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = asyncio.run(load(port, request, 4 * workers, 1.0, 10**6, server_pid))["held"]
        counts = [int(n) for n in held.split("+")] if held != "-" else []
        if len(counts) >= workers and min(counts) > 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"after {timeout_s:.0f} s, connections per worker are still {held}")


def connections_held(server_pid: int, port: int) -> list[int]:
    """Open connections on ``port`` per serving process: the workers (the children listening on
    the port) or, with one process, the server itself."""
    import psutil

    def on_port(process, status):
        return [
            c for c in process.net_connections("tcp") if c.status == status and c.laddr.port == port
        ]

    server = psutil.Process(server_pid)
    workers = [child for child in server.children() if on_port(child, psutil.CONN_LISTEN)]
    return [len(on_port(worker, psutil.CONN_ESTABLISHED)) for worker in workers or [server]]


def post(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def batch_throughput(params, repeats: int) -> list[tuple[str, float]]:
    """Images per second at batch 256: the served export, ONNX Runtime, Keras predict."""
    import keras

    from pipelines.data import load_raw
    from pipelines.export import median_seconds
    from pipelines.model import to_model_input
    from pipelines.runtime import load_predictor

    data = load_raw(Path("data/raw"), params.ingest.file_names)
    x = to_model_input(data.x_test[:256])
    rows = []
    model = keras.models.load_model("data/model/model.keras")
    keras_s = median_seconds(lambda: model.predict(x, batch_size=256, verbose=0), repeats)
    rows.append(("Keras predict (baseline)", len(x) / keras_s))
    for name in dict.fromkeys([params.serve.format, "model.onnx"]):
        predictor = load_predictor(Path("data/export") / name, threads=params.serve.threads)
        rows.append((name, len(x) / median_seconds(lambda p=predictor: p.predict(x), repeats)))
    return rows


def main() -> None:
    from pipelines.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="per server and setting, at most (counted)"
    )
    parser.add_argument(
        "--max-requests", type=int, default=200_000, help="per server and setting, at most"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="paired slices per setting (CONSTANT, PREDICT)"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5, help="batch-throughput repeats")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--workers", type=int, help="server processes of both servers (default: serve.workers)"
    )
    parser.add_argument(
        "--monitoring",
        action="store_true",
        help="also the server without metrics and inference log: the cost of both",
    )
    args = parser.parse_args()
    params = load_params(args.params)
    scratch = Path(tempfile.mkdtemp(prefix="mnist-bench-serve-"))

    from pipelines.data import load_raw

    data = load_raw(Path("data/raw"), params.ingest.file_names)
    body = json.dumps({"instances": [data.x_test[0].tolist()]}).encode()
    workers = ["--workers", str(args.workers or params.serve.workers)]
    logged = ["--log-dir", str(scratch / "monitoring")]  # never the checkout's data/monitoring
    servers = {
        "CONSTANT": (["benchmarks.constant_app", *workers], "/ready", "/predict"),
        "PREDICT": (
            ["serving.app", "--params", args.params, *workers, *logged],
            "/ready",
            "/predict",
        ),
    }
    if args.monitoring:
        quiet = yaml.safe_load(Path(args.params).read_text())
        quiet["serve"].update(metrics=False, log_inference=False)
        (scratch / "params.yaml").write_text(yaml.safe_dump(quiet))
        servers[UNMONITORED] = (
            ["serving.app", "--params", str(scratch / "params.yaml"), *workers, *logged],
            "/ready",
            "/predict",
        )
    running: dict[str, subprocess.Popen] = {}
    try:
        targets = {}
        for name, (argv, ready, path) in servers.items():
            port = free_port()
            running[name] = start(argv, port, ready)
            targets[name] = (port, running[name].pid, post(path, body))
            warm_up(port, targets[name][2], running[name].pid, int(workers[1]))
        slices = {
            n: asyncio.run(
                paired_rounds(
                    targets,
                    n,
                    args.rounds,
                    args.seconds / args.rounds,
                    max(1, args.max_requests // args.rounds),
                )
            )
            for n in args.clients
        }
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.wait(timeout=20)
        logged_rows = count_logged(scratch / "monitoring")
        shutil.rmtree(scratch, ignore_errors=True)
    results = {name: [pooled(slices[n][name]) for n in args.clients] for name in servers}

    print(
        f"\nPOST /predict, one 28x28 image per request, loopback; {params.serve.format}, "
        f"{workers[1]} server process(es) each"
    )
    print(
        f"{'server':10} {'clients':>7} {'requests':>8} {'fail':>5} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'req/s':>8}  connections per process"
    )
    for name, rows in results.items():
        for row in rows:
            print(
                f"{name:10} {row['clients']:7d} {row['requests']:8d} {row['failures']:5d} "
                f"{row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['rps']:8.0f}  {row['held']}"
            )
    for n, predict_row in zip(args.clients, results["PREDICT"], strict=True):
        pairs = zip(slices[n]["PREDICT"], slices[n]["CONSTANT"], strict=True)
        shares = [p["rps"] / c["rps"] for p, c in pairs]
        share = float(np.median(shares))
        line = (
            f"{n} client(s): PREDICT/CONSTANT req/s = {share:.3f} (median of {len(shares)} "
            f"paired rounds: {min(shares):.3f}-{max(shares):.3f})"
        )
        if predict_row["clients"] >= 32:
            line += (
                f"  (goal >= {GOAL_SHARE:.2f}: {'met' if share >= GOAL_SHARE else 'NOT met'});"
                f" p99 {predict_row['p99_ms']:.2f} ms (goal <= {GOAL_P99_MS:.0f}: "
                f"{'met' if predict_row['p99_ms'] <= GOAL_P99_MS else 'NOT met'})"
            )
        print(line)

    if args.monitoring:
        print(f"\nthe monitoring's cost: PREDICT against {UNMONITORED} (baseline), paired slices")
        print(
            f"{'clients':>7} {'p99 off':>8} {'p99 on':>7} {'p99 on/off':>10} {'req/s on/off':>13}"
        )
        for i, n in enumerate(args.clients):
            on, off = results["PREDICT"][i], results[UNMONITORED][i]
            pairs = zip(slices[n]["PREDICT"], slices[n][UNMONITORED], strict=True)
            ratios = [p["rps"] / q["rps"] for p, q in pairs]
            print(
                f"{n:7d} {off['p99_ms']:8.2f} {on['p99_ms']:7.2f} "
                f"{on['p99_ms'] / off['p99_ms']:9.2f}x {float(np.median(ratios)):12.3f}x"
                f"  (rounds {min(ratios):.3f}-{max(ratios):.3f})"
            )
        print(f"inference log rows written by PREDICT: {logged_rows}")

    print("\nbatch of 256 test images, one thread per runtime (median of", args.repeats, "calls)")
    rows = batch_throughput(params, args.repeats)
    for label, rate in rows:
        print(f"  {label:28} {rate:9.0f} images/s  {rate / rows[0][1]:5.2f}x")


if __name__ == "__main__":
    main()
