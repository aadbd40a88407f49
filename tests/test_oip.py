"""The Open Inference Protocol's request parsing and responses (serving/oip.py), on bodies built
here. A real client, tritonclient, calls the real server in tests/test_serving.py."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from serving.errors import InputError
from serving.oip import HEADER_LENGTH, InferRequest, infer_response, model_metadata, parse_infer

MAX_BATCH = 4


def images(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def body(tensor: dict, **request) -> bytes:
    return orjson.dumps({"inputs": [{"name": "input", **tensor}], **request})


def binary_body(array: np.ndarray, datatype: str, **request) -> tuple[bytes, str]:
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    header = body(
        {"datatype": datatype, "shape": list(array.shape),
         "parameters": {"binary_data_size": len(raw)}},
        **request,
    )  # fmt: skip
    return header + raw, str(len(header))


def refused(data: bytes, header: str | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        parse_infer(data, header, MAX_BATCH)
    return info.value


def test_uint8_pixels_as_json_nested_or_flat_arrive_as_they_were_sent():
    pixels = images()
    for data in (pixels.tolist(), pixels.reshape(-1).tolist()):
        parsed = parse_infer(body({"datatype": "UINT8", "shape": [2, 28, 28], "data": data}),
                             None, MAX_BATCH)  # fmt: skip
        assert parsed.images.dtype == np.uint8 and parsed.images.shape == (2, 28, 28, 1)
        assert (parsed.images[..., 0] == pixels).all() and not parsed.binary_output


def test_fp32_images_are_read_0_1_or_0_255_per_image_as_on_the_other_apis():
    pixels = images().astype(np.float32)
    data = np.stack([pixels[0], pixels[1] / 255])  # one 0-255 image, one 0-1 image
    parsed = parse_infer(
        body({"datatype": "FP32", "shape": [2, 28, 28, 1], "data": data.tolist()}), None, MAX_BATCH
    )
    assert parsed.images.dtype == np.float32
    np.testing.assert_allclose(parsed.images[..., 0], pixels / 255, atol=1e-6)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_binary_tensor_data_after_the_json_header(datatype):
    pixels = images(3)
    array = pixels if datatype == "UINT8" else pixels.astype(np.float32) / 255
    data, header = binary_body(array, datatype, id="req-7", parameters={"binary_data_output": True})
    parsed = parse_infer(data, header, MAX_BATCH)
    np.testing.assert_allclose(parsed.images[..., 0].astype(np.float32),
                               array if datatype == "UINT8" else pixels / 255, atol=1e-6)  # fmt: skip
    assert parsed.id == "req-7" and parsed.binary_output


def test_an_output_named_with_binary_data_asks_for_binary():
    data = body({"datatype": "UINT8", "shape": [1, 28, 28], "data": images(1).tolist()},
                outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])  # fmt: skip
    assert parse_infer(data, None, MAX_BATCH).binary_output


@pytest.mark.parametrize(
    ("tensor", "request_fields", "status", "field", "words"),
    [
        ({"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28]}, {}, 400,
         "inputs[0].name", "'pixels' is not an input; this model takes 'input'"),
        ({"datatype": "INT64", "shape": [1, 28, 28]}, {}, 400, "inputs[0].datatype", "INT64"),
        ({"datatype": "UINT8", "shape": [1, 32, 32]}, {}, 400, "inputs[0].shape", "[N, 28, 28]"),
        ({"datatype": "UINT8", "shape": [0, 28, 28]}, {}, 400, "inputs[0].shape", "N >= 1"),
        ({"datatype": "UINT8", "shape": [5, 28, 28]}, {}, 413, "inputs[0].shape", "limit is 4"),
        ({"datatype": "UINT8", "shape": [1, 28, 28]}, {}, 400, "inputs[0].data", "missing"),
        ({"datatype": "UINT8", "shape": [2, 28, 28], "data": [0] * 784}, {}, 400,
         "inputs[0].data", "has 784 values; shape [2, 28, 28] takes 1568"),
        ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [300] * 784}, {}, 400,
         "inputs[0].data", "whole numbers 0-255"),
        ({"datatype": "FP32", "shape": [1, 28, 28], "data": [-1.0] * 784}, {}, 400,
         "inputs[0].data, image 0", "values must lie in [0, 1] or [0, 255]"),
        ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [[1, 2], [3]]}, {}, 400,
         "inputs[0].data", "not an array of numbers"),
        ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784},
         {"outputs": [{"name": "logits"}]}, 400, "outputs[0].name", "'logits' is not an output"),
    ],
)  # fmt: skip
def test_bad_requests_get_the_status_and_the_field_at_fault(
    tensor, request_fields, status, field, words
):
    error = refused(orjson.dumps({"inputs": [{"name": "input", **tensor}], **request_fields}))
    assert (error.status, error.field) == (status, field) and words in error.message


def test_malformed_bodies_and_headers_are_named():
    assert refused(b"{").field == "body"
    assert refused(b"[]").field == "body"
    assert refused(orjson.dumps({"inputs": []})).field == "inputs"
    data, header = binary_body(images(1), "UINT8")
    assert refused(data, "nine").field == HEADER_LENGTH
    assert refused(data, str(len(data) + 1)).field == HEADER_LENGTH
    short = refused(data[:-1], header)  # one byte missing from the tensor
    assert short.field == "inputs[0].parameters.binary_data_size" and "783 sent" in short.message


def test_responses_carry_the_probabilities_as_json_or_after_the_header():
    probs = np.array([[0.1] * 10, [0.05] * 9 + [0.55]], dtype=np.float32)
    as_json, headers = infer_response("m", "3", InferRequest(images(2), "a", False), probs)
    answer = orjson.loads(as_json)
    assert headers == {"content-type": "application/json"}
    assert answer["model_name"] == "m" and answer["model_version"] == "3" and answer["id"] == "a"
    (output,) = answer["outputs"]
    assert output["shape"] == [2, 10] and output["datatype"] == "FP32"
    np.testing.assert_allclose(output["data"], probs.reshape(-1), rtol=1e-6)
    raw, headers = infer_response("m", "3", InferRequest(images(2), None, True), probs)
    size = int(headers[HEADER_LENGTH])
    header = orjson.loads(raw[:size])
    assert "id" not in header and header["outputs"][0]["parameters"] == {"binary_data_size": 80}
    assert (np.frombuffer(raw[size:], dtype="<f4").reshape(2, 10) == probs).all()


def test_metadata_names_the_tensors_and_the_served_version():
    meta = model_metadata("mnist-classifier", "4", MAX_BATCH)
    assert meta["versions"] == ["4"]
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["max_batch_size"] == MAX_BATCH
