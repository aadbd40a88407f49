"""The API's contract: typed (pydantic) models of what each route takes and answers, from which
FastAPI writes the OpenAPI document at ``/openapi.json``.

The predict routes read their bodies themselves (``serving.parsing``: simdjson straight into one
buffer, far cheaper than a pydantic model per pixel), so their request models only describe the
body; the parser refuses exactly what they do not admit. Every refusal answers the error body
of its API (``ErrorBody``, or ``OIPError`` on the Open Inference Protocol), and each route lists
the statuses it can answer, with why, in ``refusals``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from pipelines.constants import IMAGE_SIDE, NUM_CLASSES

SIDE = f"{IMAGE_SIDE}x{IMAGE_SIDE}"  # how the descriptions name an image's shape

Pixel = Annotated[float, Field(ge=0, le=255, strict=True)]
Row = Annotated[list[Pixel], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)]
Channel = Annotated[list[Pixel], Field(min_length=1, max_length=1)]
ChannelRow = Annotated[list[Channel], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)]
Image = Annotated[
    Annotated[list[Row], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)]
    | Annotated[list[ChannelRow], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)],
    Field(
        description=f"{SIDE} (or {SIDE}x1) numbers, 0-1 or 0-255: an image whose largest value is "
        "above 1 is read as 0-255. White ink on black, as in MNIST."
    ),
]
Probabilities = Annotated[
    list[float], Field(min_length=NUM_CLASSES, max_length=NUM_CLASSES, description="digits 0-9")
]
Digit = Annotated[int, Field(ge=0, le=NUM_CLASSES - 1)]


def _whole_number(value: Any) -> Any:
    """JSON Schema's integer, which 3.0 is too; not a boolean or a string (pydantic's lax int
    would read ``true`` and ``"3"``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    return value


Label = Annotated[int, Field(ge=0, le=NUM_CLASSES - 1), BeforeValidator(_whole_number)]


class ErrorBody(BaseModel):
    """A refusal: what is wrong, and the field at fault."""

    error: str = Field(description="<field>: <what is wrong>", examples=["instances: is empty"])
    field: str = Field(description="the request's field at fault", examples=["instances"])


class OIPError(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str = Field(description="<field>: <what is wrong>")


WHY = {
    400: "the body is not valid JSON or multipart (on /v2: not the protocol's request)",
    401: "POST /feedback without this server's token",
    403: "corrections are switched off here (serve.feedback: false)",
    404: "another model or version than the one served",
    413: "the body is over serve.max_body_bytes (uploads: serve.max_upload_bytes), or more images "
    "than serve.max_batch",
    422: "the request's fields are not what the schema says (or an upload is no digit image; on "
    "/predict/number: no number, with the reason: no ink, too many parts, a part no digit)",
    429: "too many corrections: serve.feedback_per_minute, or serve.feedback_quota waiting",
    503: "no model is loaded yet",
}


def refusals(*statuses: int, body: type[BaseModel] = ErrorBody) -> dict[int | str, Any]:
    """FastAPI's ``responses`` for the refusals a route can answer, each with its error body."""
    return {status: {"model": body, "description": WHY[status]} for status in statuses}


def inlined(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with the models it names written in place, for a request body that
    FastAPI does not parse (and so does not add to the document's components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def read_body(
    model: type[BaseModel], max_items: int | None = None, field: str | None = None
) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: ``model``'s schema as the
    request body, with at most ``max_items`` (``serve.max_batch``) in the list ``field``."""
    schema = inlined(model)
    if field is not None:
        schema["properties"][field]["maxItems"] = max_items
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class PredictRequest(BaseModel):
    """TensorFlow Serving's row format: one image per instance."""

    instances: list[Image] = Field(min_length=1, description="the images")


class Prediction(BaseModel):
    digit: Digit
    probabilities: Probabilities


class PredictAnswer(BaseModel):
    model_version: str
    predictions: list[Prediction]


class TFServingAnswer(BaseModel):
    predictions: list[Probabilities]


class ImageAnswer(BaseModel):
    model_version: str
    digit: Digit
    probabilities: Probabilities
    input: list[list[int]] = Field(description=f"the {SIDE} pixels the model saw")


class Box(BaseModel):
    """Where a digit was found, in the uploaded image's pixels (bottom and right excluded)."""

    top: int = Field(ge=0)
    left: int = Field(ge=0)
    bottom: int = Field(ge=1)
    right: int = Field(ge=1)


Probability = Annotated[float, Field(ge=0, le=1)]


class NumberDigit(BaseModel):
    box: Box
    digit: Digit
    probability: Probability
    runner_up: Digit = Field(description="the next likeliest digit")
    runner_up_probability: Probability
    input: list[list[int]] = Field(
        description=f"the {SIDE} pixels the model saw: what POST /feedback takes to correct it"
    )


class NumberAnswer(BaseModel):
    model_version: str
    number: str = Field(pattern=r"^[0-9]+$", description="the digits read, left to right")
    confidence: Probability = Field(
        description="the product of the digits' probabilities: the chance all are right, if the "
        "model's probabilities are calibrated"
    )
    digits: list[NumberDigit] = Field(min_length=1)


# An upload is a PNG or JPEG of one digit: multipart's encoding says so (a schema cannot say that
# the image must hold ink; a blank one gets 422).
UPLOAD = {
    "requestBody": {
        "content": {
            "multipart/form-data": {"encoding": {"file": {"contentType": "image/png, image/jpeg"}}}
        }
    }
}


class Correction(BaseModel):
    """The page's "correct this prediction": the digit the model saw and its right label."""

    image: Image = Field(description="the `input` that POST /predict/image returned")
    label: Label = Field(description="the digit it really is")


class FeedbackAnswer(BaseModel):
    saved: str
    label: Digit
    status: Literal["pending review"]
    note: str


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: Literal[True]
    version: str


class NotReady(BaseModel):
    ready: Literal[False]
    reason: str | None


class LogState(BaseModel):
    folder: str
    written: int
    dropped: int


class Batching(BaseModel):
    max_images: int
    max_wait_ms: float
    calls: int = Field(description="model calls this worker made for requests")
    images: int = Field(description="the images those calls held")


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    alias: str
    format: str
    run_id: str
    metrics: dict[str, float]
    loaded_at: str
    last_reload_error: str | None
    inference_log: LogState | None
    shadow: dict[str, Any] | None = Field(description="this worker's shadow counts")
    batching: Batching | None = Field(description="this worker's batching across requests")


# --- the Open Inference Protocol (serving.oip parses; these describe) ---------------------------


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


Side = Literal[IMAGE_SIDE]  # an image's height or width in a tensor's shape


class InferInput(BaseModel):
    name: Literal["input"]
    shape: (
        tuple[Annotated[int, Field(ge=1)], Side, Side]
        | tuple[Annotated[int, Field(ge=1)], Side, Side, Literal[1]]
    ) = Field(description="[N, 28, 28] or [N, 28, 28, 1]")
    datatype: Literal["UINT8", "FP32"]
    data: list[Any] | None = Field(
        default=None,
        description="N*784 numbers, flat or nested, row-major; or none, with binary_data_size in "
        "parameters and the bytes after the JSON header (Inference-Header-Content-Length)",
    )
    parameters: dict[str, Any] | None = None


class InferOutput(BaseModel):
    name: Literal["probabilities"]
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1, max_length=1)]
    outputs: list[InferOutput] | None = None


class InferTensor(BaseModel):
    name: Literal["probabilities"]
    datatype: Literal["FP32"]
    shape: list[int]
    data: list[float] | None = None
    parameters: dict[str, Any] | None = None


class InferAnswer(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferTensor]
