"""IDX files: encode, parse, and every kind of broken file is a DataError that names it."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import Params
from pipelines.data import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    DataError,
    Dataset,
    encode_idx,
    load_raw,
    read_idx,
    write_json,
)


def names(params: Params) -> dict[str, str]:
    return {key: spec.name for key, spec in params.ingest.files.items()}


def test_images_round_trip(tmp_path: Path, tiny_dataset: Dataset) -> None:
    # given images written as gzip IDX
    path = tmp_path / "images.gz"
    path.write_bytes(encode_idx(tiny_dataset.x_train))
    # when read back
    images = read_idx(path)
    # then they are the same uint8 array
    assert images.dtype == np.uint8
    assert images.shape == (200, 28, 28)
    np.testing.assert_array_equal(images, tiny_dataset.x_train)


def test_labels_round_trip(tmp_path: Path, tiny_dataset: Dataset) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(encode_idx(tiny_dataset.y_test))
    labels = read_idx(path)
    assert labels.shape == (100,)
    np.testing.assert_array_equal(labels, tiny_dataset.y_test)


def test_encode_idx_writes_the_published_header(tiny_dataset: Dataset) -> None:
    raw = gzip.decompress(encode_idx(tiny_dataset.x_test[:3]))
    assert struct.unpack(">IIII", raw[:16]) == (IMAGES_MAGIC, 3, 28, 28)
    raw = gzip.decompress(encode_idx(tiny_dataset.y_test[:7]))
    assert struct.unpack(">II", raw[:8]) == (LABELS_MAGIC, 7)


def test_encode_idx_is_byte_identical_across_calls(tiny_dataset: Dataset) -> None:
    # when the same array is encoded twice (the gzip mtime would differ without mtime=0)
    first = encode_idx(tiny_dataset.x_train)
    second = encode_idx(tiny_dataset.x_train.copy())
    # then the bytes (and so DVC's hash) are the same
    assert first == second


def test_encode_idx_refuses_two_dimensions() -> None:
    with pytest.raises(ValueError, match="1 or 3 dimensions"):
        encode_idx(np.zeros((4, 4), dtype=np.uint8))


def test_truncated_gzip_names_the_file(tmp_path: Path, tiny_dataset: Dataset) -> None:
    # given a gzip file cut in half
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = encode_idx(tiny_dataset.x_train)
    path.write_bytes(data[: len(data) // 2])
    # when / then
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot decompress"):
        read_idx(path)


def test_not_gzip_at_all_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="plain.gz"):
        read_idx(path)


def test_bad_magic_is_reported(tmp_path: Path) -> None:
    # given a well-formed gzip whose IDX magic is wrong
    path = tmp_path / "magic.gz"
    path.write_bytes(gzip.compress(struct.pack(">II", 0xDEADBEEF, 0)))
    # when / then
    with pytest.raises(DataError, match=r"magic.gz: bad IDX magic number 0xdeadbeef"):
        read_idx(path)


def test_header_size_mismatch_is_reported(tmp_path: Path) -> None:
    # given a header that promises 5 images but carries 4
    path = tmp_path / "short.gz"
    header = struct.pack(">IIII", IMAGES_MAGIC, 5, 28, 28)
    path.write_bytes(gzip.compress(header + bytes(4 * 28 * 28)))
    # when / then
    with pytest.raises(DataError, match=r"short.gz: header says \(5, 28, 28\)"):
        read_idx(path)


def test_labels_with_extra_bytes_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">II", LABELS_MAGIC, 3) + bytes(4)))
    with pytest.raises(DataError, match="labels.gz: header says"):
        read_idx(path)


def test_header_too_short_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gz"
    path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(DataError, match="too short for an IDX header"):
        read_idx(path)


def test_load_raw_reads_the_four_files_and_the_source(raw_dir: Path, params: Params) -> None:
    # given a raw folder and its SOURCE.json
    write_json(raw_dir / "SOURCE.json", {"data_source": "mnist"})
    # when
    data = load_raw(raw_dir, names(params))
    # then
    assert (len(data.x_train), len(data.y_train), len(data.x_test), len(data.y_test)) == (
        200,
        200,
        100,
        100,
    )
    assert data.data_source == "mnist"


def test_load_raw_without_source_file_says_unknown(raw_dir: Path, params: Params) -> None:
    assert load_raw(raw_dir, names(params)).data_source == "unknown"


def test_load_raw_with_mismatched_counts_names_both_files(
    raw_dir: Path, params: Params, tiny_dataset: Dataset
) -> None:
    # given train labels one short of the train images
    files = names(params)
    (raw_dir / files["train_labels"]).write_bytes(encode_idx(tiny_dataset.y_train[:-1]))
    # when / then
    with pytest.raises(DataError) as info:
        load_raw(raw_dir, files)
    message = str(info.value)
    assert "train has 200 images but 199 labels" in message
    assert files["train_images"] in message
    assert files["train_labels"] in message
