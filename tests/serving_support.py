"""Helpers shared by the export, register and serving tests: a small trained model, a registry
holding versions with real exports, and request bodies for the server."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import keras
import numpy as np
import pytest
import yaml

from pipelines.config import ExportParams, ModelParams
from pipelines.model import build_model, to_model_input
from tests.conftest import PARAMS_PATH, REPO
from tests.team_support import free_port

# The export stage's settings, with few latency calls: parity is what the tests check.
SMALL_EXPORT = ExportParams(
    representative_images=50,
    min_agreement=0.999,  # ONNX and float TFLite match Keras to rounding: far inside this bar
    # The tiny model sits near chance on these strokes (their labels are arbitrary), so int8 flips
    # a few of its near-tied answers, by an amount that depends on the CPU's kernels. The serving
    # tests need its int8 export to pass (the server refuses a failed one); a broken export, which
    # loses far more, still fails. params.yaml's bar is for the full run.
    max_int8_drop=0.2,
    latency_images=3,
    latency_batch=32,
    latency_repeats=2,
    threads=1,
)


def tiny_trained_model(images: np.ndarray, labels: np.ndarray, epochs: int = 3) -> keras.Model:
    """A small CNN of the project's architecture, fitted for a few epochs (seconds on a CPU)."""
    keras.utils.set_random_seed(0)
    model = build_model(
        ModelParams(conv1_filters=8, conv2_filters=8, kernel_size=3, dense_units=16, dropout=0.0)
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(to_model_input(images), labels, epochs=epochs, batch_size=32, verbose=0)
    return model


def publish_versions(store_dir, params, x_train, y_train, x_test, y_test):
    """A registry in ``store_dir`` (sqlite) with three versions of one small model, through the
    real export and register code: v1 champion, v2 challenger (same accuracy, so the gate keeps
    v1), v3 whose ONNX file is corrupt (no alias). Returns the export folder. MLFLOW_TRACKING_URI
    must already point at the store."""
    import shutil

    import mlflow

    from pipelines import tracking
    from pipelines.data import write_json
    from pipelines.export import run_export
    from pipelines.model import predict_probabilities
    from pipelines.register import register_model
    from pipelines.scoring import evaluate_probabilities

    tracking.setup("serving-test")
    model = tiny_trained_model(x_train, y_train)
    out = store_dir / "export"
    write_json(out / "parity.json", run_export(model, x_train, x_test, y_test, SMALL_EXPORT, out))
    broken = store_dir / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").write_bytes(b"corrupt")
    gate = params.register.model_copy(update={"min_accuracy": 0.0, "serve_check_images": 50})
    probs = predict_probabilities(model, x_test, 64)
    result = evaluate_probabilities(probs, y_test, 3)
    metrics = {"accuracy": result.accuracy, "loss": result.loss, "data_source": "test"}
    records = []
    for export_dir in (out, out, broken):
        with mlflow.start_run() as run:
            pass
        records.append(
            register_model(
                gate,
                run.info.run_id,
                model,
                metrics,
                x_test,
                y_test,
                64,
                export_dir=export_dir,
                served_format="model.onnx",
            )
        )
    assert [r["alias"] for r in records] == ["champion", "challenger", None], records
    return model, out


def body(images) -> dict:
    """A predict request's JSON body for ``images``."""
    return {"instances": np.asarray(images).tolist()}


GOOD = np.zeros((28, 28)).tolist()


# 28 rows of 28 elements and 784 numbers in all, but row 0 holds arrays: flattening hides it
HIDDEN_NESTING = [[[], [1, 2]] + [0] * 26] + [[0] * 28] * 27


def with_first_pixel(token: str) -> str:
    """A one-image JSON body whose first pixel is ``token`` (NaN, Infinity: Python's json accepts
    them, so the server must check)."""
    return json.dumps({"instances": [GOOD]}).replace("0.0", token, 1)


@contextlib.contextmanager
def serving_process(store, folder, *args, serve: dict | None = None, overrides: dict | None = None):
    """`python -m serving.app *args` on a free loopback port with the test registry; its URL and
    process. ``serve`` overrides params.yaml's serve section, ``overrides`` any (merged in); the
    inference log goes to ``folder/monitoring``. Stopped (and checked to have let go of its port)
    on exit."""
    from pipelines.config import deep_merge

    params = deep_merge(yaml.safe_load(PARAMS_PATH.read_text()), overrides or {})
    params["serve"]["poll_interval_s"] = 1
    params["serve"]["log_dir"] = str(folder / "monitoring")
    params["serve"].update(serve or {})
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "PORT": str(port),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.app", "--params", str(params_file), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stdout.read()}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError("server not ready in 90 s")
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=20)
    with pytest.raises(httpx.ConnectError):  # no worker process was left behind
        httpx.get(f"{url}/health", timeout=2)
