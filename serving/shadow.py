"""Shadow scoring: each answered request scored again by a second model, off the response path.

With ``serve.shadow`` set to an alias (``challenger``), the server holds a second ``Champion`` on
``models:/<name>@<alias>``, reloaded when that alias moves like the served one. A route hands its
answer to ``Shadow.submit``, which only queues it. A thread takes the queue, lets the shadow model
predict the same images, counts per shadow version the requests, the images and the images whose
digit both models agree on, and passes the answer on to the inference log with the shadow's
version and digits in it. The log is the record the promotion gate reads
(``pipelines.shadow``); ``/model`` and ``/metrics`` show the counts.

A request never waits for the shadow: when the queue is full, the answer goes to the log without
a shadow score and is counted as dropped. No shadow model (the alias is not set), or one that is
the served version itself, scores nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from serving.champion import Champion
from serving.inference_log import Answered

log = logging.getLogger("serving.app")


@dataclass
class Tally:
    """What one shadow version has scored in this process."""

    requests: int = 0
    images: int = 0
    agreed: int = 0  # images whose digit the two models agree on

    def as_dict(self) -> dict[str, float | int | None]:
        agreement = self.agreed / self.images if self.images else None
        return {"requests": self.requests, "images": self.images, "agreement": agreement}


class Shadow:
    """Scores what the served model answered with ``model``'s version as well, in a thread."""

    def __init__(
        self,
        model: Champion,
        forward: Callable[[Answered], None] | None = None,
        on_scored: Callable[[str, int, int], None] | None = None,
        on_drop: Callable[[], None] | None = None,
        max_queue: int = 1024,
    ):
        """``forward`` receives every answer, scored or not (the inference log's ``record``);
        ``on_scored(version, images, agreed)`` and ``on_drop()`` feed the metrics."""
        self.model, self.forward = model, forward
        self.on_scored, self.on_drop = on_scored, on_drop
        self.tallies: dict[str, Tally] = {}
        self.dropped = 0  # requests not scored: the queue was full
        self.failures = 0  # requests the shadow model failed to score
        self._queue: queue.Queue[Answered | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None

    def submit(self, answered: Answered) -> None:
        """Called by a route once it has answered; returns at once."""
        try:
            self._queue.put_nowait(answered)
        except queue.Full:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            self._pass_on(answered)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Score what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while (answered := self._queue.get()) is not None:
            try:
                answered = self.score(answered)
            except Exception:  # a broken shadow must never cost the served answers their log
                self.failures += 1
                log.exception("shadow: scoring with %s failed", self.model.alias)
            self._pass_on(answered)

    def score(self, answered: Answered) -> Answered:
        """``answered`` with the shadow's version and digits, when a shadow other than the served
        version is loaded; else unchanged."""
        loaded = self.model.current
        if loaded is None or loaded.version == answered.model_version:
            return answered
        digits = loaded.predictor.predict(answered.images).argmax(axis=1)
        agreed = int(np.count_nonzero(digits == answered.probabilities.argmax(axis=1)))
        tally = self.tallies.setdefault(loaded.version, Tally())
        tally.requests += 1
        tally.images += len(digits)
        tally.agreed += agreed
        if self.on_scored is not None:
            self.on_scored(loaded.version, len(digits), agreed)
        return replace(answered, shadow_version=loaded.version, shadow_digits=digits)

    def _pass_on(self, answered: Answered) -> None:
        if self.forward is not None:
            self.forward(answered)

    def describe(self) -> dict:
        """What ``GET /model`` shows: the shadow's alias and version, and this process' counts."""
        loaded = self.model.current
        version = loaded.version if loaded is not None else None
        return {
            "alias": self.model.alias,
            "version": version,
            "last_error": self.model.last_error,
            **(self.tallies.get(version, Tally()).as_dict()),
            "dropped": self.dropped,
            "failures": self.failures,
            "queued": self._queue.qsize(),
        }
