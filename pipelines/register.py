"""Stage register: register the trained model in MLflow and move an alias through the promotion gate.

Gate, in order:
  1. floor: test accuracy below ``register.min_accuracy`` -> registered, no alias;
  2. the candidate must load back from the registry and reproduce its test predictions;
  3. infra: the served export (``serve.format``) must have passed its parity bars in the export
     stage, and, downloaded from the registry and loaded by the server's code
     (``pipelines.runtime.load_registered``), must predict ``register.serve_check_images`` test
     images losing at most ``register.max_served_drop`` accuracy against Keras;
  4. no champion yet -> ``champion``; otherwise the current champion is re-scored on this very
     test set, and the candidate takes ``champion`` only if strictly better, else ``challenger``;
  5. with ``register.shadow_min_requests`` above 0, a candidate that beats the champion gets
     ``challenger`` instead, tagged ``shadow_pending`` (the champion it beat): ``pipelines.shadow``
     promotes it once it has agreed with the champion on enough served requests.
The exports and their parity report are attached to the version (files of its logged model, and
tags), and so are evaluate's report, with the numbers stage's section added (``numbers/`` holds
that stage's scores and drawing). Every decision is written on the version as tags (reason, compared metrics, previous champion, time).
If anything fails after the version is created and before its alias is set, the version is deleted.

Several writers: steps 1-3 run concurrently; reading the champion, deciding, tagging and moving
the alias (``promote``) run under the registry lock (``pipelines.locks.registry_lock``: a
PostgreSQL advisory lock or a file lock), so two registrations that finish together are decided
one after the other, each against the champion the other left. The version's ``gate_lock`` tag
names the lock that was held.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines.config import RegisterParams, load_params
from pipelines.data import write_json
from pipelines.locks import REGISTRY_LOCK_TIMEOUT_S, HeldLock, registry_lock
from pipelines.runtime import PARITY_REPORT, SPEED_REPORT

log = logging.getLogger("pipelines.register")

LOAD_CHECK_IMAGES = 512  # test images the registry round-trip check predicts
PROBABILITY_TOLERANCE = 1e-4  # largest allowed probability difference in that check
REPORT_ARTIFACT = "evaluation_report.html"  # evaluate's report, among the version's artifacts
NUMBERS_ARTIFACTS = "numbers"  # the numbers stage's files, among the version's artifacts
SHADOW_PENDING_TAG = "shadow_pending"  # on a version waiting in shadow: the champion it beat


@dataclass(frozen=True)
class Decision:
    """Which alias a candidate gets (None: none) and why."""

    alias: str | None
    reason: str
    shadow: bool = False  # the alias is challenger until the shadow's evidence is in


@dataclass(frozen=True)
class Evidence:
    """Everything the gate weighs, measured by ``register_model``; the decision is a function of it."""

    candidate_accuracy: float  # the candidate's test accuracy (evaluate's metrics.json)
    champion_accuracy: float | None = None  # the champion re-scored on this test set; None: none
    champion_version: str | None = None
    champion_unservable: str | None = None  # why the previous champion was set aside, if it was
    registry_drift: float = 0.0  # max |dp| of the registry copy against the evaluated model
    served_failure: str | None = None  # the infra check of the served export; None: passed


def decide_promotion(params: RegisterParams, evidence: Evidence) -> Decision:
    """The promotion gate, as a pure function of what was measured (steps 1-4 of the docstring)."""
    accuracy, champion = evidence.candidate_accuracy, evidence.champion_accuracy
    if accuracy < params.min_accuracy:
        return Decision(
            None, f"test accuracy {accuracy:.4%} is below the floor {params.min_accuracy:.4%}"
        )
    if evidence.registry_drift > PROBABILITY_TOLERANCE:
        return Decision(
            None,
            f"registry copy predicts differently from the evaluated model "
            f"(max |dp| {evidence.registry_drift:.2e}, tolerance {PROBABILITY_TOLERANCE:.0e})",
        )
    if evidence.served_failure is not None:
        return Decision(None, evidence.served_failure)
    if champion is None:
        reason = f"no current champion; test accuracy {accuracy:.4%} passes the floor {params.min_accuracy:.4%}"
        if evidence.champion_unservable:
            reason += f"; the previous champion {evidence.champion_unservable}"
        return Decision(params.champion_alias, reason)
    versus = f"champion v{evidence.champion_version}: {accuracy:.4%}"
    if accuracy > champion:
        beats = f"beats {versus} > {champion:.4%} on the same test set"
        if params.shadow_min_requests > 0:
            return Decision(
                params.challenger_alias,
                f"{beats}; serves in shadow of v{evidence.champion_version} first, for "
                f"register.shadow_min_requests ({params.shadow_min_requests}) at an agreement of "
                f"at least {params.shadow_min_agreement:.2%} (python -m pipelines.shadow)",
                shadow=True,
            )
        return Decision(params.champion_alias, beats)
    return Decision(
        params.challenger_alias, f"does not beat {versus} <= {champion:.4%} on the same test set"
    )


def score_version(uri: str, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Load a registered Keras model and return its accuracy on the given images."""
    import mlflow

    from pipelines.model import predict_probabilities

    model = mlflow.keras.load_model(uri)
    probs = predict_probabilities(model, images, batch_size)
    return float((probs.argmax(axis=1) == labels.astype(np.int64)).mean())


def check_served(
    params: RegisterParams,
    version: str,
    parity: dict,
    served_format: str,
    model,
    x_test: np.ndarray,
    y_test: np.ndarray,
    batch_size: int,
) -> tuple[dict[str, str], str | None]:
    """Gate step 3. Returns the version tags it measured and the failure (None: passed)."""
    from pipelines.model import predict_probabilities, to_model_input
    from pipelines.runtime import check_parity, load_registered

    tags = {"served_format": served_format, "parity_passed": str(parity["passed"]).lower()}
    for name, row in parity["formats"].items():
        for key in ("accuracy", "agreement"):
            tags[f"export.{name}.{key}"] = f"{row[key]:.6g}"
    try:
        check_parity(parity, served_format, f"v{version}")
    except ValueError as exc:
        return tags, f"served export: {exc}"
    n = min(params.serve_check_images, len(x_test))
    images, labels = x_test[:n], y_test[:n].astype(np.int64)
    expected = float((predict_probabilities(model, images, batch_size).argmax(1) == labels).mean())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            predictor = load_registered(params.model_name, version, served_format, Path(tmp))
            probs = predictor.predict(to_model_input(images))
    except Exception as exc:  # whatever breaks, the version must not be served
        return tags, f"served export {served_format} of v{version} failed to load or predict: {exc}"
    served = float((probs.argmax(axis=1) == labels).mean())
    tags.update(served_check_images=str(n), served_check_accuracy=f"{served:.6f}")
    log.info(
        "infra check: %s from the registry scores %.4f on %d test images (Keras %.4f)",
        served_format,
        served,
        n,
        expected,
    )
    if served < expected - params.max_served_drop:
        return tags, (
            f"served export {served_format} scores {served:.4%} on {n} test images against Keras' "
            f"{expected:.4%} (allowed drop {params.max_served_drop:.2%})"
        )
    return tags, None


ChampionScorer = Callable[[str], tuple[float | None, str | None]]
"""Scores a champion version: (its accuracy, None), (None, why it cannot be served) or (None, None)
when it failed to load or predict; either None counts as no champion."""


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` decided, against which champion, and under which lock."""

    decision: Decision
    champion_version: str | None  # the champion the candidate was weighed against; None: none
    champion_accuracy: float | None
    lock: str  # the lock held while deciding (``HeldLock.describe()``)


def promote(
    client,
    params: RegisterParams,
    version: str,
    evidence: Evidence,
    score_champion: ChampionScorer,
    tags: dict[str, str] | None = None,
    lock: AbstractContextManager[HeldLock] | None = None,
) -> Promotion:
    """The gate's critical section, under ``lock`` (default: ``registry_lock(params.model_name)``).

    Writes ``tags`` (the candidate's own, which no other writer changes) on ``version`` first, then,
    holding the lock: reads the current champion, scores it with ``score_champion``, completes
    ``evidence`` (the candidate's own measurements) with it, decides (``decide_promotion``), writes
    the decision's tags and moves the alias. No other writer may read or move the alias in
    between: that is what the lock is for. On failure the version is left to the caller to delete.
    """
    from pipelines import tracking

    for key, value in (tags or {}).items():
        client.set_model_version_tag(params.model_name, version, key, value)
    if lock is None:
        lock = registry_lock(params.model_name)
    with lock as held:
        champion = tracking.current_champion(client, params.model_name, params.champion_alias)
        champion_version = str(champion.version) if champion is not None else None
        champion_accuracy, unservable = None, None
        if champion_version is not None:
            champion_accuracy, unservable = score_champion(champion_version)
            if champion_accuracy is None:
                champion_version = None
        decision = decide_promotion(
            params,
            replace(
                evidence,
                champion_accuracy=champion_accuracy,
                champion_version=champion_version,
                champion_unservable=unservable,
            ),
        )
        decided = {
            "decision": decision.alias or "none",
            "reason": decision.reason,
            "previous_champion": champion_version or "none",
            "champion_test_accuracy": f"{champion_accuracy:.6f}"
            if champion_accuracy is not None
            else "none",
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "gate_lock": held.describe(),
            "gate_lock_waited_s": f"{held.waited_s:.3f}",
            **({SHADOW_PENDING_TAG: champion_version} if decision.shadow else {}),
        }
        for key, value in decided.items():
            client.set_model_version_tag(params.model_name, version, key, value)
        if decision.alias is not None:
            held.check()  # a PostgreSQL session that died has let someone else in: do not write
            client.set_registered_model_alias(params.model_name, decision.alias, version)
    return Promotion(decision, champion_version, champion_accuracy, held.describe())


def champion_scorer(
    params: RegisterParams,
    x_test: np.ndarray,
    y_test: np.ndarray,
    batch_size: int,
    export_dir: Path | None,
    served_format: str,
) -> ChampionScorer:
    """The gate's scorer of a champion: re-scored on this test set, and (with ``export_dir``) its
    served export loaded by the server's code. Remembers each version that passed both: a
    version's files do not change, so a score taken before the lock is reused under it. A failure
    is tried again under the lock: it may have been transient (a download, a full disk)."""
    results: dict[str, tuple[float | None, str | None]] = {}

    def score(version: str) -> tuple[float | None, str | None]:
        if version in results:
            return results[version]
        uri = f"models:/{params.model_name}/{version}"
        try:
            accuracy = score_version(uri, x_test, y_test, batch_size)
            log.info("current champion v%s scores %.4f on this test set", version, accuracy)
        except Exception as exc:  # a champion that no longer loads must not block a good candidate
            log.warning(
                "current champion v%s failed to load or predict (%s); treating as absent",
                version,
                exc,
            )
            return None, None
        if export_dir is not None:
            # A champion registered before the export stage (or with a broken export) cannot be
            # served: it must not keep the alias from a candidate that can.
            from pipelines.runtime import load_registered

            try:
                with tempfile.TemporaryDirectory() as tmp:
                    load_registered(params.model_name, version, served_format, Path(tmp))
            except Exception as exc:
                unservable = f"v{version} cannot be served ({exc})"
                log.warning("current champion %s; treating as absent", unservable)
                return None, unservable
        results[version] = accuracy, None
        return results[version]

    return score


def register_model(
    params: RegisterParams,
    run_id: str,
    model,
    metrics: dict,
    x_test: np.ndarray,
    y_test: np.ndarray,
    batch_size: int,
    extra_tags: dict[str, str] | None = None,
    export_dir: Path | None = None,
    served_format: str = "model.onnx",
    report: Path | None = None,
    numbers: Path | None = None,
    lock_timeout_s: float = REGISTRY_LOCK_TIMEOUT_S,
) -> dict:
    """Log ``model`` on the run, register it, run the gate and set the alias. Returns the record.

    ``export_dir`` (the export stage's output: the files and parity.json) is attached to the
    version and enables the infra check on ``served_format``; without it (unit tests) step 3 is
    skipped. ``report`` (evaluate's report.html) is attached to the version as
    ``evaluation_report.html`` among its artifacts, and named in its ``evaluation_report`` tag;
    with ``numbers`` (the numbers stage's output) the page gets its section, the version its files
    under ``numbers/`` and a ``numbers.<spacing>.whole_accuracy`` tag per spacing. Everything up
    to the decision runs without the registry lock; ``promote`` waits up to ``lock_timeout_s``
    for it.
    """
    import mlflow

    from pipelines import tracking
    from pipelines.model import to_model_input

    client = tracking.client()
    # the numbers stage's scores, read before anything is logged: a missing file fails here
    number_scores = read_scores(numbers) if numbers is not None else None
    score_champion = champion_scorer(params, x_test, y_test, batch_size, export_dir, served_format)
    # Score today's champion before the lock: under it, promote re-reads the alias and only
    # re-scores when another writer moved it in the meantime.
    champion = tracking.current_champion(client, params.model_name, params.champion_alias)
    if champion is not None:
        score_champion(str(champion.version))

    from mlflow.models import infer_signature

    example = to_model_input(x_test[:2])  # (2, 28, 28, 1) float32 in [0, 1]
    # An explicit signature: mlflow 3.17's keras flavour fails to write `input_example` files.
    signature = infer_signature(example, model.predict(example, verbose=0))
    parity = None
    if export_dir is not None:
        parity = json.loads((Path(export_dir) / PARITY_REPORT).read_text())
        if served_format not in parity["formats"]:
            raise FileNotFoundError(f"{export_dir}/{PARITY_REPORT}: no entry for {served_format}")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.keras.log_model(model, name="model", signature=signature)
        if (
            export_dir is not None
        ):  # the exports travel with the model: models:/<name>/<v>/model.onnx
            client.log_model_artifacts(info.model_id, str(export_dir))
        if report is not None:
            with tempfile.TemporaryDirectory() as tmp:
                write_report(Path(report), numbers, number_scores, Path(tmp) / REPORT_ARTIFACT)
                client.log_model_artifacts(info.model_id, tmp)
        if numbers is not None:
            client.log_model_artifacts(info.model_id, str(numbers), NUMBERS_ARTIFACTS)
    version = mlflow.register_model(info.model_uri, params.model_name).version
    log.info("registered %s v%s from run %s", params.model_name, version, run_id)
    try:
        # Infra check: the registered artefact must load and predict like the model we evaluated.
        n = min(LOAD_CHECK_IMAGES, len(x_test))
        batch = to_model_input(x_test[:n])
        expected = model.predict(batch, batch_size=batch_size, verbose=0)
        loaded = mlflow.keras.load_model(f"models:/{params.model_name}/{version}")
        drift = float(
            np.abs(loaded.predict(batch, batch_size=batch_size, verbose=0) - expected).max()
        )
        served_tags: dict[str, str] = {}
        failure = None
        if parity is not None:
            served_tags, failure = check_served(
                params, version, parity, served_format, model, x_test, y_test, batch_size
            )
            speed_file = Path(export_dir) / SPEED_REPORT
            if speed_file.exists():
                for name, row in json.loads(speed_file.read_text())["formats"].items():
                    served_tags[f"export.{name}.latency_1_ms"] = f"{row['latency_1_ms']:.6g}"
        tags = {
            "test_accuracy": f"{metrics['accuracy']:.6f}",
            "test_loss": f"{metrics['loss']:.6f}",
            "run_id": run_id,
            **(
                {"evaluation_report": f"models:/{params.model_name}/{version}/{REPORT_ARTIFACT}"}
                if report is not None
                else {}
            ),
            **served_tags,
            **(numbers_tags(number_scores) if number_scores is not None else {}),
            **(extra_tags or {}),
        }
        promotion = promote(
            client,
            params,
            str(version),
            Evidence(
                candidate_accuracy=metrics["accuracy"],
                registry_drift=drift,
                served_failure=failure,
            ),
            score_champion,
            tags,
            registry_lock(params.model_name, lock_timeout_s, mlflow.get_registry_uri()),
        )
    except BaseException:
        log.error(
            "registration of v%s failed before its alias was set; deleting the version", version
        )
        client.delete_model_version(params.model_name, version)
        raise
    decision = promotion.decision
    log.info(
        "v%s -> %s: %s (%s)", version, decision.alias or "no alias", decision.reason, promotion.lock
    )
    return {
        "model_name": params.model_name,
        "version": int(version),
        "alias": decision.alias,
        "reason": decision.reason,
        "test_accuracy": metrics["accuracy"],
        "previous_champion": int(promotion.champion_version)
        if promotion.champion_version
        else None,
        "champion_test_accuracy": promotion.champion_accuracy,
        "served_format": served_tags.get("served_format"),
        "served_check_accuracy": served_tags.get("served_check_accuracy"),
    }


def read_scores(numbers: Path) -> dict:
    """The numbers stage's scores.json, from its output folder ``numbers``."""
    from pipelines.numbers import SCORES_FILE

    return json.loads((numbers / SCORES_FILE).read_text())


def write_report(report: Path, numbers: Path | None, scores: dict | None, out: Path) -> None:
    """The version's report: evaluate's page, with the numbers stage's section when given."""
    if numbers is None or scores is None:
        shutil.copyfile(report, out)
        return
    from pipelines.numbers import WORST_FILE
    from pipelines.report import render_numbers, with_section

    section = render_numbers(scores, numbers / WORST_FILE)
    out.write_text(with_section(report.read_text(), section))


def numbers_tags(scores: dict) -> dict[str, str]:
    """``numbers.<spacing>.whole_accuracy`` for each spacing of the numbers stage's scores."""
    return {
        f"numbers.{k}.whole_accuracy": f"{v['whole_accuracy']:.6f}"
        for k, v in scores["by_spacing"].items()
    }


def main() -> None:
    import keras

    from pipelines import tracking
    from pipelines.cli import base_parser
    from pipelines.data import load_raw

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--export", required=True, help="the export stage's output")
    parser.add_argument("--report", required=True, help="evaluate's report")
    parser.add_argument("--numbers", help="the numbers stage's output, added to the report")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    model_dir = Path(args.model)
    tracking.setup(params.tracking.experiment)
    run_id = tracking.read_run_id(model_dir / tracking.RUN_FILE)
    data = load_raw(Path(args.raw), params.ingest.file_names)
    model = keras.models.load_model(model_dir / "model.keras")
    metrics = json.loads(Path(args.metrics).read_text())
    run_tags = tracking.client().get_run(run_id).data.tags  # the training run's lineage
    record = register_model(
        params.register,
        run_id,
        model,
        metrics,
        data.x_test,
        data.y_test,
        params.evaluate.batch_size,
        extra_tags={
            "data_source": data.data_source,
            "git_commit": tracking.git_commit(),
            **{key: run_tags.get(key, "unknown") for key in ("data_version", "training_reason")},
        },
        export_dir=Path(args.export),
        served_format=params.serve.format,
        report=Path(args.report) if Path(args.report).exists() else None,
        numbers=Path(args.numbers) if args.numbers else None,
    )
    write_json(Path(args.out) / "registration.json", record)


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("register", main)
