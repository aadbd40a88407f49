"""Batching across requests (serving/batching.py), with a stand-in model that records its calls."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.batching import Batcher, joined

POISON = 7  # an image whose pixels are all 7 makes the stand-in model fail


class Recorder:
    """A model whose 'probabilities' for an image are its mean pixel in [0, 1], ten times over;
    it fails a whole call when one of its images is POISON."""

    def __init__(self):
        self.calls: list[int] = []

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        pixels = images.astype(np.float32) / (255 if images.dtype == np.uint8 else 1)
        if images.dtype == np.uint8 and (images.reshape(len(images), -1) == POISON).all(1).any():
            raise ValueError("a poisoned image")
        return np.repeat(pixels.reshape(len(images), -1).mean(1, keepdims=True), 10, axis=1)


def images(*values: int) -> np.ndarray:
    return np.stack([np.full((28, 28, 1), v, dtype=np.uint8) for v in values])


async def gather(batcher: Batcher, model, requests):
    return await asyncio.gather(
        *(batcher.predict(model, r) for r in requests), return_exceptions=True
    )


def test_requests_that_arrive_together_share_one_call_and_get_their_own_rows():
    # given five requests of 1-3 images queued on one event loop turn
    model, batcher = Recorder(), Batcher(max_images=64, max_wait_s=0)
    requests = [images(10), images(20, 30), images(40), images(50, 60, 70), images(80)]
    answers = asyncio.run(gather(batcher, model, requests))
    # then the model ran once, for all eight images, and each request got back its own rows
    assert model.calls == [8]
    for request, answer in zip(requests, answers, strict=True):
        expected = request.reshape(len(request), -1).mean(1) / 255
        assert answer.shape == (len(request), 10)
        np.testing.assert_allclose(answer[:, 0], expected, rtol=1e-6)
    assert batcher.describe() == {"max_images": 64, "max_wait_ms": 0, "calls": 1, "images": 8}


def test_an_image_the_model_cannot_answer_fails_only_its_own_request():
    model, batcher = Recorder(), Batcher(max_images=64, max_wait_s=0)
    requests = [images(10), images(20, POISON), images(40)]
    answers = asyncio.run(gather(batcher, model, requests))
    # the batch failed, so each request ran alone: only the poisoned one fails
    assert model.calls == [4, 1, 2, 1]
    assert isinstance(answers[1], ValueError) and "poisoned" in str(answers[1])
    np.testing.assert_allclose(answers[0][:, 0], [10 / 255], rtol=1e-6)
    np.testing.assert_allclose(answers[2][:, 0], [40 / 255], rtol=1e-6)


def test_a_batch_goes_once_it_is_full_and_a_large_request_goes_alone():
    model, batcher = Recorder(), Batcher(max_images=4, max_wait_s=10)
    requests = [
        images(1, 2, 3),
        images(4, 5),
        images(*range(10, 16)),
        images(6),
        images(17, 18, 19),
    ]
    started = time.perf_counter()
    answers = asyncio.run(gather(batcher, model, requests))
    # each batch went as soon as the next request would not fit, not after the 10 s wait; the
    # six-image request alone; the last two filled a batch of four exactly
    assert time.perf_counter() - started < 5
    assert model.calls == [3, 2, 6, 4]
    assert [len(a) for a in answers] == [3, 2, 6, 1, 3]
    np.testing.assert_allclose(answers[4][:, 0], [17 / 255, 18 / 255, 19 / 255], rtol=1e-6)


def test_the_first_request_waits_the_window_for_others_and_no_longer():
    model, batcher = Recorder(), Batcher(max_images=64, max_wait_s=0.05)

    async def two_apart():
        first = asyncio.ensure_future(batcher.predict(model, images(1)))
        await asyncio.sleep(0.01)  # inside the window: joins the first's batch
        second = batcher.predict(model, images(2))
        started = time.perf_counter()
        answers = await asyncio.gather(first, second)
        return answers, time.perf_counter() - started

    answers, waited = asyncio.run(two_apart())
    assert model.calls == [2] and [len(a) for a in answers] == [1, 1]
    assert 0.02 < waited < 1.0  # the window's rest (about 40 ms), not more than a loop hiccup


def test_requests_on_different_models_are_batched_apart():
    # around a hot reload, requests hold the version they started on
    old, new, batcher = Recorder(), Recorder(), Batcher(max_images=64, max_wait_s=0)

    async def both():
        return await asyncio.gather(
            batcher.predict(old, images(1)),
            batcher.predict(new, images(2)),
            batcher.predict(old, images(3)),
        )

    asyncio.run(both())
    assert old.calls == [2] and new.calls == [1]


def test_joined_reads_pixels_as_the_runtime_does_when_scales_mix():
    pixels, floats = images(51), np.full((1, 28, 28, 1), 0.5, dtype=np.float32)
    assert joined([pixels, images(3)]).dtype == np.uint8
    both = joined([pixels, floats])
    assert both.dtype == np.float32
    np.testing.assert_allclose(both[:, 0, 0, 0], [51 / 255, 0.5], rtol=1e-6)


@pytest.mark.parametrize(("max_images", "max_wait_s"), [(0, 0), (1, -1)])
def test_settings_out_of_range_are_refused(max_images, max_wait_s):
    with pytest.raises(ValueError, match="max_images"):
        Batcher(max_images, max_wait_s)
