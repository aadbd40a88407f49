"""The model the server answers with: ``models:/<name>@<alias>``, reloaded when the alias moves.

``Champion.refresh()`` resolves the alias to a version and, if it changed, downloads that version's
export (``serve.format``) and loads it with ``pipelines.runtime`` (the same code the promotion gate
checks it with). The new model replaces the old one with a single reference swap, so a request in
flight finishes on the model it started with and none is dropped. A failed reload keeps the old
model and records why (``/model`` shows it). A background thread calls ``refresh`` every
``serve.poll_interval_s`` seconds.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.constants import INPUT_SHAPE, NUM_CLASSES
from pipelines.runtime import Predictor, load_registered

log = logging.getLogger("serving.champion")


@dataclass(frozen=True)
class Loaded:
    """One loaded model version and what ``GET /model`` says about it."""

    predictor: Predictor
    name: str
    version: str
    alias: str
    format: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    loaded_at: str = ""


class Champion:
    """Holds the served model and keeps it in step with the registry alias."""

    def __init__(
        self,
        model_name: str,
        alias: str,
        file_name: str,
        threads: int = 1,
        poll_interval_s: float = 10.0,
        cache_dir: Path | None = None,
        required: bool = True,
    ):
        """``required=False`` (the shadow): an alias that does not resolve is a normal state, not
        a failure. The model held is let go, since the alias no longer names it."""
        self.model_name, self.alias, self.file_name = model_name, alias, file_name
        self.threads, self.poll_interval_s = threads, poll_interval_s
        self.required = required
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="mnist-serve-"))
        self.current: Loaded | None = None
        self.last_error: str | None = "not loaded yet"
        self.last_check: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
        # Called after each change of the model held (None: let go, only when not required), and
        # after each failed reload (its reason): the server's metrics hang here.
        self.on_loaded: list[Callable[[Loaded | None], None]] = []
        self.on_failure: list[Callable[[str], None]] = []

    def refresh(self) -> bool:
        """Load the alias' version if it is not the one served. True if the served model changed."""
        from mlflow.exceptions import MlflowException

        from pipelines import tracking

        with self._refresh_lock:
            self.last_check = time.time()
            client = tracking.client()
            try:
                version = client.get_model_version_by_alias(self.model_name, self.alias)
            except MlflowException as exc:
                if not self.required:
                    return self._let_go(f"models:/{self.model_name}@{self.alias} is not set")
                return self._failed(
                    f"models:/{self.model_name}@{self.alias} does not resolve: {exc}"
                )
            except Exception as exc:  # the store is unreachable: keep serving what we have
                return self._failed(f"registry unreachable: {exc}")
            if self.current is not None and self.current.version == str(version.version):
                return False
            target = self.cache_dir / f"v{version.version}"
            try:
                predictor = load_registered(
                    self.model_name, version.version, self.file_name, target, self.threads
                )
                predictor.predict(np.zeros((1, *INPUT_SHAPE), dtype=np.float32))  # warm up
                probs = predictor.predict(np.zeros((2, *INPUT_SHAPE), dtype=np.float32))
                if probs.shape != (2, NUM_CLASSES) or not np.isfinite(probs).all():
                    raise ValueError(
                        f"predicts shape {probs.shape}, expected {(2, NUM_CLASSES)} finite"
                    )
            except Exception as exc:
                shutil.rmtree(target, ignore_errors=True)
                return self._failed(
                    f"v{version.version} ({self.file_name}) failed to load, still serving "
                    f"{'v' + self.current.version if self.current else 'nothing'}: {exc}"
                )
            metrics = {}
            for key in ("test_accuracy", "test_loss", "served_check_accuracy"):
                if key in version.tags:
                    metrics[key] = float(version.tags[key])
            previous = self.current
            self.current = Loaded(
                predictor=predictor,
                name=self.model_name,
                version=str(version.version),
                alias=self.alias,
                format=self.file_name,
                run_id=version.run_id or "",
                metrics=metrics,
                loaded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            self.last_error = None
            log.info(
                "%s %s v%s (%s)%s",
                "serving" if self.required else f"shadowing with @{self.alias}",
                self.model_name,
                version.version,
                self.file_name,
                f", replacing v{previous.version}" if previous else "",
            )
            if previous is not None:  # requests still holding it keep their reference
                shutil.rmtree(self.cache_dir / f"v{previous.version}", ignore_errors=True)
            for listener in self.on_loaded:
                listener(self.current)
            return True

    def _let_go(self, reason: str) -> bool:
        """No version has the alias (only when not required): hold no model."""
        self.last_error = reason
        previous, self.current = self.current, None
        if previous is None:
            return False
        log.info("%s: no longer holding v%s", reason, previous.version)
        shutil.rmtree(self.cache_dir / f"v{previous.version}", ignore_errors=True)
        for listener in self.on_loaded:
            listener(None)
        return True

    def _failed(self, reason: str) -> bool:
        self.last_error = reason
        log.warning("reload failed: %s", reason)
        for listener in self.on_failure:
            listener(reason)
        return False

    def start(self) -> None:
        """Poll the alias in a daemon thread until ``stop``."""

        def loop() -> None:
            while not self._stop.wait(self.poll_interval_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="champion-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        shutil.rmtree(self.cache_dir, ignore_errors=True)
