"""The Open Inference Protocol (v2), the REST API of KServe, Triton, MLServer and Seldon clients.

    GET  /v2                                      server metadata
    GET  /v2/health/live   /v2/health/ready       liveness, readiness (503 until a model loads)
    GET  /v2/models/<name>[/versions/<v>]         model metadata: the input and output tensors
    GET  /v2/models/<name>[/versions/<v>]/ready   200 once the model is loaded, 503 before
    POST /v2/models/<name>[/versions/<v>]/infer   inference

The model takes one input tensor, ``input``: ``[N, 28, 28]`` or ``[N, 28, 28, 1]`` images, white
ink on black as in MNIST, ``UINT8`` pixels 0-255 or ``FP32`` values (an image whose largest value
is above 1 is read as 0-255, as on the other APIs). It gives one output, ``probabilities``,
``[N, 10]`` ``FP32``. Tensor data comes as JSON (flat or nested, row-major) or, with the protocol's
binary tensor data extension, as raw little-endian bytes after the JSON header
(``Inference-Header-Content-Length``), which is what ``tritonclient`` sends by default. An output
is returned in binary when the request asks (``binary_data`` on the output, or
``binary_data_output`` on the request).

Errors answer the protocol's error body, ``{"error": "<field>: <what is wrong>"}``: 400 for a
malformed request, 404 for another model or version, 413 for more than ``serve.max_batch``
images, 503 while no model is loaded. Here the requests are parsed and answered; the routes
(and the model, the metrics and the log they share with the other APIs) are in
``serving.routes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from pipelines.constants import IMAGE_SHAPE, INPUT_SHAPE, NUM_CLASSES
from serving.errors import InputError
from serving.parsing import read_image, scaled_images

INPUT, OUTPUT = "input", "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor data extension's header
DATATYPES = {"UINT8": np.uint8, "FP32": np.float32}  # what the input tensor may be
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: the images for ``pipelines.runtime``, and how to answer."""

    images: np.ndarray  # (N, 28, 28, 1): uint8 pixels, or float32 in [0, 1]
    id: str | None
    binary_output: bool


def model_metadata(name: str, version: str, max_batch: int) -> dict[str, Any]:
    """``GET /v2/models/<name>``: the served version and the tensors, ``-1`` for the batch."""
    return {
        "name": name,
        "versions": [version],
        "platform": "mnist-mlops",
        # one tensor has one datatype here: UINT8, what MNIST pixels are; FP32 is taken as well
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, *IMAGE_SHAPE]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
        "parameters": {
            "input_datatypes": list(DATATYPES),
            "input_shapes": [[-1, *IMAGE_SHAPE], [-1, *INPUT_SHAPE]],
            "max_batch_size": max_batch,
        },
    }


def parse_infer(body: bytes, header_length: str | None, max_batch: int) -> InferRequest:
    """An inference request's body -> images, or an InputError naming the field at fault."""
    json_part, binary = body, b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise InputError(
                400, HEADER_LENGTH, f"{header_length!r} is not a length within the body's "
                f"{len(body)} bytes"
            )  # fmt: skip
        json_part, binary = body[:size], body[size:]
    try:
        request = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InputError(400, "body", f"not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise InputError(400, "body", "must be a JSON object with 'inputs'")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError(400, "inputs", f"must be a list of one tensor, {INPUT!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise InputError(
            400, "inputs[0].name", f"{tensor.get('name')!r} is not an input; this model takes "
            f"{INPUT!r}"
        )  # fmt: skip
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # {} is not hashable
        raise InputError(
            400, "inputs[0].datatype", f"{datatype!r}: send one of {', '.join(DATATYPES)}"
        )
    n = _batch_of(tensor.get("shape"), max_batch)
    images = _tensor_data(tensor, np.dtype(DATATYPES[datatype]), n, binary)
    binary_output = _binary_output(request)
    request_id = request.get("id")
    return InferRequest(images, None if request_id is None else str(request_id), binary_output)


def _batch_of(shape: Any, max_batch: int) -> int:
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or tuple(shape[1:]) not in (IMAGE_SHAPE, INPUT_SHAPE)
        or shape[0] < 1
    ):
        raise InputError(
            400, "inputs[0].shape", f"{shape!r}; expected [N, 28, 28] or [N, 28, 28, 1], N >= 1"
        )
    if shape[0] > max_batch:
        raise InputError(413, "inputs[0].shape", f"has {shape[0]} images; the limit is {max_batch}")
    return shape[0]


def _tensor_data(tensor: dict, dtype: np.dtype, n: int, binary: bytes) -> np.ndarray:
    """The tensor's values as (n, 28, 28, 1) images, from JSON data or the binary part."""
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    expected = n * PIXELS
    if size is not None:
        if size != expected * dtype.itemsize or len(binary) != size:
            raise InputError(
                400, "inputs[0].parameters.binary_data_size", f"{size!r} bytes declared and "
                f"{len(binary)} sent; [{n}, 28, 28] {dtype.name} takes {expected * dtype.itemsize}"
            )  # fmt: skip
        flat = np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise InputError(400, "inputs[0].data", "missing: send the values, or binary data")
        try:
            flat = np.asarray(data, dtype=np.float64).reshape(-1)
        except (ValueError, TypeError):
            raise InputError(
                400, "inputs[0].data", "is not an array of numbers (ragged, or non-numeric)"
            ) from None
        if flat.size != expected:
            raise InputError(
                400, "inputs[0].data", f"has {flat.size} values; shape [{n}, 28, 28] takes "
                f"{expected}"
            )  # fmt: skip
        if dtype == np.uint8:
            if not (np.all(flat >= 0) and np.all(flat <= 255) and np.all(flat == np.rint(flat))):
                raise InputError(400, "inputs[0].data", "UINT8 values must be whole numbers 0-255")
            flat = flat.astype(np.uint8)
    if dtype == np.uint8:
        return flat.reshape(n, *INPUT_SHAPE)
    images = scaled_images(flat.astype(np.float32).reshape(n, *IMAGE_SHAPE))
    if images is None:  # name the first image at fault
        for i, image in enumerate(flat.reshape(n, *IMAGE_SHAPE)):
            try:
                read_image(image, f"inputs[0].data, image {i}")
            except InputError as exc:
                raise InputError(400, exc.field, exc.message) from None
    return images


def _binary_output(request: dict) -> bool:
    parameters = request.get("parameters") or {}
    wanted = bool(parameters.get("binary_data_output")) if isinstance(parameters, dict) else False
    outputs = request.get("outputs")
    if outputs is None:
        return wanted
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InputError(400, "outputs", f"must be a list of tensors, {OUTPUT!r}")
    for i, output in enumerate(outputs):
        if output.get("name") != OUTPUT:
            raise InputError(
                400, f"outputs[{i}].name", f"{output.get('name')!r} is not an output; this model "
                f"gives {OUTPUT!r}"
            )  # fmt: skip
        wanted = bool((output.get("parameters") or {}).get("binary_data", wanted))
    return wanted


def infer_response(
    name: str, version: str, request: InferRequest, probabilities: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or the JSON header then the raw probabilities."""
    probs = np.ascontiguousarray(probabilities, dtype="<f4")
    output: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
    if request.binary_output:
        output["parameters"] = {"binary_data_size": probs.nbytes}
    else:
        output["data"] = probs.reshape(-1)
    answer: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": [output]}
    if request.id is not None:
        answer["id"] = request.id
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not request.binary_output:
        return header, {"content-type": "application/json"}
    return header + probs.tobytes(), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
