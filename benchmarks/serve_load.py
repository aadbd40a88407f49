"""Benchmark: the REST server under load on loopback, against FastAPI's own ceiling.

Baseline: CONSTANT, a plain FastAPI endpoint that reads the same request and returns a constant
(benchmarks/constant_app.py), served by uvicorn with the same settings (``serve.workers`` processes
each, or ``--workers``): what the framework can do.
Compared: PREDICT, ``POST /predict`` of the real server (``python -m serving.app``) with one
28x28 image per request, predicting with the champion's ``serve.format`` export.

Each is measured with 1 client and with 32 concurrent clients (keep-alive connections, each sending
its next request when the last is answered), for at most ``--seconds`` and ``--max-requests`` per
setting, on 127.0.0.1 only; the servers are started here and stopped at the end. Printed: p50 and
p99 latency and requests per second, and PREDICT's share of CONSTANT's requests per second.
Goals at 32 clients: p99 <= 15 ms and >= 50% of CONSTANT's rate. The client runs on the same
2 cores as the server, so both figures include its cost.

Then batch throughput at batch 256: the served runtime (and ONNX Runtime) against Keras ``predict``.

    python -m benchmarks.serve_load                 # needs a champion (make run) and data/export
    python -m benchmarks.serve_load --seconds 2 --max-requests 200   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GOAL_P99_MS = 15.0
GOAL_SHARE = 0.5


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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{' '.join(argv)} exited: {process.stderr.read()[-2000:]}")
        try:
            status = asyncio.run(one_request(port, f"GET {ready_path} HTTP/1.1\r\nHost: x\r\n\r\n"))
            if status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{' '.join(argv)}: {ready_path} not 200 within {timeout_s:.0f} s")


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    await reader.readexactly(length)
    return status


async def one_request(port: int, request: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode())
    await writer.drain()
    status = await read_response(reader)
    writer.close()
    return status


async def load(port: int, request: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` keep-alive connections sending ``request`` back to back; latencies and rate."""
    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop_at and len(latencies) + failures < max_requests:
            start = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = await read_response(reader)
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1e3
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "rps": len(latencies) / elapsed,
    }


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
    parser.add_argument("--seconds", type=float, default=10.0, help="per setting, at most")
    parser.add_argument("--max-requests", type=int, default=20000, help="per setting, at most")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5, help="batch-throughput repeats")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--workers", type=int, help="server processes of both servers (default: serve.workers)"
    )
    args = parser.parse_args()
    params = load_params(args.params)

    from pipelines.data import load_raw

    data = load_raw(Path("data/raw"), params.ingest.file_names)
    body = json.dumps({"instances": [data.x_test[0].tolist()]}).encode()
    workers = ["--workers", str(args.workers or params.serve.workers)]
    servers = {
        "CONSTANT": (["benchmarks.constant_app", *workers], "/ready", "/predict"),
        "PREDICT": (["serving.app", "--params", args.params, *workers], "/ready", "/predict"),
    }
    results: dict[str, list[dict]] = {}
    for name, (argv, ready, path) in servers.items():
        port = free_port()
        process = start(argv, port, ready)
        try:
            asyncio.run(load(port, post(path, body), 4, 1.0, 200))  # warm up
            results[name] = [
                asyncio.run(load(port, post(path, body), n, args.seconds, args.max_requests))
                for n in args.clients
            ]
        finally:
            process.terminate()
            process.wait(timeout=20)

    print(
        f"\nPOST /predict, one 28x28 image per request, loopback; {params.serve.format}, "
        f"{workers[1]} server process(es) each"
    )
    print(
        f"{'server':10} {'clients':>7} {'requests':>8} {'fail':>5} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>8}"
    )
    for name, rows in results.items():
        for row in rows:
            print(
                f"{name:10} {row['clients']:7d} {row['requests']:8d} {row['failures']:5d} "
                f"{row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['rps']:8.0f}"
            )
    for predict_row, constant_row in zip(results["PREDICT"], results["CONSTANT"], strict=True):
        share = predict_row["rps"] / constant_row["rps"]
        line = f"{predict_row['clients']} client(s): PREDICT/CONSTANT req/s = {share:.2f}"
        if predict_row["clients"] >= 32:
            line += (
                f"  (goal >= {GOAL_SHARE:.2f}: {'met' if share >= GOAL_SHARE else 'NOT met'});"
                f" p99 {predict_row['p99_ms']:.2f} ms (goal <= {GOAL_P99_MS:.0f}: "
                f"{'met' if predict_row['p99_ms'] <= GOAL_P99_MS else 'NOT met'})"
            )
        print(line)

    print("\nbatch of 256 test images, one thread per runtime (median of", args.repeats, "calls)")
    rows = batch_throughput(params, args.repeats)
    for label, rate in rows:
        print(f"  {label:28} {rate:9.0f} images/s  {rate / rows[0][1]:5.2f}x")


if __name__ == "__main__":
    main()
