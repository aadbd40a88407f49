"""The CNN, as a pure function of typed params. Imports no tuning or tracking code."""

from __future__ import annotations

import functools
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipelines.config import ModelParams
from pipelines.constants import INPUT_SHAPE, NUM_CLASSES

# CPU features that give oneDNN native bfloat16 arithmetic (/proc/cpuinfo's names)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def native_bf16_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True if the CPU computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN needs it to."""
    try:
        flags = next(
            (line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
             if line.startswith("flags")),
            [],
        )  # fmt: skip
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def compute_dtype(precision: str) -> str:
    """``train.precision`` -> the Keras dtype policy that training computes in.

    ``float32``: everything in float32. ``bfloat16``: Keras' ``mixed_bfloat16`` (convolutions,
    matrix products and BatchNorm in bfloat16; weights, optimiser, loss and the softmax in
    float32). ``auto``: ``mixed_bfloat16`` on a CPU with native bfloat16, where it makes the training
    step faster (docs/results/2026-11-24-training-speed-float32.md), ``float32`` otherwise, GPUs
    included (not measured on a GPU yet).
    """
    if precision == "float32":
        return "float32"
    if precision == "bfloat16":
        return "mixed_bfloat16"
    if tf.config.list_physical_devices("GPU") or not native_bf16_cpu():
        return "float32"
    return "mixed_bfloat16"


def to_model_input(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 in [0, 255] -> (N, 28, 28, 1) float32 in [0, 1]."""
    return (np.asarray(images, dtype=np.float32) / 255.0)[..., np.newaxis]


def predict_probabilities(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 10) float probabilities, from a Keras model."""
    return np.asarray(model.predict(to_model_input(images), batch_size=batch_size, verbose=0))


class FusedBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization whose training step is TensorFlow's fused kernel (FusedBatchNormV3).

    Same maths as the stock layer: normalise with the batch mean and (biased) variance, scale by
    gamma, shift by beta, and move the moving statistics by ``1 - momentum`` towards the batch's.
    tf.keras 2 used this kernel by default; Keras 3 computes BatchNorm from a dozen separate ops,
    which made it the most expensive part of our training step (benchmarks/speed.py). Used only
    while training: ``serving_copy`` turns a model back into stock layers with the same weights.
    """

    def call(self, inputs, training: bool = False):
        if not training or self.axis not in (-1, len(inputs.shape) - 1) or len(inputs.shape) != 4:
            return super().call(inputs, training=training)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=self.gamma,
            offset=self.beta,
            mean=self.moving_mean,
            variance=self.moving_variance,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0 - self.momentum,  # returns the updated moving statistics
            data_format="NHWC",
            is_training=True,
        )
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return outputs


def build_model(
    params: ModelParams, fused_batchnorm: bool = False, dtype: str = "float32"
) -> keras.Model:
    """Conv-BN-Pool x2 (then Conv-BN with ``conv3_filters``), Dense, Dropout, softmax. Uncompiled.

    The baseline (``conv3_filters: 0``, ``padding: valid``) is the seed article's network:
    28 -> conv 26 -> pool 13 -> conv 11 -> pool 5. ``fused_batchnorm=True`` builds the training
    variant (same weights, faster BatchNorm step). ``dtype`` is the Keras dtype policy of every
    layer but the softmax, which stays float32 (``compute_dtype``); the weights are float32 in
    every policy, so a ``mixed_bfloat16`` model's weights load into a float32 one unchanged.
    """
    batchnorm = FusedBatchNormalization if fused_batchnorm else keras.layers.BatchNormalization
    filters = [params.conv1_filters, params.conv2_filters, params.conv3_filters]
    layers: list[keras.layers.Layer] = [keras.Input(shape=INPUT_SHAPE)]  # (N, 28, 28, 1) in [0, 1]
    for block, width in enumerate((f for f in filters if f), start=1):
        layers += [
            keras.layers.Conv2D(
                width,
                params.kernel_size,
                padding=params.padding,
                activation="relu",
                name=f"conv{block}",
                dtype=dtype,
            ),
            batchnorm(name=f"bn{block}", dtype=dtype),
        ]
        if block < 3:  # the third block keeps its 3x3 (valid) or 7x7 (same) map: no pooling to 1x1
            layers.append(keras.layers.MaxPooling2D(name=f"pool{block}", dtype=dtype))
    layers += [
        keras.layers.Flatten(name="flatten", dtype=dtype),
        keras.layers.Dense(params.dense_units, activation="relu", name="dense", dtype=dtype),
        keras.layers.Dropout(params.dropout, name="dropout", dtype=dtype),
        # float32 probabilities (and so a float32 loss) in every policy
        keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probs", dtype="float32"),
    ]
    return keras.Sequential(layers, name="mnist_cnn")


def serving_copy(model: keras.Model, params: ModelParams) -> keras.Model:
    """The same network and weights in stock Keras layers only, for saving, export and serving."""
    copy = build_model(params)
    copy.set_weights(model.get_weights())
    return copy
