"""Batching across requests: the images of requests that arrive together go through the model in
one call, and each request gets back its own rows.

Each model call has a fixed part (setting the input, resizing the interpreter, invoking it) that
one call for several requests pays once, and the int8 model costs a little less per image in a
batch. A request that waits for its batch lives across a few turns of the event loop, long enough
for the cyclic collector to count it as long-lived; its full passes over everything the server
had made then stalled the loop. With ``serve.freeze_gc`` (serving/app.py) they do not, and
batching is on by default (docs/results/2026-12-03-serving-gc.md).

``Batcher.predict`` queues a request's images and waits. The first request of a batch schedules
the model call ``max_wait_s`` later (with 0, on the event loop's next turn: after the handlers
already runnable have queued theirs, so a lone client waits for nothing); a batch that reaches
``max_images`` goes at once. The call runs on the event loop, as the model call did before: each
worker process has one core, so a thread would not add one. A request holds its own model
(``Loaded``): requests that started on different versions, around a hot reload, are batched
apart. When a batch's call fails, each of its requests is run alone, so a request the model
cannot answer fails by itself and the others are answered.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from pipelines.runtime import Predictor

log = logging.getLogger("serving.app")


@dataclass
class _Job:
    predictor: Predictor
    images: np.ndarray  # (n, 28, 28, 1), uint8 pixels or float32 in [0, 1]
    answer: asyncio.Future


class Batcher:
    """Queues requests' images for one model call per batch, on the running event loop."""

    def __init__(self, max_images: int, max_wait_s: float):
        if max_images < 1 or max_wait_s < 0:
            raise ValueError(
                f"max_images must be >= 1 and max_wait_s >= 0, got {max_images}, {max_wait_s}"
            )
        self.max_images, self.max_wait_s = max_images, max_wait_s
        self._queue: list[_Job] = []
        self._queued_images = 0
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.calls = 0  # model calls made, and the images they held: what batching saved
        self.images = 0

    def describe(self) -> dict:
        """What ``GET /model`` shows: the settings, and the calls and images so far."""
        return {
            "max_images": self.max_images,
            "max_wait_ms": self.max_wait_s * 1000,
            "calls": self.calls,
            "images": self.images,
        }

    async def predict(self, predictor: Predictor, images: np.ndarray) -> np.ndarray:
        """``predictor.predict(images)``, in one call with the images of the requests queued
        beside this one. Raises what that predict would raise on these images alone."""
        loop = asyncio.get_running_loop()
        job = _Job(predictor, images, loop.create_future())
        if self._queue and self._queued_images + len(images) > self.max_images:
            self._flush()  # what is queued goes now; this request starts the next batch
        self._queue.append(job)
        self._queued_images += len(images)
        if self._queued_images >= self.max_images:
            self._flush()
        elif self._timer is None:
            if self.max_wait_s:
                self._timer = loop.call_later(self.max_wait_s, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        return await job.answer

    def _flush(self) -> None:
        """Run what is queued (at most ``max_images`` images, or one larger request): one call
        per model."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, self._queue, self._queued_images = self._queue, [], 0
        by_model: dict[int, list[_Job]] = {}
        for job in jobs:
            by_model.setdefault(id(job.predictor), []).append(job)
        for same_model in by_model.values():
            self._run(same_model)

    def _run(self, jobs: list[_Job]) -> None:
        predictor = jobs[0].predictor
        if len(jobs) == 1:
            self._answer(jobs[0], predictor)
            return
        try:
            probs = self._call(predictor, joined([job.images for job in jobs]))
        except Exception as exc:  # find the request at fault: each alone
            log.warning("a batch of %d requests failed (%s): running each alone", len(jobs), exc)
            for job in jobs:
                self._answer(job, predictor)
            return
        start = 0
        for job in jobs:
            end = start + len(job.images)
            if not job.answer.done():  # a client that went away cancels its wait
                job.answer.set_result(probs[start:end])
            start = end

    def _answer(self, job: _Job, predictor: Predictor) -> None:
        try:
            probs = self._call(predictor, job.images)
        except Exception as exc:
            if not job.answer.done():
                job.answer.set_exception(exc)
            return
        if not job.answer.done():
            job.answer.set_result(probs)

    def _call(self, predictor: Predictor, images: np.ndarray) -> np.ndarray:
        probs = predictor.predict(images)
        self.calls += 1
        self.images += len(images)
        return probs


def joined(parts: list[np.ndarray]) -> np.ndarray:
    """One array of several requests' images: uint8 pixels if all are, else float32 in [0, 1]
    (a pixel p is p / 255, as ``pipelines.runtime`` reads it)."""
    if all(part.dtype == np.uint8 for part in parts):
        return np.concatenate(parts)
    return np.concatenate(
        [
            part.astype(np.float32) / np.float32(255) if part.dtype == np.uint8 else part
            for part in parts
        ]
    )
