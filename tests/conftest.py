"""Shared fixtures: the real params, a tiny MNIST-shaped dataset and its raw IDX folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import Params, load_params
from pipelines.data import Dataset, encode_idx

# Before any test module imports TensorFlow (none of the imports above does).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The temporary Prefect server's telemetry heartbeat only adds sqlite-lock noise to test logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
PARAMS_PATH = REPO / "params.yaml"

N_TRAIN = 200
N_TEST = 100


def draw_stroke(rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 'digit': a random polyline of 2-4 segments with a soft 2-pixel pen."""
    image = np.zeros((28, 28), dtype=np.float32)
    points = rng.uniform(4, 24, size=(rng.integers(3, 6), 2))
    for (r0, c0), (r1, c1) in zip(points[:-1], points[1:], strict=True):
        for t in np.linspace(0.0, 1.0, 40):
            r, c = r0 + t * (r1 - r0), c0 + t * (c1 - c0)
            ri, ci = int(round(r)), int(round(c))
            image[ri, ci] = max(image[ri, ci], 1.0)
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                image[ri + dr, ci + dc] = max(image[ri + dr, ci + dc], 0.5)
    intensity = rng.uniform(180, 255)
    return np.clip(image * intensity, 0, 255).astype(np.uint8)


def make_arrays(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0):
    """Deterministic (x_train, y_train, x_test, y_test): all digits in both splits, no repeats."""
    rng = np.random.default_rng(seed)
    images = np.stack([draw_stroke(rng) for _ in range(n_train + n_test)])
    assert len({img.tobytes() for img in images}) == len(images), "strokes must be distinct"
    y_train = np.tile(np.arange(10, dtype=np.uint8), n_train // 10)
    y_test = np.tile(np.arange(10, dtype=np.uint8), n_test // 10)
    return images[:n_train], y_train, images[n_train:], y_test


@pytest.fixture(scope="session")
def params() -> Params:
    return load_params(PARAMS_PATH)


@pytest.fixture
def tiny_dataset() -> Dataset:
    x_train, y_train, x_test, y_test = make_arrays()
    return Dataset(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, data_source="mnist"
    )


def write_raw(folder: Path, params: Params, dataset: Dataset) -> Path:
    """Write the dataset's four arrays as gzip IDX under the file names params.ingest expects."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": dataset.x_train,
        "train_labels": dataset.y_train,
        "test_images": dataset.x_test,
        "test_labels": dataset.y_test,
    }
    for key, spec in params.ingest.files.items():
        (folder / spec.name).write_bytes(encode_idx(arrays[key]))
    return folder


@pytest.fixture
def raw_dir(tmp_path: Path, params: Params, tiny_dataset: Dataset) -> Path:
    return write_raw(tmp_path / "raw", params, tiny_dataset)


@pytest.fixture(scope="session")
def postgres():
    """One private PostgreSQL cluster for the session (databases: mlflow, optuna, prefect)."""
    from tests.team_support import postgres_cluster

    with postgres_cluster("mlflow", "optuna", "prefect", "locks") as cluster:
        yield cluster
