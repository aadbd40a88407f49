"""Stage evaluate: score the trained model on the whole test set and log the results to its run.

Writes metrics.json (for `dvc metrics`), predictions.csv (for `dvc plots`' confusion matrix),
the 10x10 confusion matrix as CSV and PNG, per-class precision/recall/F1 and the most-confused
pairs. With ``evaluate.insight`` (pipelines/insight.py) also Grad-CAM, the error gallery and
tables, FGSM robustness and calibration under insight/, and the self-contained HTML report
report.html (pipelines/report.py), which register attaches to the model version. All of it is
logged onto the training run in MLflow.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import load_params
from pipelines.constants import NUM_CLASSES
from pipelines.data import atomic_write_text, load_raw, save_figure, write_json
from pipelines.scoring import Evaluation, evaluate_probabilities

log = logging.getLogger("pipelines.evaluate")

INSIGHT_DIR = "insight"  # Grad-CAM, error gallery, robustness and calibration files, under --out
REPORT_FILE = "report.html"


def plot_confusion(cm: np.ndarray, path: Path, title: str) -> None:
    """Heatmap of the confusion matrix with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    shown = np.log1p(cm)  # log scale, so the off-diagonal errors are visible next to the diagonal
    ax.imshow(shown, cmap="Blues")
    for t in range(len(cm)):
        for p in range(len(cm)):
            ax.text(
                p,
                t,
                str(cm[t, p]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shown[t, p] > shown.max() / 2 else "black",
            )
    ax.set_xticks(range(len(cm)))
    ax.set_yticks(range(len(cm)))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def write_reports(
    result: Evaluation,
    y_true: np.ndarray,
    out: Path,
    extra_metrics: dict | None = None,
) -> dict:
    """Write every report file into ``out``; return the metrics dict (``extra_metrics`` joins it).

    metrics.json holds numbers only, the headline of `dvc metrics show`; where the data came from
    is the run's ``data_source`` tag."""
    metrics = {
        "accuracy": round(result.accuracy, 6),
        "loss": round(result.loss, 6),
        "n_test": int(len(y_true)),
        **(extra_metrics or {}),
    }
    write_json(out / "metrics.json", metrics)
    atomic_write_text(
        out / "predictions.csv",
        pd.DataFrame({"actual": y_true.astype(int), "predicted": result.predicted}).to_csv(
            index=False
        ),
    )
    cm_frame = pd.DataFrame(
        result.confusion,
        index=pd.Index(range(NUM_CLASSES), name="true"),
        columns=[f"pred_{d}" for d in range(NUM_CLASSES)],
    )
    atomic_write_text(out / "confusion_matrix.csv", cm_frame.to_csv())
    atomic_write_text(
        out / "per_class.csv", result.per_class.to_csv(index=False, float_format="%.6f")
    )
    atomic_write_text(
        out / "confused_pairs.csv", result.confused_pairs.to_csv(index=False, float_format="%.6f")
    )
    plot_confusion(
        result.confusion,
        out / "confusion_matrix.png",
        f"test accuracy {result.accuracy:.4%} (n={len(y_true)})",
    )
    return metrics


def champion_summary(model_name: str, alias: str, run_id: str) -> dict | None:
    """The current champion's version, run and logged test metrics, for the report's comparison."""
    from pipelines import tracking

    client = tracking.client()
    version = tracking.current_champion(client, model_name, alias)
    if version is None:
        return None
    return {
        "version": version.version,
        "run_id": version.run_id,
        "metrics": dict(client.get_run(version.run_id).data.metrics),
        "same_run": version.run_id == run_id,
    }


def write_report(
    path: Path,
    run_id: str,
    experiment: str,
    result: Evaluation,
    found,
    logged_metrics: dict[str, float],
    images: np.ndarray,
    reports: Path,
    champion: dict | None,
    best_params: Path,
) -> None:
    """Render the HTML report (pipelines/report.py) of the run ``run_id`` into ``path``."""
    import json
    import time

    import mlflow

    from pipelines.report import ReportInputs, render_report

    run = mlflow.get_run(run_id)
    tags = run.data.tags
    lineage = {
        "MLflow run": run_id,
        "experiment": experiment,
        "git commit": tags.get("git_commit", "unknown"),
        "data version (md5 of data/dataset)": tags.get("data_version", "unknown"),
        "data source": tags.get("data_source", "unknown"),
        "digits added from data/incoming": tags.get("incoming.digits_added", "0"),
        "trained": time.strftime(
            "%Y-%m-%d %H:%M:%S %Z", time.localtime(run.info.start_time / 1000)
        ),
    }
    overrides = {}
    if best_params.exists():
        overrides = json.loads(best_params.read_text()).get("overrides") or {}
    inputs = ReportInputs(
        model_label=f"run {run_id[:12]} ({experiment})",
        metrics=logged_metrics,
        n_test=len(images),
        per_class=result.per_class,
        confused_pairs=result.confused_pairs,
        groups=found.groups,
        confident_errors=found.confident_errors,
        images=images,
        robustness=found.robustness,
        robustness_images=found.robustness_images,
        calibration=found.calibration,
        figures={
            "confusion": reports / "confusion_matrix.png",
            "gradcam": found.out / "gradcam.png",
            "errors": found.out / "errors.png",
            "robustness": found.out / "robustness.png",
            "reliability": found.out / "reliability.png",
        },
        gradcam_caption=(
            f"Heat = where the evidence for the predicted digit lies, from the last convolution "
            f"({found.gradcam_layer}): the misclassified test images, then a fixed, seeded sample of "
            "correct ones. Captions: true / predicted (confidence)."
        ),
        lineage=lineage,
        params=dict(run.data.params),
        overrides=overrides,
        champion=champion,
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    atomic_write_text(path, render_report(inputs))


def main() -> None:
    import keras
    import mlflow

    from pipelines import tracking
    from pipelines.cli import base_parser
    from pipelines.model import predict_probabilities
    from pipelines.report import render_off_notice

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--best-params", required=True, help="shown in the report")
    args = parser.parse_args()
    params = load_params(args.params)
    data = load_raw(Path(args.raw), params.ingest.file_names)
    model_dir, out = Path(args.model), Path(args.out)
    model = keras.models.load_model(model_dir / "model.keras")
    probs = predict_probabilities(model, data.x_test, params.evaluate.batch_size)
    result = evaluate_probabilities(probs, data.y_test, params.evaluate.top_confused_pairs)
    found = None
    shutil.rmtree(out / INSIGHT_DIR, ignore_errors=True)  # nothing stale from an earlier model
    (out / REPORT_FILE).unlink(missing_ok=True)
    if params.evaluate.insight:
        from pipelines.insight import analyse

        start = time.perf_counter()
        found = analyse(model, data.x_test, data.y_test, probs, params.evaluate, out / INSIGHT_DIR)
        log.info(
            "insight in %.1f s: ECE %.4f; FGSM accuracy on %d images %s; %d misclassified",
            time.perf_counter() - start,
            found.ece,
            found.robustness_images,
            ", ".join(f"eps {e:g}: {a:.2%}" for e, a in found.robustness.items()),
            sum(len(idx) for *_, idx in found.groups),
        )
    metrics = write_reports(
        result,
        data.y_test,
        out,
        {k: round(v, 6) for k, v in found.metrics().items()} if found else None,
    )
    log.info(
        "test accuracy %.4f, loss %.4f on %d images (%s)",
        result.accuracy,
        result.loss,
        len(data.y_test),
        data.data_source,
    )
    for row in result.confused_pairs.head(5).itertuples(index=False):
        log.info(
            "  most confused: true %d -> predicted %d, %d times", row.true, row.predicted, row.count
        )

    with tracking.attach_run(model_dir / tracking.RUN_FILE, params.tracking.experiment) as run_id:
        logged = {"test_accuracy": result.accuracy, "test_loss": result.loss}
        if found is not None:
            logged.update({f"test_{k}": v for k, v in found.metrics().items()})
        mlflow.log_metrics(logged)
        for row in result.per_class.itertuples(index=False):
            mlflow.log_metrics(
                {
                    f"test_precision_{row.digit}": row.precision,
                    f"test_recall_{row.digit}": row.recall,
                    f"test_f1_{row.digit}": row.f1,
                }
            )
        if found is not None:
            # The robustness curve as one metric over steps: step = epsilon x 100 (0 = clean).
            for eps, accuracy in found.robustness.items():
                mlflow.log_metric("test_fgsm_accuracy", accuracy, step=round(eps * 100))
            champion = champion_summary(
                params.register.model_name, params.register.champion_alias, run_id
            )
            write_report(
                out / REPORT_FILE,
                run_id,
                params.tracking.experiment,
                result,
                found,
                logged,
                data.x_test,
                out,
                champion,
                Path(args.best_params),
            )
            log.info("report: %s", out / REPORT_FILE)
        else:
            (out / INSIGHT_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / INSIGHT_DIR / "OFF.txt", "evaluate.insight is false\n")
            atomic_write_text(out / REPORT_FILE, render_off_notice(metrics))
        mlflow.set_tag("data_source", data.data_source)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("evaluate", main)
