"""Benchmark: wall time to reach the seed recipe's final test accuracy, seed recipe against project.

Baseline: SEED, benchmarks/seed_recipe.py trained as the article does it (30 epochs at most,
EarlyStopping patience 5 with the best weights restored). Its final test accuracy is the target,
and its whole training time is what the project has to beat.
Compared: PROJECT, pipelines.train.train_model with params.yaml and the tune stage's
best_params.json (what `dvc repro` trains), or with ``--set key=value`` overrides.

Both train on the same data in fresh processes, one after the other, with test accuracy measured
after every epoch outside the timed epoch (validation and callbacks are inside it). Printed: each
epoch's cumulative training seconds and test accuracy, the first epoch where the project reaches
the target, and the ratio of the seed's total time to that. One run of each: a full-data run takes
~15 minutes per mode on 2 cores, and this VM's speed drifts over minutes, so read the ratio with
that in mind (benchmarks/speed.py gives the interleaved median throughput).

    python -m benchmarks.time_to_accuracy                # full data, both modes (~30 min)
    python -m benchmarks.time_to_accuracy --only project --set train.model.conv3_filters=128
"""

from __future__ import annotations

import os

USER_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS")  # before `pipelines` switches oneDNN on

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def parse_set(items: list[str]) -> dict[str, object]:
    """``["train.epochs=30", ...]`` -> ``{"train.epochs": 30}``, values read as YAML scalars."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def worker(data_path: str, best_params: str, overrides: dict[str, object]) -> None:
    """Train the project's path on the data, testing after every epoch; print one JSON line."""
    import keras

    from pipelines.config import apply_overrides, load_params
    from pipelines.model import to_model_input
    from pipelines.train import train_model

    params = load_params()
    policy = params.augment
    tuned = json.loads(Path(best_params).read_text())["overrides"] if best_params else {}
    params, policy = apply_overrides(params, policy, {**tuned, **overrides})
    data = np.load(data_path)
    x_test = to_model_input(data["x_test"])
    seconds: list[float] = []
    accuracy: list[float] = []

    class EpochTest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after EpochProgress took the epoch's time
            swap = keras.callbacks.SwapEMAWeights()  # test the averaged weights, as validation does
            if params.train.ema_momentum:
                swap.set_model(self.model)
                swap.on_test_begin()
            probs = self.model.predict(x_test, batch_size=1000, verbose=0)
            if params.train.ema_momentum:
                swap.on_test_end()
            accuracy.append(float((probs.argmax(axis=1) == data["y_test"]).mean()))

    result = train_model(
        params.train,
        policy,
        data["x_train"],
        data["y_train"],
        on_epoch=lambda epoch, metrics: seconds.append(metrics["epoch_seconds"]),
        callbacks=[EpochTest()],
    )
    probs = result.model.predict(x_test, batch_size=1000, verbose=0)
    print(
        json.dumps(
            {
                "settings": {**tuned, **overrides},
                "epoch_seconds": seconds,
                "epoch_test_accuracy": accuracy,
                "test_accuracy": float((probs.argmax(axis=1) == data["y_test"]).mean()),
            }
        ),
        flush=True,
    )


def run(argv: list[str], onednn: str | None) -> dict:
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # stderr (the per-epoch progress lines) passes through: a full-data mode runs ~15 minutes.
    done = subprocess.run([sys.executable, "-m", *argv], env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed with exit code {done.returncode} (its log is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(name: str, result: dict) -> None:
    total = 0.0
    print(f"\n{name}: final test accuracy {result['test_accuracy']:.4f}")
    pairs = zip(result["epoch_seconds"], result["epoch_test_accuracy"], strict=True)
    for epoch, (seconds, acc) in enumerate(pairs):
        total += seconds
        print(f"  epoch {epoch + 1:2d}  {total:7.1f} s  test acc {acc:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=0, help="training images; 0 = all")
    parser.add_argument("--seed-epochs", type=int, default=30)
    parser.add_argument("--seed-patience", type=int, default=5)
    parser.add_argument("--only", choices=["seed", "project"], help="run one mode")
    parser.add_argument(
        "--target", type=float, help="accuracy to reach (default: the seed run's final accuracy)"
    )
    parser.add_argument(
        "--best-params",
        default="data/tune/best_params.json",
        help="the tune stage's overrides; a missing file (e.g. 'none'): params.yaml as it is",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    best = args.best_params if Path(args.best_params).exists() else ""
    if args.worker:
        from pipelines.cli import configure_logging

        configure_logging()  # the per-epoch progress lines
        worker(args.data, best, parse_set(args.set))
        return

    from pipelines.config import load_params
    from pipelines.data import load_raw

    data = load_raw(args.raw, load_params().ingest.file_names)
    pick = np.random.default_rng(0).permutation(len(data.x_train))[: args.images or None]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "data.npz")
        np.savez(path, x_train=data.x_train[pick], y_train=data.y_train[pick],
                 x_test=data.x_test, y_test=data.y_test)  # fmt: skip
        if args.only != "project":
            results["seed"] = run(
                ["benchmarks.seed_recipe", "--data", path, "--test-each-epoch",
                 "--epochs", str(args.seed_epochs), "--patience", str(args.seed_patience)],
                USER_ONEDNN,
            )  # fmt: skip
            show("seed recipe", results["seed"])
        if args.only != "seed":
            extra = [f"--set={item}" for item in args.set]
            results["project"] = run(
                ["benchmarks.time_to_accuracy", "--worker", "--data", path,
                 "--best-params", best or "none", *extra],
                "1",
            )  # fmt: skip
            show(f"project {results['project']['settings']}", results["project"])
    target = args.target or results.get("seed", {}).get("test_accuracy")
    if target is None or "project" not in results:
        return
    project = results["project"]
    elapsed = np.cumsum(project["epoch_seconds"])
    hits = [i for i, acc in enumerate(project["epoch_test_accuracy"]) if acc >= target]
    print(f"\ntarget: test accuracy {target:.4f}")
    if not hits:
        print("project: never reached it")
        return
    print(f"project: reached at epoch {hits[0] + 1}, after {elapsed[hits[0]]:.1f} s of training")
    if "seed" in results:
        seed_total = sum(results["seed"]["epoch_seconds"])
        print(
            f"seed recipe: {seed_total:.1f} s for its {len(results['seed']['epoch_seconds'])} epochs"
            f" -> project is {seed_total / elapsed[hits[0]]:.2f}x faster to the seed's accuracy"
        )


if __name__ == "__main__":
    main()
