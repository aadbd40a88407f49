"""Scoring: the metrics, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.scoring import (
    confusion_matrix,
    evaluate_probabilities,
    most_confused_pairs,
    per_class_metrics,
)

# 3 classes: true 0,0,0,1,1,2 predicted 0,0,1,1,2,2
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def test_confusion_matrix_counts_rows_true_columns_predicted() -> None:
    cm = confusion_matrix(Y_TRUE, Y_PRED, n=3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.dtype == np.int64


def test_confusion_matrix_defaults_to_ten_digits() -> None:
    cm = confusion_matrix(np.array([9, 9, 3]), np.array([9, 4, 3]))
    assert cm.shape == (10, 10)
    assert cm[9, 9] == 1 and cm[9, 4] == 1 and cm[3, 3] == 1 and cm.sum() == 3


def test_per_class_metrics_by_hand() -> None:
    # given the 3-class matrix [[2,1,0],[0,1,1],[0,0,1]]
    cm = confusion_matrix(Y_TRUE, Y_PRED, n=3)
    # when
    frame = per_class_metrics(cm)
    # then precision = tp/column, recall = tp/row, f1 = harmonic mean
    assert frame["digit"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(frame["precision"], [2 / 2, 1 / 2, 1 / 2])
    np.testing.assert_allclose(frame["recall"], [2 / 3, 1 / 2, 1 / 1])
    np.testing.assert_allclose(frame["f1"], [0.8, 0.5, 2 / 3])
    assert frame["support"].tolist() == [3, 2, 1]


def test_per_class_metrics_are_zero_where_undefined() -> None:
    # given a class that is never true nor predicted, and one never predicted
    cm = np.array([[3, 0, 0], [2, 0, 0], [0, 0, 0]])
    frame = per_class_metrics(cm)
    assert frame.loc[1, ["precision", "recall", "f1"]].tolist() == [0.0, 0.0, 0.0]
    assert frame.loc[2, ["precision", "recall", "f1", "support"]].tolist() == [0, 0, 0, 0]
    assert frame.loc[0, "precision"] == pytest.approx(3 / 5)


def test_most_confused_pairs_orders_by_count_then_digits() -> None:
    # given off-diagonal counts with a tie (2->1 and 0->2 both 3)
    cm = np.array([[10, 1, 3], [0, 10, 0], [5, 3, 10]])
    # when
    pairs = most_confused_pairs(cm, top=3)
    # then largest first, ties by true digit, the diagonal never listed, cut at `top`
    assert list(pairs.columns) == ["true", "predicted", "count", "share_of_true"]
    assert list(zip(pairs["true"], pairs["predicted"], pairs["count"], strict=True)) == [
        (2, 0, 5),
        (0, 2, 3),
        (2, 1, 3),
    ]
    assert pairs.loc[0, "share_of_true"] == pytest.approx(5 / 18)
    assert len(most_confused_pairs(cm, top=10)) == 4  # only the non-zero off-diagonal cells


def test_most_confused_pairs_of_a_perfect_model_is_empty() -> None:
    pairs = most_confused_pairs(np.diag([5, 5, 5]), top=5)
    assert pairs.empty
    assert list(pairs.columns) == ["true", "predicted", "count", "share_of_true"]


def hand_made_probs() -> tuple[np.ndarray, np.ndarray]:
    """4 images: three right (p=0.9, 0.6, 0.5), one wrong with p(true)=0.2."""
    probs = np.full((4, 10), 0.0)
    probs[0, 3], probs[0, 5] = 0.9, 0.1  # true 3, right
    probs[1, 7], probs[1, 1] = 0.6, 0.4  # true 7, right
    probs[2, 0], probs[2, 8] = 0.5, 0.5 - 1e-9  # true 0, right
    probs[3, 2], probs[3, 4] = 0.2, 0.8  # true 2, predicted 4
    return probs, np.array([3, 7, 0, 2], dtype=np.uint8)


def test_evaluate_probabilities_by_hand() -> None:
    # given
    probs, y_true = hand_made_probs()
    # when
    result = evaluate_probabilities(probs, y_true, top_pairs=5)
    # then accuracy = 3/4 and loss = mean cross-entropy of the true class
    assert result.accuracy == pytest.approx(0.75)
    expected_loss = -(math.log(0.9) + math.log(0.6) + math.log(0.5) + math.log(0.2)) / 4
    assert result.loss == pytest.approx(expected_loss)
    assert result.predicted.tolist() == [3, 7, 0, 4]
    assert result.confusion.sum() == 4 and result.confusion[2, 4] == 1
    assert result.confused_pairs[["true", "predicted", "count"]].values.tolist() == [[2, 4, 1]]


def test_zero_probability_for_the_true_class_gives_a_finite_loss() -> None:
    probs = np.zeros((1, 10))
    probs[0, 1] = 1.0
    result = evaluate_probabilities(probs, np.array([0]), top_pairs=1)
    assert result.accuracy == 0.0
    assert result.loss == pytest.approx(-math.log(1e-7))
