"""Run an exported model (ONNX or TFLite) without Keras: the one inference path that the export
stage's parity check, the promotion gate's infra check and the REST server all use.

``load_predictor(path)`` picks the runtime from the file name:
  - ``*.onnx``: ONNX Runtime (CPU);
  - ``*.tflite``: the LiteRT interpreter (``ai-edge-litert``), float or full-integer int8.

Every predictor takes (N, 28, 28, 1) images, float32 in [0, 1] or uint8 pixels 0-255 (read as
pixel / 255), and returns (N, 10) float32 probabilities. Predictors are safe to call from several
threads at once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from pipelines.constants import INPUT_SHAPE

PARITY_REPORT = "parity.json"  # the export stage's verdict per format, attached to the version
SPEED_REPORT = "speed.json"  # the export stage's sizes and latencies: measured, not a verdict
FORMATS = {  # export file name -> what it is
    "model.onnx": "ONNX (ONNX Runtime)",
    "model_float.tflite": "TFLite float32",
    "model_int8.tflite": "TFLite int8, full-integer",
}
# export file name -> its headline metrics file (accuracy, agreement), for `dvc metrics show`:
# one small file per format, so that each format is a row under the same two columns
METRICS_FILES = {
    "model.onnx": "onnx.json",
    "model_float.tflite": "tflite.json",
    "model_int8.tflite": "int8.json",
}


class Predictor(Protocol):
    path: Path

    def predict(self, images: np.ndarray) -> np.ndarray: ...


class OnnxPredictor:
    """ONNX Runtime session; ``run`` is thread-safe, so no lock."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: _checked(images)})[0]


class TFLitePredictor:
    """LiteRT interpreter. It is not thread-safe and its tensors have one shape at a time, so
    calls are serialised; quantised (uint8) inputs and outputs are converted here.

    The int8 export's input is uint8 with scale 1/255 and zero point 0: a pixel 0-255 is its own
    quantised value, so uint8 images go to the interpreter as they are (quantising pixel / 255
    gives back the same pixel, for each of the 256 values)."""

    def __init__(self, path: Path, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = -1
        self.lock = threading.Lock()
        self.quantised_in = self.input["dtype"] != np.float32
        if self.quantised_in:  # q = round(x / scale + zero), clipped to the integer type's range
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            self.in_scale, self.in_zero = np.float32(1 / scale), np.float32(zero)
            self.in_range = np.float32(info.min), np.float32(info.max)
        dtype, quantization = self.input["dtype"], self.input["quantization"]
        self.pixels_in = dtype == np.uint8 and quantization == (np.float32(1 / 255), 0)
        self.out_table = None
        if self.output["dtype"] in (np.uint8, np.int8):  # (q - zero) * scale for each of 256 codes
            scale, zero = self.output["quantization"]
            codes = np.arange(256, dtype=np.uint8).view(self.output["dtype"])
            self.out_table = ((codes.astype(np.float32) - zero) * scale).astype(np.float32)
        elif self.output["dtype"] != np.float32:
            raise ValueError(f"{path}: unsupported output type {self.output['dtype'].__name__}")

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = _checked(images, keep_pixels=self.pixels_in)
        if self.quantised_in and images.dtype == np.float32:
            # in place on a new array: as few numpy calls as possible, as each has a fixed cost
            scaled = images * self.in_scale
            if self.in_zero:
                scaled += self.in_zero
            np.clip(scaled, *self.in_range, out=scaled)
            images = np.rint(scaled, out=scaled).astype(self.input["dtype"])
        with self.lock:
            if len(images) != self.batch:
                self.interpreter.resize_tensor_input(self.input["index"], images.shape)
                self.interpreter.allocate_tensors()
                self.batch = len(images)
            self.interpreter.set_tensor(self.input["index"], images)
            self.interpreter.invoke()
            out = self.interpreter.get_tensor(self.output["index"])
        if self.out_table is not None:
            return self.out_table[out.view(np.uint8)]
        return out


def _checked(images: np.ndarray, keep_pixels: bool = False) -> np.ndarray:
    """(N, 28, 28, 1) float32 in [0, 1]; uint8 pixels are divided by 255 unless ``keep_pixels``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != INPUT_SHAPE or not len(images):
        raise ValueError(
            f"expected images of shape (N>0, {', '.join(map(str, INPUT_SHAPE))}), got {images.shape}"
        )
    if images.dtype == np.uint8:
        return images if keep_pixels else images.astype(np.float32) / np.float32(255)
    return images.astype(np.float32, copy=False)


def load_predictor(path: Path, threads: int = 1) -> Predictor:
    """The predictor for an exported model file, chosen by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported model there")
    if path.suffix == ".onnx":
        return OnnxPredictor(path, threads)
    if path.suffix == ".tflite":
        return TFLitePredictor(path, threads)
    raise ValueError(f"{path}: unknown model format (expected .onnx or .tflite)")


def load_registered(
    model_name: str, version: str | int, file_name: str, dst: Path, threads: int = 1
) -> Predictor:
    """Download one exported file of a registry version into ``dst`` and load it.

    The version is pinned (``models:/<name>/<version>/<file>``), so an alias that moves meanwhile
    cannot mix two versions. The version's parity report (``parity.json``, attached with the
    exports) must say that this export passed its bars: one that failed them (an int8 file that
    lost accuracy, say) is refused, never served. The register stage's infra check and the
    server both load this way.
    """
    import mlflow

    base = f"models:/{model_name}/{version}"
    Path(dst).mkdir(parents=True, exist_ok=True)
    local = {}
    for name in (PARITY_REPORT, file_name):
        try:
            local[name] = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/{name}", dst_path=str(dst)
            )
        except Exception as exc:  # MlflowException, OSError: say which file of which version
            raise FileNotFoundError(f"{base}/{name}: cannot download ({exc})") from exc
    check_parity(json.loads(Path(local[PARITY_REPORT]).read_text()), file_name, base)
    return load_predictor(Path(local[file_name]), threads)


def check_parity(report: dict, file_name: str, source: str) -> None:
    """Raise ValueError unless the export stage's parity ``report`` says ``file_name`` (an export
    of ``source``, for the message) passed its bars."""
    row = report.get("formats", {}).get(file_name)
    if row is None:
        raise ValueError(f"{file_name} of {source}: its {PARITY_REPORT} has no entry for it")
    if not row.get("passed", False):
        failures = "; ".join(row.get("failures", [])) or "no reason recorded"
        raise ValueError(f"{file_name} of {source} failed its parity bars at export: {failures}")
