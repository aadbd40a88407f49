"""Stage export: write the trained model as ONNX, TFLite float32 and TFLite int8, and check each
against Keras on the whole test set.

For every format, through ``pipelines.runtime`` (the code the server runs): test accuracy, argmax
agreement with Keras, the largest probability difference, file size, the median latency of a
one-image call and of a batch call. The bars (``export.min_agreement`` for ONNX and float TFLite,
``export.max_int8_drop`` for int8) are recorded per format in ``parity.json``; the register stage
refuses to promote a model whose served format failed them. The report is written in three parts
(``split_report``): ``parity.json``, the verdict; ``speed.json``, sizes and latencies, which change
on every run and so are no metric; and one headline metrics file per format (accuracy, agreement).
The files and the reports are logged on the training run; register attaches them to the version.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.config import ExportParams, load_params
from pipelines.data import atomic_write_bytes, load_raw, write_json
from pipelines.runtime import FORMATS, METRICS_FILES, PARITY_REPORT, SPEED_REPORT, load_predictor

log = logging.getLogger("pipelines.export")

KERAS = "keras"  # the reference row of the report


def representative_images(images: np.ndarray, n: int) -> np.ndarray:
    """``n`` clean training images spread evenly over the set (deterministic), (n, 28, 28) uint8."""
    index = np.linspace(0, len(images) - 1, num=min(n, len(images))).astype(np.int64)
    return images[index]


def fold_batchnorm(model):
    """The same function as ``model`` (inference), with each BatchNormalization folded into the
    next Conv2D or Dense: for export.

    In this network BatchNorm follows the ReLU, so it cannot fold into its own convolution; it is a
    per-channel ``a * x + c`` that the next layer's weights absorb instead (kernel scaled by ``a``
    on its input channels, ``c`` pushed through the kernel into the bias). Left alone, full-integer
    quantisation stores each BatchNorm's output as one int8 tensor per layer, offsets included,
    and int8 loses far more than its bar (docs/results/2026-11-24-export-run-m.md).

    A BatchNorm is folded only where that is exact: through MaxPooling2D only if every ``a`` is
    positive (max commutes with a positive scale), through Flatten and Dropout (inference: the
    identity), into a Conv2D with ``valid`` padding (``same`` pads the *normalised* input with zeros)
    or a Dense, with a bias. Anywhere else it stays where it was.
    """
    import keras

    layers = list(model.layers)
    weights = {layer.name: layer.get_weights() for layer in layers}
    kept: list[keras.layers.Layer] = []
    pending = None  # (batchnorm layer, a, c, its index in `kept`)

    def put_back() -> None:
        if pending is not None:
            kept.insert(pending[3], pending[0])

    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            put_back()
            gamma, beta, mean, variance = layer.get_weights()
            scale = gamma / np.sqrt(variance + layer.epsilon)
            pending = (layer, scale, beta - scale * mean, len(kept))
            continue
        if pending is not None:
            _, scale, shift, _ = pending
            passes = isinstance(layer, (keras.layers.Flatten, keras.layers.Dropout)) or (
                isinstance(layer, keras.layers.MaxPooling2D) and bool((scale > 0).all())
            )
            foldable = getattr(layer, "use_bias", False) and (
                isinstance(layer, keras.layers.Dense)
                or (isinstance(layer, keras.layers.Conv2D) and layer.padding == "valid")
            )
            if foldable:
                kernel, bias = weights[layer.name]
                if kernel.ndim == 4:  # Conv2D (kh, kw, in, out)
                    weights[layer.name] = [
                        kernel * scale[None, None, :, None],
                        bias + np.einsum("hwio,i->o", kernel, shift),
                    ]
                else:  # Dense, after a Flatten of (h, w, channels): channels vary fastest
                    repeats = kernel.shape[0] // scale.shape[0]
                    weights[layer.name] = [
                        kernel * np.tile(scale, repeats)[:, None],
                        bias + np.tile(shift, repeats) @ kernel,
                    ]
                pending = None
            elif not passes:
                put_back()
                pending = None
        kept.append(layer)
    put_back()
    folded = keras.Sequential(
        [keras.Input(shape=model.input_shape[1:])]
        + [layer.__class__.from_config(layer.get_config()) for layer in kept],
        name=model.name,
    )
    for layer in folded.layers:
        layer.set_weights(weights[layer.name])
    return folded


def convert(model, representative: np.ndarray) -> dict[str, bytes]:
    """The three exports of a Keras model, as file name -> bytes.

    ONNX through Keras' own exporter (tf2onnx); TFLite through ``tf.lite.TFLiteConverter``, int8
    with full-integer quantisation (uint8 input and output) calibrated on ``representative``.
    All three export the same function with BatchNorm folded into the next layer
    (``fold_batchnorm``): fewer ops, and an int8 model that keeps its accuracy.
    """
    import tensorflow as tf

    from pipelines.model import to_model_input

    samples = to_model_input(representative)
    model = fold_batchnorm(model)
    model(samples[:1], training=False)  # Keras' exporters need a model that has been called
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        model.export(str(onnx_path), format="onnx", verbose=False)
        files["model.onnx"] = onnx_path.read_bytes()

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    files["model_float.tflite"] = converter.convert()

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([samples[i : i + 1]] for i in range(len(samples)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8  # scale 1/255, zero point 0: the raw pixel values
    converter.inference_output_type = tf.uint8
    files["model_int8.tflite"] = converter.convert()
    return files


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def latency(
    predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, params: ExportParams
) -> dict:
    """One-image and batch latency (medians, ms) and batch throughput of ``predict`` on ``x``."""
    singles = iter(np.tile(np.arange(len(x)), 2 + params.latency_images // max(len(x), 1)))
    one = median_seconds(lambda: predict(x[next(singles)][None]), params.latency_images)
    batch = x[: params.latency_batch]
    many = median_seconds(lambda: predict(batch), params.latency_repeats)
    return {
        "latency_1_ms": one * 1e3,
        "latency_batch_ms": many * 1e3,
        "batch_images_per_s": len(batch) / many,
    }


def score(probs: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict:
    """Accuracy, argmax agreement with the reference probabilities, largest probability gap."""
    predicted = probs.argmax(axis=1)
    return {
        "accuracy": float((predicted == labels).mean()),
        "agreement": float((predicted == reference.argmax(axis=1)).mean()),
        "max_abs_prob_diff": float(np.abs(probs - reference).max()),
    }


def check(name: str, row: dict, keras_accuracy: float, params: ExportParams) -> list[str]:
    """The bar a format must pass, as a list of failures (empty: passed)."""
    if name == "model_int8.tflite":
        drop = keras_accuracy - row["accuracy"]
        if drop > params.max_int8_drop:
            return [f"int8 loses {drop:.2%} accuracy (bar: at most {params.max_int8_drop:.2%})"]
        return []
    if row["agreement"] < params.min_agreement:
        return [
            f"agrees with Keras on {row['agreement']:.3%} of test images (bar: {params.min_agreement:.1%})"
        ]
    return []


def parity_report(
    model, export_dir: Path, x_test: np.ndarray, y_test: np.ndarray, params: ExportParams
) -> dict:
    """Measure Keras and every exported file in ``export_dir`` on the test set."""
    from pipelines.model import to_model_input

    x = to_model_input(x_test)
    labels = y_test.astype(np.int64)
    start = time.perf_counter()
    reference = model.predict(x, batch_size=params.latency_batch, verbose=0)
    keras_seconds = time.perf_counter() - start
    keras_row = {
        **score(reference, labels, reference),
        "size_bytes": None,
        # Keras `predict` per request, as a naive server would call it (fewer calls: it is slow).
        "latency_1_ms": median_seconds(lambda: model.predict(x[:1], verbose=0), 20) * 1e3,
        "batch_images_per_s": len(x) / keras_seconds,
        "passed": True,
        "failures": [],
    }
    formats: dict[str, dict] = {KERAS: keras_row}
    for name, what in FORMATS.items():
        path = export_dir / name
        predictor = load_predictor(path, threads=params.threads)
        probs = np.concatenate(
            [
                predictor.predict(x[i : i + params.latency_batch])
                for i in range(0, len(x), params.latency_batch)
            ]
        )
        row = {
            "what": what,
            **score(probs, labels, reference),
            "size_bytes": path.stat().st_size,
            **latency(predictor.predict, x, params),
        }
        row["failures"] = check(name, row, keras_row["accuracy"], params)
        row["passed"] = not row["failures"]
        formats[name] = row
        log.info(
            "%-18s accuracy %.4f  agreement %.4f  %7.1f KB  1 image %.3f ms  batch of %d %.2f ms%s",
            name,
            row["accuracy"],
            row["agreement"],
            row["size_bytes"] / 1024,
            row["latency_1_ms"],
            params.latency_batch,
            row["latency_batch_ms"],
            "" if row["passed"] else "  FAILED: " + "; ".join(row["failures"]),
        )
    exported = [row for name, row in formats.items() if name != KERAS]
    fastest = min((n for n in formats if n != KERAS), key=lambda n: formats[n]["latency_1_ms"])
    return {
        "test_images": len(x),
        "threads": params.threads,
        "latency_batch": min(params.latency_batch, len(x)),
        "bars": {"min_agreement": params.min_agreement, "max_int8_drop": params.max_int8_drop},
        "passed": all(row["passed"] for row in exported),
        "fastest_single_image": fastest,
        "formats": formats,
    }


SPEED_KEYS = ("size_bytes", "latency_1_ms", "latency_batch_ms", "batch_images_per_s")  # per format
SPEED_SETTINGS = ("threads", "latency_batch", "fastest_single_image")  # of the whole report
HEADLINE_KEYS = ("accuracy", "agreement")


def split_report(report: dict) -> dict[str, dict]:
    """``parity_report``'s result as the files the stage writes: file name -> content.

    Timings and sizes go to the speed report alone, so that rerunning export changes the verdict
    and the metrics only when the models' predictions change."""
    speed_rows = {
        n: {k: row[k] for k in SPEED_KEYS if k in row} for n, row in report["formats"].items()
    }
    verdict_rows = {
        n: {k: v for k, v in row.items() if k not in SPEED_KEYS}
        for n, row in report["formats"].items()
    }
    files = {
        PARITY_REPORT: {k: v for k, v in report.items() if k not in ("formats", *SPEED_SETTINGS)}
        | {"formats": verdict_rows},
        SPEED_REPORT: {k: report[k] for k in SPEED_SETTINGS} | {"formats": speed_rows},
    }
    for name, metrics_file in METRICS_FILES.items():
        files[metrics_file] = {k: report["formats"][name][k] for k in HEADLINE_KEYS}
    return files


def run_export(
    model,
    x_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    params: ExportParams,
    out: Path,
) -> dict:
    """Write the three exports into ``out`` (each atomically), then measure them. Returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    files = convert(model, representative_images(x_train, params.representative_images))
    for name, blob in files.items():
        atomic_write_bytes(out / name, blob)
    log.info("exported %s in %.1f s", ", ".join(files), time.perf_counter() - start)
    return parity_report(model, out, x_test, y_test, params)


def main() -> None:
    import keras
    import mlflow

    from pipelines import tracking
    from pipelines.cli import base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    model_dir, out = Path(args.model), Path(args.out)
    model_file = model_dir / "model.keras"
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file}: no trained model; run the train stage first")
    data = load_raw(Path(args.raw), params.ingest.file_names)
    model = keras.models.load_model(model_file)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    report = run_export(model, data.x_train, data.x_test, data.y_test, params.export, out)
    written = split_report(report)
    for file_name, content in written.items():
        write_json(out / file_name, content)
    with tracking.attach_run(model_dir / tracking.RUN_FILE, params.tracking.experiment):
        for name in [*FORMATS, *written]:
            mlflow.log_artifact(str(out / name), artifact_path="export")
        mlflow.log_metrics(
            {
                f"export.{name.replace('.', '_')}.{key}": value
                for name, row in report["formats"].items()
                for key, value in row.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
        )
    # Recorded, not fatal: pipelines.runtime.load_registered refuses a failed export, so register
    # keeps a version whose served export (serve.format) failed off the aliases, and the server
    # never loads one. A failure of another format is recorded only.
    if not report["passed"]:
        failed = {n: r["failures"] for n, r in report["formats"].items() if not r["passed"]}
        log.warning("exports failed their parity bars: %s", failed)
    log.info(
        "parity report: %s (fastest single image: %s)",
        out / PARITY_REPORT,
        report["fastest_single_image"],
    )


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("export", main)
