"""The merge stage: newly labelled digits from data/incoming join the training set, bad files are
rejected by name, and the test set never changes."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import MergeParams
from pipelines.data import encode_idx, load_raw
from pipelines.merge import merge, png_digit
from tests.conftest import draw_stroke


def png_bytes(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def new_digits(n: int, seed: int = 123) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([draw_stroke(rng) for _ in range(n)])


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / ".gitkeep").touch()  # ignored, as in the repo
    return folder


def run_merge(tmp_path, raw_dir, incoming, params, on_bad_file="skip", max_new_class_share=1.0):
    out, report_path = tmp_path / "dataset", tmp_path / "merge" / "report.json"
    report = merge(
        raw_dir,
        incoming,
        out,
        MergeParams(
            on_bad_file=on_bad_file, max_files=1000, max_new_class_share=max_new_class_share
        ),
        params.ingest.file_names,
        report_path,
    )
    assert json.loads(report_path.read_text()) == report
    return out, report


def file_bytes(folder: Path, params) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in params.ingest.file_names.values()}


def test_nothing_incoming_keeps_raw_bytes(tmp_path, raw_dir, incoming, params):
    out, report = run_merge(tmp_path, raw_dir, incoming, params)
    assert report["status"] == "nothing new" and report["digits_added"] == 0
    assert file_bytes(out, params) == file_bytes(raw_dir, params)


def test_good_batch_is_merged_after_the_original_digits(tmp_path, raw_dir, incoming, params):
    digits = new_digits(8)
    (incoming / "3").mkdir()
    (incoming / "3" / "a.png").write_bytes(png_bytes(digits[0]))
    (incoming / "7").mkdir()
    (incoming / "7" / "dark-on-light.png").write_bytes(png_bytes(255 - digits[1]))
    (incoming / "7" / "rgb.png").write_bytes(png_bytes(digits[2], "RGB"))
    (incoming / "extra-images-idx3-ubyte.gz").write_bytes(encode_idx(digits[3:]))
    (incoming / "extra-labels-idx1-ubyte.gz").write_bytes(
        encode_idx(np.array([0, 1, 2, 8, 9], dtype=np.uint8))
    )

    out, report = run_merge(tmp_path, raw_dir, incoming, params)

    assert report["status"] == "merged", report
    assert report["rejected_files"] == [] and report["accepted_files"] == 4
    assert report["digits_added"] == 8
    before, after = (
        load_raw(raw_dir, params.ingest.file_names),
        load_raw(out, params.ingest.file_names),
    )
    n = len(before.x_train)
    assert len(after.x_train) == n + 8 == report["train_images"]
    np.testing.assert_array_equal(after.x_train[:n], before.x_train)
    # PNG files in path order (3/a, 7/dark-on-light, 7/rgb), then the IDX pair.
    np.testing.assert_array_equal(after.y_train[n:], [3, 7, 7, 0, 1, 2, 8, 9])
    np.testing.assert_array_equal(after.x_train[n : n + 3], digits[:3])  # the inverted one too
    np.testing.assert_array_equal(after.x_train[n + 3 :], digits[3:])
    # The test set is data/raw's, byte for byte.
    test_names = [params.ingest.file_names[k] for k in ("test_images", "test_labels")]
    for name in test_names:
        assert (out / name).read_bytes() == (raw_dir / name).read_bytes()
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["incoming"] == {"digits_added": 8}


def bad_batch(incoming: Path, raw_dir: Path, params) -> None:
    """One good PNG and one of each kind of bad file."""
    test_image = load_raw(raw_dir, params.ingest.file_names).x_test[5]
    digits = new_digits(3)
    (incoming / "4").mkdir()
    (incoming / "4" / "good.png").write_bytes(png_bytes(digits[0]))
    (incoming / "4" / "corrupt.png").write_bytes(png_bytes(digits[1])[:60])
    (incoming / "4" / "copy-of-test.png").write_bytes(png_bytes(test_image))
    (incoming / "4" / "too-big.png").write_bytes(png_bytes(np.zeros((40, 40), np.uint8) + 9))
    (incoming / "x").mkdir()
    (incoming / "x" / "no-label.png").write_bytes(png_bytes(digits[2]))
    (incoming / "notes.txt").write_text("hello")
    (incoming / "lonely-images-idx3-ubyte.gz").write_bytes(encode_idx(digits))


EXPECTED_REJECTIONS = {
    "4/corrupt.png": "is not a readable PNG",
    "4/copy-of-test.png": "is a copy of a test image",
    "4/too-big.png": "is 40x40 pixels; incoming digits must be 28x28",
    "x/no-label.png": "label folder 'x' is not a digit 0-9",
    "notes.txt": "is neither <label>/<name>.png nor an IDX pair",
    "lonely-images-idx3-ubyte.gz": "has no matching labels file",
}


def assert_rejections(report: dict) -> None:
    reasons = {r["file"]: r["reason"] for r in report["rejected_files"]}
    assert set(reasons) == set(EXPECTED_REJECTIONS), reasons
    for name, expected in EXPECTED_REJECTIONS.items():
        assert expected in reasons[name], (name, reasons[name])


def test_skip_merges_the_good_files_and_names_each_bad_one(tmp_path, raw_dir, incoming, params):
    bad_batch(incoming, raw_dir, params)
    out, report = run_merge(tmp_path, raw_dir, incoming, params, on_bad_file="skip")
    assert report["status"] == "merged" and report["digits_added"] == 1
    assert_rejections(report)
    after = load_raw(out, params.ingest.file_names)
    assert after.y_train[-1] == 4


def test_refuse_merges_nothing_and_keeps_the_data_version(tmp_path, raw_dir, incoming, params):
    bad_batch(incoming, raw_dir, params)
    out, report = run_merge(tmp_path, raw_dir, incoming, params, on_bad_file="refuse")
    assert report["status"] == "refused" and report["digits_added"] == 0
    assert_rejections(report)
    # Byte for byte what an empty incoming folder gives: DVC sees no new data version.
    assert file_bytes(out, params) == file_bytes(raw_dir, params)
    empty = incoming.parent / "empty"
    empty.mkdir()
    other_out = merge(
        raw_dir,
        empty,
        tmp_path / "dataset-empty",
        MergeParams(on_bad_file="refuse", max_files=10, max_new_class_share=1.0),
        params.ingest.file_names,
    )
    assert other_out["status"] == "nothing new"
    assert (out / "SOURCE.json").read_bytes() == (
        tmp_path / "dataset-empty/SOURCE.json"
    ).read_bytes()


def test_idx_pair_with_test_copies_or_bad_labels_is_rejected(tmp_path, raw_dir, incoming, params):
    x_test = load_raw(raw_dir, params.ingest.file_names).x_test
    digits = new_digits(4)
    digits[2] = x_test[0]
    # An uncompressed IDX file is read too.
    (incoming / "dup-images-idx3-ubyte").write_bytes(gzip.decompress(encode_idx(digits)))
    (incoming / "dup-labels-idx1-ubyte.gz").write_bytes(encode_idx(np.arange(4, dtype=np.uint8)))
    (incoming / "bad-images-idx3-ubyte.gz").write_bytes(encode_idx(new_digits(2, seed=9)))
    (incoming / "bad-labels-idx1-ubyte.gz").write_bytes(encode_idx(np.array([1, 12], np.uint8)))
    _, report = run_merge(tmp_path, raw_dir, incoming, params)
    reasons = {r["file"]: r["reason"] for r in report["rejected_files"]}
    assert (
        "1 of its 4 digits are copies of test images (first at index 2)"
        in reasons["dup-images-idx3-ubyte"]
    )
    assert "label 12 at index 1 is not a digit 0-9" in reasons["bad-images-idx3-ubyte.gz"]
    assert report["status"] == "nothing new"


def test_png_digit_inverts_light_paper_and_refuses_blank():
    digit = new_digits(1)[0]
    np.testing.assert_array_equal(png_digit(png_bytes(255 - digit)), digit)
    with pytest.raises(ValueError, match="blank"):
        png_digit(png_bytes(np.zeros((28, 28), np.uint8)))
    with pytest.raises(ValueError, match="not a PNG"):
        buffer = io.BytesIO()
        Image.fromarray(digit).save(buffer, format="JPEG")
        png_digit(buffer.getvalue())


def test_a_flood_of_one_class_is_refused_and_the_quarantine_is_not_read(
    tmp_path, raw_dir, incoming, params
):
    from pipelines.merge import PENDING_DIR

    digits = new_digits(12)
    raw = load_raw(raw_dir, params.ingest.file_names)
    sevens = int((raw.y_train == 7).sum())
    # given more new 7s than a tenth of the 7s in the training set, and unreviewed corrections
    cap = 0.1
    flood = int(cap * sevens) + 1
    (incoming / "7").mkdir()
    for i in range(flood):
        (incoming / "7" / f"{i}.png").write_bytes(png_bytes(np.roll(digits[i % 12], i, axis=1)))
    (incoming / PENDING_DIR).mkdir()
    (incoming / PENDING_DIR / "f00d.png").write_bytes(png_bytes(digits[0]))
    (incoming / PENDING_DIR / "f00d.json").write_text("{}")
    # when merge runs with the cap
    out, report = run_merge(tmp_path, raw_dir, incoming, params, max_new_class_share=cap)
    # then nothing joins the training set, and the report names the class and the numbers
    assert report["status"] == "refused" and report["digits_added"] == 0
    assert report["over_class_cap"] == [
        f"class 7: {flood} new digits, more than merge.max_new_class_share (0.1) of its "
        f"{sevens} training digits"
    ]
    assert file_bytes(out, params) == file_bytes(raw_dir, params)
    # and the quarantine was neither merged nor rejected as a bad file
    assert report["rejected_files"] == [] and report["incoming_files"] == flood
    # under the cap the same batch merges
    _, report = run_merge(tmp_path, raw_dir, incoming, params, max_new_class_share=1.0)
    assert report["status"] == "merged" and report["digits_added"] == flood
