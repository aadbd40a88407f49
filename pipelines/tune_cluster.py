"""The tune stage's trials on a Dask cluster, ``tune.workers`` at a time, on one shared study.

Every trial is one Dask task (``run_one_trial``): the worker loads the study from its storage
(PostgreSQL in the team profile), asks it for a trial, trains it and reports each epoch to the
pruner, exactly as the in-process path does (``pipelines.tune.make_objective``). The stage keeps
``tune.workers`` tasks in flight and submits the next one when one ends, until ``tune.n_trials``
trials are finished or ``tune.timeout_s`` is up; so a worker that joins the cluster later, from
any machine, takes trials from then on.

Why one task per trial, not one ``study.optimize`` loop per worker: a worker that dies loses one
trial, not the rest of its loop. Dask reschedules the lost task on another worker (up to
``distributed.scheduler.allowed-failures`` times), which asks for a trial again; the dead trial
stops beating and, after ``tune.heartbeat_s`` + ``tune.grace_s``, Optuna fails it and re-queues
its settings once, as in process (``RetryHeartbeatStaleTrialCallback``).

Where the cluster is: ``tune.scheduler``, else ``$DASK_SCHEDULER_ADDRESS`` (Dask's own variable),
else a local cluster of ``tune.workers`` processes of one thread each, started for this run.
Each worker needs the project installed and reads MLflow's credentials from its environment; the
images travel to the workers through Dask (scattered once), so no shared disk is needed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from pipelines.config import AugmentParams, Params

log = logging.getLogger("pipelines.tune")

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
# One TensorFlow thread pool per worker, sized to its one thread: workers share the cores.
WORKER_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
CONNECT_TIMEOUT_S = 30
WORKER_WAIT_S = 120  # how long to wait for the first worker of a cluster started elsewhere
STORAGE_WAIT_S = 120  # how long a worker and the stage wait for the study's database to return
STORAGE_RETRY_S = 2.0
MAX_LOST_TASKS = 3  # tasks Dask gave up on (KilledWorker) before the stage gives up too


class ClusterError(RuntimeError):
    """The Dask cluster could not be reached, had no workers, or kept losing them."""


@dataclass(frozen=True)
class TrialSpec:
    """What a worker needs to run one trial of the study (picklable; no secrets)."""

    params: Params
    policy: AugmentParams
    study_name: str
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def worker_seed(sampler_seed: int, index: int) -> int:
    """The sampler seed of the ``index``-th task: distinct per task, fixed by the study's seed."""
    return int(np.random.SeedSequence([sampler_seed, index]).generate_state(1)[0])


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a database that went away raises through Optuna's storage."""
    from sqlalchemy.exc import DBAPIError

    return (optuna.exceptions.StorageInternalError, DBAPIError)


def from_storage(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage error, or was raised while one was being handled.

    The second case is real: when the database goes away while Optuna finishes a trial, the
    storage error inside ``_run_trial``'s ``finally`` leaves a local unset, and what reaches the
    caller is an UnboundLocalError whose context is the storage error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, storage_errors()):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def failed_meanwhile(exc: BaseException) -> bool:
    """Whether ``exc`` is Optuna refusing to finish a trial that is already FAIL.

    While the database was away this worker's heartbeats did not reach it, so another worker's
    stale-trial check failed the trial and re-queued its settings
    (``RetryHeartbeatStaleTrialCallback``). Its result is then not this worker's to record: the
    re-queued copy will run, and this worker asks for another trial."""
    return isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a FAIL trial")


def retrying(what: str, call, wait_s: float = STORAGE_WAIT_S):
    """``call()``, retried while the study's database is away, for up to ``wait_s`` seconds, and
    again when the trial it ran was failed by the heartbeat meanwhile."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except Exception as exc:
            if failed_meanwhile(exc) and time.monotonic() <= deadline:
                log.warning(
                    "%s: its trial was failed and re-queued meanwhile; asking for another", what
                )
                continue
            if not from_storage(exc) or time.monotonic() > deadline:
                raise
            log.warning("%s: the study's storage is away (%s); retrying", what, type(exc).__name__)
            time.sleep(STORAGE_RETRY_S)


def run_one_trial(
    spec: TrialSpec, index: int, images: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """On a Dask worker: ask the shared study for one trial and run it; return what it gave.

    A trial the database dropped (a restart) is left to the heartbeat, which fails it and
    re-queues its settings; this worker asks for another trial once the database is back."""
    return retrying(f"task {index}", lambda: _run_one_trial(spec, index, images, labels))


def _run_one_trial(
    spec: TrialSpec, index: int, images: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    import mlflow

    from pipelines.tune import make_objective, open_study

    logging.getLogger("pipelines").setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow.set_tracking_uri(spec.tracking_uri)
    mlflow.set_experiment(experiment_id=spec.experiment_id)
    seed = worker_seed(spec.params.tune.sampler_seed, index)
    study = open_study(spec.params, spec.study_name, spec.storage_url, seed=seed, parallel=True)
    ran: list[optuna.trial.FrozenTrial] = []
    start = time.perf_counter()
    study.optimize(
        make_objective(spec.params, spec.policy, images, labels, spec.parent_run_id),
        n_trials=1,
        gc_after_trial=True,
        catch=(),
        callbacks=[lambda _study, trial: ran.append(trial)],
    )
    trial = ran[0]
    try:
        from distributed import get_worker

        worker = get_worker().address
    except ValueError:  # called outside a worker (a test)
        worker = "in process"
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "epochs": len(trial.intermediate_values),
        "seconds": round(time.perf_counter() - start, 1),
        "worker": worker,
    }


def scheduler_address(params: Params) -> str:
    return params.tune.scheduler or os.environ.get(SCHEDULER_ENV, "")


def connect(params: Params):
    """A Dask client on the configured scheduler, or on a local cluster started here; and the
    local cluster (None when the scheduler runs elsewhere), which the caller closes."""
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    address = scheduler_address(params)
    if not address:
        workers = params.tune.workers
        log.info("no Dask scheduler configured: starting a local cluster of %d workers", workers)
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            env=WORKER_ENV,
        )
        return Client(cluster), cluster
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} (tune.scheduler or ${SCHEDULER_ENV}): "
            f'{exc}; start it with `make up PROFILE=team`, or set tune.scheduler to "" for a '
            "local cluster"
        ) from exc
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError as exc:
        client.close()
        raise ClusterError(
            f"the Dask scheduler at {address} has no workers after {WORKER_WAIT_S} s; start one "
            f"with `dask worker {address} --nthreads 1`"
        ) from exc
    return client, None


def run_study_on_cluster(
    params: Params,
    policy: AugmentParams,
    images: np.ndarray,
    labels: np.ndarray,
    study: optuna.Study,
    storage_url: str,
    parent_run_id: str,
) -> None:
    """Run trials on the cluster, ``tune.workers`` at a time, until ``tune.n_trials`` are finished
    (counting earlier runs) or ``tune.timeout_s`` is up; a trial that raises fails the stage."""
    import mlflow
    from distributed import KilledWorker, wait

    from pipelines.tune import finished_trials

    if storage_url.startswith("sqlite") and scheduler_address(params):
        log.warning(
            "the study is in a sqlite file (%s): workers on other machines cannot reach it; "
            "set MNIST_TUNE_STORAGE=postgresql://... for a cluster beyond this machine",
            storage_url,
        )
    tune = params.tune
    spec = TrialSpec(
        params=params,
        policy=policy,
        study_name=study.study_name,
        storage_url=storage_url,
        tracking_uri=mlflow.get_tracking_uri(),
        experiment_id=mlflow.active_run().info.experiment_id,
        parent_run_id=parent_run_id,
    )
    deadline = time.monotonic() + tune.timeout_s if tune.timeout_s else float("inf")
    client, cluster = connect(params)
    try:
        workers = len(client.scheduler_info()["workers"])
        log.info(
            "Dask scheduler %s with %d worker(s); %d trial(s) at a time",
            client.scheduler.address,
            workers,
            tune.workers,
        )
        images_f = client.scatter(images, broadcast=True)
        labels_f = client.scatter(labels, broadcast=True)
        in_flight: set = set()
        index, lost = 0, 0
        while True:
            done = retrying("the stage", lambda: finished_trials(study))
            while (
                len(in_flight) < tune.workers
                and done + len(in_flight) < tune.n_trials
                and time.monotonic() < deadline
            ):
                in_flight.add(
                    client.submit(
                        run_one_trial,
                        spec,
                        index,
                        images_f,
                        labels_f,
                        pure=False,
                        key=f"{study.study_name}-task-{index}-{time.time_ns()}",
                    )
                )
                index += 1
            if not in_flight:
                break
            finished, in_flight = wait(in_flight, return_when="FIRST_COMPLETED")
            in_flight = set(in_flight)
            for future in finished:
                try:
                    result = future.result()
                except KilledWorker as exc:
                    lost += 1
                    log.warning("a trial task lost its worker too often (%s)", exc)
                    if lost >= MAX_LOST_TASKS:
                        raise ClusterError(
                            f"{lost} trial tasks lost their workers; is the cluster healthy?"
                        ) from exc
                    continue
                value = "" if result["value"] is None else f" {tune.metric} {result['value']:.4f}"
                log.info(
                    "trial %d %s%s after %d epoch(s), %.1f s on %s (%d/%d finished)",
                    result["number"],
                    result["state"].lower(),
                    value,
                    result["epochs"],
                    result["seconds"],
                    result["worker"],
                    retrying("the stage", lambda: finished_trials(study)),
                    tune.n_trials,
                )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
