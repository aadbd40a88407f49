"""Stage evaluate: score the trained model on the whole test set and log the results to its run.

Writes metrics.json (for `dvc metrics`), predictions.csv (for `dvc plots`' confusion matrix),
the 10x10 confusion matrix as CSV and PNG, per-class precision/recall/F1 and the most-confused
pairs; logs all of it onto the training run in MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import load_params
from pipelines.data import atomic_write_text, load_raw, save_figure, write_json

log = logging.getLogger("pipelines.evaluate")

NUM_CLASSES = 10


@dataclass(frozen=True)
class Evaluation:
    """Test-set results of one model."""

    accuracy: float
    loss: float
    confusion: np.ndarray  # (10, 10) int, rows = true digit, columns = predicted digit
    per_class: pd.DataFrame  # digit, precision, recall, f1, support
    confused_pairs: (
        pd.DataFrame
    )  # true, predicted, count, share_of_true (off-diagonal, largest first)
    predicted: np.ndarray  # (N,) int


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int = NUM_CLASSES) -> np.ndarray:
    """(n, n) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return cm


def per_class_metrics(cm: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return pd.DataFrame(
        {
            "digit": range(len(cm)),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    )


def most_confused_pairs(cm: np.ndarray, top: int) -> pd.DataFrame:
    """Off-diagonal cells, largest count first: which digit was taken for which."""
    rows = [
        {
            "true": t,
            "predicted": p,
            "count": int(cm[t, p]),
            "share_of_true": cm[t, p] / max(1, cm[t].sum()),
        }
        for t in range(len(cm))
        for p in range(len(cm))
        if t != p and cm[t, p] > 0
    ]
    frame = pd.DataFrame(rows, columns=["true", "predicted", "count", "share_of_true"])
    return (
        frame.sort_values(["count", "true", "predicted"], ascending=[False, True, True])
        .head(top)
        .reset_index(drop=True)
    )


def evaluate_probabilities(probs: np.ndarray, y_true: np.ndarray, top_pairs: int) -> Evaluation:
    """Score (N, 10) predicted probabilities against (N,) labels."""
    y_true = y_true.astype(np.int64)
    predicted = probs.argmax(axis=1)
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0))))
    cm = confusion_matrix(y_true, predicted)
    return Evaluation(
        accuracy=float((predicted == y_true).mean()),
        loss=loss,
        confusion=cm,
        per_class=per_class_metrics(cm),
        confused_pairs=most_confused_pairs(cm, top_pairs),
        predicted=predicted,
    )


def predict_probabilities(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 10) float probabilities."""
    from pipelines.model import to_model_input

    return np.asarray(model.predict(to_model_input(images), batch_size=batch_size, verbose=0))


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


def write_reports(result: Evaluation, y_true: np.ndarray, data_source: str, out: Path) -> dict:
    """Write every report file into ``out``; return the metrics dict."""
    metrics = {
        "accuracy": round(result.accuracy, 6),
        "loss": round(result.loss, 6),
        "n_test": int(len(y_true)),
        "data_source": data_source,
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
        index=pd.Index(range(10), name="true"),
        columns=[f"pred_{d}" for d in range(10)],
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


def main() -> None:
    import keras
    import mlflow

    from pipelines import tracking
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", default="data/dataset")
    parser.add_argument("--model", default="data/model")
    parser.add_argument("--out", default="data/reports")
    args = parser.parse_args()
    params = load_params(args.params)
    data = load_raw(Path(args.raw), params.ingest.file_names)
    model_dir, out = Path(args.model), Path(args.out)
    model = keras.models.load_model(model_dir / "model.keras")
    probs = predict_probabilities(model, data.x_test, params.evaluate.batch_size)
    result = evaluate_probabilities(probs, data.y_test, params.evaluate.top_confused_pairs)
    metrics = write_reports(result, data.y_test, data.data_source, out)
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

    with tracking.attach_run(model_dir / tracking.RUN_FILE, params.tracking.experiment):
        mlflow.log_metrics({"test_accuracy": result.accuracy, "test_loss": result.loss})
        for row in result.per_class.itertuples(index=False):
            mlflow.log_metrics(
                {
                    f"test_precision_{row.digit}": row.precision,
                    f"test_recall_{row.digit}": row.recall,
                    f"test_f1_{row.digit}": row.f1,
                }
            )
        mlflow.set_tag("data_source", metrics["data_source"])
        mlflow.log_artifacts(str(out), artifact_path="evaluation")


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("evaluate", main)
