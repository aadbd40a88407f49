"""The corrections' quarantine: digits sent to the server's POST /feedback wait in
``data/incoming/pending/`` until someone reviews them; only accepted ones reach the merge stage.

    python -m pipelines.review                 # list what waits: each digit, its label, the model's answer
    python -m pipelines.review accept 3f2a 91c0     # move these (by id prefix) to data/incoming/<label>/
    python -m pipelines.review reject 3f2a --reason "a 7, not a 1"
    python -m pipelines.review accept --all

Each pending correction is two files with one id (the pixels' hash): ``<id>.png`` and
``<id>.json`` (the label the user gave, the model's answer and confidence, the served version,
the client and the time). Accepting moves the PNG to ``data/incoming/<label>/<id>.png``, where
``merge`` reads it; rejecting deletes both. Every decision is appended to
``data/incoming/.review.jsonl`` (a dot file: merge skips it), so what was let in and by whom stays
on record.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data import atomic_write_bytes, atomic_write_text
from pipelines.merge import INCOMING_DIR, PENDING_DIR, encode_digit, png_digit

REVIEW_LOG = ".review.jsonl"


@dataclass(frozen=True)
class Pending:
    """One correction waiting for review."""

    id: str
    png: Path
    label: int
    answer: dict  # the model's digit, confidence and version when the correction arrived
    meta: dict  # the whole record

    def digit(self) -> np.ndarray:
        return png_digit(self.png.read_bytes())


def quarantine(incoming: Path = INCOMING_DIR) -> Path:
    return Path(incoming) / PENDING_DIR


def save_pending(digit: np.ndarray, label: int, meta: dict, incoming: Path = INCOMING_DIR) -> Path:
    """Put one corrected digit in the quarantine with what is known about it; its PNG's path.
    The same digit sent again replaces its record (the id is the pixels' hash)."""
    name, data = encode_digit(digit, label)
    png = quarantine(incoming) / name
    record = {"id": png.stem, "label": int(label), **meta}
    atomic_write_text(png.with_suffix(".json"), json.dumps(record, sort_keys=True) + "\n")
    atomic_write_bytes(png, data)  # the PNG last: a listed correction always has its record
    return png


def waiting(incoming: Path = INCOMING_DIR) -> list[Pending]:
    """The pending corrections, oldest first; one without its record is skipped."""
    found = []
    for png in quarantine(incoming).glob("*.png"):
        try:
            meta = json.loads(png.with_suffix(".json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        found.append(Pending(png.stem, png, int(meta["label"]), meta.get("answer", {}), meta))
    return sorted(found, key=lambda p: (p.meta.get("received_at", ""), p.id))


def count_waiting(incoming: Path = INCOMING_DIR) -> int:
    folder = quarantine(incoming)
    return sum(1 for _ in folder.glob("*.png")) if folder.exists() else 0


def select(items: list[Pending], prefixes: list[str], everything: bool) -> list[Pending]:
    """The corrections named by id prefixes (or all); a prefix that matches none, or several,
    is an error naming it."""
    if everything:
        return items
    chosen = []
    for prefix in prefixes:
        matches = [p for p in items if p.id.startswith(prefix)]
        if len(matches) != 1:
            what = "no pending correction" if not matches else f"{len(matches)} corrections"
            raise ValueError(f"id {prefix!r} matches {what} in the quarantine")
        chosen.append(matches[0])
    return chosen


def decide(item: Pending, accept: bool, reason: str, incoming: Path = INCOMING_DIR) -> dict:
    """Accept (into data/incoming/<label>/) or reject (delete) one correction; the log entry."""
    entry = {
        "id": item.id,
        "decision": "accepted" if accept else "rejected",
        "label": item.label,
        "answer": item.answer,
        "reason": reason,
        "reviewer": getpass.getuser(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if accept:
        target = Path(incoming) / str(item.label) / item.png.name
        atomic_write_bytes(target, item.png.read_bytes())
        entry["file"] = target.relative_to(incoming).as_posix()
    item.png.unlink(missing_ok=True)
    item.png.with_suffix(".json").unlink(missing_ok=True)
    with (Path(incoming) / REVIEW_LOG).open("a") as log:
        log.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry


def render(digit: np.ndarray) -> list[str]:
    """A 28x28 digit as 14 lines of text (two pixel rows per line)."""
    shades = " .:-=+*#%@"
    lines = []
    for top, bottom in zip(digit[0::2], digit[1::2], strict=True):
        pair = np.maximum(top, bottom).astype(int) * (len(shades) - 1) // 255
        lines.append("".join(shades[v] for v in pair))
    return lines


def describe(item: Pending) -> str:
    answer = item.answer
    said = (
        f"model said {answer['digit']} ({answer['confidence']:.0%}, v{answer['version']})"
        if answer
        else "no model answer recorded"
    )
    head = f"{item.id}  label {item.label}  {said}  from {item.meta.get('client', '?')}"
    head += f"  at {item.meta.get('received_at', '?')}"
    return "\n".join([head, *("    |" + line + "|" for line in render(item.digit()))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Review the corrections waiting in quarantine.")
    parser.add_argument("action", nargs="?", choices=("list", "accept", "reject"), default="list")
    parser.add_argument("ids", nargs="*", help="id prefixes, as `list` shows them")
    parser.add_argument("--all", action="store_true", help="every pending correction")
    parser.add_argument("--reason", default="", help="why (kept in data/incoming/.review.jsonl)")
    parser.add_argument("--incoming", default=str(INCOMING_DIR))
    args = parser.parse_args(argv)
    incoming = Path(args.incoming)
    items = waiting(incoming)
    if args.action == "list":
        for item in items:
            print(describe(item), end="\n\n")
        print(f"{len(items)} correction(s) waiting in {quarantine(incoming)}")
        return 0
    if not args.ids and not args.all:
        parser.error(f"{args.action}: name the ids (or --all)")
    try:
        chosen = select(items, args.ids, args.all)
    except ValueError as exc:
        print(f"review: {exc}", file=sys.stderr)
        return 2
    for item in chosen:
        entry = decide(item, args.action == "accept", args.reason, incoming)
        print(f"{entry['decision']} {item.id} (label {item.label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
