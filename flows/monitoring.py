"""Prefect flow ``mnist-monitoring``: check a window of the inference log against the training
data, record the figures in MLflow, and ask for retraining with a Prefect event when a threshold
in params.yaml's ``monitor`` section is passed.

    python -m flows.monitoring                  # one check now (ephemeral API without a server)
    python -m flows.monitoring --log-dir data/monitoring --window-hours 1

The statistics are ``pipelines.monitoring``'s pure functions; this flow reads the inputs, logs
and emits. Per check:

- **The window**: the log's last ``monitor.window_hours``, the records of the latest model
  version in it (the one serving now). Fewer than ``monitor.min_records``: no verdict.
- **The reference**: ``monitor.reference_images`` training images of ``data/dataset`` (a fixed
  sample), through the same ``image_features`` the server's log uses; and the training labels.
- **MLflow**: one run per served version in the experiment ``monitor.experiment``, each check one
  step of its metrics (``drift_share``, ``low_confidence_share``, ... at the window's end), so the
  UI charts their history; each check's HTML report is an artifact ``reports/<time>.html``.
- **Events**: every check emits ``mnist.monitoring.checked``; a check with a reason emits
  ``mnist.monitoring.retrain-requested`` with the reasons in its payload. The project's
  automation (``flows/automations.py``) turns that into a run of ``monitor.retrain_deployment``
  whose ``reason`` parameter carries them to the MLflow run and the model version.
- **The shadow gate**: with ``register.shadow_min_requests`` on, ``pipelines.shadow`` then decides
  on a challenger waiting in shadow (its result is the verdict's ``shadow``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger

from flows.training import REPO_ROOT
from pipelines.config import Params, load_params
from pipelines.merge import INCOMING_DIR
from pipelines.monitoring import (
    Thresholds,
    check_window,
    image_features,
    read_log,
    report_html,
)
from pipelines.review import count_waiting

CHECKED = "mnist.monitoring.checked"
RETRAIN = "mnist.monitoring.retrain-requested"
REFERENCE_SEED = 0  # the same training images every check: figures comparable across checks
VERSION_TAG = "mnist.monitoring.model_version"


def resource(model_name: str) -> dict[str, str]:
    """The Prefect resource the monitoring events are about: the registered model."""
    return {"prefect.resource.id": f"mnist.model.{model_name}", "prefect.resource.name": model_name}


def reference(root: Path, params: Params) -> tuple[Any, np.ndarray]:
    """Features of a fixed sample of the training images, and the training labels."""
    from pipelines.data import load_raw

    data = load_raw(root / "data" / "dataset", params.ingest.file_names)
    rng = np.random.default_rng(REFERENCE_SEED)
    n = min(params.monitor.reference_images, len(data.x_train))
    sample = rng.choice(len(data.x_train), n, replace=False)
    return image_features(data.x_train[sample]), data.y_train


def monitoring_run(client, experiment: str, version: str) -> str:
    """The MLflow run holding the checks of one served version (created at its first check)."""
    import mlflow

    found = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{VERSION_TAG}` = '{version}'",
        output_format="list",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(
        experiment_id, run_name=f"monitoring v{version}", tags={VERSION_TAG: version}
    )
    client.set_terminated(run.info.run_id)  # checks are added to it later, one step each
    return run.info.run_id


def log_check(params: Params, root: Path, version: str, check, window_end: datetime) -> str:
    """One step of the version's monitoring run: the figures and the HTML report."""
    from pipelines import tracking

    tracking.setup(params.monitor.experiment, root)
    client = tracking.client()
    run_id = monitoring_run(client, params.monitor.experiment, version)
    step = len(client.get_metric_history(run_id, "drift_share"))
    stamp = int(window_end.timestamp() * 1000)
    from mlflow.entities import Metric

    metrics = [Metric(k, float(v), stamp, step) for k, v in check.metrics().items()]
    client.log_batch(run_id, metrics=metrics)
    title = f"Drift check of v{version}, window ending {window_end:%Y-%m-%d %H:%M} UTC"
    html = report_html(check, Thresholds.of(params.monitor), title)
    client.log_text(run_id, html, f"reports/{window_end:%Y%m%dT%H%M%S}.html")
    client.set_tag(run_id, "last_reasons", "; ".join(check.reasons) or "none")
    return run_id


def emit(event: str, model_name: str, payload: dict[str, Any]) -> None:
    """Send one event and wait until it has left this process (the flow may end right after)."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(event=event, resource=resource(model_name), payload=payload)
    EventsWorker.drain_all()


@flow(name="mnist-monitoring", log_prints=True)
def monitoring(
    root: str | None = None,
    log_dir: str | None = None,
    window_hours: float | None = None,
    incoming: str | None = None,
) -> dict[str, Any]:
    """Check the inference log's last window; emit a retrain event when a threshold is passed.

    Args:
        root: the repo whose params.yaml, data/dataset and MLflow store to use (default: this one).
        log_dir: the inference log (default: params.yaml's serve.log_dir under ``root``).
        window_hours: override monitor.window_hours.
        incoming: where the server saves corrections (default: data/incoming under ``root``).

    Returns:
        The verdict: ``records``, ``reasons`` and, when checked, the figures and the MLflow run.
    """
    logger = get_run_logger()
    repo = Path(root or REPO_ROOT).resolve()
    params = load_params(repo / "params.yaml")
    monitor, model_name = params.monitor, params.register.model_name
    hours = window_hours or monitor.window_hours
    log_path = Path(log_dir) if log_dir else repo / params.serve.log_dir
    window_end = datetime.now(tz=UTC)
    window = read_log(log_path, since=window_end - timedelta(hours=hours))
    if not window.empty:  # the version serving now: the last one that answered
        version = str(window["model_version"].iloc[-1])
        window = window[window["model_version"] == version]
    if len(window) < monitor.min_records:
        verdict = {
            "records": len(window),
            "reasons": [],
            "verdict": f"no verdict: {len(window)} records in the last {hours:g} h of "
            f"{log_path}, fewer than monitor.min_records ({monitor.min_records})",
        }
        logger.info("%s", verdict["verdict"])
        emit(CHECKED, model_name, verdict)
        return verdict | shadow_gate(params, repo, log_path, logger)
    ref, labels = reference(repo, params)
    # corrections waiting in the quarantine: many of them say the model gets digits wrong
    feedback = count_waiting(Path(incoming) if incoming else repo / INCOMING_DIR)
    check = check_window(ref, labels, window, Thresholds.of(monitor), feedback)
    run_id = log_check(params, repo, version, check, window_end)
    verdict = {
        "records": check.records,
        "model_version": version,
        "reasons": check.reasons,
        "reason": "; ".join(check.reasons),
        "metrics": check.metrics(),
        "mlflow_run_id": run_id,
        "window_end": window_end.isoformat(timespec="seconds"),
    }
    logger.info(
        "v%s, %d records: drift share %.2f, prediction distance %.3f, low confidence %.1f%%, "
        "%d corrections waiting: %s",
        version,
        check.records,
        check.drift_share,
        check.prediction_distance,
        100 * check.low_confidence_share,
        feedback,
        "; ".join(check.reasons) or "no threshold passed",
    )
    emit(CHECKED, model_name, verdict)
    if check.reasons:
        emit(RETRAIN, model_name, verdict)
    return verdict | shadow_gate(params, repo, log_path, logger)


def shadow_gate(params: Params, repo: Path, log_path: Path, logger=None) -> dict[str, Any]:
    """With register.shadow_min_requests on, the shadow gate after each check
    (``pipelines.shadow``): a challenger that has agreed with the champion on enough requests
    takes ``champion``. ``{"shadow": result}``, or nothing while the gate is off."""
    if params.register.shadow_min_requests == 0:
        return {}
    from pipelines import tracking
    from pipelines.shadow import promote_from_shadow

    tracking.use_store(repo)
    result = promote_from_shadow(tracking.client(), params.register, log_path)
    (logger or logging.getLogger("flows.monitoring")).info(
        "shadow gate: %s, %s", result["outcome"], result["reason"]
    )
    return {"shadow": result}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the flow 'mnist-monitoring' once.")
    parser.add_argument("--root", default=None, help="repo to check (default: this checkout)")
    parser.add_argument(
        "--log-dir", default=None, help="the inference log (default: serve.log_dir)"
    )
    parser.add_argument("--window-hours", type=float, default=None)
    parser.add_argument("--json", action="store_true", help="print the verdict as one JSON line")
    args = parser.parse_args()
    started = time.monotonic()
    verdict = monitoring(root=args.root, log_dir=args.log_dir, window_hours=args.window_hours)
    if args.json:
        print(json.dumps(verdict))
        return
    print(verdict.get("verdict") or verdict["reason"] or "no threshold passed")
    print(f"({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    main()
