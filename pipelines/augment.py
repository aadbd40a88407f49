"""Stage augment: turn the `augment` params into the policy train applies, and draw a preview grid.

Train applies the policy on the fly, as the first layers of the graph it fits (fresh variants every
epoch; ``pipelines.train.train_model``). The layers also work in a tf.data map, off the training
graph, but on two cores that was not faster, as the input thread competed with the training ops
(docs/results/2026-11-24-augment-modes.md). This stage owns the policy so that it is visible, versioned and previewable on its own.
benchmarks/augment_modes.py measures the alternative (precomputed variants) against it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from pipelines.config import AugmentParams, load_params
from pipelines.data import load_raw, save_figure, write_json

log = logging.getLogger("pipelines.augment")


class RandomIntensity(keras.layers.Layer):
    """Scale each image's pixel intensities by a random factor in [1 - factor, 1 + factor].

    Brightness for ink on a black background: the ink gets lighter or darker, the background stays
    0. (Keras' RandomBrightness adds an offset instead, which greys the background in training
    only; in our measurements that shifted BatchNorm's statistics and slowed convergence.)
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training: bool = False):
        if not training:
            return images
        batch = keras.ops.shape(images)[0]
        scale = keras.random.uniform(
            (batch, 1, 1, 1), 1.0 - self.factor, 1.0 + self.factor, seed=self.seed_generator
        )
        return images * scale

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor}


class RandomAffine(keras.layers.Layer):
    """Rotation, shift and zoom as ONE affine resampling per image (one interpolation, one op).

    Keras' RandomRotation, RandomTranslation and RandomZoom each resample the batch: three
    interpolations (three blurs) and three passes over the data. Composing the three into one
    matrix draws the same distribution of transforms at a third of the cost (benchmarks/speed.py).
    An image point p moves to ``c + zoom * R(angle) (p - c) + shift`` (c: the image centre).
    """

    def __init__(
        self,
        rotation_deg: float,
        shift: float,
        zoom_min: float,
        zoom_max: float,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rotation_deg, self.shift = rotation_deg, shift
        self.zoom_min, self.zoom_max = zoom_min, zoom_max
        self.seed_generator = keras.random.SeedGenerator(seed)

    def transforms(self, batch: int, height: int, width: int):
        """(batch, 8) inverse maps (output pixel -> input pixel), as affine_transform takes them."""
        ops, rand = keras.ops, keras.random

        def uniform(low: float, high: float):
            return rand.uniform((batch,), low, high, seed=self.seed_generator)

        angle = uniform(-self.rotation_deg, self.rotation_deg) * (np.pi / 180.0)
        zoom = uniform(self.zoom_min, self.zoom_max)
        dx = uniform(-self.shift, self.shift) * width
        dy = uniform(-self.shift, self.shift) * height
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        # Inverse of p -> c + zoom R (p - c) + d  is  q -> c + R^T (q - c - d) / zoom.
        cos, sin = ops.cos(angle) / zoom, ops.sin(angle) / zoom
        ox, oy = cx + dx, cy + dy
        zero = ops.zeros_like(cos)
        return ops.stack(
            [cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy, zero, zero],
            axis=1,
        )

    def call(self, images, training: bool = False):
        if not training:
            return images
        shape = keras.ops.shape(images)  # (N, H, W, C)
        return keras.ops.image.affine_transform(
            images,
            self.transforms(shape[0], images.shape[1], images.shape[2]),
            interpolation="bilinear",
            fill_mode="constant",
            fill_value=0.0,
            data_format="channels_last",
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "rotation_deg": self.rotation_deg,
            "shift": self.shift,
            "zoom_min": self.zoom_min,
            "zoom_max": self.zoom_max,
        }


def build_augmenter(params: AugmentParams, seed: int | None = None) -> keras.Sequential:
    """Keras layers for the enabled transforms; they act on (N, 28, 28, 1) floats in [0, 1].

    The layers are active only with ``training=True``, so the same object can sit in a tf.data map.
    """
    layers: list[keras.layers.Layer] = []

    def layer_seed() -> int | None:
        # Each random layer needs its own seed: with one shared seed they draw the same numbers.
        return None if seed is None else seed + len(layers)

    if params.enabled:
        if (
            params.rotation_deg > 0
            or params.shift > 0
            or (params.zoom_min, params.zoom_max) != (1, 1)
        ):
            layers.append(
                RandomAffine(
                    params.rotation_deg,
                    params.shift,
                    params.zoom_min,
                    params.zoom_max,
                    seed=layer_seed(),
                    name="affine",
                )
            )
        if params.brightness > 0:
            layers.append(RandomIntensity(params.brightness, seed=layer_seed(), name="brightness"))
        if params.noise_std > 0:
            layers.append(
                keras.layers.GaussianNoise(params.noise_std, seed=layer_seed(), name="noise")
            )
    # Noise and brightness can push pixels outside [0, 1]; the model was built for that range.
    layers.append(keras.layers.Lambda(lambda x: keras.ops.clip(x, 0.0, 1.0), name="clip"))
    return keras.Sequential(layers, name="augment")


def augment_batch(augmenter: keras.Sequential, images: np.ndarray) -> np.ndarray:
    """Apply the augmenter to a (N, 28, 28, 1) float batch, in training mode."""
    return keras.ops.convert_to_numpy(augmenter(images, training=True))


def preview_grid(images: np.ndarray, augmented: np.ndarray, path: Path) -> None:
    """Save a grid of original/augmented pairs: originals in even columns, their variants beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = 8
    rows = int(np.ceil(2 * n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.2))
    for ax in np.ravel(axes):
        ax.axis("off")
    for i in range(n):
        for j, (img, title) in enumerate(((images[i], "orig"), (augmented[i], "aug"))):
            ax = np.ravel(axes)[2 * i + j]
            ax.imshow(np.squeeze(img), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
    fig.suptitle("augment preview: original | augmented", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def main() -> None:
    from pipelines.cli import base_parser
    from pipelines.model import to_model_input

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    all_params = load_params(args.params)
    params = all_params.augment
    out = Path(args.out)
    write_json(out / "policy.json", params.model_dump())
    data = load_raw(Path(args.raw), all_params.ingest.file_names)
    rng = np.random.default_rng(params.seed)
    pick = rng.choice(
        len(data.x_train), size=min(params.preview_images // 2, len(data.x_train)), replace=False
    )
    keras.utils.set_random_seed(params.seed)
    originals = to_model_input(data.x_train[pick])  # (n, 28, 28, 1) float32
    preview_grid(
        originals,
        augment_batch(build_augmenter(params, seed=params.seed), originals),
        out / "preview.png",
    )
    log.info(
        "policy and preview written to %s (augmentation %s)", out, "on" if params.enabled else "off"
    )


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("augment", main)
