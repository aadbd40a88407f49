"""Stage augment: the policy as Keras layers, active only in training, and its preview grid."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipelines.augment import RandomIntensity, augment_batch, build_augmenter, preview_grid
from pipelines.config import AugmentParams, Params
from pipelines.data import Dataset
from pipelines.model import to_model_input


@pytest.fixture
def batch(tiny_dataset: Dataset) -> np.ndarray:
    return to_model_input(tiny_dataset.x_train[:16])  # (16, 28, 28, 1) float32 in [0, 1]


def as_numpy(tensor) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


def test_disabled_policy_is_only_the_clip(params: Params, batch: np.ndarray) -> None:
    # given augmentation switched off
    policy = params.augment.model_copy(update={"enabled": False})
    # when
    augmenter = build_augmenter(policy, seed=1)
    # then the only layer is the clip, and images in [0, 1] come out unchanged, even in training
    assert [layer.name for layer in augmenter.layers] == ["clip"]
    np.testing.assert_array_equal(augment_batch(augmenter, batch), batch)
    # and values outside [0, 1] are clipped
    outside = np.full(batch.shape, 1.5, dtype=np.float32)
    outside[:, :14] = -0.5
    out = augment_batch(augmenter, outside)
    assert (out[:, :14] == 0.0).all() and (out[:, 14:] == 1.0).all()


def test_zero_strengths_build_no_transform_layers(params: Params) -> None:
    policy = params.augment.model_copy(
        update={
            "rotation_deg": 0,
            "shift": 0,
            "zoom_min": 1.0,
            "zoom_max": 1.0,
            "brightness": 0,
            "noise_std": 0,
        }
    )
    assert [layer.name for layer in build_augmenter(policy).layers] == ["clip"]


def test_full_policy_changes_images_in_training_only(params: Params, batch: np.ndarray) -> None:
    # given the params.yaml policy with every transform on
    policy: AugmentParams = params.augment
    assert policy.enabled and policy.rotation_deg and policy.noise_std
    augmenter = build_augmenter(policy, seed=3)
    assert len(augmenter.layers) == 6  # rotation, translation, zoom, brightness, noise, clip
    # when applied in training mode
    trained = augment_batch(augmenter, batch)
    # then the shape is kept, values stay in [0, 1], and the images did change
    assert trained.shape == batch.shape
    assert trained.min() >= 0.0 and trained.max() <= 1.0
    assert not np.allclose(trained, batch, atol=1e-3)
    # and in inference mode the images pass through (the clip is a no-op on [0, 1])
    inferred = as_numpy(augmenter(batch, training=False))
    np.testing.assert_allclose(inferred, batch, atol=1e-6)


def test_random_intensity_keeps_background_at_zero() -> None:
    # given an image with zero background and ink at 0.5
    images = np.zeros((8, 28, 28, 1), dtype=np.float32)
    images[:, 10:18, 12:16, :] = 0.5
    layer = RandomIntensity(0.2, seed=0)
    # when
    out = as_numpy(layer(images, training=True))
    # then the background is still exactly 0 and the ink is scaled within [0.8, 1.2] x 0.5
    assert (out[images == 0] == 0).all()
    ink = out[images > 0]
    assert ink.min() >= 0.5 * 0.8 - 1e-6 and ink.max() <= 0.5 * 1.2 + 1e-6
    # one factor per image: every ink pixel of one image is scaled alike
    per_image = out[:, 10:18, 12:16, 0].reshape(8, -1)
    assert np.allclose(per_image, per_image[:, :1])
    # and without training the layer is the identity
    np.testing.assert_array_equal(as_numpy(layer(images, training=False)), images)


def test_preview_grid_writes_a_png(tmp_path: Path, batch: np.ndarray) -> None:
    # given 6 originals and their variants
    path = tmp_path / "augment" / "preview.png"
    # when
    preview_grid(batch[:6], np.clip(batch[:6] * 0.5, 0, 1), path)
    # then a PNG exists and no temporary file is left
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["preview.png"]
