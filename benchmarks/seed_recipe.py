"""The seed article's training recipe, as the article wrote it: the baseline for benchmarks/speed.py.

Deliberately standalone (Keras and NumPy only, nothing from `pipelines`), so that none of the
project's speed work leaks into it: the stock Keras augmentation layers in front of the model,
stock BatchNormalization, `model.fit` on NumPy arrays, batch 128, a 20% validation split, Adam
with ReduceLROnPlateau and EarlyStopping, and TensorFlow's default runtime settings.

    python -m benchmarks.seed_recipe --data slice.npz --epochs 3

Prints one JSON line: per-epoch seconds (and the part of each spent before its first batch),
training images per epoch, test accuracy, and with
``--test-each-epoch`` the test accuracy after every epoch (evaluated outside the timed epoch).
"""

from __future__ import annotations

import argparse
import json
import time

import keras
import numpy as np


def build_seed_model() -> keras.Sequential:
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            # augmentation: rotation +-10 deg, shift 10%, zoom 0.9-1.1, brightness +-10%, noise 0.05
            L.RandomRotation(10 / 360, fill_mode="constant"),
            L.RandomTranslation(0.1, 0.1, fill_mode="constant"),
            L.RandomZoom(0.1, fill_mode="constant"),
            L.RandomBrightness(0.1, value_range=(0.0, 1.0)),
            L.GaussianNoise(0.05),
            L.Conv2D(32, 3, activation="relu"),
            L.BatchNormalization(),
            L.MaxPooling2D(),
            L.Conv2D(64, 3, activation="relu"),
            L.BatchNormalization(),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(128, activation="relu"),
            L.Dropout(0.5),
            L.Dense(10, activation="softmax"),
        ]
    )


class EpochTimer(keras.callbacks.Callback):
    """Each epoch's wall time, and how much of it passed before its first training batch began.

    That wait is input-pipeline time: Keras drops the previous epoch's spare tf.data iterator
    there, and the drop waits for the iterator's autotuning thread (benchmarks/speed.py).
    """

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.waits: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
        self.waiting = True

    def on_train_batch_begin(self, batch, logs=None):
        if self.waiting:
            self.waits.append(time.perf_counter() - self.start)
            self.waiting = False

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


class EpochTest(keras.callbacks.Callback):
    """Test accuracy after every epoch; runs after EpochTimer, so its time is not counted."""

    def __init__(self, x_test: np.ndarray, y_test: np.ndarray):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.accuracy: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        probs = self.model.predict(self.x_test, batch_size=1000, verbose=0)
        self.accuracy.append(float((probs.argmax(axis=1) == self.y_test).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, help=".npz with x_train, y_train, x_test, y_test (uint8)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--patience",
        type=int,
        default=0,
        help="EarlyStopping patience (the article's is 5); 0 = never stop early, for fixed-epoch timing",
    )
    parser.add_argument(
        "--test-each-epoch", action="store_true", help="also record test accuracy after each epoch"
    )
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    data = np.load(args.data)
    x = data["x_train"].astype("float32")[..., None] / 255.0
    x_test = data["x_test"].astype("float32")[..., None] / 255.0
    model = build_seed_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    tester = EpochTest(x_test, data["y_test"]) if args.test_each_epoch else None
    model.fit(
        x,
        data["y_train"],
        batch_size=128,
        epochs=args.epochs,
        validation_split=0.2,
        callbacks=[
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3),
            keras.callbacks.EarlyStopping(
                patience=args.patience or args.epochs, restore_best_weights=True
            ),
            timer,
            *([tester] if tester else []),
        ],
        verbose=0,
    )
    probs = model.predict(x_test, batch_size=1000, verbose=0)
    result = {
        "epoch_seconds": timer.seconds,
        "epoch_wait_seconds": timer.waits,
        "train_images": len(x) - int(len(x) * 0.2),
        "test_accuracy": float((probs.argmax(axis=1) == data["y_test"]).mean()),
    }
    if tester:
        result["epoch_test_accuracy"] = tester.accuracy
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
