"""Stage tune: an Optuna study (TPE sampler, median or Hyperband pruner) over the `tune.space` params.

Each trial trains the project's CNN (``train_model``, the same code train runs) on a slice of the
training set for a few epochs, reports its validation metric every epoch to the pruner, and is a
nested MLflow run under one parent tuning run. The study lives in sqlite (or any Optuna storage
URL), named by a hash of everything that defines it, so a killed run resumes where it stopped and a
changed search space starts a new study. Writes ``best_params.json``: the overrides train applies
on top of params.yaml (none when tuning is switched off). Trial 0 is params.yaml as it is; the best
trial replaces it only when it wins by ``tune.min_improvement``, more than trial noise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from pipelines.config import AugmentParams, Params, SearchDim, apply_overrides, load_params
from pipelines.data import SOURCE_FILE, atomic_write_text, load_raw, save_figure, write_json

log = logging.getLogger("pipelines.tune")

BEST_FILE = "best_params.json"
STORAGE_ENV = "MNIST_TUNE_STORAGE"  # overrides tune.storage: e.g. the team profile's PostgreSQL
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def study_key(params: Params, source_record: dict) -> str:
    """A short hash of what defines the study: tune and train settings, augmentation, data."""
    from pipelines.model import compute_dtype

    blob = json.dumps(
        {
            "tune": params.tune.model_dump(
                # how and where it runs, and when it stops, do not change what a trial measures
                exclude={
                    "storage",
                    "timeout_s",
                    "n_trials",
                    "min_improvement",
                    "workers",
                    "scheduler",
                }
            ),
            # what a trial uses of train (dvc.yaml lists the same keys for the tune stage)
            "train": params.train.model_dump(
                # a trial's value is its best epoch's metric, whichever weights it ends with
                exclude={
                    "epochs",
                    "max_images",
                    "early_stopping_patience",
                    "restore_best_weights",
                    "ema_momentum",
                }
            ),
            "compute_dtype": compute_dtype(params.train.precision),  # "auto" on this machine
            "augment": params.augment.model_dump(),
            "data": source_record.get("files"),
            **params.adversarial.identity(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def suggest(trial: optuna.Trial, key: str, dim: SearchDim) -> Any:
    """Draw one setting from its search dimension."""
    if dim.choices is not None:
        return trial.suggest_categorical(key, dim.choices)
    if dim.is_int:
        return trial.suggest_int(key, dim.low, dim.high, step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)


def current_settings(params: Params, policy: AugmentParams) -> dict[str, Any]:
    """The space keys' values in params.yaml (and the policy) where they lie inside the space: the
    first trial of a new study, so the tuned result is measured against the hand-set one."""
    sections = {"train": params.train.model_dump(), "augment": policy.model_dump()}
    settings = {}
    for key, dim in params.tune.space.items():
        value: Any = sections
        for part in key.split("."):
            value = value[part]
        inside = value in dim.choices if dim.choices is not None else dim.low <= value <= dim.high
        if inside:
            settings[key] = value
    return settings


def make_pruner(params) -> optuna.pruners.BasePruner:
    if params.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=params.pruner_startup_trials,
            n_warmup_steps=params.pruner_warmup_epochs,
        )
    if params.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=params.trial_epochs)
    return optuna.pruners.NopPruner()


def open_study(
    params: Params, name: str, storage_url: str, seed: int | None = None, parallel: bool = False
) -> optuna.Study:
    """Create or load the study; a trial whose process died is failed after the heartbeat grace
    period and re-queued once with the same settings.

    ``seed`` replaces ``tune.sampler_seed`` (a worker's own seed: samplers with one seed would
    draw the same settings), and ``parallel`` makes TPE count running trials as a poor result
    (constant liar), so workers asking at the same time do not all get one setting.
    """
    tune = params.tune
    storage = optuna.storages.RDBStorage(
        storage_url,
        heartbeat_interval=tune.heartbeat_s,
        grace_period=tune.grace_s,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=1
        ),
        # a database server that restarts mid-study: drop dead pooled connections, reconnect
        engine_kwargs={"pool_pre_ping": True} if not storage_url.startswith("sqlite") else None,
    )
    return optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(
            seed=tune.sampler_seed if seed is None else seed, constant_liar=parallel
        ),
        pruner=make_pruner(tune),
        direction="maximize" if tune.metric == "val_accuracy" else "minimize",
        load_if_exists=True,
    )


def storage_for(params: Params, out: Path) -> str:
    """The study's Optuna storage URL: $MNIST_TUNE_STORAGE (a team's database, whose password
    stays out of git), else ``tune.storage``, else the sqlite file ``<out>/study.db``."""
    return (
        os.environ.get(STORAGE_ENV)
        or params.tune.storage
        or f"sqlite:///{(out / 'study.db').resolve()}"
    )


def shown_storage(params: Params, out: Path) -> str:
    """The storage as summary.json records it: no password, no absolute path (it is committed)."""
    if os.environ.get(STORAGE_ENV) or params.tune.storage:
        from sqlalchemy.engine import make_url

        return make_url(storage_for(params, out)).render_as_string(hide_password=True)
    return str(out / "study.db")


def best_of(history: dict[str, list[float]], metric: str) -> float:
    values = history[metric]
    return float(max(values) if metric == "val_accuracy" else min(values))


def summarise(study: optuna.Study) -> dict[str, Any]:
    states = [t.state for t in study.trials]
    count = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState}
    summary: dict[str, Any] = {
        "study": study.study_name,
        "trials_finished": count["complete"] + count["pruned"],
        "trials_complete": count["complete"],
        "trials_pruned": count["pruned"],
        "trials_failed": count["fail"],
    }
    if count["complete"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value)
    return summary


def choose(study: optuna.Study, metric: str, min_improvement: float) -> dict[str, Any]:
    """The settings train should use: the best trial, unless it beats trial 0 (params.yaml as it
    is) by less than ``min_improvement`` of ``metric``, in which case trial 0's.

    A trial's score comes from a small validation split, and the best of a dozen noisy scores is
    biased upwards, so a narrow win is more likely noise than a better setting.
    """
    best = study.best_trial
    hand_set = study.trials[0] if study.trials else None
    chosen, reason = best, "the best trial"
    if hand_set is not None and hand_set.state == optuna.trial.TrialState.COMPLETE:
        sign = 1.0 if metric == "val_accuracy" else -1.0
        gain = sign * (best.value - hand_set.value)
        if best.number == hand_set.number:
            reason = "trial 0 (params.yaml) is the best trial"
        elif gain < min_improvement:
            chosen = hand_set
            reason = (
                f"trial {best.number} beats trial 0 (params.yaml) by {gain:.4f} {metric}, "
                f"less than tune.min_improvement {min_improvement}: kept params.yaml"
            )
        else:
            reason = f"trial {best.number} beats trial 0 (params.yaml) by {gain:.4f} {metric}"
    return {
        "best_trial": best.number,
        "best_value": best.value,
        "chosen_trial": chosen.number,
        "chosen_value": chosen.value,
        "reason": reason,
        "overrides": chosen.params,
    }


def trials_table(study: optuna.Study) -> str:
    keys = sorted({k for t in study.trials for k in t.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "value", "epochs", *keys])
    for t in study.trials:
        writer.writerow(
            [
                t.number,
                t.state.name,
                "" if t.value is None else f"{t.value:.6f}",
                len(t.intermediate_values),
                *(t.params.get(k, "") for k in keys),
            ]
        )
    return out.getvalue()


def save_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history and parameter importances as PNGs (importances need 2+ complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    paths = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2:
        plots.append(("param_importances.png", ovm.plot_param_importances))
    for name, plot in plots:
        try:
            with warnings.catch_warnings():  # "experimental since v2.2": noise in a stage log
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances with one distinct value
            log.warning("skipped %s: %s", name, exc)
            continue
        save_figure(ax.figure, out / name, dpi=100)
        paths.append(out / name)
    return paths


def make_objective(
    params: Params,
    policy: AugmentParams,
    images: np.ndarray,
    labels: np.ndarray,
    parent_run_id: str,
):
    """One trial: train the project's CNN with the trial's settings, reporting each epoch to the
    pruner; a nested MLflow run under ``parent_run_id`` (the tuning run), in process or on a worker."""
    import mlflow
    from optuna_integration.keras import KerasPruningCallback

    from pipelines.train import train_model

    tune = params.tune

    def objective(trial: optuna.Trial) -> float:
        dotted = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
        trial_params, trial_policy = apply_overrides(params, policy, dotted)
        train = trial_params.train.model_copy(
            update={
                "max_images": tune.trial_images,
                "epochs": tune.trial_epochs,
                "early_stopping_patience": tune.trial_epochs,  # the pruner decides, not ES
                # Keras' weight average starts from the random initial weights and, at 0.999,
                # still holds half of them after 700 steps: a trial's few epochs would score the
                # start, not the trial. Trials compare raw weights; train adds the average.
                "ema_momentum": 0.0,
            }
        )
        with mlflow.start_run(
            run_name=f"trial-{trial.number}", nested=True, parent_run_id=parent_run_id
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({**dotted, "trial_images": tune.trial_images})
            mlflow.set_tag("optuna.trial", trial.number)
            start = time.perf_counter()
            epochs: list[int] = []

            def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
                epochs.append(epoch)
                mlflow.log_metrics(metrics, step=epoch)

            try:
                result = train_model(
                    train,
                    trial_policy,
                    images,
                    labels,
                    on_epoch=log_epoch,
                    callbacks=[KerasPruningCallback(trial, tune.metric)],
                    adversarial=trial_params.adversarial,
                )
            except optuna.TrialPruned:
                mlflow.set_tag("state", "PRUNED")
                log.info(
                    "trial %d pruned after %d epoch(s), %.1f s",
                    trial.number,
                    len(epochs),
                    time.perf_counter() - start,
                )
                raise
            value = best_of(result.history, tune.metric)
            mlflow.set_tag("state", "COMPLETE")
            mlflow.log_metric("value", value)
            log.info(
                "trial %d: %s %.4f in %.1f s  %s",
                trial.number,
                tune.metric,
                value,
                time.perf_counter() - start,
                dotted,
            )
            return value

    return objective


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(
    params: Params,
    policy: AugmentParams,
    images: np.ndarray,
    labels: np.ndarray,
    study: optuna.Study,
    parent_run_id: str,
) -> None:
    """Run trials in this process until ``tune.n_trials`` are finished (counting earlier runs) or
    the time is up. (``tune.workers`` > 1: pipelines/tune_cluster.py runs them on Dask instead.)"""
    tune = params.tune
    remaining = tune.n_trials - finished_trials(study)
    if remaining <= 0:
        return
    study.optimize(
        make_objective(params, policy, images, labels, parent_run_id),
        n_trials=remaining,
        timeout=tune.timeout_s or None,
        gc_after_trial=True,
        catch=(),
    )


def announce(params: Params, study: optuna.Study) -> int:
    """Log how far the study is and how many trials this run adds; enqueue trial 0 (params.yaml
    as it is) in a new study. Returns the number of trials still to run."""
    tune = params.tune
    done = finished_trials(study)
    remaining = tune.n_trials - done
    if remaining <= 0:
        log.info("study %s already has %d finished trials; nothing to run", study.study_name, done)
        return 0
    log.info(
        "study %s: %d finished trials so far, running up to %d more (%s images, %d epochs each, "
        "%d at a time)",
        study.study_name,
        done,
        remaining,
        tune.trial_images or "all",
        tune.trial_epochs,
        tune.workers,
    )
    return remaining


def close_dead_trial_runs(study: optuna.Study) -> None:
    """MLflow runs of trials whose process died stay RUNNING; mark them KILLED."""
    from pipelines import tracking

    client = tracking.client()
    for t in study.trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        failed = t.state == optuna.trial.TrialState.FAIL and run_id
        if failed and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "state", "FAIL")
            client.set_terminated(run_id, status="KILLED")


def main() -> None:
    import mlflow

    from pipelines import tracking
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not params.tune.enabled:
        write_json(out / "summary.json", {"enabled": False, "trials_finished": 0})
        atomic_write_text(out / "trials.csv", "number,state,value,epochs\n")
        write_json(out / BEST_FILE, {"enabled": False, "overrides": {}})
        (out / "plots").mkdir(exist_ok=True)
        atomic_write_text(out / "plots" / "README.txt", "tuning is off (tune.enabled: false)\n")
        log.info("tuning is off (tune.enabled: false): train will use params.yaml as it is")
        return

    policy = AugmentParams.model_validate_json(Path(args.policy).read_text())
    raw = Path(args.raw)
    data = load_raw(raw, params.ingest.file_names)
    source_record = json.loads((raw / SOURCE_FILE).read_text())
    name = f"{params.tune.study_name}-{study_key(params, source_record)}"
    storage_url = storage_for(params, out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    study = open_study(params, name, storage_url, parallel=params.tune.workers > 1)

    tracking.setup(params.tracking.experiment)
    parent_id = study.user_attrs.get("mlflow_run_id")
    if parent_id:
        log.info("resuming study %s (MLflow run %s)", name, parent_id)
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else "tune") as parent:
        if not parent_id:
            study.set_user_attr("mlflow_run_id", parent.info.run_id)
            mlflow.log_params(tracking.flatten("tune", params.tune.model_dump()))
            mlflow.set_tags({**tracking.lineage_tags(source_record), "optuna.study": name})
        if not study.trials:
            study.enqueue_trial(current_settings(params, policy), skip_if_exists=True)
        remaining = announce(params, study)
        if remaining and params.tune.workers > 1:
            from pipelines.tune_cluster import run_study_on_cluster

            run_study_on_cluster(
                params, policy, data.x_train, data.y_train, study, storage_url, parent.info.run_id
            )
        elif remaining:
            run_study(params, policy, data.x_train, data.y_train, study, parent.info.run_id)
        close_dead_trial_runs(study)

        summary = summarise(study)
        if "best_trial" not in summary:
            from pipelines.cli import StageError

            raise StageError(
                f"study {name}: no trial completed ({summary}); nothing to hand to train"
            )
        chosen = choose(study, params.tune.metric, params.tune.min_improvement)
        # the storage as configured (no absolute paths: summary.json is committed as a DVC metric)
        summary["storage"] = shown_storage(params, out)
        summary["chosen_trial"] = chosen["chosen_trial"]
        write_json(out / "summary.json", summary)
        atomic_write_text(out / "trials.csv", trials_table(study))
        plots = save_plots(study, out / "plots")
        write_json(
            out / BEST_FILE,
            {"enabled": True, "study": name, "metric": params.tune.metric, **chosen},
        )
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        # Tags, not params: the run is the study's, and a resumed or shared study (two
        # experiments at once) may choose again; MLflow refuses to change a param's value.
        mlflow.set_tags({f"chosen.{k}": str(v) for k, v in chosen["overrides"].items()})
        mlflow.set_tag("chosen", chosen["reason"])
        for path in (out / "summary.json", out / "trials.csv", out / BEST_FILE, *plots):
            mlflow.log_artifact(str(path))
    log.info(
        "study %s: %d finished (%d pruned), best trial %d with %s %.4f; train gets trial %d: %s -> %s",
        name,
        summary["trials_finished"],
        summary["trials_pruned"],
        chosen["best_trial"],
        params.tune.metric,
        chosen["best_value"],
        chosen["chosen_trial"],
        chosen["reason"],
        out / BEST_FILE,
    )


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("tune", main)
