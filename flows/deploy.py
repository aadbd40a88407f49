"""Serve the flows ``mnist-training`` and ``mnist-monitoring`` as Prefect deployments, in one
long-running process, and register the project's automation.

    mnist-training/manual             on demand: prefect deployment run 'mnist-training/manual'
                                      --param epochs=3 --param trials=2 (or --param smoke=true)
    mnist-training/scheduled-retrain  on params.yaml's deploy.retrain_cron, in deploy.timezone
    mnist-monitoring/drift-check      on params.yaml's monitor.cron: the inference log against
                                      the training data (flows/monitoring.py)
    automation mnist-retrain-on-evidence   a retrain event from the drift check runs
                                      monitor.retrain_deployment with its reason
                                      (flows/automations.py)

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy    # `make up` starts this

The process polls the Prefect API for due runs of both deployments and runs each one in a child
process (``python -m prefect.engine``) with this process's environment, so MLFLOW_TRACKING_URI set
here sends every deployment run's MLflow logging to the tracking server. On SIGTERM it pauses both
deployments' schedules; `make down` cancels its runs in progress before that (flows/servers.py).

One training at a time, in two layers:
  * Prefect: each deployment has a concurrency limit of 1 with the CANCEL_NEW strategy. In Prefect
    3.8.8 the server enforces it when a run moves to Pending (SecureFlowConcurrencySlots in
    prefect/server/orchestration/core_policy.py): with no free slot, ENQUEUE would put the run back
    to Scheduled("AwaitingConcurrencySlot") and retry every 30 s until the first run ends, then run
    it; CANCEL_NEW sets it Cancelled with the message "Deployment concurrency limit reached." We
    cancel, because the project's policy (deploy.lock_wait_s: 0) is to skip, not to queue.
    The limit is per deployment, so it does not stop a manual run during a scheduled one.
  * The flow itself: an exclusive lock on ``.run/training.lock`` (flows/training.py), taken by
    every training, deployment or not. A run that finds it held waits deploy.lock_wait_s seconds,
    then ends Cancelled with a message naming the holder's pid, flow run and start time.
The runner keeps Prefect's default process limit (PREFECT_RUNNER_PROCESS_LIMIT, 5): with a limit
of 1 here a second run would sit unsubmitted as Late, with no message, and never reach either gate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.monitoring import monitoring
from flows.training import REPO_ROOT, training
from pipelines.config import DeployParams, MonitorParams, Params, load_params

MANUAL = "manual"
SCHEDULED = "scheduled-retrain"
DRIFT_CHECK = "drift-check"
DEPLOYMENTS = (MANUAL, SCHEDULED)  # of mnist-training
TAGS = ["mnist"]
SCHEDULED_REASON = "scheduled retrain (deploy.retrain_cron)"


def monitoring_deployment(monitor: MonitorParams, timezone: str, root: str | None, flow=None):
    """mnist-monitoring/drift-check on ``monitor.cron``; ``flow`` is the flow or its source."""
    return (flow or monitoring).to_deployment(
        name=DRIFT_CHECK,
        description="Check the inference log for drift; a passed threshold asks for retraining.",
        schedule=Cron(monitor.cron, timezone=timezone),
        parameters={"root": root} if root else {},
        tags=TAGS,
        **({} if flow else {"entrypoint_type": EntrypointType.MODULE_PATH}),
    )


def register_automation(params: Params) -> str:
    """The retrain automation, on the server PREFECT_API_URL names; its id."""
    from prefect.client.orchestration import get_client

    from flows.automations import apply_automation

    with get_client(sync_client=True) as client:
        return str(
            apply_automation(client, params.monitor.retrain_deployment, params.register.model_name)
        )


def build_deployments(deploy: DeployParams, root: str | None = None) -> list[RunnerDeployment]:
    """The two deployments of ``mnist-training``; ``root`` becomes their default ``root`` parameter."""
    one_at_a_time = ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
    )
    common = dict(
        concurrency_limit=one_at_a_time,
        parameters={"root": root} if root else {},
        tags=TAGS,
        # Import flows.training by module name: the child process runs in the repo with .venv.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    manual = training.to_deployment(
        name=MANUAL,
        description="Train on demand; parameters: epochs, trials, smoke, force.",
        **common,
    )
    scheduled = training.to_deployment(
        name=SCHEDULED,
        description=f"Retrain on params.yaml's deploy.retrain_cron ({deploy.timezone}).",
        schedule=Cron(deploy.retrain_cron, timezone=deploy.timezone),
        **{**common, "parameters": {**common["parameters"], "reason": SCHEDULED_REASON}},
    )
    return [manual, scheduled]


def deploy_to_pool(params: Params, pool: str, root: Path, experiments: int) -> list[str]:
    """Register both deployments on the process work pool ``pool`` (the team profile); return ids.

    The pool's workers run them from ``root`` (a local source: each worker's machine needs the
    checkout at that path). ``manual`` takes up to ``experiments`` runs at a time: a run with
    overrides trains in a scratch copy of its own, lock-free, so experiments run side by side,
    while a run in the checkout still meets the training lock. ``scheduled-retrain`` retrains
    the checkout: one at a time, as in the local profile. The drift check and the retrain
    automation come with them.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    # a worker creates it too, but maybe later
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    # from_source: the workers run the flow from ``root`` (pull step: set the working directory).
    # RunnerDeployment.apply, not Flow.deploy: in Prefect 3.8.8 the latter asks the server for
    # the pool's workers with an explicit null limit, which the server refuses (422).
    deploy = params.deploy
    flow = training.from_source(source=str(root), entrypoint="flows/training.py:training")
    strategy = ConcurrencyLimitStrategy.CANCEL_NEW
    common = dict(work_pool_name=pool, parameters={"root": str(root)}, tags=TAGS)
    manual = flow.to_deployment(
        name=MANUAL,
        description=f"Train on demand, up to {experiments} experiments at a time; parameters: "
        "epochs, trials, tune_workers, smoke, force.",
        concurrency_limit=ConcurrencyLimitConfig(limit=experiments, collision_strategy=strategy),
        **common,
    )
    scheduled = flow.to_deployment(
        name=SCHEDULED,
        description=f"Retrain on params.yaml's deploy.retrain_cron ({deploy.timezone}).",
        schedule=Cron(deploy.retrain_cron, timezone=deploy.timezone),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
        **{**common, "parameters": {**common["parameters"], "reason": SCHEDULED_REASON}},
    )
    checker = monitoring.from_source(source=str(root), entrypoint="flows/monitoring.py:monitoring")
    drift = monitoring_deployment(params.monitor, deploy.timezone, str(root), checker)
    ids = [str(d.apply(work_pool_name=pool)) for d in (manual, scheduled, drift)]
    register_automation(params)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Serve mnist-training/manual and mnist-training/scheduled-retrain."
    )
    parser.add_argument(
        "--root", default=None, help="default repo the runs train in (default: this checkout)"
    )
    parser.add_argument(
        "--pool",
        default=None,
        help="register the deployments on this process work pool and exit (the team profile) "
        "instead of serving them from this process",
    )
    parser.add_argument(
        "--experiments", type=int, default=2, help="with --pool: manual runs at a time"
    )
    args = parser.parse_args()
    params_path = Path(args.root or REPO_ROOT) / "params.yaml"
    params = load_params(params_path)
    if args.pool:
        root = Path(args.root or REPO_ROOT).resolve()
        ids = deploy_to_pool(params, args.pool, root, args.experiments)
        names = [*DEPLOYMENTS, f"mnist-monitoring/{DRIFT_CHECK}"]
        print(f"deployments {', '.join(names)} on work pool {args.pool}: {', '.join(ids)}")
        return
    deployments = [
        *build_deployments(params.deploy, args.root),
        monitoring_deployment(params.monitor, params.deploy.timezone, args.root),
    ]
    for deployment in deployments:  # serve() applies them too; the automation needs them first
        deployment.apply()
    print(f"automation {register_automation(params)} registered")
    serve(*deployments)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    main()
