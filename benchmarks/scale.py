"""Benchmark: what the tune stage gains from more workers, and what each trial pays for sharing.

Four parts, each printed as a table against its named baseline, on this machine:

a. TRIALS PER HOUR. Baseline: IN PROCESS, the tune stage (``python -m pipelines.tune``) with
   ``tune.workers: 1``: trials one after another in the stage's process, TensorFlow on every core.
   Compared: 2 DASK WORKERS, the same stage with ``tune.workers: 2``: a local cluster of two
   processes of one thread each (pipelines/tune_cluster.py, ``WORKER_ENV``). Both run the same
   study definition on a fresh sqlite study, modes interleaved (the order flips each repeat). The
   space keeps params.yaml's keys that do not change what a trial computes (learning rate,
   dropout, augmentation), the architecture and batch size stay params.yaml's, and the pruner is
   off: every trial does the same work, so the rate measures the two paths, not the draws.
   Printed: trials per hour over the stage's wall time (Python, TensorFlow and cluster start-up
   included) and over its trial phase (first trial's start to last trial's end, from the study),
   and the median seconds of one trial.
b. STUDY STORAGE. Baseline: SQLITE, a study in a sqlite file. Compared: POSTGRESQL, the team
   profile's server. No training: each trial draws params.yaml's whole space (TPE), reports
   ``--reports`` epochs to the median pruner (``trial.report`` and ``should_prune``, as Keras'
   pruning callback does) and ends; through ``study.optimize`` with the stage's own storage
   settings (``pipelines.tune.open_study``: heartbeat on, stale trials failed and retried).
   Printed: milliseconds per trial, overall and for the first and last 10 (TPE reads every
   trial, so a trial costs more as the study grows).
c. MLFLOW. Baseline: the LOCAL STORE, a sqlite file (what `make run` writes to). Compared: the
   TEAM SERVER: MLflow on PostgreSQL with basic auth, signed in as admin, over HTTP on loopback.
   Printed: milliseconds for one epoch's metrics (one ``log_metrics`` call, as a trial logs each
   epoch), one ``log_metric`` call, and a trial's own run (nested start, params, tags, value, end).
d. DASK SCHEDULER. Baseline: ONE AT A TIME, a no-op task submitted and waited for (what each
   trial pays on top of its work). Compared: ALL IN FLIGHT, the same tasks submitted at once (the
   scheduler's own rate: the ceiling of one task per trial). On the same local cluster as (a).

Parts b and c run on the team profile's PostgreSQL and MLflow server, started from the profile's
own program definitions (flows/team.py) in a temporary folder on free ports and stopped at the
end; its Prefect server and workers and its Dask processes are left out (nothing here uses them,
and idle they would still take CPU from the measurement).

    python -m benchmarks.scale                        # MNIST_DIR or data/raw; ~10-15 min here
    python -m benchmarks.scale --parts b c d          # only the cheap parts (~2 min)
    python -m benchmarks.scale --trials 2 --images 300 --epochs 1 --repeats 1 \\
        --storage-trials 5 --mlflow-calls 10 --tasks 10  # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# What would point a child at someone's team servers: the benchmark sets its own.
TEAM_ENV = (
    "MNIST_TUNE_STORAGE",
    "DASK_SCHEDULER_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_REGISTRY_URI",
)
# Space keys that leave a trial's work unchanged: the rest (batch size, filters, units) stay fixed.
COST_NEUTRAL = ("train.learning_rate", "train.model.dropout", "augment.")
IN_PROCESS = "in process (baseline)"
ON_DASK = "2 Dask workers x 1 thread"
MODES = {IN_PROCESS: 1, ON_DASK: 2}
EXPERIMENT = "scale-benchmark"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TEAM_ENV}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


def default_raw() -> str:
    return os.environ.get("MNIST_DIR") or "data/raw"


def ratio(value: float, base: float) -> str:
    return f"{value / base:5.2f}x" if base else "  n/a"


# --- a. trials per hour -------------------------------------------------------------------------


def raw_folder(source: Path, tmp: Path, params) -> Path:
    """A folder the tune stage reads: the four IDX files and ingest's SOURCE.json."""
    from pipelines.data import SOURCE_FILE
    from pipelines.ingest import write_source

    if (source / SOURCE_FILE).exists():
        return source
    raw = tmp / "raw"
    raw.mkdir()
    for spec in params.ingest.files.values():
        shutil.copyfile(source / spec.name, raw / spec.name)
    write_source(raw, params.ingest, "mnist")
    return raw


def study_params(base: dict, trials: int, images: int, epochs: int, workers: int) -> dict:
    from pipelines.config import deep_merge

    space = {
        key: dim
        for key, dim in base["tune"]["space"].items()
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in COST_NEUTRAL)
    }
    raw = deep_merge(
        base,
        {
            "tune": {
                "enabled": True,
                "n_trials": trials,
                "trial_images": images,
                "trial_epochs": epochs,
                "pruner": "none",
                "workers": workers,
                "scheduler": "",
                "storage": "",
                "timeout_s": 0,
            }
        },
    )
    raw["tune"]["space"] = space
    return raw


def run_stage(params_file: Path, raw: Path, policy: Path, out: Path) -> dict:
    """One tune stage in a fresh process; its wall time and its study's trial timings."""
    import optuna

    env = {**clean_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    argv = [
        sys.executable, "-m", "pipelines.tune", "--params", str(params_file), "--raw", str(raw),
        "--policy", str(policy), "--out", str(out / "tune"),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the tune stage failed:\n{done.stderr[-3000:]}")
    url = f"sqlite:///{out / 'tune' / 'study.db'}"
    (name,) = optuna.get_all_study_names(url)
    trials = [
        t
        for t in optuna.load_study(study_name=name, storage=url).trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    phase = (
        max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    ).total_seconds()
    trials.sort(key=lambda t: t.datetime_start)
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    return {"trials": len(trials), "wall": wall, "phase": phase, "trial_s": seconds}


def warm(seconds: list[float], workers: int) -> list[float]:
    """The trials after each worker's first (which imports TensorFlow and builds the graph)."""
    return seconds[workers:] or seconds


def trials_per_hour(args, tmp: Path) -> dict[str, list[dict]]:
    from pipelines.config import AugmentParams, parse_params, read_yaml

    base = read_yaml(Path(args.params))
    params = parse_params(base)
    raw = raw_folder(Path(args.raw), tmp, params)
    policy = tmp / "policy.json"
    policy.write_text(AugmentParams.model_validate(base["augment"]).model_dump_json())
    files = {}
    for name, workers in MODES.items():
        path = tmp / f"params-{workers}.yaml"
        path.write_text(
            yaml.safe_dump(study_params(base, args.trials, args.images, args.epochs, workers))
        )
        files[name] = path
    results: dict[str, list[dict]] = {name: [] for name in MODES}
    for repeat in range(args.repeats):
        order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
        for name in order:
            out = tmp / f"a-{MODES[name]}-{repeat}"
            r = run_stage(files[name], raw, policy, out)
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(r)
            print(
                f"a. repeat {repeat + 1}/{args.repeats}  {name:26} {r['trials']} trials,"
                f" stage {r['wall']:6.1f} s, trial phase {r['phase']:6.1f} s,"
                f" trials {[round(s, 1) for s in r['trial_s']]} s",
                flush=True,
            )
    return results


def print_trials_table(args, results: dict[str, list[dict]]) -> dict[str, float]:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    def rate(name: str, key: str) -> float:
        return statistics.median(3600 * r["trials"] / r[key] for r in results[name])

    print(
        f"\na. trials per hour: {args.trials} trials of {args.images or 'all'} images x"
        f" {args.epochs} epochs (pruner off, cost-neutral space), median of {args.repeats};"
        " ratio = trials/h / in process's"
    )
    print(
        "stage = the whole stage's wall time; phase = first trial's start to last trial's end;"
        " s/trial = median of one trial, warm = leaving out each worker's first trial"
    )
    print(
        f"{'mode':26} {'trials':>6} {'stage s':>8} {'trials/h':>9} {'ratio':>6}"
        f" {'phase s':>8} {'trials/h':>9} {'ratio':>6} {'s/trial':>8} {'warm':>6}"
    )
    figures = {}
    for name in results:
        every = statistics.median(s for r in results[name] for s in r["trial_s"])
        trial_s = statistics.median(
            s for r in results[name] for s in warm(r["trial_s"], MODES[name])
        )
        print(
            f"{name:26} {results[name][0]['trials']:6d} {med(name, 'wall'):8.1f}"
            f" {rate(name, 'wall'):9.0f} {ratio(rate(name, 'wall'), rate(IN_PROCESS, 'wall'))}"
            f" {med(name, 'phase'):8.1f} {rate(name, 'phase'):9.0f}"
            f" {ratio(rate(name, 'phase'), rate(IN_PROCESS, 'phase'))} {every:8.1f} {trial_s:6.1f}"
        )
        figures["inproc_s" if name == IN_PROCESS else "trial_s"] = trial_s
    figures["phase_rate_dask"] = rate(ON_DASK, "phase")
    return figures


# --- the team profile's PostgreSQL and MLflow server ---------------------------------------------


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds the processes ``pids`` and their descendants have used (ended ones included)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass(frozen=True)
class TrackingStack:
    """The running servers of (b) and (c): addresses, the admin's credentials, and the pids whose
    CPU time each server's cost is read from."""

    optuna_url: str
    mlflow_urls: dict[str, str]  # row name -> URL
    username: str
    password: str
    postgres_pid: int
    mlflow_pids: dict[str, int]  # row name -> pid

    def postgres_cpu(self) -> float:
        return tree_cpu([self.postgres_pid])

    def server_cpu(self, name: str) -> float:
        return tree_cpu([self.postgres_pid, self.mlflow_pids[name]])


TEAM_SERVER = "team MLflow server"
CACHED_SERVER = "same, auth cache 60 s"  # what-if: basic auth's credential cache switched on


def wait_for(url: str, timeout_s: float) -> None:
    from flows.servers import http_ok

    deadline = time.monotonic() + timeout_s
    while not http_ok(url):
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer in {timeout_s:.0f} s")
        time.sleep(0.5)


@contextmanager
def cached_auth_server(program, run_dir: Path):
    """A second MLflow server like the team's ``program`` (same stores, users, workers) whose
    basic auth caches a checked credential for 60 s (``auth_cache_ttl_seconds``), instead of
    checking the password hash on every request as the shipped config does."""
    import signal

    config = run_dir / "mlflow-auth-cached.ini"
    shipped = Path(program.env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    config.write_text(shipped.rstrip("\n") + "\nauth_cache_ttl_seconds = 60\n")
    config.chmod(0o600)
    port = free_port()
    command = list(program.command)
    command[command.index("--port") + 1] = str(port)
    env = {**clean_env(), **program.env, "MLFLOW_AUTH_CONFIG_PATH": str(config)}
    with open(run_dir / "mlflow-cached.log", "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", 180)
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def tracking_stack(with_mlflow: bool):
    """The team profile's ``postgres`` (and ``mlflow-server``) programs, as `make up PROFILE=team`
    defines them, under supervisord in a temporary folder on free ports; always stopped."""
    from flows import team
    from flows.servers import Layout
    from flows.supervise import down as stop_all
    from flows.supervise import up as start_all

    wanted = {"postgres", "mlflow-server"} if with_mlflow else {"postgres"}

    @dataclass(frozen=True)
    class TrackingOnly(Layout):
        def programs(self):
            return [p for p in team.programs(self) if p.name in wanted]

    # Not a pytest or 0700 folder: PostgreSQL runs as `postgres` and must reach its data.
    folder = Path(tempfile.mkdtemp(prefix="mnist-scale-"))
    folder.chmod(0o755)
    layout = TrackingOnly(
        run_dir=folder / ".run",
        mlruns=folder / "mlruns",
        profile="team",
        mlflow_port=free_port(),
        postgres_port=free_port(),
        prefect_port=free_port(),
        dask_port=free_port(),
    )
    sup = layout.supervisor()
    try:
        start = time.perf_counter()
        start_all(sup, 180)
        print(
            f"team servers ({', '.join(sorted(wanted))}) up in {time.perf_counter() - start:.0f} s"
        )
        secret = team.read_env_file(layout.run_dir / team.SECRETS_FILE)
        pids = {name: info["pid"] for name, info in sup.processes().items()}
        urls, mlflow_pids = {}, {}
        with contextlib.ExitStack() as extra:
            if with_mlflow:
                urls[TEAM_SERVER], mlflow_pids[TEAM_SERVER] = (
                    layout.mlflow_url,
                    pids["mlflow-server"],
                )
                (program,) = [p for p in sup.programs if p.name == "mlflow-server"]
                urls[CACHED_SERVER], mlflow_pids[CACHED_SERVER] = extra.enter_context(
                    cached_auth_server(program, layout.run_dir)
                )
            yield TrackingStack(
                optuna_url=secret["MNIST_TUNE_STORAGE"],
                mlflow_urls=urls,
                username=secret["MLFLOW_TRACKING_USERNAME"],
                password=secret["MLFLOW_TRACKING_PASSWORD"],
                postgres_pid=pids["postgres"],
                mlflow_pids=mlflow_pids,
            )
    finally:
        stop_all(sup)
        shutil.rmtree(folder, ignore_errors=True)


# --- b. study storage ---------------------------------------------------------------------------

SQLITE = "sqlite (baseline)"
POSTGRES = "PostgreSQL"


def storage_trials(params, url: str, name: str, trials: int, reports: int) -> list[float]:
    """Seconds of each of ``trials`` training-free trials, through the stage's storage settings."""
    import numpy as np
    import optuna

    from pipelines.tune import open_study, suggest

    study = open_study(params, name, url)
    rng = np.random.default_rng(0)  # the same values on every storage: the same pruning, draws
    values = rng.uniform(0.9, 1.0, size=(trials, reports))
    ends: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        for key, dim in params.tune.space.items():
            suggest(trial, key, dim)
        for step in range(reports):
            trial.report(float(values[trial.number, step]), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(values[trial.number, -1])

    start = time.perf_counter()
    study.optimize(
        objective,
        n_trials=trials,
        callbacks=[lambda _s, _t: ends.append(time.perf_counter())],
        gc_after_trial=False,
    )
    return list(np.diff([start, *ends]))


def storage_cost(args, stack: TrackingStack, tmp: Path) -> dict[str, list[dict]]:
    import optuna

    from pipelines.config import load_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    params = load_params(args.params)
    stores = {SQLITE: f"sqlite:///{tmp / 'storage.db'}", POSTGRES: stack.optuna_url}
    results: dict[str, list[dict]] = {name: [] for name in stores}
    for repeat in range(args.storage_repeats):
        order = list(stores) if repeat % 2 == 0 else list(reversed(stores))
        for name in order:
            cpu = stack.postgres_cpu()
            seconds = storage_trials(
                params, stores[name], f"scale-{repeat}", args.storage_trials, args.reports
            )
            server = (stack.postgres_cpu() - cpu) / len(seconds) if name == POSTGRES else None
            results[name].append({"seconds": seconds, "server_cpu": server})
            print(
                f"b. repeat {repeat + 1}/{args.storage_repeats}  {name:18}"
                f" {1000 * sum(seconds) / len(seconds):7.1f} ms per trial",
                flush=True,
            )
    return results


def print_storage_table(args, results: dict[str, list[dict]]) -> dict[str, float]:
    def per_trial(name: str, part: slice = slice(None)) -> float:
        return 1000 * statistics.median(statistics.mean(r["seconds"][part]) for r in results[name])

    def cpu(name: str) -> str:
        if results[name][0]["server_cpu"] is None:
            return f"{'-':>9}"
        return f"{1000 * statistics.median(r['server_cpu'] for r in results[name]):9.1f}"

    print(
        f"\nb. study storage: {args.storage_trials} trials x (ask, {args.reports} reports and"
        f" pruning checks, tell), no training, heartbeat on, median of {args.storage_repeats};"
        " ms per trial; ratio = against sqlite; server CPU = the PostgreSQL server's CPU time"
    )
    print(
        f"{'storage':18} {'ms/trial':>9} {'ratio':>6} {'first 10':>9} {'last 10':>9}"
        f" {'server CPU ms':>13}"
    )
    base = per_trial(SQLITE)
    for name in results:
        print(
            f"{name:18} {per_trial(name):9.1f} {ratio(per_trial(name), base)}"
            f" {per_trial(name, slice(0, 10)):9.1f} {per_trial(name, slice(-10, None)):9.1f}"
            f" {cpu(name):>13}"
        )
    return {
        "pg_ms": per_trial(POSTGRES),
        "pg_last_ms": per_trial(POSTGRES, slice(-10, None)),
        "pg_cpu_ms": float(cpu(POSTGRES)),
        "sqlite_ms": base,
    }


# --- c. MLflow ----------------------------------------------------------------------------------


LOCAL_STORE = "local sqlite store (baseline)"
MLFLOW_OPS = ("epoch", "metric", "trial run")


def mlflow_costs(uri: str, calls: int, space: list[str], artifacts: str | None, cpu) -> dict:
    """Seconds per call of each operation a trial makes, on the store at ``uri``; and, where
    ``cpu`` reads a server's CPU seconds, the server's CPU seconds per call."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow.set_experiment(EXPERIMENT)
    out: dict[str, float | None] = {}

    def timed(op: str, count: int, body) -> None:
        cpu_start, start = cpu() if cpu else 0.0, time.perf_counter()
        for i in range(count):
            body(i)
        out[op] = (time.perf_counter() - start) / count
        out[f"{op} cpu"] = (cpu() - cpu_start) / count if cpu else None

    with mlflow.start_run(run_name="tune") as parent:
        mlflow.log_metric("warm-up", 0.0)  # the first call opens connections, sessions
        keys = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds")
        timed(
            "epoch",
            calls,
            lambda step: mlflow.log_metrics({k: 0.5 + step / (calls + 1) for k in keys}, step=step),
        )
        timed("metric", calls, lambda step: mlflow.log_metric("value", step / calls, step=step))

        def trial_run(number: int) -> None:
            with mlflow.start_run(
                run_name=f"trial-{number}", nested=True, parent_run_id=parent.info.run_id
            ):
                mlflow.log_params({**{k: 0.1 for k in space}, "trial_images": 4000})
                mlflow.set_tag("optuna.trial", number)
                mlflow.set_tag("state", "COMPLETE")
                mlflow.log_metric("value", 0.99)

        timed("trial run", max(2, calls // 10), trial_run)
    return out


def mlflow_cost(args, stack: TrackingStack, tmp: Path) -> dict[str, list[dict]]:
    from pipelines.config import load_params

    space = list(load_params(args.params).tune.space)
    stores = {LOCAL_STORE: (f"sqlite:///{tmp / 'mlflow.db'}", (tmp / "art").as_uri(), None)}
    for name, url in stack.mlflow_urls.items():
        stores[name] = (url, None, lambda name=name: stack.server_cpu(name))
    saved = {
        k: os.environ.pop(k, None) for k in (*TEAM_ENV, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    }
    os.environ["MLFLOW_TRACKING_USERNAME"] = stack.username
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.password
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    results: dict[str, list[dict]] = {name: [] for name in stores}
    try:
        for repeat in range(args.mlflow_repeats):
            order = list(stores) if repeat % 2 == 0 else list(reversed(stores))
            for name in order:
                uri, artifacts, cpu = stores[name]
                r = mlflow_costs(uri, args.mlflow_calls, space, artifacts, cpu)
                results[name].append(r)
                print(
                    f"c. repeat {repeat + 1}/{args.mlflow_repeats}  {name:30} "
                    + "  ".join(f"{op} {1000 * r[op]:.1f} ms" for op in MLFLOW_OPS),
                    flush=True,
                )
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return results


def print_mlflow_table(args, results: dict[str, list[dict]]) -> dict[str, float]:
    def ms(name: str, op: str) -> float:
        return 1000 * statistics.median(r[op] for r in results[name])

    def cpu(name: str, op: str) -> str:
        if results[name][0][f"{op} cpu"] is None:
            return "-"
        return f"{ms(name, f'{op} cpu'):.1f}"

    print(
        f"\nc. MLflow: {args.mlflow_calls} calls each (trial runs: a tenth as many), median of"
        f" {args.mlflow_repeats}; ms per call; ratio = against the local store; cpu = the"
        " server's CPU ms per call (MLflow and PostgreSQL).\n"
        "epoch = one log_metrics of an epoch's 6 metrics; metric = one log_metric;"
        " trial run = a nested run's start, params, 2 tags, a metric and end"
    )
    print(
        f"{'store':30} {'epoch ms':>9} {'ratio':>6} {'cpu':>6} {'metric ms':>9} {'ratio':>6}"
        f" {'cpu':>6} {'trial run ms':>12} {'ratio':>6} {'cpu':>6}"
    )
    for name in results:
        print(
            f"{name:30} {ms(name, 'epoch'):9.1f}"
            f" {ratio(ms(name, 'epoch'), ms(LOCAL_STORE, 'epoch'))} {cpu(name, 'epoch'):>6}"
            f" {ms(name, 'metric'):9.1f}"
            f" {ratio(ms(name, 'metric'), ms(LOCAL_STORE, 'metric'))} {cpu(name, 'metric'):>6}"
            f" {ms(name, 'trial run'):12.1f}"
            f" {ratio(ms(name, 'trial run'), ms(LOCAL_STORE, 'trial run'))}"
            f" {cpu(name, 'trial run'):>6}"
        )
    figures = {
        "local_epoch_ms": ms(LOCAL_STORE, "epoch"),
        "local_run_ms": ms(LOCAL_STORE, "trial run"),
    }
    if TEAM_SERVER in results:
        figures.update(
            epoch_ms=ms(TEAM_SERVER, "epoch"),
            run_ms=ms(TEAM_SERVER, "trial run"),
            epoch_cpu_ms=ms(TEAM_SERVER, "epoch cpu"),
            run_cpu_ms=ms(TEAM_SERVER, "trial run cpu"),
        )
    if CACHED_SERVER in results:
        figures.update(
            cached_epoch_ms=ms(CACHED_SERVER, "epoch"),
            cached_run_ms=ms(CACHED_SERVER, "trial run"),
            cached_epoch_cpu_ms=ms(CACHED_SERVER, "epoch cpu"),
            cached_run_cpu_ms=ms(CACHED_SERVER, "trial run cpu"),
        )
    return figures


# --- d. the Dask scheduler ----------------------------------------------------------------------


def scheduler_cost(args) -> dict[str, list[float]]:
    from pipelines.config import load_params
    from pipelines.tune_cluster import connect

    params = load_params(args.params)
    params = params.model_copy(
        update={"tune": params.tune.model_copy(update={"workers": 2, "scheduler": ""})}
    )
    saved = os.environ.pop("DASK_SCHEDULER_ADDRESS", None)
    client, cluster = connect(params)  # a local cluster as the stage starts it (tune.workers: 2)
    results: dict[str, list[float]] = {"one at a time (baseline)": [], "all in flight": []}
    try:
        client.wait_for_workers(2)
        client.submit(operator.neg, -1, pure=False).result()  # warm-up
        for _ in range(args.storage_repeats):
            start = time.perf_counter()
            for i in range(args.tasks):
                client.submit(operator.neg, i, pure=False).result()
            results["one at a time (baseline)"].append((time.perf_counter() - start) / args.tasks)
            start = time.perf_counter()
            client.gather(client.map(operator.neg, range(args.tasks), pure=False))
            results["all in flight"].append((time.perf_counter() - start) / args.tasks)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        if saved is not None:
            os.environ["DASK_SCHEDULER_ADDRESS"] = saved
    return results


def print_scheduler_table(args, results: dict[str, list[float]]) -> dict[str, float]:
    def ms(name: str) -> float:
        return 1000 * statistics.median(results[name])

    base = ms("one at a time (baseline)")
    print(
        f"\nd. Dask scheduler: {args.tasks} no-op tasks on a local cluster of 2 workers, median of"
        f" {args.storage_repeats}; ms per task; ratio = against one at a time"
    )
    print(f"{'submitted':26} {'ms/task':>8} {'ratio':>6} {'tasks/h':>12}")
    for name in results:
        print(f"{name:26} {ms(name):8.2f} {ratio(ms(name), base)} {3600_000 / ms(name):12,.0f}")
    return {"task_ms": base, "flight_ms": ms("all in flight")}


# --- the projection's inputs ------------------------------------------------------------------


def print_inputs(args, fig: dict[str, float]) -> None:
    """One paragraph: what docs/team.md's projection takes from the tables above.

    A trial of (a) already pays for a sqlite study, a local MLflow store and, on Dask, the
    scheduler's round trip; on the team servers it pays the differences (b) and (c) on top."""
    parts, extra, cpu = [], 0.0, 0.0
    if "trial_s" in fig:
        parts.append(
            f"a trial of {args.images or 'all'} images x {args.epochs} epochs takes"
            f" {fig['trial_s']:.1f} s on one warm 1-thread worker"
            f" ({fig['inproc_s']:.1f} s in process on every core), sqlite study and local MLflow"
            f" store included; 2 workers here make {fig['phase_rate_dask']:.0f} trials/h"
        )
    if "pg_ms" in fig:
        parts.append(
            f"the study costs {fig['pg_ms']:.0f} ms per trial in PostgreSQL"
            f" ({fig['pg_last_ms']:.0f} ms at {args.storage_trials} trials;"
            f" sqlite {fig['sqlite_ms']:.0f} ms), of which {fig['pg_cpu_ms']:.0f} ms are the"
            " server's CPU"
        )
        extra, cpu = extra + fig["pg_ms"] - fig["sqlite_ms"], cpu + fig["pg_cpu_ms"]
    if "epoch_ms" in fig:
        e = args.epochs
        server = e * fig["epoch_ms"] + fig["run_ms"]
        local = e * fig["local_epoch_ms"] + fig["local_run_ms"]
        server_cpu = e * fig["epoch_cpu_ms"] + fig["run_cpu_ms"]
        cached_cpu = e * fig["cached_epoch_cpu_ms"] + fig["cached_run_cpu_ms"]
        parts.append(
            f"MLflow costs a trial of {e} epochs {server:.0f} ms on the team server"
            f" (local store {local:.0f} ms), {server_cpu:.0f} ms of it the server's CPU"
            f" ({cached_cpu:.0f} ms with the auth cache)"
        )
        extra, cpu = extra + server - local, cpu + server_cpu
    if "task_ms" in fig:
        parts.append(
            f"the scheduler {fig['task_ms']:.1f} ms per task one at a time and"
            f" {fig['flight_ms']:.2f} ms per task in flight"
            f" ({3_600_000 / fig['flight_ms']:,.0f} tasks/h)"
        )
    text = "projection inputs: " + "; ".join(parts) + "."
    if "trial_s" in fig and extra:
        t = fig["trial_s"] + extra / 1000
        text += (
            f" On the team servers a trial on a worker takes ~ {fig['trial_s']:.1f}"
            f" {'+' if extra >= 0 else '-'} {abs(extra) / 1000:.2f} = {t:.1f} s: N machines of"
            f" W workers make ~ N x W x 3600 / {t:.1f} trials/h"
        )
        if cpu:
            text += f", until the servers' {cpu:.0f} ms of CPU per trial fill their cores"
            text += f" (one core: {3_600_000 / cpu:,.0f} trials/h)"
        text += "."
    print("\n" + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list("abcd"), default=list("abcd"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default=default_raw(), help="IDX files (default: $MNIST_DIR)")
    parser.add_argument("--trials", type=int, default=6, help="(a) trials per study")
    parser.add_argument("--images", type=int, default=4000, help="(a) images per trial")
    parser.add_argument("--epochs", type=int, default=2, help="(a) epochs per trial")
    parser.add_argument("--repeats", type=int, default=2, help="(a) studies per mode")
    parser.add_argument("--storage-trials", type=int, default=50, help="(b) trials per study")
    parser.add_argument("--reports", type=int, default=5, help="(b) epochs reported per trial")
    parser.add_argument("--storage-repeats", type=int, default=3, help="(b, d) repeats")
    parser.add_argument("--mlflow-calls", type=int, default=60, help="(c) calls per operation")
    parser.add_argument("--mlflow-repeats", type=int, default=3, help="(c) repeats")
    parser.add_argument("--tasks", type=int, default=200, help="(d) no-op tasks per repeat")
    args = parser.parse_args()
    from flows import postgres

    if {"b", "c"} & set(args.parts) and not postgres.available():
        raise SystemExit(
            "parts b and c need PostgreSQL: `make postgres-server` (or set PG_BIN), "
            "or run --parts a d"
        )
    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    fig: dict[str, float] = {}
    shown = {}  # part -> (its table's printer, what it measured)
    with tempfile.TemporaryDirectory(prefix="mnist-scale-") as tmp:
        tmp = Path(tmp)
        if "d" in args.parts:
            shown["d"] = (print_scheduler_table, scheduler_cost(args))
        if {"b", "c"} & set(args.parts):
            with tracking_stack(with_mlflow="c" in args.parts) as stack:
                if "b" in args.parts:
                    shown["b"] = (print_storage_table, storage_cost(args, stack, tmp))
                if "c" in args.parts:
                    shown["c"] = (print_mlflow_table, mlflow_cost(args, stack, tmp))
        if "a" in args.parts:
            shown["a"] = (print_trials_table, trials_per_hour(args, tmp))
    for part in sorted(shown):
        printer, results = shown[part]
        fig.update(printer(args, results))
    print_inputs(args, fig)
    print(json.dumps({"figures": fig}), flush=True)


if __name__ == "__main__":
    main()
