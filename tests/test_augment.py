"""Stage augment: the policy as Keras layers, active only in training, and its preview grid."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipelines.augment import (
    RandomAffine,
    RandomIntensity,
    augment_batch,
    build_augmenter,
    preview_grid,
)
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
    # rotation, shift and zoom are one resampling
    assert [layer.name for layer in augmenter.layers] == ["affine", "brightness", "noise", "clip"]
    # when applied in training mode
    trained = augment_batch(augmenter, batch)
    # then the shape is kept, values stay in [0, 1], and the images did change
    assert trained.shape == batch.shape
    assert trained.min() >= 0.0 and trained.max() <= 1.0
    assert not np.allclose(trained, batch, atol=1e-3)
    # and in inference mode the images pass through (the clip is a no-op on [0, 1])
    inferred = as_numpy(augmenter(batch, training=False))
    np.testing.assert_allclose(inferred, batch, atol=1e-6)


def moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: centre of mass (x, y) in pixels, and the ink's spread (RMS distance from it)."""
    img = images[..., 0]
    ys, xs = np.mgrid[: img.shape[1], : img.shape[2]]
    mass = img.sum(axis=(1, 2))
    cx = (img * xs).sum(axis=(1, 2)) / mass
    cy = (img * ys).sum(axis=(1, 2)) / mass
    spread = np.sqrt(
        (img * ((xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2)).sum(axis=(1, 2))
        / mass
    )
    return np.stack([cx, cy], axis=1), spread


def test_random_affine_shift_moves_the_ink_by_the_drawn_offset(batch: np.ndarray) -> None:
    # given a shift-only transform, with the offsets it will draw known in advance
    layer = RandomAffine(0.0, 0.1, 1.0, 1.0, seed=5)
    expected = keras.ops.convert_to_numpy(
        RandomAffine(0.0, 0.1, 1.0, 1.0, seed=5).transforms(16, 28, 28)
    )
    # when
    out = as_numpy(layer(batch, training=True))
    # then every digit's centre of mass moved by the drawn offset (inverse map: input = output + a2)
    before, _ = moments(batch)
    after, _ = moments(out)
    moved = after - before
    np.testing.assert_allclose(moved[:, 0], -expected[:, 2], atol=0.35)
    np.testing.assert_allclose(moved[:, 1], -expected[:, 5], atol=0.35)
    assert np.abs(moved).max() > 1.0  # up to 2.8 pixels: the test would notice no shift at all


def test_random_affine_zoom_and_rotation_act_about_the_centre() -> None:
    # given a centred ring of ink
    ys, xs = np.mgrid[:28, :28]
    radius = np.hypot(xs - 13.5, ys - 13.5)
    ring = ((radius > 5) & (radius < 7)).astype(np.float32)[None, :, :, None].repeat(4, axis=0)
    _, spread = moments(ring)
    # when zoomed by exactly 1.1 (no rotation, no shift)
    zoomed = as_numpy(RandomAffine(0.0, 0.0, 1.1, 1.1, seed=0)(ring, training=True))
    # then the ink spreads 1.1x around the same centre
    centre, zoomed_spread = moments(zoomed)
    np.testing.assert_allclose(zoomed_spread / spread, 1.1, atol=0.02)
    np.testing.assert_allclose(centre, 13.5, atol=0.05)
    # and a rotation about the centre keeps the ring where it was
    rotated = as_numpy(RandomAffine(10.0, 0.0, 1.0, 1.0, seed=0)(ring, training=True))
    centre, rotated_spread = moments(rotated)
    np.testing.assert_allclose(centre, 13.5, atol=0.05)
    np.testing.assert_allclose(rotated_spread, spread, rtol=0.02)
    # and at inference the layer is the identity
    np.testing.assert_array_equal(as_numpy(RandomAffine(10.0, 0.1, 0.9, 1.1)(ring)), ring)


def test_random_affine_rotates_by_the_drawn_angle_within_the_range() -> None:
    # given horizontal bars through the centre, and the angles the layer will draw
    bars = np.zeros((16, 28, 28, 1), dtype=np.float32)
    bars[:, 13:15, 4:24] = 1.0
    drawn = keras.ops.convert_to_numpy(
        RandomAffine(10.0, 0.0, 1.0, 1.0, seed=9).transforms(16, 28, 28)
    )
    angles = np.degrees(np.arctan2(drawn[:, 1], drawn[:, 0]))
    # when
    out = as_numpy(RandomAffine(10.0, 0.0, 1.0, 1.0, seed=9)(bars, training=True))[..., 0]
    # then each bar's principal axis turned by the drawn angle, and no angle exceeds 10 degrees
    ys, xs = np.mgrid[:28, :28]
    for image, angle in zip(out, angles, strict=True):
        w = image / image.sum()
        mx, my = (w * xs).sum(), (w * ys).sum()
        cxx, cyy = (w * (xs - mx) ** 2).sum(), (w * (ys - my) ** 2).sum()
        cxy = (w * (xs - mx) * (ys - my)).sum()
        axis = np.degrees(0.5 * np.arctan2(2 * cxy, cxx - cyy))
        assert abs(abs(axis) - abs(angle)) < 0.5
    assert np.abs(angles).max() <= 10.0 and np.abs(angles).max() > 5.0


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
