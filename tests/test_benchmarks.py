"""Smoke tests of the benchmarks: they run end to end on a tiny slice and print their figures.

They assert no timing: a benchmark is measured by a person on a quiet machine, not by CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def run_benchmark(*argv: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_speed_benchmark_prints_throughput_and_ratio_per_mode(raw_dir: Path) -> None:
    # when the throughput benchmark runs once per mode on 200 images for one epoch
    out = run_benchmark(
        "benchmarks.speed", "--images", "200", "--epochs", "1", "--repeats", "1",
        "--raw", str(raw_dir),
    )  # fmt: skip
    # then it prints one result row per mode: images per epoch, img/s, ratio to the seed, the wait
    # before first batches, img/s and ratio without it, accuracy, and the dtype policy it trained in
    rows = {
        m.group(1).strip(): m.groups()[1:]
        for m in re.finditer(
            r"^(seed recipe \(baseline\)|project, f32, oneDNN off|project, float32|project)\s+"
            r"(\d+)\s+(\d+)\s+([\d.]+)x\s+([\d.]+)\s+(\d+)\s+([\d.]+)x\s+([\d.]+)\s+(\w+)$",
            out,
            flags=re.MULTILINE,
        )
    }
    assert set(rows) == {
        "seed recipe (baseline)", "project, f32, oneDNN off", "project, float32", "project"
    }, out  # fmt: skip
    for images, speed, _, wait, bare_speed, _, _, _ in rows.values():
        assert int(images) > 0 and 0 < int(speed) <= int(bare_speed) and float(wait) >= 0
    # the baseline's ratios to itself
    assert rows["seed recipe (baseline)"][2] == rows["seed recipe (baseline)"][5] == "1.00"
    # the float32 modes compute in float32; "project" in what params.yaml's precision means here
    from pipelines.config import load_params
    from pipelines.model import compute_dtype

    assert rows["project, float32"][-1] == rows["project, f32, oneDNN off"][-1] == "float32"
    assert rows["project"][-1] == compute_dtype(load_params().train.precision)


def test_time_to_accuracy_benchmark_prints_each_epoch_and_the_target(raw_dir: Path) -> None:
    # when both modes train one epoch on 200 images
    out = run_benchmark(
        "benchmarks.time_to_accuracy", "--images", "200", "--seed-epochs", "1",
        "--set", "train.epochs=1", "--best-params", "none", "--raw", str(raw_dir),
    )  # fmt: skip
    # then each mode prints its epochs with cumulative seconds and test accuracy, and the verdict
    assert re.search(r"^seed recipe: final test accuracy [\d.]+$", out, re.MULTILINE), out
    assert re.search(r"^project \{'train.epochs': 1\}: final test accuracy", out, re.MULTILINE)
    assert len(re.findall(r"^  epoch  1\s+[\d.]+ s  test acc [\d.]+$", out, re.MULTILINE)) == 2
    assert re.search(r"^target: test accuracy [\d.]+$", out, re.MULTILINE), out
    assert re.search(r"^project: (reached at epoch 1, after [\d.]+ s|never reached it)", out, re.M)


def test_adversarial_benchmark_prints_both_arms_and_the_difference(raw_dir: Path) -> None:
    # when both arms train one epoch on 300 images
    out = run_benchmark(
        "benchmarks.adversarial", "--images", "300", "--epochs", "1", "--best-params", "none",
        "--raw", str(raw_dir), "--epsilons", "0.1", "0.2",
    )  # fmt: skip
    # then it prints clean and FGSM accuracy per arm, and the differences in points
    assert re.search(
        r"^300 training images, 1 epochs; adversarial: FGSM eps 0\.1 on 50%", out, re.M
    )
    rows = re.findall(
        r"^(plain|adversarial)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s+\d+$", out, re.MULTILINE
    )
    assert [r[0] for r in rows] == ["plain", "adversarial"], out
    assert all(0 <= float(v) <= 100 for r in rows for v in r[1:])
    assert re.search(r"^difference\s+[+-][\d.]+p\s+[+-][\d.]+p\s+[+-][\d.]+p\s+[\d.]+x$", out, re.M)


def test_augment_modes_benchmark_prints_both_modes_against_the_baseline(raw_dir: Path) -> None:
    # when both modes train two epochs on 300 images (the precomputed one: two copies, one fit)
    out = run_benchmark(
        "benchmarks.augment_modes", "--images", "300", "--epochs", "2", "--raw", str(raw_dir)
    )
    # then each mode prints its precompute time, median epoch, total and test accuracy, and its
    # ratios to the on-the-fly baseline
    rows = {
        m.group(1): [float(v) for v in m.groups()[1:]]
        for m in re.finditer(
            r"^(on the fly \(baseline\)|precomputed)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)"
            r"\s+([\d.]+)\s+([\d.]+)x, ([\d.]+)x$",
            out,
            flags=re.MULTILINE,
        )
    }
    assert set(rows) == {"on the fly (baseline)", "precomputed"}, out
    base, pre = rows["on the fly (baseline)"], rows["precomputed"]
    # only the precomputed mode augments up front (printed in ms steps: 300 images took 0.0x s)
    assert base[0] == 0 and pre[0] > 0, out  # only the precomputed mode augments up front
    for precompute, epochs, median, total, accuracy, _, _ in (base, pre):
        assert epochs == 2 and median > 0 and total >= precompute + median and 0 <= accuracy <= 1
    assert base[5] == base[6] == 1.0


def test_serve_load_pairs_its_slices_on_connections_kept_open() -> None:
    """The load test's paired rounds: each server's slice in turn (first server first in even
    rounds, last in odd ones), on connections opened once per setting and kept, every answer
    counted. Two tiny keep-alive HTTP servers in this process stand in for the real ones."""
    import asyncio
    import itertools

    from benchmarks.serve_load import paired_rounds, pooled, post

    async def scenario():
        accepted = {"A": 0, "B": 0}
        answered: list[str] = []

        def handler(name):
            async def handle(reader, writer):
                accepted[name] += 1
                try:
                    while True:
                        head = (await reader.readuntil(b"\r\n\r\n")).lower()
                        length = int(re.search(rb"content-length: *(\d+)", head).group(1))
                        await reader.readexactly(length)
                        answered.append(name)
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                except (asyncio.IncompleteReadError, ConnectionError):
                    pass
                finally:
                    writer.close()

            return handle

        servers = {name: await asyncio.start_server(handler(name), "127.0.0.1", 0) for name in "AB"}
        targets = {
            name: (server.sockets[0].getsockname()[1], os.getpid(), post("/x", b"{}"))
            for name, server in servers.items()
        }
        slices = await paired_rounds(targets, clients=4, rounds=3, seconds=0.1, max_requests=10**6)
        for server in servers.values():
            server.close()
        return accepted, answered, slices

    accepted, answered, slices = asyncio.run(scenario())
    assert accepted == {"A": 4, "B": 4}  # 4 connections each, kept for all three rounds
    # rounds A B | B A | A B: one server at a time, and the order alternates
    assert [name for name, _ in itertools.groupby(answered)] == ["A", "B", "A", "B"]
    for name in "AB":
        assert len(slices[name]) == 3
        assert all(part["requests"] > 0 and part["failures"] == 0 for part in slices[name])
        assert slices[name][0]["held"] == "4"  # this process holds the server ends of all 4
        assert pooled(slices[name])["requests"] == answered.count(name)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_scale_benchmark_prints_each_part_against_its_baseline(raw_dir: Path) -> None:
    from tests.team_support import need_postgres

    need_postgres()  # parts b and c run on the team profile's PostgreSQL and MLflow server
    # when every part runs tiny: 2 trials of one epoch per mode, 5 storage trials, 10 MLflow
    # calls, 10 scheduler tasks
    out = run_benchmark(
        "benchmarks.scale", "--trials", "2", "--images", "0", "--epochs", "1", "--repeats", "1",
        "--storage-trials", "5", "--storage-repeats", "1", "--mlflow-calls", "10",
        "--mlflow-repeats", "1", "--tasks", "10", "--raw", str(raw_dir),
    )  # fmt: skip
    num, x = r"([\d.,]+)", r"([\d.]+)x"

    def rows(names: str, *columns: str) -> dict[str, tuple[str, ...]]:
        pattern = rf"^({names})\s+" + r"\s+".join(columns) + r"$"
        return {m.group(1): m.groups()[1:] for m in re.finditer(pattern, out, re.MULTILINE)}

    # then (a) each mode ran both trials: stage and trial-phase rates with their ratios
    a = rows(r"in process \(baseline\)|2 Dask workers x 1 thread", r"(\d+)", num, num, x, num,
             num, x, num, num)  # fmt: skip
    assert set(a) == {"in process (baseline)", "2 Dask workers x 1 thread"}, out
    assert all(row[0] == "2" and float(row[2]) > 0 for row in a.values()), out
    assert a["in process (baseline)"][3] == a["in process (baseline)"][6] == "1.00"
    # and (b) both storages, in ms per trial, PostgreSQL with its server's CPU time
    b = rows(r"sqlite \(baseline\)|PostgreSQL", num, x, num, num, r"([\d.]+|-)")
    assert set(b) == {"sqlite (baseline)", "PostgreSQL"}, out
    assert b["sqlite (baseline)"][1] == "1.00" and b["sqlite (baseline)"][4] == "-"
    # and (c) the local store, the team server and the same with its auth cache, per call
    c = rows(r"local sqlite store \(baseline\)|team MLflow server|same, auth cache 60 s",
             *[num, x, r"([\d.]+|-)"] * 3)  # fmt: skip
    assert set(c) == {
        "local sqlite store (baseline)",
        "team MLflow server",
        "same, auth cache 60 s",
    }
    assert c["local sqlite store (baseline)"][1::3] == ("1.00",) * 3, out
    assert "-" not in c["team MLflow server"], out
    # and (d) the scheduler one task at a time and all in flight
    d = rows(r"one at a time \(baseline\)|all in flight", num, x, num)
    assert set(d) == {"one at a time (baseline)", "all in flight"}, out
    # and the projection's inputs, from every part
    assert re.search(r"^projection inputs: a trial of .* trials/h\)\.$", out, re.MULTILINE), out


def test_drift_thresholds_benchmark_prints_each_window_and_shift(raw_dir: Path, tmp_path) -> None:
    # when the benchmark runs on the tiny dataset without a model (the labels stand in)
    out = run_benchmark(
        "benchmarks.drift_thresholds", "--raw", str(raw_dir), "--window", "40", "--windows", "1",
        "--export", str(tmp_path / "none"),
    )  # fmt: skip
    # then every window is printed unshifted and after each shift, with its figures
    from pipelines.shifts import SHIFTS

    rows = re.findall(
        r"^(MNIST test, [\w ]+?)\s{2,}(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out, re.M
    )
    assert {(w, s) for w, s, *_ in rows} == {
        (w, s) for w in ("MNIST test, random 1", "MNIST test, 2nd half") for s in ("none", *SHIFTS)
    }, out
    assert "model: none (labels)" in out
    inverted = [float(share) for _, s, _, share, _ in rows if s == "inverted"]
    assert all(share >= 0.5 for share in inverted), out  # an inverted window drifts, always


WRK_REPORT = """Running 5s test @ http://127.0.0.1:8000/predict
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.90ms    9.10ms 190.00ms   95.00%
    Req/Sec     3.25k   200.00     3.60k    70.00%
  Latency Distribution
     50%    8.88ms
     75%   10.02ms
     90%   12.50ms
     99%    1.20s
  16160 requests in 5.00s, 9.10MB read
Requests/sec:   3232.71
Transfer/sec:      1.82MB
"""


def test_serve_wrk_reads_wrks_report_and_refuses_errors() -> None:
    from benchmarks.serve_wrk import read_wrk

    # the units of each percentile are wrk's own (us, ms, s)
    assert read_wrk(WRK_REPORT, "u") == {"rps": 3232.71, "p50_ms": 8.88, "p99_ms": 1200.0}
    # a server answering errors fast is not fast: the run fails
    errors = WRK_REPORT.replace("Requests/sec", "  Non-2xx or 3xx responses: 12\nRequests/sec")
    with pytest.raises(RuntimeError, match="non-2xx"):
        read_wrk(errors, "u")
    with pytest.raises(RuntimeError, match="could not read"):
        read_wrk("Requests/sec: 10\n", "u")
