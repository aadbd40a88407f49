"""Typed, frozen view of ``params.yaml``: one pydantic model per section, unknown keys rejected.

A stage's section has the stage's name and module (``train`` -> ``pipelines/train.py``); ``serve``
belongs to ``serving/``, ``deploy`` to ``flows/deploy.py``, and ``tracking`` and ``adversarial``
are shared by several stages; ``numbers.segment`` is read by ``serving/`` too.
Every number the pipeline uses lives in ``params.yaml``; this module only gives it types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    """Base for every params section: immutable, and a typo is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceFile(Section):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class IngestParams(Section):
    files: dict[Literal["train_images", "train_labels", "test_images", "test_labels"], SourceFile]
    mirrors: list[str] = Field(min_length=1)
    timeout_s: float = Field(gt=0)
    fallback_test_fraction: float = Field(gt=0, lt=1)
    fallback_seed: int

    @property
    def file_names(self) -> dict[str, str]:
        """{"train_images": "train-images-idx3-ubyte.gz", ...}: what ``load_raw`` takes."""
        return {key: spec.name for key, spec in self.files.items()}


class MergeParams(Section):
    on_bad_file: Literal["skip", "refuse"]  # skip: merge the good files; refuse: none of the batch
    max_files: int = Field(ge=1)  # a batch with more incoming files than this is refused
    max_new_class_share: float = Field(gt=0)  # a batch adding more of one class is refused


class ValidateParams(Section):
    image_shape: tuple[int, int]
    min_train_images: int = Field(ge=1)
    min_test_images: int = Field(ge=1)
    min_class_share: float = Field(ge=0, lt=0.1)
    pixel_min: int
    pixel_max: int


class AugmentParams(Section):
    enabled: bool
    rotation_deg: float = Field(ge=0, le=180)
    shift: float = Field(ge=0, lt=1)
    zoom_min: float = Field(gt=0)
    zoom_max: float = Field(gt=0)
    brightness: float = Field(ge=0, lt=1)
    noise_std: float = Field(ge=0)
    preview_images: int = Field(ge=1)
    seed: int

    @model_validator(mode="after")
    def _zoom_order(self) -> AugmentParams:
        if self.zoom_min > self.zoom_max:
            raise ValueError(f"zoom_min ({self.zoom_min}) must be <= zoom_max ({self.zoom_max})")
        return self


class ModelParams(Section):
    conv1_filters: int = Field(ge=1)
    conv2_filters: int = Field(ge=1)
    conv3_filters: int = Field(default=0, ge=0)  # 0 = no third block (the baseline)
    kernel_size: int = Field(ge=1)
    padding: Literal["valid", "same"] = "valid"
    dense_units: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)


class TrainParams(Section):
    seed: int
    max_images: int = Field(ge=0)  # 0 = the whole training set
    validation_split: float = Field(gt=0, lt=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    lr_decay: float = Field(gt=0, le=1)  # per-epoch multiplier; 1 = off
    lr_factor: float = Field(gt=0, lt=1)
    lr_patience: int = Field(ge=0)
    min_learning_rate: float = Field(ge=0)
    early_stopping_patience: int = Field(ge=0)
    restore_best_weights: bool = (
        False  # true: end on the epoch with the best val_loss, not the last
    )
    bn_calibration_images: int = Field(ge=0)  # 0 = keep BatchNorm's training-time statistics
    ema_momentum: float = Field(default=0.0, ge=0, lt=1)  # weight averaging; 0 = off
    # what the training step computes in (pipelines.model.compute_dtype); saved models are float32
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    model: ModelParams


class SearchDim(Section):
    """One tuned setting: ``choices``, or a ``low``..``high`` range (ints give an int range).

    ``log`` samples the range on a log scale (learning rates); ``step`` quantises it.
    """

    choices: list[int | float | str | bool] | None = Field(default=None, min_length=1)
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDim:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
        elif self.low is None or self.high is None:
            raise ValueError("give choices, or both low and high")
        elif not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (found {self.low})")
        return self

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class AdversarialParams(Section):
    enabled: bool  # false: train on the (augmented) images only
    epsilon: float = Field(gt=0, le=1)  # FGSM step on the [0, 1] pixel scale
    ratio: float = Field(gt=0, le=1)  # share of each training batch replaced by its FGSM copies

    def identity(self) -> dict[str, Any]:
        """What this section adds to the hash that names a training (checkpoints, tuning study):
        nothing while it is off, so the names from before the section existed stay valid."""
        return {"adversarial": self.model_dump()} if self.enabled else {}


class TuneParams(Section):
    enabled: bool  # false: train uses params.yaml as it is
    study_name: str  # a hash of everything that defines the study is appended
    storage: str  # Optuna storage URL; "" = sqlite file data/tune/study.db
    metric: Literal[
        "val_accuracy", "val_loss"
    ]  # what a trial maximises (accuracy) or minimises (loss)
    n_trials: int = Field(ge=1)  # finished (complete or pruned) trials, across resumes
    timeout_s: float = Field(ge=0)  # wall-clock budget of one tuning run; 0 = none
    trial_images: int = Field(
        ge=0
    )  # training images per trial (validation split included); 0 = all
    trial_epochs: int = Field(ge=1)
    sampler_seed: int
    pruner: Literal["median", "hyperband", "none"]
    pruner_startup_trials: int = Field(ge=0)  # median: trials that are never pruned
    pruner_warmup_epochs: int = Field(ge=0)  # median: epochs before a trial can be pruned
    min_improvement: float = Field(ge=0)  # the best trial replaces trial 0 only if it wins by this
    # trials at a time: 1 = in this process; N > 1 = on a Dask cluster (pipelines/tune_cluster.py)
    workers: int = Field(default=1, ge=1)
    # the Dask scheduler's address (tcp://host:8786); "" = $DASK_SCHEDULER_ADDRESS, else a local
    # cluster of `workers` processes started for this run
    scheduler: str = ""
    heartbeat_s: int = Field(ge=1)  # a trial whose process stops beating this long ...
    grace_s: int = Field(ge=1)  # ... plus this grace is failed, and retried on the next run
    space: dict[str, SearchDim]

    @model_validator(mode="after")
    def _space_keys(self) -> TuneParams:
        for key in self.space:
            if key.split(".")[0] not in ("train", "augment"):
                raise ValueError(f"space key {key!r} must start with 'train.' or 'augment.'")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(ge=1)
    top_confused_pairs: int = Field(ge=1)
    insight: (
        bool  # Grad-CAM, error gallery, FGSM, calibration and the HTML report; false = metrics only
    )
    seed: int  # the fixed samples: correct images in the Grad-CAM grid, FGSM's test images
    gradcam_correct: int = Field(ge=0)  # correctly classified images in the Grad-CAM grid
    gradcam_errors: int = Field(ge=0)  # misclassified images in the Grad-CAM grid (at most)
    gallery_per_pair: int = Field(ge=1)  # images drawn per (true, predicted) row of the gallery
    confident_errors: int = Field(ge=1)  # rows of the most-confident-errors table
    fgsm_epsilons: list[float] = Field(min_length=1)
    fgsm_images: int = Field(ge=0)  # test images FGSM attacks (seeded sample); 0 = all
    calibration_bins: int = Field(ge=2)
    insight_batch_size: int = Field(ge=1)  # images per gradient pass (Grad-CAM, FGSM)

    @field_validator("fgsm_epsilons")
    @classmethod
    def _epsilons_in_range(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            raise ValueError(f"FGSM epsilons are on the [0, 1] pixel scale, in (0, 1]; got {bad}")
        return sorted(values)


class ExportParams(Section):
    representative_images: int = Field(ge=1)  # clean training images that calibrate int8
    min_agreement: float = Field(ge=0, le=1)  # ONNX, float TFLite: share of Keras' argmax kept
    max_int8_drop: float = Field(ge=0, le=1)  # int8: accuracy it may lose against Keras
    latency_images: int = Field(ge=1)  # one-image calls timed (median)
    latency_batch: int = Field(ge=1)  # batch size of the batch latency
    latency_repeats: int = Field(ge=1)  # batch calls timed (median)
    threads: int = Field(ge=1)  # runtime threads, as the server runs them


class RegisterParams(Section):
    model_name: str
    champion_alias: str
    challenger_alias: str
    min_accuracy: float = Field(ge=0, le=1)
    serve_check_images: int = Field(ge=1)  # test images the served format must predict
    max_served_drop: float = Field(ge=0, le=1)  # ... losing at most this accuracy against Keras
    shadow_min_requests: int = Field(ge=0)  # 0: off; else a better candidate serves in shadow first
    shadow_min_agreement: float = Field(
        ge=0, le=1
    )  # ... and must agree this often to take champion


class ServeParams(Section):
    format: Literal["model.onnx", "model_float.tflite", "model_int8.tflite"]
    host: str
    port: int = Field(ge=1, le=65535)  # PORT in the environment overrides it
    poll_interval_s: float = Field(gt=0)  # how often the champion alias is checked for a move
    threads: int = Field(ge=1)  # runtime threads per request
    workers: int = Field(ge=1)  # server processes, each with its own model
    max_batch: int = Field(ge=1)  # images per request
    http: Literal["h11", "httptools"]  # uvicorn's HTTP parser
    batch_requests: bool  # one model call for the images of requests that arrive together
    max_batch_wait_ms: float = Field(ge=0, le=1000)  # how long a batch's first request waits
    batch_max_images: int = Field(ge=1)  # a batch goes as soon as it holds this many images
    freeze_gc: bool  # gc.freeze() once the model is loaded (serving/app.py)
    max_body_bytes: int = Field(ge=1)  # JSON request bodies
    max_upload_bytes: int = Field(ge=1)  # uploaded images
    feedback: bool  # POST /feedback (the page's "correct this prediction") queues for review
    feedback_per_minute: int = Field(ge=1)  # corrections one client may send a minute, per worker
    feedback_quota: int = Field(ge=1)  # corrections waiting for review, at most; then 429
    metrics: bool  # GET /metrics, Prometheus' text format
    log_inference: bool  # every answered image recorded to Parquet under log_dir, off the path
    log_dir: str = Field(min_length=1)
    log_images: bool  # keep the 28x28 pixels in the log too (off: only the summary features)
    log_max_mb: float = Field(gt=0)  # the log's size cap: the oldest files go first
    log_flush_s: float = Field(gt=0)  # how often the log's writer thread writes what has queued
    shadow: str | None = Field(min_length=1)  # an alias scored beside the served one (None: off)


class DeployParams(Section):
    retrain_cron: str = Field(min_length=9)  # the scheduled-retrain deployment's cron schedule
    timezone: str  # the cron's time zone
    lock_wait_s: float = Field(
        ge=0
    )  # a training waits this long for a running one, then is skipped


class MonitorParams(Section):
    experiment: str = Field(min_length=1)  # the MLflow experiment of the drift checks
    cron: str = Field(min_length=9)  # the mnist-monitoring/drift-check deployment's schedule
    window_hours: float = Field(gt=0)  # each check reads the log's last window_hours
    min_records: int = Field(ge=1)  # fewer answered images in the window: no verdict
    reference_images: int = Field(ge=100)  # training images sampled as the reference
    feature_distance: float = Field(gt=0)  # a feature drifts past this normed distance
    drift_share: float = Field(gt=0, le=1)  # ... and the data drifts when this share of them does
    prediction_distance: float = Field(gt=0, le=1)  # digits answered vs training labels
    low_confidence: float = Field(gt=0, le=1)  # an answer under this top probability is unsure
    max_low_confidence_share: float = Field(gt=0, le=1)
    max_feedback: int = Field(ge=0)  # corrections waiting in the quarantine
    retrain_deployment: str = Field(pattern=r"^[^/]+/[^/]+$")  # what the automation runs


class SegmentParams(Section):
    """How ``pipelines.segment`` reads a whole number (docs/numbers.md)."""

    min_part_share: float = Field(ge=0, le=1)  # of the largest part's ink: less is a speck
    merge_overlap: float = Field(ge=0, le=1)  # of the narrower part's columns: more is one digit
    min_part_height: float = Field(
        ge=0, le=1
    )  # of the median part's height: less joins a neighbour
    min_split_aspect: float = Field(gt=0)  # width / line height above which a part may be cut
    max_piece_aspect: float = Field(gt=0)  # the widest one digit may be, over the line height
    min_piece_share: float = Field(gt=0, le=1)  # the narrowest piece, a share of the line height
    digit_aspect: float = Field(gt=0)  # pieces wider than this (over line height) are penalised
    aspect_spread: float = Field(gt=0)  # ... by a half-normal of this spread, in log units
    piece_cost: float  # log-score each piece costs: higher favours fewer, wider pieces
    crossing_cost: float = Field(ge=0)  # log-score per stroke a cut crosses beyond the first
    cut_spread: int = Field(ge=0)  # columns either side of a valley also tried as cuts
    max_cuts: int = Field(ge=0)  # valleys tried per part, the lowest first
    max_digits: int = Field(ge=1)  # more parts or digits than this is refused
    min_confidence: float = Field(ge=0, le=1)  # a digit less sure than this refuses the number
    max_line_height: int = Field(ge=28)  # taller ink is scaled down to this first (cost)


class NumberBenchParams(Section):
    """The seeded benchmark of numbers made from MNIST's test digits (``pipelines.numbers``)."""

    count: int = Field(ge=1)  # numbers per length and spacing
    seed: int
    max_length: int = Field(ge=1)  # lengths 1..max_length
    scale: tuple[float, float]  # each digit's size, relative to MNIST's
    jitter: int = Field(ge=0)  # rows each digit moves up or down, at most
    slant: float = Field(ge=0, le=1)  # the whole number's shear, at most this either way
    gap: tuple[int, int]  # apart: blank columns between neighbours
    overlap: tuple[int, int]  # overlapping: columns by which neighbours overlap
    worst_examples: int = Field(ge=0)  # wrong or refused readings drawn with their boxes

    @model_validator(mode="after")
    def _ranges_ordered(self) -> NumberBenchParams:
        for name in ("scale", "gap", "overlap"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name}: expected 0 < low <= high, got [{low}, {high}]")
        return self


class NumbersParams(Section):
    segment: SegmentParams
    benchmark: NumberBenchParams


class TrackingParams(Section):
    experiment: str


class Params(Section):
    tracking: TrackingParams
    ingest: IngestParams
    merge: MergeParams
    validate_: ValidateParams = Field(alias="validate")
    augment: AugmentParams
    tune: TuneParams
    train: TrainParams
    adversarial: AdversarialParams
    evaluate: EvaluateParams
    export: ExportParams
    register_: RegisterParams = Field(alias="register")
    serve: ServeParams
    deploy: DeployParams
    monitor: MonitorParams
    numbers: NumbersParams

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    # `validate` and `register` are pydantic/ABC method names, so those two fields carry a
    # trailing underscore in Python and their plain names in params.yaml.
    @property
    def validate(self) -> ValidateParams:  # type: ignore[override]
        return self.validate_

    @property
    def register(self) -> RegisterParams:  # type: ignore[override]
        return self.register_

    @model_validator(mode="after")
    def _space_names_real_settings(self) -> Params:
        # A tuned key must name an existing number in its section, so a typo fails here, not
        # after an hour of trials.
        sections = {"train": self.train.model_dump(), "augment": self.augment.model_dump()}
        for key in self.tune.space:
            node: Any = sections
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"tune.space: {key!r} is not a setting in params.yaml")
                node = node[part]
            if isinstance(node, dict):
                raise ValueError(f"tune.space: {key!r} is a section, not a single setting")
        return self

    @model_validator(mode="after")
    def _shadow_is_another_alias(self) -> Params:
        if self.serve.shadow == self.register.champion_alias:
            raise ValueError(
                f"serve.shadow: {self.serve.shadow!r} is the served alias itself "
                f"(register.champion_alias); name the challenger's ({self.register.challenger_alias!r})"
            )
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in, recursing into nested mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.model.dropout": 0.3} -> {"train": {"model": {"dropout": 0.3}}}."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def apply_overrides(
    params: Params, policy: AugmentParams, dotted: dict[str, Any]
) -> tuple[Params, AugmentParams]:
    """``params`` and the augment ``policy`` with dotted ``train.*``/``augment.*`` overrides (the
    tune stage's best trial) applied and validated again."""
    nested = nest(dotted)
    unknown = set(nested) - {"train", "augment"}
    if unknown:
        raise ParamsError(
            f"overrides may only touch train.* and augment.*, found {sorted(unknown)}"
        )
    try:
        train = TrainParams.model_validate(
            deep_merge(params.train.model_dump(), nested.get("train", {}))
        )
        policy = AugmentParams.model_validate(
            deep_merge(policy.model_dump(), nested.get("augment", {}))
        )
    except ValidationError as exc:
        raise ParamsError(f"tuned overrides {dotted} are invalid: {exc}") from None
    return params.model_copy(update={"train": train}), policy


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with an error that names the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ParamsError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(
            f"{path}: expected a mapping at the top level, found {type(data).__name__}"
        )
    return data


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a raw params mapping; the error names each bad key by its dotted path."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {exc.error_count()} invalid setting(s):"]
        for err in exc.errors():
            where = (
                ".".join(str(p) for p in err["loc"])
                .replace("validate_", "validate")
                .replace("register_", "register")
            )
            lines.append(f"  {where}: {err['msg']} (found {err.get('input')!r})")
        raise ParamsError("\n".join(lines)) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Load and validate ``params.yaml``."""
    return parse_params(read_yaml(Path(path)), source=str(path))
