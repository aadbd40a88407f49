"""serving.parsing: request bodies read into the arrays the model takes, on the fast path and the
general one. Through the served API, with a real model, in test_serving.py."""

from __future__ import annotations

import json

import numpy as np

from serving.parsing import _simd_batch, parse_instances
from tests.serving_support import GOOD, HIDDEN_NESTING, body, with_first_pixel


def test_parse_instances_reads_each_scale_per_image():
    images = parse_instances(json.dumps(body([np.full((28, 28), 255), np.full((28, 28), 0.5)])), 4)
    assert images.shape == (2, 28, 28, 1) and images.dtype == np.float32
    assert images[0].max() == 1.0 and images[1].max() == 0.5


def test_fast_json_path_reads_exactly_what_the_general_path_reads():
    from pipelines.model import to_model_input
    from pipelines.runtime import _checked

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 28, 28))
    pixels[:, 0, 0] = 255  # each image read as 0-255
    batches = {
        "0-255 integers": pixels.tolist(),
        "0-255 floats": (pixels + 0.5 * (pixels < 255)).tolist(),
        "0-1 floats": rng.random((2, 28, 28)).tolist(),
        "mixed scales": [np.full((28, 28), 255).tolist(), np.full((28, 28), 0.25).tolist()],
    }
    for what, instances in batches.items():
        raw = json.dumps({"instances": instances}).encode()
        fast = _simd_batch(raw, 4)
        assert fast is not None, what  # the common request takes the fast path ...
        general = parse_instances(
            json.dumps({"instances": [np.asarray(i)[..., None].tolist() for i in instances]}), 4
        )  # ... 28x28x1 images take the general one
        assert general.dtype == np.float32, what
        # whole-number 0-255 images stay pixels (uint8), the int8 model's own input; the runtime
        # reads them exactly as the general path's floats, and as training does
        assert fast.dtype == (np.uint8 if what == "0-255 integers" else np.float32), what
        assert np.array_equal(_checked(fast), general), what
    assert np.array_equal(
        _checked(_simd_batch(json.dumps({"instances": pixels.tolist()}).encode(), 4)),
        to_model_input(pixels.astype(np.uint8)),
    )
    # anything else is left to the general path, which names what is wrong
    for instances in (
        [HIDDEN_NESTING],
        [np.zeros((27, 28)).tolist()],
        [[["1"] * 28] * 28],
        [GOOD] * 5,  # over the batch limit
    ):
        assert _simd_batch(json.dumps({"instances": instances}).encode(), 4) is None
    assert _simd_batch(with_first_pixel("NaN").encode(), 4) is None
    assert _simd_batch(b'{"instances": "[[[["}', 4) is None
