"""Stage train: fit the CNN on the validated training images, with on-the-fly augmentation.

Pure core: ``train_model(params, policy, images, labels)``. ``main()`` adds the files, the MLflow
run (params, lineage tags, per-epoch metrics, artifacts) and resume-after-kill checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipelines.adversarial import AdversarialTraining
from pipelines.augment import build_augmenter
from pipelines.config import (
    AdversarialParams,
    AugmentParams,
    Params,
    TrainParams,
    apply_overrides,
    load_params,
)
from pipelines.constants import INPUT_SHAPE
from pipelines.data import SOURCE_FILE, atomic_write_text, load_raw
from pipelines.model import build_model, compute_dtype, serving_copy, to_model_input

log = logging.getLogger("pipelines.train")

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a training produced."""

    model: keras.Model
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def select_images(
    images: np.ndarray, labels: np.ndarray, params: TrainParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded subsample (``max_images``) then seeded train/validation split.

    Returns (x_fit, y_fit, x_val, y_val), images still (N, 28, 28) uint8.
    """
    order = np.random.default_rng(params.seed).permutation(len(images))
    if params.max_images:
        order = order[: params.max_images]
    n_val = max(1, int(round(len(order) * params.validation_split)))
    val, fit = order[:n_val], order[n_val:]
    return images[fit], labels[fit], images[val], labels[val]


def make_dataset(
    images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None
) -> tf.data.Dataset:
    """uint8 images -> batches of ((B, 28, 28, 1) float32 in [0, 1], (B,) int) with prefetch.

    tf.data's autotuner is switched off. Its model thread belongs to each iterator, and Keras
    creates a spare iterator at the end of every epoch and drops it at the start of the next: the
    drop waits for that thread's optimisation pass (py-spy: the main thread blocked in
    ``RootDataset::Iterator::~Iterator``; docs/results/2026-11-24-input-stalls.md), on a pipeline
    that needs no tuning (a cast and a scale per batch, two batches ahead).
    """
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    # Scale per batch, not per image: one vectorised op instead of N small ones.
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32)[..., None] / 255.0, y))
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)


class EpochDecay(keras.callbacks.Callback):
    """Multiply the current learning rate by ``factor`` at the start of every epoch after the first.

    It scales whatever rate the optimiser has, so ReduceLROnPlateau's cuts compound with it
    (keras' LearningRateScheduler would overwrite them). Without it, a noisy val_loss kept
    resetting the plateau counter and the rate barely decayed.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if epoch > 0 and self.factor != 1.0:
            lr = self.model.optimizer.learning_rate
            lr.assign(lr * self.factor)


class BatchNormCalibrator:
    """Sets each BatchNormalization's moving mean and variance to the exact statistics of clean images.

    Training sees augmented digits, so BatchNorm's moving statistics describe augmented inputs,
    while evaluation and serving see clean ones ("precise BN", Wu & Johnson 2021); the gain is on
    docs/results/2026-11-24-accuracy-history.md.

    The statistics are those of the model as served, in float32: a model that trains in
    ``mixed_bfloat16`` is measured through a float32 twin that gets its current weights. The
    layers up to each BatchNorm run as one compiled function (built once, reused every epoch);
    per-batch moments are pooled in float64. Layers are calibrated in order, each on the output of
    the already-calibrated ones before it.

    Args:
        model: the Sequential CNN from ``build_model`` (no augmentation layers).
        images: (N, 28, 28) uint8 clean training images.
    """

    def __init__(self, model: keras.Sequential, images: np.ndarray, batch_size: int = 1000):
        self.model = model
        self.twin = model
        if any(layer.compute_dtype != "float32" for layer in model.layers):
            self.twin = keras.models.clone_model(
                model,
                clone_function=lambda layer: layer.__class__.from_config(
                    {**layer.get_config(), "dtype": "float32"}
                ),
            )
        self.batches = [
            tf.constant(to_model_input(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        self.steps = [
            (layer, twin_layer, self._moments_through(self.twin.layers[:index]))
            for index, (layer, twin_layer) in enumerate(
                zip(model.layers, self.twin.layers, strict=True)
            )
            if isinstance(layer, keras.layers.BatchNormalization)
        ]

    @staticmethod
    def _moments_through(head: list[keras.layers.Layer]):
        @tf.function(input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.float32)])
        def moments(x):  # one trace, whatever the batch size
            for layer in head:
                x = layer(x, training=False)
            mean, variance = tf.nn.moments(x, axes=list(range(len(x.shape) - 1)))  # per channel
            return mean, variance, tf.reduce_prod(tf.shape(x)[:-1])

        return moments

    def __call__(self) -> None:
        if self.twin is not self.model:
            self.twin.set_weights(self.model.get_weights())
        for layer, twin_layer, moments in self.steps:
            # Per-batch float32 moments, pooled exactly in float64: E[x] and E[x^2] over all batches.
            parts = [moments(batch) for batch in self.batches]
            counts = np.array([float(n) for _, _, n in parts])[:, None]  # (batches, 1)
            means = np.stack([m.numpy() for m, _, _ in parts]).astype(np.float64)  # (batches, C)
            squares = np.stack([v.numpy() for _, v, _ in parts]).astype(np.float64) + means**2
            mean = (counts * means).sum(axis=0) / counts.sum()
            variance = np.maximum((counts * squares).sum(axis=0) / counts.sum() - mean**2, 0.0)
            for target in {id(layer): layer, id(twin_layer): twin_layer}.values():
                target.moving_mean.assign(mean.astype(np.float32))
                target.moving_variance.assign(variance.astype(np.float32))


def recalibrate_batchnorm(
    model: keras.Sequential, images: np.ndarray, batch_size: int = 1000
) -> None:
    """One-off ``BatchNormCalibrator(model, images, batch_size)()``."""
    BatchNormCalibrator(model, images, batch_size)()


class CleanBatchNorm(keras.callbacks.Callback):
    """Recalibrate BatchNorm on clean images before each validation, so that val_loss (which drives
    ReduceLROnPlateau, EarlyStopping and, if on, the restored best weights) measures the model as served."""

    def __init__(self, model: keras.Sequential, images: np.ndarray):
        super().__init__()
        self.calibrate = BatchNormCalibrator(model, images)

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.calibrate()


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch (metrics, learning rate, epoch and total time) and an optional hook."""

    def __init__(self, epochs: int, hook: EpochHook | None = None):
        super().__init__()
        self.epochs, self.hook = epochs, hook
        self.start = self.epoch_start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        metrics["epoch_seconds"] = now - self.epoch_start
        shown = "  ".join(
            f"{k} {metrics[k]:.4f}"
            for k in ("loss", "accuracy", "val_loss", "val_accuracy")
            if k in metrics
        )
        log.info(
            "epoch %d/%d  %s  lr %.1e  %.1f s (elapsed %.1f s)",
            epoch + 1,
            self.epochs,
            shown,
            metrics["learning_rate"],
            metrics["epoch_seconds"],
            now - self.start,
        )
        if self.hook is not None:
            self.hook(epoch, metrics)


def compile_for_training(model: keras.Model, params: TrainParams) -> None:
    """Adam at ``params.learning_rate`` (keeping an EMA of the weights if ``ema_momentum``),
    sparse cross-entropy, accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(
            params.learning_rate,
            use_ema=params.ema_momentum > 0,
            ema_momentum=params.ema_momentum or 0.99,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def training_callbacks(
    params: TrainParams,
    model: keras.Sequential,
    calibration_images: np.ndarray,
    on_epoch: EpochHook | None = None,
    backup_dir: Path | None = None,
    extra: list[keras.callbacks.Callback] | None = None,
) -> tuple[list[keras.callbacks.Callback], CleanBatchNorm | None]:
    """The callbacks of a training run, in order, and the clean-BatchNorm calibrator (call it once
    more after ``fit``: the final weights get their clean statistics; None if switched off).

    The learning-rate schedule is a per-epoch decay with ReduceLROnPlateau's cuts on top.
    ``extra`` callbacks run after the built-in ones, so they see clean-BatchNorm validation metrics.
    """
    callbacks: list[keras.callbacks.Callback] = [
        EpochDecay(params.lr_decay),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=params.lr_factor,
            patience=params.lr_patience,
            min_lr=params.min_learning_rate,
            verbose=0,
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=params.early_stopping_patience,
            restore_best_weights=params.restore_best_weights,
            verbose=0,
        ),
        EpochProgress(params.epochs, on_epoch),
        *(extra or []),
    ]
    clean_bn = None
    if params.bn_calibration_images:
        # Before EarlyStopping and the LR callbacks read val_loss (they act at epoch end; this at test begin).
        clean_bn = CleanBatchNorm(model, calibration_images[: params.bn_calibration_images])
        callbacks.insert(0, clean_bn)
    if params.ema_momentum:
        # Validation measures the averaged weights (swapped in before CleanBatchNorm recalibrates
        # for them, swapped out after); fit() ends by writing the averages into the model.
        callbacks.insert(0, keras.callbacks.SwapEMAWeights())
    if backup_dir is not None:
        # Saves model, optimiser and epoch after every epoch and restores them on a rerun;
        # deletes its files once fit() completes. (The LR-plateau and early-stopping counters
        # restart from zero after a resume: a compromise Keras makes, not us.)
        callbacks.insert(0, keras.callbacks.BackupAndRestore(str(backup_dir), save_freq="epoch"))
    return callbacks, clean_bn


def train_model(
    params: TrainParams,
    policy: AugmentParams,
    images: np.ndarray,
    labels: np.ndarray,
    on_epoch: EpochHook | None = None,
    backup_dir: Path | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    adversarial: AdversarialParams | None = None,
) -> TrainResult:
    """Fit the CNN. ``backup_dir`` enables per-epoch checkpoints that a rerun resumes from.

    ``callbacks`` run after the built-in ones, so they see clean-BatchNorm validation metrics
    (the tune stage's pruning callback). ``adversarial`` (if enabled) mixes FGSM copies into
    every training batch (``pipelines.adversarial.AdversarialTraining``).
    """
    keras.utils.set_random_seed(params.seed)
    x_fit, y_fit, x_val, y_val = select_images(images, labels, params)
    train_ds = make_dataset(x_fit, y_fit, params.batch_size, shuffle_seed=params.seed)
    val_ds = make_dataset(x_val, y_val, params.batch_size)

    dtype = compute_dtype(params.precision)
    model = build_model(params.model, fused_batchnorm=True, dtype=dtype)
    # Augmentation runs as the first layers of the graph being fitted (active only in training, on
    # whatever device trains), and shares its weights with `model`, which alone is saved: the
    # exported model never carries augmentation layers.
    fitted = model
    if adversarial is not None and adversarial.enabled:
        augmenter = build_augmenter(policy, seed=params.seed) if policy.enabled else None
        fitted = AdversarialTraining(model, augmenter, adversarial.epsilon, adversarial.ratio)
        fitted.build((None, *INPUT_SHAPE))
    elif policy.enabled:
        fitted = keras.Sequential(
            [keras.Input(shape=INPUT_SHAPE), build_augmenter(policy, seed=params.seed), model],
            name="train_graph",
        )
    compile_for_training(fitted, params)
    all_callbacks, clean_bn = training_callbacks(
        params, model, x_fit, on_epoch, backup_dir, callbacks
    )
    log.info(
        "training on %d images, validating on %d, batch %d, up to %d epochs, computing in %s, "
        "augmentation %s, %s",
        len(x_fit),
        len(x_val),
        params.batch_size,
        params.epochs,
        dtype,
        "on" if policy.enabled else "off",
        describe_adversarial(adversarial),
    )
    start = time.perf_counter()
    history = fitted.fit(
        train_ds,
        validation_data=val_ds,
        epochs=params.epochs,
        callbacks=all_callbacks,
        verbose=0,
        shuffle=False,
    )
    if clean_bn is not None:
        clean_bn.calibrate()  # the final (or restored best) weights get their clean statistics
    return TrainResult(
        model=serving_copy(model, params.model),
        history={k: [float(v) for v in vals] for k, vals in history.history.items()},
        seconds=time.perf_counter() - start,
    )


def describe_adversarial(adversarial: AdversarialParams | None) -> str:
    if adversarial is None or not adversarial.enabled:
        return "adversarial training off"
    return (
        f"adversarial training on (FGSM eps {adversarial.epsilon:g} "
        f"on {adversarial.ratio:.0%} of each batch)"
    )


def checkpoint_key(
    params: TrainParams,
    policy: AugmentParams,
    source_record: dict,
    adversarial: AdversarialParams | None = None,
) -> str:
    """A short hash of everything that defines a training, so a resume never mixes two of them."""
    blob = json.dumps(
        {
            "train": params.model_dump(),
            "compute_dtype": compute_dtype(params.precision),  # what "auto" means on this machine
            "augment": policy.model_dump(),
            "data": source_record.get("files"),
            **(adversarial.identity() if adversarial is not None else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tuned_settings(
    params: Params, policy: AugmentParams, best_file: Path
) -> tuple[Params, AugmentParams]:
    """The settings train uses: ``params`` and the augment stage's policy, with the tune stage's
    chosen overrides (``best_params.json``) applied."""
    if not best_file.exists():
        raise FileNotFoundError(
            f"{best_file}: no tuning result; run the tune stage first (dvc repro tune)"
        )
    tuned = json.loads(best_file.read_text())
    if not tuned["overrides"]:
        log.info("no tuned overrides (%s): params.yaml as it is", best_file)
        return params, policy
    log.info(
        "using trial %d of study %s (%s): %s",
        tuned["chosen_trial"],
        tuned["study"],
        tuned["reason"],
        tuned["overrides"],
    )
    return apply_overrides(params, policy, tuned["overrides"])


def main() -> None:
    import mlflow

    from pipelines import tracking
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--best-params", required=True, help="the tune stage's overrides")
    parser.add_argument("--preview", required=True)
    parser.add_argument("--validation-report", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    params, policy = tuned_settings(
        load_params(args.params),
        AugmentParams.model_validate_json(Path(args.policy).read_text()),
        Path(args.best_params),
    )
    raw = Path(args.raw)
    data = load_raw(raw, params.ingest.file_names)
    source_record = json.loads((raw / SOURCE_FILE).read_text())
    out = Path(args.out)

    backup_dir = Path(args.checkpoints) / checkpoint_key(
        params.train, policy, source_record, params.adversarial
    )
    resume_file = backup_dir / "mlflow_run_id"
    resume_id = resume_file.read_text().strip() if resume_file.exists() else None
    if resume_id:
        log.info("resuming from checkpoint %s (MLflow run %s)", backup_dir, resume_id)

    with tracking.training_run(
        params, out / tracking.RUN_FILE, source_record, run_id=resume_id
    ) as run_id:
        backup_dir.mkdir(parents=True, exist_ok=True)
        resume_file.write_text(run_id)
        mlflow.set_tag("compute_dtype", compute_dtype(params.train.precision))
        for artifact in (args.preview, args.validation_report):
            if Path(artifact).exists():
                mlflow.log_artifact(artifact, artifact_path="data")

        def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch)

        result = train_model(
            params.train,
            policy,
            data.x_train,
            data.y_train,
            log_epoch,
            backup_dir,
            adversarial=params.adversarial,
        )
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.tmp.keras"
        result.model.save(tmp)
        tmp.replace(out / "model.keras")
        rows = ["epoch," + ",".join(result.history)]
        rows += [
            f"{i}," + ",".join(f"{result.history[k][i]:.6f}" for k in result.history)
            for i in range(len(next(iter(result.history.values()))))
        ]
        atomic_write_text(out / "history.csv", "\n".join(rows) + "\n")
        mlflow.log_artifact(str(out / "history.csv"))
        mlflow.log_metrics({"train_seconds": result.seconds, "epochs_run": len(rows) - 1})
    shutil.rmtree(backup_dir, ignore_errors=True)
    log.info("model saved to %s (MLflow run %s)", out / "model.keras", run_id)


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("train", main)
