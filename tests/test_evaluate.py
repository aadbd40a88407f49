"""Stage evaluate: the report files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipelines.evaluate import write_reports
from pipelines.scoring import evaluate_probabilities
from tests.test_scoring import hand_made_probs


def test_write_reports_writes_every_file(tmp_path: Path) -> None:
    # given an evaluation
    probs, y_true = hand_made_probs()
    result = evaluate_probabilities(probs, y_true, top_pairs=5)
    out = tmp_path / "reports"
    # when
    metrics = write_reports(result, y_true, out)
    # then metrics.json matches the returned dict, and holds numbers only (dvc metrics' headline)
    assert metrics == {"accuracy": 0.75, "loss": round(result.loss, 6), "n_test": 4}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # predictions.csv is actual/predicted per image (what dvc plots reads)
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["actual", "predicted"]
    assert predictions.values.tolist() == [[3, 3], [7, 7], [0, 0], [2, 4]]
    # the confusion matrix as a 10x10 CSV with a 'true' index
    cm = pd.read_csv(out / "confusion_matrix.csv", index_col="true")
    assert cm.shape == (10, 10)
    assert list(cm.columns) == [f"pred_{d}" for d in range(10)]
    assert cm.loc[2, "pred_4"] == 1 and cm.to_numpy().sum() == 4
    assert len(pd.read_csv(out / "per_class.csv")) == 10
    assert len(pd.read_csv(out / "confused_pairs.csv")) == 1
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp*"))
