"""Benchmark: training throughput of the project's training path against the seed article's recipe.

Baseline: SEED, benchmarks/seed_recipe.py (stock Keras layers, `model.fit` on NumPy arrays,
batch 128, 20% validation split, TensorFlow's default runtime settings on this machine).
Compared: PROJECT, pipelines.train.train_model on the seed's model with params.yaml's augmentation policy
(tf.data input without the autotuner, one fused affine augmentation, fused BatchNorm kernel,
oneDNN, and ``train.precision`` from params.yaml: ``auto`` is bfloat16 mixed precision on a CPU with
native bfloat16); the same path in float32; and in float32 with oneDNN forced off. The last two
separate what the precision, the runtime setting and the code each bring.

Each mode trains the same model for the same number of epochs on the same images (by default
all 60,000, the real training job), in a fresh process, modes interleaved, ``--repeats`` times.
Throughput is training images per epoch times epochs over the summed epoch wall time (validation
and every callback included). Printed: the median of the repeats per mode, its ratio to the seed
recipe, each mode's test accuracy, and the same throughput without the time each epoch spent
before its first batch. In the seed recipe that wait is Keras dropping a spare tf.data iterator
whose autotuning thread is busy (docs/results/2026-11-24-input-stalls.md; the project switches
the autotuner off: pipelines.train.make_dataset).

    python -m benchmarks.speed                      # full data, 3 epochs, 3 repeats (~15 min here)
    python -m benchmarks.speed --images 12000       # a seeded slice: per-epoch costs weigh more
    python -m benchmarks.speed --modes seed project # only these modes (the seed recipe always runs)
"""

from __future__ import annotations

import os

# Captured before `pipelines` is imported (it switches oneDNN on by default): the seed recipe runs
# with the environment exactly as the user has it.
USER_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SEED = "seed recipe (baseline)"
MODES = {
    # short name: (printed name, command after `python -m`,
    #              TF_ENABLE_ONEDNN_OPTS for the child; None = as the user has it)
    "seed": (SEED, "benchmarks.seed_recipe", None),
    "onednn-off": (
        "project, f32, oneDNN off",
        "benchmarks.speed --worker --precision float32",
        "0",
    ),
    "float32": ("project, float32", "benchmarks.speed --worker --precision float32", "1"),
    "project": ("project", "benchmarks.speed --worker", "1"),
}


def worker(data_path: str, epochs: int, precision: str | None) -> None:
    """Train with the project's path on the slice and print the same JSON line as seed_recipe."""
    from benchmarks.seed_recipe import EpochTimer
    from pipelines.config import load_params
    from pipelines.model import compute_dtype, to_model_input
    from pipelines.train import select_images, train_model

    params = load_params()
    data = np.load(data_path)
    # The seed article's model, whatever params.yaml's default is: the same network in every mode.
    seed_model = params.train.model.model_copy(
        update={"conv1_filters": 32, "conv2_filters": 64, "conv3_filters": 0, "kernel_size": 3,
                "padding": "valid", "dense_units": 128, "dropout": 0.5}
    )  # fmt: skip
    train = params.train.model_copy(
        update={
            "epochs": epochs,
            "early_stopping_patience": epochs,
            "max_images": 0,
            "model": seed_model,
            "ema_momentum": 0.0,  # the seed recipe keeps no weight average: same maths, no extra op
            "precision": precision or params.train.precision,
        }
    )
    timer = EpochTimer()  # the seed recipe's timer, last among the callbacks as there
    result = train_model(train, params.augment, data["x_train"], data["y_train"], callbacks=[timer])
    probs = result.model.predict(to_model_input(data["x_test"]), batch_size=1000, verbose=0)
    fit_images = len(select_images(data["x_train"], data["y_train"], train)[0])
    print(
        json.dumps(
            {
                "epoch_seconds": timer.seconds,
                "epoch_wait_seconds": timer.waits,
                "train_images": fit_images,
                "compute_dtype": compute_dtype(train.precision),
                "test_accuracy": float((probs.argmax(axis=1) == data["y_test"]).mean()),
            }
        ),
        flush=True,
    )


def run_mode(command: str, onednn: str | None, data_path: str, epochs: int) -> dict:
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    value = onednn if onednn is not None else USER_ONEDNN
    if value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = value
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = [sys.executable, "-m", *command.split(), "--data", data_path, "--epochs", str(epochs)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark mode {command!r} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    images = result["train_images"] * len(result["epoch_seconds"])
    result["wait_seconds"] = sum(result["epoch_wait_seconds"])
    result["images_per_second"] = images / sum(result["epoch_seconds"])
    result["images_per_second_no_wait"] = images / (
        sum(result["epoch_seconds"]) - result["wait_seconds"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=0, help="training images in a seeded slice; 0 = all"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="modes to run (default: all); the seed recipe is always one of them",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.data, args.epochs, args.precision)
        return
    modes = {MODES[key][0]: MODES[key][1:] for key in MODES if key in {"seed", *args.modes}}

    from pipelines.config import load_params
    from pipelines.data import load_raw

    data = load_raw(args.raw, load_params().ingest.file_names)
    pick = np.random.default_rng(0).permutation(len(data.x_train))[: args.images or None]
    results: dict[str, list[dict]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "slice.npz")
        np.savez(
            data_path,
            x_train=data.x_train[pick],
            y_train=data.y_train[pick],
            x_test=data.x_test,
            y_test=data.y_test,
        )
        for repeat in range(args.repeats):
            for name, (command, onednn) in modes.items():
                r = run_mode(command, onednn, data_path, args.epochs)
                results[name].append(r)
                print(
                    f"repeat {repeat + 1}/{args.repeats}  {name:24} {r['images_per_second']:7.0f} img/s"
                    f"  epochs {[round(s, 1) for s in r['epoch_seconds']]} s"
                    f" (before the first batch {[round(s, 1) for s in r['epoch_wait_seconds']]})"
                    f"  test acc {r['test_accuracy']:.4f}",
                    flush=True,
                )

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(
        f"\n{len(pick)} images ({data.data_source}), {args.epochs} epochs, "
        f"median of {args.repeats} repeats; ratio = throughput / seed recipe's.\n"
        "wait = seconds per run spent before each epoch's first batch (input pipeline); "
        "the two columns after it leave it out; computes in = the Keras dtype policy of training"
    )
    print(
        f"{'mode':24} {'train img/epoch':>15} {'img/s':>7} {'ratio':>6} {'wait s':>7}"
        f" {'img/s':>7} {'ratio':>6} {'test acc':>9} {'computes in':>15}"
    )
    for name, runs in results.items():
        ips, bare = median(name, "images_per_second"), median(name, "images_per_second_no_wait")
        print(
            f"{name:24} {runs[0]['train_images']:15d} {ips:7.0f}"
            f" {ips / median(SEED, 'images_per_second'):5.2f}x {median(name, 'wait_seconds'):7.1f}"
            f" {bare:7.0f} {bare / median(SEED, 'images_per_second_no_wait'):5.2f}x"
            f" {median(name, 'test_accuracy'):9.4f} {runs[0].get('compute_dtype', 'float32'):>15}"
        )


if __name__ == "__main__":
    main()
