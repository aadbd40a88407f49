"""The inference log: one record per answered image, written to Parquet off the request path.

A request only appends its answer to an in-memory queue (``record``); a background thread takes
what has queued, at most every ``flush_interval_s``, computes each image's summary features
(``pipelines.monitoring``, the columns the drift check compares with the training data) and writes
one Parquet file per flush:

    <folder>/date=2026-12-02/hour=22/part-<pid>-<time>-<n>.parquet

Hive-style partitions, so ``pandas.read_parquet(folder)`` (pyarrow) reads the whole log with
``date`` and ``hour`` as columns, and a window is a filter on them. Each worker process writes its
own files (its pid in the name), so several workers never write one file. A file is written under
a temporary name and renamed, so a reader never sees half of one. When the log passes
``max_bytes``, the oldest files go first (rotation by age), whichever worker wrote them.

The queue is bounded: when the writer falls behind by more than ``max_queue`` images, the newest
records are dropped and counted (``dropped``), rather than letting the server's memory grow or a
request wait on the disk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.monitoring import LOG_FILES, answer_summary, as_unit_images, image_features

log = logging.getLogger("serving.app")


@dataclass(frozen=True)
class Answered:
    """One request's answers, as the route hands them over: nothing computed yet."""

    time: float  # seconds since the epoch, when the answer went out
    endpoint: str
    model_version: str
    latency_s: float  # the request's time in the route, shared by the images it carried
    images: np.ndarray  # (n, 28, 28[, 1]), uint8 or 0-1 floats
    probabilities: np.ndarray  # (n, 10)
    shadow_version: str = ""  # the shadow model's version that scored them too ("": none)
    shadow_digits: np.ndarray | None = None  # (n,) its digits (serving.shadow)


class InferenceLog:
    """Queue answers and write them to hourly Parquet partitions from a background thread."""

    def __init__(
        self,
        folder: Path,
        max_bytes: int,
        flush_interval_s: float = 2.0,
        keep_images: bool = False,
        max_queue: int = 100_000,
        on_drop: Callable[[int], None] | None = None,
    ):
        self.folder = Path(folder)
        self.max_bytes, self.flush_interval_s = max_bytes, flush_interval_s
        self.keep_images, self.max_queue, self.on_drop = keep_images, max_queue, on_drop
        self.dropped = 0  # images not logged because the queue was full
        self.written = 0  # images written
        self._queue: deque[Answered] = deque()
        self._queued_images = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files = 0

    def record(self, answered: Answered) -> None:
        """Called by a route once it has answered; returns at once."""
        n = len(answered.images)
        with self._lock:
            full = self._queued_images + n > self.max_queue
            if full:
                self.dropped += n
            else:
                self._queue.append(answered)
                self._queued_images += n
        if full and self.on_drop is not None:
            self.on_drop(n)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            try:
                self.flush()
            except Exception:  # a full disk must not take the server down: log it and go on
                log.exception("inference log: writing to %s failed", self.folder)

    def flush(self) -> Path | None:
        """Write every queued answer to one new file; the file's path, or None if none queued."""
        with self._lock:
            batch, self._queue = list(self._queue), deque()
            self._queued_images = 0
        if not batch:
            return None
        frame = self.frame(batch)
        stamp = datetime.fromtimestamp(batch[-1].time, tz=UTC)
        part = self.folder / f"date={stamp:%Y-%m-%d}" / f"hour={stamp:%H}"
        part.mkdir(parents=True, exist_ok=True)
        self._files += 1
        path = part / f"part-{os.getpid()}-{int(time.time() * 1000)}-{self._files}.parquet"
        partial = path.with_name(f".{path.name}.tmp")
        frame.to_parquet(partial, index=False)
        partial.replace(path)
        self.written += len(frame)
        self.enforce_cap()
        return path

    def frame(self, batch: list[Answered]) -> pd.DataFrame:
        """The records of ``batch``, one row per image. Built column by column over the whole
        batch, not a frame per request: this thread shares the interpreter with the requests."""
        counts = np.array([len(a.images) for a in batch])

        def per_image(values, dtype=None) -> np.ndarray:
            return np.repeat(np.asarray(values, dtype=dtype), counts)

        unit = np.concatenate([as_unit_images(a.images) for a in batch])
        columns = pd.DataFrame(
            {
                "time": pd.to_datetime(per_image([a.time for a in batch]), unit="s", utc=True),
                "endpoint": per_image([a.endpoint for a in batch]),
                "model_version": per_image([a.model_version for a in batch]),
                "latency_ms": per_image([a.latency_s * 1000 for a in batch], np.float32),
                "batch_size": per_image(counts, np.int32),
                "shadow_version": per_image([a.shadow_version for a in batch]),
            }
        )
        columns["shadow_digit"] = np.concatenate(
            [
                np.full(len(a.images), -1) if a.shadow_digits is None else a.shadow_digits
                for a in batch
            ]
        ).astype(np.int8)  # -1: not scored by a shadow
        probabilities = np.concatenate([a.probabilities for a in batch])
        frame = pd.concat([columns, answer_summary(probabilities), image_features(unit)], axis=1)
        if self.keep_images:
            frame["image"] = list(np.round(unit * 255).astype(np.uint8).reshape(len(unit), -1))
        return frame

    def enforce_cap(self) -> list[Path]:
        """Delete the oldest files until the log is under ``max_bytes``; the files deleted."""
        files = []
        for path in self.folder.glob(LOG_FILES):
            try:
                files.append((path.parent.parent.name, path.parent.name, path.stat(), path))
            except FileNotFoundError:  # another worker rotated it away
                continue
        total = sum(stat.st_size for _, _, stat, _ in files)
        removed, current = [], datetime.now(tz=UTC).strftime("date=%Y-%m-%d/hour=%H")
        for _, _, stat, path in sorted(files, key=lambda f: (f[0], f[1], f[2].st_mtime)):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= stat.st_size
            removed.append(path)
            hour = path.parent
            if f"{hour.parent.name}/{hour.name}" != current and not any(hour.iterdir()):
                hour.rmdir()  # never the hour being written, which a worker may be about to use
        return removed
