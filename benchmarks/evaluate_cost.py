"""Benchmark: what the insight (Grad-CAM, error analysis, FGSM, calibration, HTML report) adds to
the evaluate stage's time on the full test set.

Baseline: METRICS ONLY, ``python -m pipelines.evaluate`` with ``evaluate.insight: false`` (metrics,
confusion matrix, per-class table, MLflow logging). Compared: WITH INSIGHT, the same command with
params.yaml as it is. Each is the whole stage as `dvc repro` runs it, in a fresh process (Python
and TensorFlow start-up included), on the trained model in data/model, modes interleaved,
``--repeats`` times, logging to a scratch MLflow store (the real runs are not touched). Printed:
the median wall time of each mode and the ratio. The issue's bar: at most 1.20x.

    python -m benchmarks.evaluate_cost              # needs a trained model (make run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def scratch_run(store: Path, model_dir: Path) -> None:
    """A training run in a scratch store for evaluate to log onto, named in model_dir/run.json."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_experiment("evaluate-cost")
    with mlflow.start_run(run_name="train") as run:
        mlflow.set_tags({"git_commit": "benchmark", "data_version": "benchmark"})
    (model_dir / "run.json").write_text(json.dumps({"run_id": run.info.run_id}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default="data/dataset")
    parser.add_argument("--model", default="data/model/model.keras")
    parser.add_argument("--best-params", default="data/tune/best_params.json")
    args = parser.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(
            f"{args.model}: no trained model; run `make run` (or dvc repro train) first"
        )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        model_dir.mkdir()
        shutil.copyfile(args.model, model_dir / "model.keras")
        store = tmp / "mlflow.db"
        scratch_run(store, model_dir)
        params = yaml.safe_load(Path(args.params).read_text())
        modes = {}
        for name, insight in (("metrics only (baseline)", False), ("with insight", True)):
            params["evaluate"]["insight"] = insight
            params["tracking"]["experiment"] = "evaluate-cost"
            path = tmp / f"params-{insight}.yaml"
            path.write_text(yaml.safe_dump(params))
            modes[name] = path
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        seconds: dict[str, list[float]] = {name: [] for name in modes}
        for repeat in range(args.repeats):
            for name, params_file in modes.items():
                argv = [
                    sys.executable, "-m", "pipelines.evaluate", "--params", str(params_file),
                    "--raw", args.raw, "--model", str(model_dir), "--out", str(tmp / "reports"),
                    "--best-params", args.best_params,
                ]  # fmt: skip
                start = time.perf_counter()
                done = subprocess.run(argv, env=env, capture_output=True, text=True)
                elapsed = time.perf_counter() - start
                if done.returncode != 0:
                    raise SystemExit(f"evaluate ({name}) failed:\n{done.stderr[-3000:]}")
                seconds[name].append(elapsed)
                print(f"repeat {repeat + 1}/{args.repeats}  {name:24} {elapsed:6.1f} s", flush=True)
    base = statistics.median(seconds["metrics only (baseline)"])
    print(f"\nevaluate stage wall time, full test set, median of {args.repeats}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:24} {median:6.1f} s {median / base:6.2f}x  (+{median - base:.1f} s)")


if __name__ == "__main__":
    main()
