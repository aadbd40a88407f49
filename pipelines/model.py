"""The CNN, as a pure function of typed params. Imports no tuning or tracking code."""

from __future__ import annotations

import keras
import numpy as np

from pipelines.config import ModelParams

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def to_model_input(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 in [0, 255] -> (N, 28, 28, 1) float32 in [0, 1]."""
    return (np.asarray(images, dtype=np.float32) / 255.0)[..., np.newaxis]


def build_model(params: ModelParams) -> keras.Model:
    """Conv-BN-Pool x2, Dense, Dropout, softmax. Uncompiled; the caller picks the optimiser."""
    k = params.kernel_size
    return keras.Sequential(
        [
            keras.Input(shape=INPUT_SHAPE),  # (N, 28, 28, 1) float32 in [0, 1]
            keras.layers.Conv2D(params.conv1_filters, k, activation="relu", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.MaxPooling2D(name="pool1"),  # (N, 13, 13, conv1_filters)
            keras.layers.Conv2D(params.conv2_filters, k, activation="relu", name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.MaxPooling2D(name="pool2"),  # (N, 5, 5, conv2_filters)
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(params.dense_units, activation="relu", name="dense"),
            keras.layers.Dropout(params.dropout, name="dropout"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probs"),  # (N, 10)
        ],
        name="mnist_cnn",
    )
