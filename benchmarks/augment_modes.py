"""Benchmark: augmentation on the fly (the pipeline's way) vs precomputed variants.

Baseline: ON THE FLY, as pipelines/train.py does it (augmentation layers in the fitted graph,
fresh variants every epoch). Alternative: PRECOMPUTED, one seeded augmented copy of the
training slice per epoch, made once up front (what a DVC-cached augment output would hold),
then plain training on copy e in epoch e. Both use the same model (fused BatchNorm), params,
callbacks (pipelines.train.training_callbacks: schedule, clean BatchNorm, weight average), slice
and epochs, in one fit() each: only where the augmentation happens differs.

Prints, per mode: one-off precompute time, epochs run, median seconds per epoch, total time and test accuracy
on the full test set, and each figure's ratio against the on-the-fly baseline.

    python -m benchmarks.augment_modes --images 12000 --epochs 5
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import keras
import numpy as np

from pipelines.augment import augment_batch, build_augmenter
from pipelines.config import load_params
from pipelines.data import load_raw
from pipelines.model import build_model, to_model_input
from pipelines.train import (
    compile_for_training,
    make_dataset,
    select_images,
    train_model,
    training_callbacks,
)


def precomputed_run(params, policy, x, y, x_test, y_test):
    """Make one augmented copy of the fitted images per epoch up front, then train as train_model
    does (same model, optimiser, callbacks and weight average), epoch e on copy e."""
    keras.utils.set_random_seed(params.seed)
    x_fit, y_fit, x_val, y_val = select_images(x, y, params)
    augmenter = build_augmenter(policy, seed=params.seed)
    start = time.perf_counter()
    copies = []
    for _ in range(params.epochs):
        chunks = [
            augment_batch(augmenter, to_model_input(x_fit[i : i + 1024]))
            for i in range(0, len(x_fit), 1024)
        ]
        copies.append((np.concatenate(chunks)[..., 0] * 255).round().astype(np.uint8))
    precompute_s = time.perf_counter() - start

    model = build_model(params.model, fused_batchnorm=True)
    compile_for_training(model, params)
    epoch_times: list[float] = []
    callbacks, clean_bn = training_callbacks(
        params, model, x_fit, on_epoch=lambda e, m: epoch_times.append(m["epoch_seconds"])
    )
    # One fit() over all epochs, as train_model runs it (the schedule's counters and the weight
    # average live across epochs): the copies back to back, each shuffled; an epoch is one copy.
    batches = [
        make_dataset(images, y_fit, params.batch_size, shuffle_seed=params.seed + epoch)
        for epoch, images in enumerate(copies)
    ]
    model.fit(
        functools.reduce(lambda a, b: a.concatenate(b), batches),
        validation_data=make_dataset(x_val, y_val, params.batch_size),
        epochs=params.epochs,
        steps_per_epoch=math.ceil(len(x_fit) / params.batch_size),
        verbose=0,
        callbacks=callbacks,
    )
    if clean_bn is not None:
        clean_bn.calibrate()
    return precompute_s, epoch_times, test_accuracy(model, x_test, y_test)


def online_run(params, policy, x, y, x_test, y_test):
    epoch_times: list[float] = []
    result = train_model(
        params, policy, x, y, on_epoch=lambda e, m: epoch_times.append(m["epoch_seconds"])
    )
    return 0.0, epoch_times, test_accuracy(result.model, x_test, y_test)


def test_accuracy(model, x_test, y_test) -> float:
    probs = model.predict(to_model_input(x_test), batch_size=1000, verbose=0)
    return float((probs.argmax(axis=1) == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12000, help="training images (0 = all)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--raw", default="data/raw")
    args = parser.parse_args()
    all_params = load_params()
    # Callbacks that could stop one mode early are disabled by a patience beyond the epoch count.
    params = all_params.train.model_copy(
        update={
            "max_images": args.images,
            "epochs": args.epochs,
            "early_stopping_patience": args.epochs,
        }
    )
    data = load_raw(args.raw, all_params.ingest.file_names)
    rows = {}
    for name, fn in (("on the fly (baseline)", online_run), ("precomputed", precomputed_run)):
        print(f"--- {name}", flush=True)
        pre, epochs, acc = fn(
            params, all_params.augment, data.x_train, data.y_train, data.x_test, data.y_test
        )
        rows[name] = (pre, len(epochs), statistics.median(epochs), pre + sum(epochs), acc)
    base = rows["on the fly (baseline)"]
    print(
        f"\n{args.images or len(data.x_train)} training images, {args.epochs} epochs, data_source={data.data_source}"
    )
    print(
        f"{'mode':24} {'precompute s':>12} {'epochs':>6} {'median epoch s':>15} {'total s':>9}"
        f" {'test acc':>9}  ratios vs baseline (epoch, total)"
    )
    for name, (pre, n, med, total, acc) in rows.items():
        print(
            f"{name:24} {pre:12.3f} {n:6d} {med:15.2f} {total:9.1f} {acc:9.4f}"
            f"  {med / base[2]:.2f}x, {total / base[3]:.2f}x"
        )


if __name__ == "__main__":
    main()
