"""Request bodies -> the arrays ``pipelines.runtime`` takes, or an InputError naming the field at
fault: JSON ``{"instances": [image, ...]}`` (a fast path for the common request, a general path
for everything else) and uploaded PNG/JPEG images (MNIST preprocessing, ``serving.preprocess``)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import orjson
import simdjson

from pipelines.constants import IMAGE_SHAPE, IMAGE_SIDE, INPUT_SHAPE
from serving.errors import InputError
from serving.preprocess import ImageError, decode, ink_levels, mnist_digit


def parse_instances(body: bytes, max_batch: int) -> np.ndarray:
    """``{"instances": [image, ...]}`` -> (N, 28, 28, 1) images for ``pipelines.runtime``: uint8
    pixels when every image is whole numbers 0-255 (what MNIST clients send), float32 in [0, 1]
    otherwise.

    Each image is a 28x28 (or 28x28x1) array of finite numbers, read as 0-1 if its largest value
    is at most 1 and as 0-255 otherwise. Raises InputError naming the field at fault.
    """
    fast = _simd_batch(body, max_batch)
    if fast is not None:
        return fast
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # NaN and Infinity are not JSON, but Python's parser reads them: name the image
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(400, "body", f"not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise InputError(422, "instances", 'missing: send {"instances": [image, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InputError(
            422, "instances", f"must be a list of images, got {type(instances).__name__}"
        )
    if not instances:
        raise InputError(422, "instances", "is empty: send at least one image")
    if len(instances) > max_batch:
        raise InputError(413, "instances", f"has {len(instances)} images; the limit is {max_batch}")
    array = None
    if _numbers_only(instances):  # numpy would read a boolean or a numeric string as a number
        with contextlib.suppress(ValueError, TypeError, OverflowError):  # ragged; an int > 1e308
            array = np.asarray(instances, dtype=np.float32)
    if array is not None and array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array is not None and array.ndim == 3 and array.shape[1:] == IMAGE_SHAPE:
        images = scaled_images(array)
        if images is not None:
            return images
    # Something is wrong: find the first image at fault and say what.
    images = np.empty((len(instances), *INPUT_SHAPE), dtype=np.float32)
    for i, instance in enumerate(instances):
        images[i, ..., 0] = read_image(instance, f"instances[{i}]")
    return images


def _simd_batch(body: bytes, max_batch: int) -> np.ndarray | None:
    """The common request, N 28x28 images of plain numbers, read by simdjson straight into one
    buffer, without the Python object per pixel that orjson builds and numpy then walks (see
    docs/results/2026-11-25-serving-json-parse.md). None for anything else (28x28x1 images
    included): ``parse_instances`` then reads the body the general way and names what is wrong.

    The shape is checked exactly: N images of 28 rows of 28 elements, and no '[' in the body
    beyond those 1 + 29 N arrays, so no element is itself an array (``as_buffer`` flattens
    nested arrays); ``as_buffer`` refuses strings, booleans, nulls and objects. Images of whole
    numbers 0-255 (what MNIST clients send) come back as uint8 pixels, the int8 model's own input,
    read as unsigned integers (``as_buffer`` refuses a fraction or a negative number); any other
    numbers as float32 in [0, 1]."""
    # Every request comes this way: its shapes are spelled out in IMAGE_SIDE, as unpacking
    # INPUT_SHAPE into reshape costs more than the reshape itself.
    try:  # a parser per call, cheap next to the parse: a reused one refuses while proxies live
        instances = simdjson.Parser().parse(body)["instances"]
        n = len(instances)
        if not 0 < n <= max_batch or body.count(b"[") != 1 + (IMAGE_SIDE + 1) * n:
            return None
        for image in instances:
            if list(map(len, image)) != _ROW_LENGTHS:
                return None
        try:
            whole = np.frombuffer(instances.as_buffer(of_type="u"), dtype=np.uint64)
        except (ValueError, TypeError):  # a fraction or a negative number
            whole = None
        if whole is not None:
            whole = whole.reshape(n, -1)
            high = whole.max(axis=1).tolist()
            if min(high) > 1 and max(high) <= 255:  # 0-255 images, nothing out of range
                return whole.astype(np.uint8).reshape(n, IMAGE_SIDE, IMAGE_SIDE, 1)
        flat = np.frombuffer(instances.as_buffer(of_type="d"), dtype=np.float64)
    # not JSON, not this shape, not numbers; RuntimeError: an integer beyond 64 bits (BIGINT_ERROR)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError):
        return None
    return scaled_images(flat.astype(np.float32).reshape(n, IMAGE_SIDE, IMAGE_SIDE))


_ROW_LENGTHS = [IMAGE_SIDE] * IMAGE_SIDE  # one image's row lengths: a square of pixels


def read_image(instance: Any, where: str) -> np.ndarray:
    """One image, 28x28 (or 28x28x1) finite numbers in [0, 1] or [0, 255] -> (28, 28) float32 in
    [0, 1]. Raises InputError naming ``where``."""
    try:
        if not _numbers_only(instance):
            raise TypeError
        array = np.asarray(instance, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        raise InputError(422, where, "values must lie in [0, 1] or [0, 255]") from None
    except (ValueError, TypeError):
        raise InputError(
            422, where, "is not an array of numbers (ragged, or non-numeric values)"
        ) from None
    if array.shape == INPUT_SHAPE:
        array = array[..., 0]
    if array.shape != IMAGE_SHAPE:
        raise InputError(
            422, where, f"has shape {array.shape}; expected {IMAGE_SHAPE} or {INPUT_SHAPE}"
        )
    if not np.isfinite(array).all():
        raise InputError(422, where, "contains NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise InputError(
            422, where, f"values must lie in [0, 1] or [0, 255]; found {low:g} to {high:g}"
        )
    images = array.astype(np.float32)
    return images if high <= 1 else images / np.float32(255)


def _numbers_only(value: Any) -> bool:
    """Whether every leaf of nested lists (or an array) is a JSON number: not a boolean, a string
    or null, which the schema refuses and numpy would read as numbers."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iuf"
    if isinstance(value, list):
        return all(map(_numbers_only, value))
    return type(value) in (int, float)


def scaled_images(array: np.ndarray) -> np.ndarray | None:
    """(N, 28, 28) float32, a new array -> (N, 28, 28, 1) in [0, 1], each image scaled by 1/255 if
    its largest value is above 1; None if any value is outside [0, 255], NaN or infinite."""
    flat = array.reshape(len(array), -1)
    high = flat.max(axis=1)
    top = high.max()
    # min and max carry NaN through, and every comparison with NaN is False: NaN and infinity
    # fail this range check too. As few numpy calls as that allows: on one image each call's
    # fixed cost outweighs its work.
    if not (flat.min() >= 0 and top <= 255):
        return None
    if top > 1:  # divided, as in training (pipelines.model.to_model_input) and pipelines.runtime
        array /= np.where(high > 1, np.float32(255), np.float32(1))[:, None, None]
    return array[..., None]


def read_upload(data: bytes) -> np.ndarray:
    """An uploaded PNG or JPEG of one digit -> (28, 28) uint8, MNIST-style. Raises InputError."""
    try:
        return mnist_digit(decode(data))
    except ImageError as exc:
        raise InputError(422, "file", str(exc)) from None


def read_number_upload(data: bytes) -> np.ndarray:
    """An uploaded PNG or JPEG of a handwritten number -> (H, W) float32 ink in [0, 1], for
    ``pipelines.segment.read_number``. Raises InputError."""
    try:
        return ink_levels(decode(data))
    except ImageError as exc:
        raise InputError(422, "file", str(exc)) from None
