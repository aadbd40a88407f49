"""Benchmark: the REST server under wrk, against FastAPI's ceiling on uvicorn's fastest stack and
against ``mlflow models serve``.

Baseline: CONSTANT, ``benchmarks/constant_app.py`` (a FastAPI ``POST /predict`` that reads the
body and returns a constant) under uvicorn with uvloop and httptools, 2 worker processes: what the
framework does when the model and the project's own work cost nothing.
Compared:
- MODEL, ``benchmarks/constant_app.py``'s ``model_app`` on CONSTANT's stack: it parses the body, runs
  the champion's served export and answers as PROJECT does, with none of the project's own work.
  MODEL / CONSTANT is what the model costs, the best share any server running it can reach here;
  PROJECT / MODEL is what the project's own work costs;
- PROJECT, the real server (``python -m serving.app``, params.yaml or ``--params``), one 28x28
  MNIST digit per ``POST /predict`` as 0-255 integers;
- each ``--variant NAME=PARAMS`` (the real server with another params file: batching off,
  another HTTP parser, ...);
- MLFLOW, ``mlflow models serve`` of the same champion's logged model, 2 workers, the same digit
  as ``{"inputs": ...}`` to ``/invocations`` (``--no-mlflow`` leaves it out: it is slow to start).

The load is wrk (Debian's package, a C load generator: one thread, so the client takes little of
the cores the servers share) with keep-alive connections, 32 of them and 1. The servers run side
by side from the start; each round gives each server ``--seconds`` in turn (MLFLOW
``--mlflow-seconds``), after a short warm-up, so a VM whose speed drifts within a minute drifts
for all of them alike. Printed per setting and server: the median of the rounds' requests per
second (and their range), p50 and p99; then each server's share of CONSTANT's rate, round by round
(median and range), PROJECT against MODEL and MLFLOW, and the goal at 32 connections, with
MODEL's share beside it.

Every answer must be a 2xx: wrk's non-2xx or socket errors fail the benchmark, since a server that
answers errors fast is not fast. The servers are started here, on 127.0.0.1 only, and stopped at
the end, whatever happens.

    python -m benchmarks.serve_wrk                        # needs a champion (make run) and wrk
    python -m benchmarks.serve_wrk --rounds 1 --seconds 2 --no-mlflow   # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import yaml

from benchmarks.serve_load import free_port

GOAL_SHARE = 0.6  # of CONSTANT's requests per second, at 32 connections ...
GOAL_P99_MS = 10.0  # ... with this tail
BASELINE = "CONSTANT"
MODEL = "MODEL"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def digit(params_file: str) -> list[list[int]]:
    """One real MNIST test digit, 0-255, from the ingest stage's output."""
    from pipelines.config import load_params
    from pipelines.data import load_raw

    params = load_params(params_file)
    return load_raw(REPO / "data/raw", params.ingest.file_names).x_test[0].astype(int).tolist()


@contextmanager
def server(name: str, argv: list[str], url: str, env: dict, log: Path):
    """Start ``argv`` in its own process group; yield once ``url`` answers 200; stop it all."""
    with log.open("w") as out:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited ({process.returncode}): {log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} did not answer {url} in {START_TIMEOUT_S} s ({log}); the real server "
                    "needs a champion: run `make run` first, or set MLFLOW_TRACKING_URI"
                )
            time.sleep(0.5)
        yield
    finally:
        with_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with_group(process, signal.SIGKILL)
            process.wait(timeout=10)


def with_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def lua_script(folder: Path, name: str, body: dict) -> Path:
    """wrk's request: a POST of ``body`` as JSON."""
    path = folder / f"{name}.lua"
    text = json.dumps(body, separators=(",", ":"))
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(text)}\n"
    )
    return path


def run_wrk(url: str, script: Path, connections: int, seconds: float) -> dict:
    """One wrk run: requests/s, p50 and p99 in ms. Raises on any error or non-2xx answer."""
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
        "--timeout", "10s", "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return read_wrk(done.stdout, url)


def read_wrk(out: str, url: str) -> dict:
    """wrk's report -> requests/s, p50 and p99 in ms. Raises on any error or non-2xx answer."""
    for bad in ("Non-2xx or 3xx responses", "Socket errors"):
        if bad in out:
            raise RuntimeError(f"{url}: {bad.lower()} under load:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    latency = {
        int(p): float(v) * UNITS[u]
        for p, v, u in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    if rate is None or set(latency) != {50, 99}:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    return {"rps": float(rate.group(1)), "p50_ms": latency[50], "p99_ms": latency[99]}


def ceiling_stack(factory: str, port: int) -> list[str]:
    """``benchmarks.constant_app``'s ``factory`` under uvicorn with uvloop and httptools, 2 workers."""
    return [
        sys.executable, "-m", "uvicorn", f"benchmarks.constant_app:{factory}", "--factory",
        "--loop", "uvloop", "--http", "httptools", "--workers", "2", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip


def real_server(name: str, params_file: Path, folder: Path) -> tuple[list[str], dict]:
    """The project's server on its own port, its inference log in ``folder``."""
    params = yaml.safe_load(params_file.read_text())
    params["serve"]["log_dir"] = str(folder / f"{name}-log")
    own = folder / f"{name}.yaml"
    own.write_text(yaml.safe_dump(params))
    port = free_port()
    argv = [sys.executable, "-m", "serving.app", "--params", str(own), "--port", str(port)]
    return argv, {"port": port, "path": "/predict", "ready": "/ready"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="PROJECT's params")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PARAMS")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--mlflow-seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--pause", type=float, default=1.0, help="idle seconds between runs")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is missing: `make bench-wrk` installs it (apt-get install wrk)")
    variants = [("PROJECT", Path(args.params))]
    for spec in args.variant:
        name, _, path = spec.partition("=")
        if not name or not path or not Path(path).is_file():
            parser.error(f"--variant {spec!r}: expected NAME=PARAMS_FILE, an existing file")
        variants.append((name, Path(path)))

    image = digit(args.params)
    from pipelines.tracking import tracking_uri

    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # mlflow's CLI does not know the project's store, and reads its registry from
        # MLFLOW_REGISTRY_URI when that is set (mlflow.set_registry_uri sets it in-process)
        "MLFLOW_TRACKING_URI": tracking_uri(),
        "MLFLOW_REGISTRY_URI": tracking_uri(),
        "MNIST_BENCH_PARAMS": args.params,  # MODEL's champion
        # mlflow models serve runs `uvicorn` by name: the venv's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        servers: dict[str, dict] = {}
        port = free_port()
        servers[BASELINE] = {"port": port, "path": "/predict", "ready": "/ready"}
        argv = {BASELINE: ceiling_stack("constant_app", port)}
        port = free_port()
        servers[MODEL] = {"port": port, "path": "/predict", "ready": "/ready"}
        argv[MODEL] = ceiling_stack("model_app", port)
        for name, params_file in variants:
            argv[name], servers[name] = real_server(name, params_file, folder)
        if not args.no_mlflow:
            from pipelines.config import load_params

            register = load_params(args.params).register
            port = free_port()
            servers["MLFLOW"] = {"port": port, "path": "/invocations", "ready": "/ping"}
            argv["MLFLOW"] = [
                sys.executable, "-m", "mlflow", "models", "serve",
                "-m", f"models:/{register.model_name}@{register.champion_alias}",
                "--env-manager", "local", "--workers", "2", "-h", "127.0.0.1", "-p", str(port),
            ]  # fmt: skip
        for name, spec in servers.items():
            base = f"http://127.0.0.1:{spec['port']}"
            spec["url"] = base + spec["path"]
            print(f"starting {name} on port {spec['port']} ...", flush=True)
            stack.enter_context(
                server(name, argv[name], base + spec["ready"], env, folder / f"{name}.log")
            )
            body = {"instances": [image]}
            if name == "MLFLOW":  # the logged Keras model's own input: float32 0-1, 28x28x1
                body = {"inputs": [[[[p / 255] for p in row] for row in image]]}
            spec["script"] = lua_script(folder, name, body)
            answer = httpx.post(spec["url"], json=body, timeout=30)
            if answer.status_code != 200:
                raise RuntimeError(f"{name} answered {answer.status_code}: {answer.text[:500]}")

        figures: dict[int, dict[str, list[dict]]] = {}
        for connections in args.connections:
            figures[connections] = {name: [] for name in servers}
            for spec in servers.values():  # warm-up: connections, caches, first allocations
                run_wrk(spec["url"], spec["script"], connections, 1)
            for round_ in range(args.rounds):
                for name, spec in servers.items():
                    seconds = args.mlflow_seconds if name == "MLFLOW" else args.seconds
                    time.sleep(args.pause)
                    result = run_wrk(spec["url"], spec["script"], connections, seconds)
                    figures[connections][name].append(result)
                    print(
                        f"  c={connections} round {round_ + 1}/{args.rounds} {name:<12} "
                        f"{result['rps']:>9.0f} req/s  p99 {result['p99_ms']:.2f} ms",
                        flush=True,
                    )
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def ratios(rounds: dict[str, list[dict]], name: str, other: str) -> list[float]:
    """``name``'s requests/s over ``other``'s, round by round (they ran side by side)."""
    return [a["rps"] / b["rps"] for a, b in zip(rounds[name], rounds[other], strict=True)]


def report(figures: dict[int, dict[str, list[dict]]]) -> None:
    for connections, by_server in figures.items():
        print(f"\n{connections} connection(s), wrk -t1")
        print(f"{'server':<14}{'requests/s':>12}{'range':>20}{'p50 ms':>10}{'p99 ms':>10}")
        for name, rounds in by_server.items():
            rates = [r["rps"] for r in rounds]
            print(
                f"{name:<14}{statistics.median(rates):>12.0f}"
                f"{f'{min(rates):.0f}-{max(rates):.0f}':>20}"
                f"{statistics.median(r['p50_ms'] for r in rounds):>10.2f}"
                f"{statistics.median(r['p99_ms'] for r in rounds):>10.2f}"
            )
        pairs = [(name, BASELINE, "") for name in by_server if name != BASELINE]
        pairs.append(("PROJECT", MODEL, " (the project's own work)"))
        if "MLFLOW" in by_server:
            pairs.append(("PROJECT", "MLFLOW", ""))
        for name, other, note in pairs:
            shares = ratios(by_server, name, other)
            digits = 1 if other == "MLFLOW" else 3
            print(
                f"{name} / {other}{note}: {statistics.median(shares):.{digits}f}x "
                f"(rounds {min(shares):.{digits}f}-{max(shares):.{digits}f})"
            )
    if 32 in figures:
        rounds = figures[32]
        share = statistics.median(ratios(rounds, "PROJECT", BASELINE))
        p99 = statistics.median(r["p99_ms"] for r in rounds["PROJECT"])
        met = share >= GOAL_SHARE and p99 <= GOAL_P99_MS
        bound = statistics.median(ratios(rounds, MODEL, BASELINE))
        print(
            f"\ngoal: PROJECT >= {GOAL_SHARE}x {BASELINE} and p99 <= {GOAL_P99_MS:g} ms at 32 "
            f"connections: {'PASS' if met else 'MISS'} (share {share:.3f}x, p99 {p99:.2f} ms; "
            f"{MODEL}, the model alone on {BASELINE}'s stack: {bound:.3f}x)"
        )


if __name__ == "__main__":
    main()
