"""Scoring predictions against labels: pure functions of arrays, shared by evaluate and insight."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.constants import NUM_CLASSES


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
