"""The API's routes, answering with whatever model a Champion holds at the time of each request.

The handlers' names and docstrings are the OpenAPI document's operation ids, summaries and
descriptions: renaming or rewording one changes the served document.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, File, Header, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from pipelines.config import SegmentParams, ServeParams
from pipelines.review import count_waiting, save_pending
from serving.batching import Batcher
from serving.champion import Champion, Loaded
from serving.errors import InputError
from serving.inference_log import Answered, InferenceLog
from serving.limits import RateLimit
from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.parsing import parse_instances, read_image, read_number_upload, read_upload
from serving.schemas import (
    UPLOAD,
    Correction,
    FeedbackAnswer,
    Health,
    ImageAnswer,
    InferAnswer,
    InferRequest,
    Live,
    ModelInfo,
    ModelMetadata,
    ModelReady,
    NotReady,
    NumberAnswer,
    OIPError,
    PredictAnswer,
    PredictRequest,
    Ready,
    ServerMetadata,
    ServerReady,
    TFServingAnswer,
    read_body,
    refusals,
)
from serving.shadow import Shadow

OIP_MODEL = "/v2/models/{model}"  # the Open Inference Protocol's model paths ...
OIP_VERSION = "/v2/models/{model}/versions/{version}"  # ... and those naming a version

log = logging.getLogger("serving.app")  # the server's one log name, whichever module logs
STATIC = Path(__file__).parent / "static"
IMAGE_PATH = "/predict/image"
NUMBER_PATH = "/predict/number"
UPLOAD_PATHS = frozenset({IMAGE_PATH, NUMBER_PATH})  # the size limit gives these their own limit


def json_response(payload: dict) -> Response:
    """JSON straight from orjson (numpy arrays included): FastAPI's encoder walks every float."""
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )


def predict_answer(version: str, probs: np.ndarray) -> dict:
    """POST /predict's answer (``PredictAnswer``) for a batch's probabilities."""
    digits = probs.argmax(axis=1).tolist()
    return {
        "model_version": version,
        "predictions": [
            {"digit": d, "probabilities": row} for d, row in zip(digits, probs, strict=True)
        ],
    }


def add_routes(
    app: FastAPI,
    serve: ServeParams,
    model_name: str,
    champion: Champion,
    incoming_dir: Path,
    metrics: ServerMetrics | None = None,
    inference_log: InferenceLog | None = None,
    write_token: str | None = None,
    shadow: Shadow | None = None,
    batcher: Batcher | None = None,
    segment: SegmentParams | None = None,
) -> None:
    """Add the API's routes to ``app``, each reading ``champion.current`` when it answers. Each
    answer is counted in ``metrics`` and queued to ``shadow`` (which passes it on to the log) or
    ``inference_log``, where they are given. With ``write_token``, POST /feedback (the one write)
    needs ``Authorization: Bearer <token>``. With ``batcher``, the model runs once for the images
    of the requests that arrive together (``serving.batching``). With ``segment`` (the rules of
    ``pipelines.segment``), POST /predict/number reads whole numbers."""
    # Added to the app itself, not through an APIRouter: FastAPI keeps an included router as one
    # more route to match through on every request.

    def served() -> Loaded:
        loaded = champion.current
        if loaded is None:
            raise InputError(503, "model", f"no model loaded ({champion.last_error})")
        return loaded

    async def run_model(loaded: Loaded, images: np.ndarray) -> np.ndarray:
        """The model's probabilities for this request's images, in a batch with others'."""
        if batcher is None:
            return loaded.predictor.predict(images)
        return await batcher.predict(loaded.predictor, images)

    def answered(endpoint: str, loaded: Loaded, images, probs, started: float) -> None:
        """Record an answer: a few counter increments here, the rest on the log's thread."""
        if metrics is not None:
            metrics.observe_answers(probs.argmax(axis=1), probs.max(axis=1))
        record = shadow.submit if shadow is not None else None
        if record is None and inference_log is not None:
            record = inference_log.record
        if record is not None:
            latency = time.perf_counter() - started
            record(Answered(time.time(), endpoint, loaded.version, latency, images, probs))

    body = read_body(PredictRequest, serve.max_batch, "instances")
    predict_refusals = refusals(400, 413, 422, 503)
    tf_predict_path = f"/v1/models/{model_name}:predict"

    @app.post(
        tf_predict_path,
        openapi_extra=body,
        responses={200: {"model": TFServingAnswer}, **predict_refusals},
    )
    async def tf_serving_predict(request: Request) -> Response:
        """TensorFlow Serving's REST predict API, row format: ``{"predictions": [[10 probs]]}``."""
        started = time.perf_counter()
        images = parse_instances(await request.body(), serve.max_batch)
        loaded = served()
        probs = await run_model(loaded, images)
        answered(tf_predict_path, loaded, images, probs, started)
        return json_response({"predictions": probs})

    @app.post(
        "/predict",
        openapi_extra=body,
        responses={200: {"model": PredictAnswer}, **predict_refusals},
    )
    async def predict(request: Request) -> Response:
        """Digit and probabilities per image, and the model version that answered."""
        started = time.perf_counter()
        images = parse_instances(await request.body(), serve.max_batch)
        loaded = served()
        probs = await run_model(loaded, images)
        answered("/predict", loaded, images, probs, started)
        return json_response(predict_answer(loaded.version, probs))

    @app.post(IMAGE_PATH, openapi_extra=UPLOAD, responses=refusals(400, 413, 422, 503))
    async def predict_image(file: UploadFile = File(...)) -> ImageAnswer:  # noqa: B008
        """A PNG or JPEG of one handwritten digit, any size, dark on light or light on dark."""
        started = time.perf_counter()
        digit = read_upload(await file.read())
        loaded = served()
        batch = digit[None, ..., None]  # uint8 pixels
        all_probs = await run_model(loaded, batch)
        answered(IMAGE_PATH, loaded, batch, all_probs, started)
        probs = all_probs[0]
        return {
            "model_version": loaded.version,
            "digit": int(probs.argmax()),
            "probabilities": probs.tolist(),
            "input": digit.tolist(),  # the 28x28 the model saw
        }

    if segment is not None:
        add_number_route(app, segment, served, answered)

    def count_feedback(outcome: str) -> None:
        if metrics is not None:
            metrics.feedback.labels(outcome=outcome).inc()

    rate = RateLimit(serve.feedback_per_minute)

    @app.post("/feedback", status_code=201, responses=refusals(400, 401, 403, 413, 422, 429))
    async def feedback(
        correction: Correction,
        request: Request,
        authorization: str | None = Header(default=None),  # noqa: B008
    ) -> FeedbackAnswer:
        """Queue a corrected digit for review in ``data/incoming/pending/``, with the served
        model's answer: once a reviewer accepts it (``python -m pipelines.review``), the next
        training run's merge stage adds it to the training set."""
        if not serve.feedback:
            count_feedback("switched_off")
            raise InputError(403, "feedback", "is switched off here (serve.feedback: false)")
        if write_token is not None and not secrets.compare_digest(
            (authorization or "").encode(), f"Bearer {write_token}".encode()
        ):
            count_feedback("unauthorized")
            raise InputError(
                401,
                "authorization",
                "this server takes corrections only with its token (Authorization: Bearer ...)",
                {"WWW-Authenticate": "Bearer"},
            )
        client = request.client.host if request.client else "unknown"
        wait = rate.allow(client)
        if wait is not None:
            count_feedback("rate_limited")
            raise InputError(
                429,
                "feedback",
                f"at most {serve.feedback_per_minute} corrections a minute from one client "
                f"(serve.feedback_per_minute); try again in {wait:.0f} s",
                {"Retry-After": str(max(1, round(wait)))},
            )
        waiting = count_waiting(incoming_dir)
        if waiting >= serve.feedback_quota:
            count_feedback("quota_full")
            raise InputError(
                429,
                "feedback",
                f"{waiting} corrections already wait for review (serve.feedback_quota is "
                f"{serve.feedback_quota}); none is taken until they are reviewed",
            )
        try:
            image = read_image(correction.image, "image")
        except InputError:
            count_feedback("invalid")
            raise
        digit = np.round(image * 255).astype(np.uint8)
        answer = {}
        loaded = champion.current
        if loaded is not None:  # what the model says, for the reviewer
            probs = (await run_model(loaded, digit[None, ..., None]))[0]
            answer = {
                "digit": int(probs.argmax()),
                "confidence": float(probs.max()),
                "version": loaded.version,
            }
        meta = {
            "answer": answer,
            "client": client,
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = save_pending(digit, correction.label, meta, incoming_dir)
        log.info("correction queued for review: %s", path)
        count_feedback("queued")
        return {
            "saved": str(path),
            "label": correction.label,
            "status": "pending review",
            "note": "waits in quarantine until reviewed (python -m pipelines.review); "
            "accepted digits join the next training run (merge stage)",
        }

    add_oip_routes(app, serve, model_name, champion, served, run_model, answered)

    @app.get("/health")
    async def health() -> Health:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": NotReady, "description": "no model loaded yet"}})
    async def ready() -> Ready:
        """200 once a model is loaded; 503 with the reason before."""
        if champion.current is None:
            return JSONResponse({"ready": False, "reason": champion.last_error}, status_code=503)
        return {"ready": True, "version": champion.current.version}

    @app.get("/model", responses=refusals(503))
    async def model_info() -> ModelInfo:
        """Name, version, alias, metrics and load time of the served model."""
        loaded = served()
        return {
            "name": loaded.name,
            "version": loaded.version,
            "alias": loaded.alias,
            "format": loaded.format,
            "run_id": loaded.run_id,
            "metrics": loaded.metrics,
            "loaded_at": loaded.loaded_at,
            "last_reload_error": champion.last_error,
            "inference_log": None
            if inference_log is None
            else {
                "folder": str(inference_log.folder),
                "written": inference_log.written,
                "dropped": inference_log.dropped,
            },
            # this worker's counts (a --workers server's /metrics sums them all)
            "shadow": None if shadow is None else shadow.describe(),
            "batching": None if batcher is None else batcher.describe(),
        }

    if metrics is not None:

        @app.get("/metrics", include_in_schema=False)
        async def prometheus_metrics() -> Response:
            """Prometheus' text format: requests, latency, answers, confidence, served version."""
            return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")


def add_oip_routes(
    app: FastAPI,
    serve: ServeParams,
    model_name: str,
    champion: Champion,
    served,
    run_model,
    answered,
):
    """The Open Inference Protocol (v2) on ``app`` (``serving.oip``), answering with the model
    ``served()`` gives (503 while none is loaded), through ``run_model``, and recording each
    answer through ``answered``, as the other APIs do."""
    from serving import oip

    def oip_error(exc: InputError) -> Response:
        """The protocol's error body: ``{"error": message}``."""
        return Response(
            orjson.dumps({"error": f"{exc.field}: {exc.message}"}),
            status_code=exc.status,
            media_type="application/json",
            headers=exc.headers,
        )

    def resolve(model: str, version: str | None, loaded: Loaded | None) -> Loaded | None:
        """``loaded`` if the path names it; else 404."""
        if model != model_name:
            raise InputError(404, "model", f"{model!r} is not served here; {model_name!r} is")
        if version is not None and (loaded is None or version != loaded.version):
            served_now = f"v{loaded.version} is" if loaded is not None else "none is yet"
            raise InputError(
                404, "version", f"{version!r} of {model_name} is not served; {served_now}"
            )
        return loaded

    @app.get("/v2")
    async def oip_server_metadata() -> ServerMetadata:
        """Open Inference Protocol: the server's name, version and extensions."""
        from importlib.metadata import version

        return {
            "name": "mnist-mlops",
            "version": version("mnist-mlops"),
            "extensions": ["binary_tensor_data"],
        }

    @app.get("/v2/health/live")
    async def oip_live() -> Live:
        """Open Inference Protocol: the server answers."""
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        responses={
            200: {"model": ServerReady},
            400: {"model": ServerReady, "description": "not ready: no model is loaded yet"},
        },
    )
    async def oip_ready() -> Response:
        """Open Inference Protocol: 200 once a model is loaded; 400 before, as the protocol says
        (a 4xx means false)."""
        ready = champion.current is not None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    not_served = refusals(400, 404, 503, body=OIPError)

    async def model_metadata(model: str, version: str | None) -> Response:
        try:
            loaded = resolve(model, version, served())
        except InputError as exc:
            return oip_error(exc)
        return json_response(oip.model_metadata(model_name, loaded.version, serve.max_batch))

    metadata = {"model": ModelMetadata}

    @app.get(OIP_MODEL, responses={200: metadata, **not_served})
    async def oip_model_metadata(model: str) -> Response:
        """Open Inference Protocol: the model's versions and its input and output tensors."""
        return await model_metadata(model, None)

    @app.get(OIP_VERSION, responses={200: metadata, **not_served})
    async def oip_version_metadata(model: str, version: str) -> Response:
        """Open Inference Protocol: the version's input and output tensors."""
        return await model_metadata(model, version)

    def model_ready(model: str, version: str | None) -> Response:
        try:
            ready = resolve(model, version, champion.current) is not None
        except InputError as exc:
            return oip_error(exc)
        return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 400)

    readiness = {200: {"model": ModelReady}, **refusals(404, body=OIPError)}
    readiness[400] = {"model": ModelReady, "description": "not ready: no model is loaded yet"}

    @app.get(f"{OIP_MODEL}/ready", responses=readiness)
    async def oip_model_ready(model: str) -> Response:
        """Open Inference Protocol: 200 once the model is loaded; 400 before."""
        return model_ready(model, None)

    @app.get(f"{OIP_VERSION}/ready", responses=readiness)
    async def oip_version_ready(model: str, version: str) -> Response:
        """Open Inference Protocol: 200 once this version is loaded; 400 before."""
        return model_ready(model, version)

    async def infer(request: Request, model: str, version: str | None) -> Response:
        started = time.perf_counter()
        try:
            loaded = resolve(model, version, served())
            parsed = oip.parse_infer(
                await request.body(), request.headers.get(oip.HEADER_LENGTH), serve.max_batch
            )
        except InputError as exc:
            return oip_error(exc)
        probs = await run_model(loaded, parsed.images)
        answered(f"{OIP_MODEL}/infer", loaded, parsed.images, probs, started)
        body, headers = oip.infer_response(model_name, loaded.version, parsed, probs)
        return Response(body, headers=headers)

    infer_doc = {
        "openapi_extra": read_body(InferRequest),
        "responses": {
            200: {
                "model": InferAnswer,
                "content": {"application/octet-stream": {}},
                "description": "JSON, or with binary outputs the JSON header and the raw "
                "little-endian FP32 probabilities (Inference-Header-Content-Length)",
            },
            **refusals(400, 404, 413, 503, body=OIPError),
        },
    }

    @app.post(f"{OIP_MODEL}/infer", **infer_doc)
    async def oip_infer(request: Request, model: str) -> Response:
        """Open Inference Protocol: probabilities for a tensor of images, as JSON or, with the
        binary tensor data extension, as raw bytes after the JSON header."""
        return await infer(request, model, None)

    @app.post(f"{OIP_VERSION}/infer", **infer_doc)
    async def oip_version_infer(request: Request, model: str, version: str) -> Response:
        """Open Inference Protocol: inference by this version, which must be the one served."""
        return await infer(request, model, version)


def add_number_route(app: FastAPI, segment: SegmentParams, served, answered) -> None:
    """POST /predict/number: a whole number, read by ``pipelines.segment`` with the model
    ``served()`` gives, each digit recorded through ``answered`` as the other APIs' images are."""
    from starlette.concurrency import run_in_threadpool

    from pipelines.segment import NumberError, read_number

    @app.post(
        NUMBER_PATH,
        openapi_extra=UPLOAD,
        responses={200: {"model": NumberAnswer}, **refusals(400, 413, 422, 503)},
    )
    async def predict_number(file: UploadFile = File(...)) -> Response:  # noqa: B008
        """A PNG or JPEG of a handwritten number on one line: its digits, each with its box, its
        probability and the runner-up, and a confidence for the whole number. Digits may be of
        several sizes, slanted, apart or touching (docs/numbers.md); 422 says why a number
        cannot be read."""
        started = time.perf_counter()
        ink = read_number_upload(await file.read())
        loaded = served()

        def classify(images: np.ndarray) -> np.ndarray:
            return loaded.predictor.predict(images[..., None])

        try:  # the cut search calls the model: off the event loop, as the other requests wait
            reading = await run_in_threadpool(read_number, ink, classify, segment)
        except NumberError as exc:
            raise InputError(422, "file", str(exc)) from None
        images = np.stack([d.image for d in reading.digits])[..., None]
        probs = np.stack([d.probabilities for d in reading.digits])
        answered(NUMBER_PATH, loaded, images, probs, started)
        return json_response(
            {
                "model_version": loaded.version,
                "number": reading.text,
                "confidence": reading.confidence,
                "digits": [
                    {
                        "box": vars(d.box),
                        "digit": d.digit,
                        "probability": d.probability,
                        "runner_up": d.runner_up,
                        "runner_up_probability": d.runner_up_probability,
                        "input": d.image,
                    }
                    for d in reading.digits
                ],
            }
        )
