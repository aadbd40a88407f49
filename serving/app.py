"""The REST API and drawing page serving ``models:/mnist-classifier@champion``.

    make serve                      # http://127.0.0.1:8000 (PORT=... to change it)
    python -m serving.app --port 8001 --workers 2   # one process (and model) per worker

Endpoints (errors are JSON ``{"error": message, "field": name}``: 4xx for bad input, 503 from the
predict endpoints while no model is loaded; ``/ready`` says 503 ``{"ready": false, "reason": ...}``):
  POST /v1/models/mnist-classifier:predict  TensorFlow Serving's REST predict API (row format)
  POST /predict                             the same body; digit, probabilities and model version
  POST /predict/image                       an uploaded PNG/JPEG of one digit (MNIST preprocessing)
  POST /feedback                            a corrected digit, saved to data/incoming/<label>/ for
                                            the next training (the page's "correct" button)
  GET  /health  /ready  /model              liveness, readiness (503 until loaded), what is served
  GET  /                                    the drawing page
Only the HTTP layer lives here: inference is ``pipelines.runtime``, preprocessing
``serving.preprocess``, model loading and hot reload ``serving.champion``, worker processes
``serving.workers``.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import simdjson
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.config import Params, ServeParams, load_params
from pipelines.merge import INCOMING_DIR, save_incoming
from serving.champion import Champion, Loaded
from serving.preprocess import ImageError, decode, mnist_digit
from serving.workers import run_server

log = logging.getLogger("serving.app")
STATIC = Path(__file__).parent / "static"
IMAGE_PATH = "/predict/image"


class InputError(ValueError):
    """A request the server refuses: status, the field at fault, and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field}, status_code=status)


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
    try:
        array = np.asarray(instances, dtype=np.float32)
    except (ValueError, TypeError):
        array = None
    if array is not None and array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array is not None and array.ndim == 3 and array.shape[1:] == (28, 28):
        images = _scaled(array)
        if images is not None:
            return images
    # Something is wrong: find the first image at fault and say what.
    images = np.empty((len(instances), 28, 28, 1), dtype=np.float32)
    for i, instance in enumerate(instances):
        images[i, ..., 0] = read_image(instance, f"instances[{i}]")
    return images


def _simd_batch(body: bytes, max_batch: int) -> np.ndarray | None:
    """The common request, N 28x28 images of plain numbers, read by simdjson straight into one
    buffer with no Python object per pixel: ~12 µs for one image of 0-255 integers with every
    check, where orjson and numpy take ~30 to read it. None for anything else (28x28x1 images
    included): ``parse_instances`` then reads the body the general way and names what is wrong.

    The shape is checked exactly: N images of 28 rows of 28 elements, and no '[' in the body
    beyond those 1 + 29 N arrays, so no element is itself an array (``as_buffer`` flattens
    nested arrays); ``as_buffer`` refuses strings, booleans, nulls and objects. Images of whole
    numbers 0-255 (what MNIST clients send) come back as uint8 pixels, the int8 model's own input,
    read as unsigned integers (``as_buffer`` refuses a fraction or a negative number); any other
    numbers as float32 in [0, 1]."""
    try:  # a parser per call (~0.05 µs): a reused one refuses to parse while proxies live
        instances = simdjson.Parser().parse(body)["instances"]
        n = len(instances)
        if not 0 < n <= max_batch or body.count(b"[") != 1 + 29 * n:
            return None
        for image in instances:
            if list(map(len, image)) != _ROW_LENGTHS:
                return None
        try:
            whole = np.frombuffer(instances.as_buffer(of_type="u"), dtype=np.uint64)
        except (ValueError, TypeError):  # a fraction or a negative number
            whole = None
        if whole is not None:
            whole = whole.reshape(n, 784)
            high = whole.max(axis=1).tolist()
            if min(high) > 1 and max(high) <= 255:  # 0-255 images, nothing out of range
                return whole.astype(np.uint8).reshape(n, 28, 28, 1)
        flat = np.frombuffer(instances.as_buffer(of_type="d"), dtype=np.float64)
    except (ValueError, KeyError, TypeError, IndexError):  # not JSON, not this shape, not numbers
        return None
    return _scaled(flat.astype(np.float32).reshape(n, 28, 28))


_ROW_LENGTHS = [28] * 28  # an image: 28 rows of 28 elements


def read_image(instance: Any, where: str) -> np.ndarray:
    """One image, 28x28 (or 28x28x1) finite numbers in [0, 1] or [0, 255] -> (28, 28) float32 in
    [0, 1]. Raises InputError naming ``where``."""
    try:
        array = np.asarray(instance, dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError(
            422, where, "is not an array of numbers (ragged, or non-numeric values)"
        ) from None
    if array.shape == (28, 28, 1):
        array = array[..., 0]
    if array.shape != (28, 28):
        raise InputError(422, where, f"has shape {array.shape}; expected (28, 28) or (28, 28, 1)")
    if not np.isfinite(array).all():
        raise InputError(422, where, "contains NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise InputError(
            422, where, f"values must lie in [0, 1] or [0, 255]; found {low:g} to {high:g}"
        )
    images = array.astype(np.float32)
    return images if high <= 1 else images / np.float32(255)


def _scaled(array: np.ndarray) -> np.ndarray | None:
    """(N, 28, 28) float32, a new array -> (N, 28, 28, 1) in [0, 1], each image scaled by 1/255 if
    its largest value is above 1; None if any value is outside [0, 255], NaN or infinite."""
    flat = array.reshape(len(array), -1)
    high = flat.max(axis=1)
    top = high.max()
    # min and max carry NaN through, and every comparison with NaN is False: NaN and infinity
    # fail this range check too. Few numpy calls: each costs ~1 µs on one image.
    if not (flat.min() >= 0 and top <= 255):
        return None
    if top > 1:  # divided, as in training (pipelines.model.to_model_input) and pipelines.runtime
        array /= np.where(high > 1, np.float32(255), np.float32(1))[:, None, None]
    return array[..., None]


def json_response(payload: dict) -> Response:
    """JSON straight from orjson (numpy arrays included): FastAPI's encoder walks every float."""
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )


class BodyLimit:
    """ASGI middleware: 413 for a body over its limit, before the body is read.

    A declared Content-Length over the limit is refused at once; a body without one (chunked) is
    counted as it streams and refused when it passes the limit. Uploads (``/predict/image``) and
    JSON bodies have their own limits.
    """

    def __init__(self, app, max_body_bytes: int, max_upload_bytes: int):
        self.app, self.max_body, self.max_upload = app, max_body_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        upload = scope["path"] == IMAGE_PATH
        limit, field = (self.max_upload, "file") if upload else (self.max_body, "body")
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                return await self._refuse(send, field, int(declared), limit)
            # The HTTP parser delivers exactly the declared length, no more: nothing to count.
            return await self.app(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(field, seen, limit)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except TooLarge:  # raised where no handler turned it into a response
            if not started:
                await self._refuse(send, field, seen, limit)

    @staticmethod
    async def _refuse(send, field: str, size: int, limit: int):
        response = error(413, field, TooLarge(field, size, limit).detail)
        await response({"type": "http"}, None, send)


class TooLarge(HTTPException):
    """A streamed body passed its limit (an HTTPException, so FastAPI's body parsing re-raises it
    as it is instead of turning it into a 400)."""

    def __init__(self, field: str, size: int, limit: int):
        super().__init__(413, f"is {size:,} bytes or more; the limit is {limit:,} bytes")
        self.field = field


class Correction(BaseModel):
    """The page's "correct this prediction": the digit the model saw and its right label."""

    image: list = Field(
        description="28x28 numbers, 0-255 or 0-1, light ink on dark: the `input` that "
        "POST /predict/image returned"
    )
    label: int = Field(ge=0, le=9, description="the digit it really is")


def create_app(
    params: Params,
    champion: Champion | None = None,
    poll: bool = True,
    incoming_dir: Path = INCOMING_DIR,
) -> FastAPI:
    """The application. ``champion`` defaults to ``models:/<register.model_name>@<champion_alias>``;
    corrections (POST /feedback) are saved under ``incoming_dir`` for the merge stage."""
    serve: ServeParams = params.serve
    name = params.register.model_name
    champion = champion or Champion(
        name, params.register.champion_alias, serve.format, serve.threads, serve.poll_interval_s
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from pipelines import tracking

        tracking.use_store()
        champion.refresh()  # a failure leaves /ready at 503 with the reason; polling retries
        if poll:
            champion.start()
        yield
        champion.stop()

    app = FastAPI(
        title="MNIST digit classifier",
        description=f"Serves models:/{name}@{params.register.champion_alias}.",
        lifespan=lifespan,
    )
    app.state.champion = champion

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return error(exc.status, exc.field, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(
        request: Request, exc: StarletteHTTPException
    ):  # 404, 405, 413 while streaming
        field = getattr(exc, "field", "request")
        return error(exc.status_code, field, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid"}
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query"))
        return error(422, field or "body", first["msg"])

    def served() -> Loaded:
        loaded = champion.current
        if loaded is None:
            raise InputError(503, "model", f"no model loaded ({champion.last_error})")
        return loaded

    instances_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["instances"],
                        "properties": {
                            "instances": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": serve.max_batch,
                                "description": "Images, each 28x28 (or 28x28x1) numbers: 0-1 "
                                "floats, or 0-255 (an image whose largest value is above 1 is "
                                "read as 0-255). White ink on black, as in MNIST.",
                                "items": {"type": "array", "items": {"type": "array"}},
                            }
                        },
                    }
                }
            },
        }
    }

    @app.post(f"/v1/models/{name}:predict", openapi_extra=instances_body)
    async def tf_serving_predict(request: Request) -> Response:
        """TensorFlow Serving's REST predict API, row format: ``{"predictions": [[10 probs]]}``."""
        images = parse_instances(await request.body(), serve.max_batch)
        return json_response({"predictions": served().predictor.predict(images)})

    @app.post("/predict", openapi_extra=instances_body)
    async def predict(request: Request) -> Response:
        """Digit and probabilities per image, and the model version that answered."""
        images = parse_instances(await request.body(), serve.max_batch)
        loaded = served()
        probs = loaded.predictor.predict(images)
        digits = probs.argmax(axis=1).tolist()
        return json_response(
            {
                "model_version": loaded.version,
                "predictions": [
                    {"digit": d, "probabilities": row} for d, row in zip(digits, probs, strict=True)
                ],
            }
        )

    @app.post(IMAGE_PATH)
    async def predict_image(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008
        """A PNG or JPEG of one handwritten digit, any size, dark on light or light on dark."""
        try:
            digit = mnist_digit(decode(await file.read()))
        except ImageError as exc:
            raise InputError(422, "file", str(exc)) from None
        loaded = served()
        probs = loaded.predictor.predict(digit[None, ..., None])[0]  # uint8 pixels
        return {
            "model_version": loaded.version,
            "digit": int(probs.argmax()),
            "probabilities": probs.tolist(),
            "input": digit.tolist(),  # the 28x28 the model saw
        }

    @app.post("/feedback", status_code=201)
    async def feedback(correction: Correction) -> dict[str, Any]:
        """Save a corrected digit as ``data/incoming/<label>/*.png``: the next training run's merge
        stage checks it and adds it to the training set."""
        if not serve.feedback:
            raise InputError(403, "feedback", "is switched off here (serve.feedback: false)")
        image = read_image(correction.image, "image")
        digit = np.round(image * 255).astype(np.uint8)
        path = save_incoming(digit, correction.label, incoming_dir)
        log.info("correction saved: %s", path)
        return {
            "saved": str(path),
            "label": correction.label,
            "note": "joins the training set at the next training run (merge stage)",
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """200 once a model is loaded; 503 with the reason before."""
        if champion.current is None:
            return JSONResponse({"ready": False, "reason": champion.last_error}, status_code=503)
        return {"ready": True, "version": champion.current.version}

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
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
        }

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.add_middleware(
        BodyLimit, max_body_bytes=serve.max_body_bytes, max_upload_bytes=serve.max_upload_bytes
    )
    return app


def app_from_environment() -> FastAPI:
    """The application for one of several worker processes (``--workers`` above 1): each worker
    builds its own from the params file named in ``MNIST_SERVE_PARAMS`` and polls the alias
    itself (``MNIST_SERVE_INCOMING``: where corrections go)."""
    return create_app(
        load_params(os.environ.get("MNIST_SERVE_PARAMS", "params.yaml")),
        incoming_dir=Path(os.environ.get("MNIST_SERVE_INCOMING", INCOMING_DIR)),
    )


def main() -> None:
    import argparse

    from pipelines.cli import configure_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--workers", type=int, help="server processes, each with its own model (serve.workers)"
    )
    parser.add_argument(
        "--incoming",
        default=str(INCOMING_DIR),
        help=f"where POST /feedback saves corrected digits (default: {INCOMING_DIR})",
    )
    args = parser.parse_args()
    configure_logging()
    # The server logs each model it loads; MLflow's download progress bar (tqdm) would add bars
    # to that log on every reload, and its multiprocessing lock, left in each worker, made Python
    # warn of "leaked semaphore objects" whenever a --workers 2 server stopped. Inherited by
    # the worker processes. Set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true to have the bars back.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    params = load_params(args.params)
    host = args.host or params.serve.host
    port = args.port or int(os.environ.get("PORT", params.serve.port))
    workers = args.workers or params.serve.workers
    if workers == 1:
        run_server(create_app(params, incoming_dir=Path(args.incoming)), host, port)
    else:
        os.environ["MNIST_SERVE_PARAMS"] = args.params
        os.environ["MNIST_SERVE_INCOMING"] = args.incoming
        run_server("serving.app:app_from_environment", host, port, workers)


if __name__ == "__main__":
    main()
