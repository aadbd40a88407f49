"""The CNN, as a pure function of typed params. Imports no tuning or tracking code."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from pipelines.config import ModelParams

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


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


def build_model(params: ModelParams, fused_batchnorm: bool = False) -> keras.Model:
    """Conv-BN-Pool x2 (then Conv-BN with ``conv3_filters``), Dense, Dropout, softmax. Uncompiled.

    The baseline (``conv3_filters: 0``, ``padding: valid``) is the seed article's network:
    28 -> conv 26 -> pool 13 -> conv 11 -> pool 5. ``fused_batchnorm=True`` builds the training
    variant (same weights, faster BatchNorm step).
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
            ),
            batchnorm(name=f"bn{block}"),
        ]
        if block < 3:  # the third block keeps its 3x3 (valid) or 7x7 (same) map: no pooling to 1x1
            layers.append(keras.layers.MaxPooling2D(name=f"pool{block}"))
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(params.dense_units, activation="relu", name="dense"),
        keras.layers.Dropout(params.dropout, name="dropout"),
        keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probs"),  # (N, 10)
    ]
    return keras.Sequential(layers, name="mnist_cnn")


def serving_copy(model: keras.Model, params: ModelParams) -> keras.Model:
    """The same network and weights in stock Keras layers only, for saving, export and serving."""
    copy = build_model(params)
    copy.set_weights(model.get_weights())
    return copy
