"""Stage merge: newly labelled digits dropped into ``data/incoming/`` join the training set.

What ``data/incoming/`` may hold (anything else is rejected by name):
  ``<label>/<name>.png``  one digit per PNG, in a folder named by its label (0-9). 28x28 greyscale
                          (RGB and RGBA are converted), light ink on dark as in MNIST; an image
                          whose border is light is inverted. The serving page's "correct this
                          prediction" button saves exactly this.
  ``<name>-images-idx3-ubyte[.gz]`` with ``<name>-labels-idx1-ubyte[.gz]``  an IDX pair, MNIST's
                          own format: any number of 28x28 digits and their labels.

Checks on each incoming file, on top of the Great Expectations suite that the validate stage runs on
the merged set: the file is a readable image (or a well-formed IDX pair), 28x28, with a label in
0-9, and no digit in it is a pixel-for-pixel copy of a test image (the test set must stay unseen).
A file that fails is rejected with its name and the reason. ``merge.on_bad_file`` decides the rest:
``skip`` merges the good files; ``refuse`` merges none of the batch. Either way the decision and
every reason are written to ``data/merge/report.json`` (a DVC metric, committed) and logged; a
refusal is also recorded in MLflow as a FAILED run named ``merge-refused`` carrying the report.

Output ``data/dataset/``: the dataset every later stage reads, in data/raw's layout. The test files
are data/raw's, byte for byte. With nothing merged the training files are data/raw's too. The
folder holds only data, so its DVC hash (the data version, tag ``data_version`` on every training
run and model version) changes exactly when digits are added: a refused batch reruns nothing.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.config import MergeParams, load_params
from pipelines.constants import IMAGE_SIDE
from pipelines.data import (
    SOURCE_FILE,
    DataError,
    atomic_write_bytes,
    encode_idx,
    load_raw,
    parse_idx,
    read_idx,
    sha256_file,
    write_json,
)

log = logging.getLogger("pipelines.merge")

INCOMING_DIR = Path("data/incoming")  # also in dvc.yaml; reviewed corrections land here
PENDING_DIR = (
    "pending"  # under INCOMING_DIR: the server's corrections, unreviewed (pipelines/review.py)
)
IDX_PAIR = re.compile(r"^(?P<name>.+)-(?P<kind>images-idx3|labels-idx1)-ubyte(?:\.gz)?$")


@dataclass
class Batch:
    """What data/incoming held: accepted digits, and each rejected file with its reason."""

    images: list[np.ndarray] = field(default_factory=list)  # (n, 28, 28) uint8 per source
    labels: list[np.ndarray] = field(default_factory=list)
    accepted: list[dict] = field(default_factory=list)  # {"file", "digits"}
    rejected: list[dict] = field(default_factory=list)  # {"file", "reason"}

    def add(self, name: str, images: np.ndarray, labels: np.ndarray) -> None:
        self.images.append(images)
        self.labels.append(labels)
        self.accepted.append({"file": name, "digits": len(labels)})

    def reject(self, name: str, reason: str) -> None:
        self.rejected.append({"file": name, "reason": reason})

    @property
    def digits(self) -> int:
        return sum(len(labels) for labels in self.labels)


def png_digit(data: bytes) -> np.ndarray:
    """PNG bytes -> a 28x28 uint8 digit, light ink on dark. Raises ValueError saying why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise ValueError(f"is a {image.format} image, not a PNG")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"is not a readable PNG ({exc})") from None
    if image.size != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"is {image.size[0]}x{image.size[1]} pixels; incoming digits must be 28x28 "
            "(POST /predict/image turns any photo into one)"
        )
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))  # transparent = paper = dark
        image = Image.alpha_composite(background, image.convert("RGBA"))
    array = np.asarray(image.convert("L"), dtype=np.uint8)
    border = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])
    if border.mean() > 127:  # dark ink on light paper: MNIST is the other way round
        array = 255 - array
    if array.max() == array.min():
        raise ValueError("is blank (a single grey level)")
    return array


def encode_digit(digit: np.ndarray, label: int) -> tuple[str, bytes]:
    """One 28x28 uint8 digit (light ink on dark) as PNG bytes, and its file name: the pixels'
    hash, so the same digit sent twice is one file."""
    import hashlib

    from PIL import Image

    digit = np.asarray(digit, dtype=np.uint8)
    if digit.shape != (IMAGE_SIDE, IMAGE_SIDE) or not 0 <= int(label) <= 9:
        raise ValueError(f"expected a 28x28 digit and a label 0-9, got {digit.shape} and {label}")
    buffer = io.BytesIO()
    Image.fromarray(digit, mode="L").save(buffer, format="PNG")
    return f"{hashlib.sha1(digit.tobytes()).hexdigest()[:16]}.png", buffer.getvalue()


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An incoming IDX pair -> (images, labels). Raises ValueError (or DataError) saying why not."""

    def read(path: Path) -> np.ndarray:
        if path.suffix == ".gz":
            return read_idx(path)
        return parse_idx(path.read_bytes(), str(path))

    images, labels = read(images_path), read(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"holds images of shape {images.shape[1:]}, expected (28, 28)")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path.name} is not a labels file (shape {labels.shape})")
    if len(images) != len(labels):
        raise ValueError(f"has {len(images)} images but {labels_path.name} has {len(labels)}")
    bad = np.flatnonzero(labels > 9)
    if len(bad):
        raise ValueError(f"label {int(labels[bad[0]])} at index {int(bad[0])} is not a digit 0-9")
    return images, labels


def scan(incoming: Path, params: MergeParams, test_hashes: set[bytes]) -> Batch:
    """Read and check every file under ``incoming``; never raises on a bad file, only records it."""
    batch = Batch()
    files = sorted(
        p
        for p in incoming.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(incoming).parts)
        and p.relative_to(incoming).parts[0] != PENDING_DIR  # not reviewed: not training data
    )
    if len(files) > params.max_files:
        batch.reject(
            str(incoming), f"holds {len(files)} files; merge.max_files is {params.max_files}"
        )
        return batch
    pairs: dict[str, dict[str, Path]] = {}
    for path in files:
        name = path.relative_to(incoming).as_posix()
        parts = path.relative_to(incoming).parts
        match = IDX_PAIR.match(path.name)
        if len(parts) == 1 and match:
            kind = "images" if match["kind"].startswith("images") else "labels"
            pairs.setdefault(match["name"], {})[kind] = path
            continue
        if len(parts) != 2 or path.suffix.lower() != ".png":
            batch.reject(
                name,
                "is neither <label>/<name>.png nor an IDX pair (<name>-images-idx3-ubyte[.gz] and "
                "<name>-labels-idx1-ubyte[.gz])",
            )
            continue
        if not re.fullmatch(r"[0-9]", parts[0]):
            batch.reject(name, f"label folder {parts[0]!r} is not a digit 0-9")
            continue
        try:
            digit = png_digit(path.read_bytes())
        except ValueError as exc:
            batch.reject(name, str(exc))
            continue
        if digit.tobytes() in test_hashes:
            batch.reject(name, "is a copy of a test image (the test set must stay unseen)")
            continue
        batch.add(name, digit[None], np.array([int(parts[0])], dtype=np.uint8))
    for stem, pair in sorted(pairs.items()):
        if set(pair) != {"images", "labels"}:
            have = next(iter(pair.values())).name
            missing = "labels" if "images" in pair else "images"
            batch.reject(have, f"has no matching {missing} file ({stem}-{missing}-...-ubyte[.gz])")
            continue
        name = pair["images"].relative_to(incoming).as_posix()
        try:
            images, labels = read_idx_pair(pair["images"], pair["labels"])
        except (ValueError, DataError) as exc:
            batch.reject(name, str(exc))
            continue
        copies = [i for i, image in enumerate(images) if image.tobytes() in test_hashes]
        if copies:
            batch.reject(
                name,
                f"{len(copies)} of its {len(images)} digits are copies of test images "
                f"(first at index {copies[0]}); the test set must stay unseen",
            )
            continue
        batch.add(name, images, labels)
    return batch


def class_caps(batch: Batch, y_train: np.ndarray, max_share: float) -> list[str]:
    """Each class whose new digits in ``batch`` pass ``max_share`` of its training digits, said
    in words: one batch may not reshape a class (a flood of one mislabelled digit would)."""
    if not batch.labels:
        return []
    new = np.bincount(np.concatenate(batch.labels), minlength=10)
    have = np.bincount(y_train, minlength=10)
    return [
        f"class {digit}: {new[digit]} new digits, more than merge.max_new_class_share "
        f"({max_share}) of its {have[digit]} training digits"
        for digit in range(10)
        if new[digit] > max_share * have[digit]
    ]


def merge(
    raw: Path,
    incoming: Path,
    out: Path,
    params: MergeParams,
    file_names: dict[str, str],
    report_path: Path | None = None,
) -> dict:
    """Write ``out`` (data/raw plus the accepted incoming digits) and the report; return it."""
    data = load_raw(raw, file_names)
    incoming.mkdir(parents=True, exist_ok=True)
    batch = scan(incoming, params, {image.tobytes() for image in data.x_test})
    over_cap = class_caps(batch, data.y_train, params.max_new_class_share)
    if over_cap or batch.rejected and params.on_bad_file == "refuse":
        status = "refused"
    elif batch.digits:
        status = "merged"
    else:
        status = "nothing new"
    report = {
        "status": status,
        "on_bad_file": params.on_bad_file,
        "incoming_files": len(batch.accepted) + len(batch.rejected),
        "accepted_files": len(batch.accepted),
        "rejected_files": batch.rejected,
        "over_class_cap": over_cap,
        "digits_added": batch.digits if status == "merged" else 0,
        "train_images": len(data.x_train) + (batch.digits if status == "merged" else 0),
        "test_images": len(data.x_test),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key in ("test_images", "test_labels", "train_images", "train_labels"):
        shutil.copyfile(raw / file_names[key], tmp / file_names[key])
    if status == "merged":
        x = np.concatenate([data.x_train, *batch.images])
        y = np.concatenate([data.y_train, *batch.labels])
        atomic_write_bytes(tmp / file_names["train_images"], encode_idx(x))
        atomic_write_bytes(tmp / file_names["train_labels"], encode_idx(y))
    record = json.loads((raw / SOURCE_FILE).read_text()) if (raw / SOURCE_FILE).exists() else {}
    record.setdefault("data_source", data.data_source)
    record["files"] = {name: sha256_file(tmp / name) for name in file_names.values()}
    record.setdefault("images", {})["train"] = report["train_images"]
    record["incoming"] = {"digits_added": report["digits_added"]}  # data only: see the docstring
    write_json(tmp / SOURCE_FILE, record)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # readers see the old folder or the new one, never half of one
    if report_path is not None:
        write_json(report_path, report)
    return report


def record_refusal(experiment: str, report_path: Path) -> None:
    """A refused batch as a FAILED MLflow run ``merge-refused`` with the report and the reasons."""
    import mlflow

    from pipelines import tracking

    report = json.loads(report_path.read_text())
    tracking.setup(experiment)
    with mlflow.start_run(run_name="merge-refused") as run:
        mlflow.set_tags(
            {
                "stage": "merge",
                "merge.status": "refused",
                "merge.rejected_files": str(len(report["rejected_files"])),
                "merge.first_rejection": "; ".join(
                    f"{r['file']}: {r['reason']}" for r in report["rejected_files"][:3]
                )[:4000],
            }
        )
        mlflow.log_artifact(str(report_path), artifact_path="merge")
    tracking.client().set_terminated(run.info.run_id, status="FAILED")


def main() -> None:
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--incoming", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    report = merge(
        Path(args.raw),
        Path(args.incoming),
        Path(args.out),
        params.merge,
        params.ingest.file_names,
        Path(args.report),
    )
    for item in report["rejected_files"]:
        log.warning("rejected %s/%s: %s", args.incoming, item["file"], item["reason"])
    for reason in report["over_class_cap"]:
        log.warning("incoming batch REFUSED: %s", reason)
    if report["status"] == "refused" and not report["over_class_cap"]:
        log.warning(
            "incoming batch REFUSED (merge.on_bad_file=refuse): %d file(s) rejected, none of the "
            "%d merged; the training set is unchanged. Fix or remove them and run again.",
            len(report["rejected_files"]),
            report["incoming_files"],
        )
    if report["status"] == "refused":
        record_refusal(params.tracking.experiment, Path(args.report))
    log.info(
        "%s: %d digit(s) added from %d file(s); training set %d images, test set %d (unchanged)",
        report["status"],
        report["digits_added"],
        report["accepted_files"] if report["status"] == "merged" else 0,
        report["train_images"],
        report["test_images"],
    )


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("merge", main)
