"""The train stage: its pure pieces (the seeded split, the checkpoint key, the tf.data pipeline,
the BatchNorm recalibration) and, end to end, a killed training resuming from its checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import Params, TrainParams
from pipelines.data import Dataset
from pipelines.train import checkpoint_key, make_dataset, select_images
from tests.e2e_support import REPO, run_in, scratch_repo

SOURCE = {"data_source": "mnist", "files": {"a.gz": "0" * 64}}


@pytest.fixture
def ids() -> tuple[np.ndarray, np.ndarray]:
    """200 'images' whose single pixel is their index, so every item can be traced."""
    return np.arange(200).reshape(200, 1, 1), np.arange(200) % 10


def train_params(params: Params, **update) -> TrainParams:
    return params.train.model_copy(update=update)


@pytest.mark.parametrize(
    ("max_images", "split", "n_fit", "n_val"),
    [(0, 0.1, 180, 20), (100, 0.1, 90, 10), (60, 0.25, 45, 15), (1000, 0.5, 100, 100)],
)
def test_select_images_sizes(
    params: Params, ids, max_images: int, split: float, n_fit: int, n_val: int
) -> None:
    images, labels = ids
    x_fit, y_fit, x_val, y_val = select_images(
        images, labels, train_params(params, max_images=max_images, validation_split=split)
    )
    assert (len(x_fit), len(y_fit), len(x_val), len(y_val)) == (n_fit, n_fit, n_val, n_val)


def test_select_images_has_no_overlap_and_keeps_pairs(params: Params, ids) -> None:
    # given
    images, labels = ids
    # when
    x_fit, y_fit, x_val, y_val = select_images(images, labels, train_params(params, max_images=120))
    # then fit and validation are disjoint and every label still belongs to its image
    fit, val = x_fit.ravel(), x_val.ravel()
    assert set(fit).isdisjoint(val)
    assert len(set(fit)) == len(fit)
    np.testing.assert_array_equal(y_fit, fit % 10)
    np.testing.assert_array_equal(y_val, val % 10)


def test_select_images_is_seeded(params: Params, ids) -> None:
    images, labels = ids
    first = select_images(images, labels, train_params(params, seed=5))
    again = select_images(images, labels, train_params(params, seed=5))
    other = select_images(images, labels, train_params(params, seed=6))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2])


def test_checkpoint_key_moves_with_everything_that_defines_a_training(params: Params) -> None:
    # given a reference key
    key = checkpoint_key(params.train, params.augment, SOURCE)
    # then it is short, stable, and changes with train params, model params, policy and data
    assert len(key) == 16
    assert checkpoint_key(params.train, params.augment, dict(SOURCE)) == key
    changed = [
        checkpoint_key(
            train_params(params, epochs=params.train.epochs + 1), params.augment, SOURCE
        ),
        checkpoint_key(
            train_params(params, model=params.train.model.model_copy(update={"dropout": 0.25})),
            params.augment,
            SOURCE,
        ),
        checkpoint_key(params.train, params.augment.model_copy(update={"shift": 0.2}), SOURCE),
        checkpoint_key(params.train, params.augment, {"files": {"a.gz": "1" * 64}}),
    ]
    assert key not in changed
    assert len(set(changed)) == len(changed)


def test_make_dataset_yields_scaled_float_batches(tiny_dataset: Dataset) -> None:
    # given 50 uint8 images
    images, labels = tiny_dataset.x_train[:50], tiny_dataset.y_train[:50]
    # when batched by 16
    batches = [(x.numpy(), y.numpy()) for x, y in make_dataset(images, labels, batch_size=16)]
    # then 16, 16, 16, 2 images of (28, 28, 1) float32 in [0, 1], labels int32, order kept
    assert [len(x) for x, _ in batches] == [16, 16, 16, 2]
    for x, y in batches:
        assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.dtype == np.int32
    x_all = np.concatenate([x for x, _ in batches])
    np.testing.assert_allclose(x_all[..., 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)


def test_make_dataset_shuffles_reproducibly(tiny_dataset: Dataset) -> None:
    images, labels = tiny_dataset.x_train[:40], np.arange(40)

    def order(seed: int) -> list[int]:
        ds = make_dataset(images, labels, batch_size=40, shuffle_seed=seed)
        return next(iter(ds))[1].numpy().tolist()

    first = order(3)
    assert sorted(first) == list(range(40))
    assert first != list(range(40))
    assert order(3) == first


def test_make_dataset_runs_without_the_tf_data_autotuner(tiny_dataset: Dataset) -> None:
    # The autotuner's thread made Keras stall at the start of about half the epochs
    # (make_dataset's docstring); both the training and the validation pipeline must run without it.
    images, labels = tiny_dataset.x_train[:40], tiny_dataset.y_train[:40]
    for shuffle_seed in (None, 0):
        ds = make_dataset(images, labels, batch_size=16, shuffle_seed=shuffle_seed)
        assert ds.options().autotune.enabled is False
        assert sum(len(y) for _, y in ds) == 40


def test_recalibrate_batchnorm_sets_exact_statistics_of_clean_images():
    import keras

    from pipelines.config import ModelParams
    from pipelines.model import build_model, to_model_input
    from pipelines.train import recalibrate_batchnorm

    # given a model whose BatchNorm statistics are the untrained defaults (mean 0, variance 1)
    keras.utils.set_random_seed(1)
    model = build_model(
        ModelParams(conv1_filters=4, conv2_filters=4, kernel_size=3, dense_units=8, dropout=0.0)
    )
    images = np.random.default_rng(0).integers(0, 256, size=(300, 28, 28)).astype(np.uint8)
    # when recalibrated in batches smaller than the image count
    recalibrate_batchnorm(model, images, batch_size=128)
    # then bn1 holds the exact per-channel mean and variance of conv1's output on those images
    conv1 = keras.ops.convert_to_numpy(model.get_layer("conv1")(to_model_input(images)))
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn1.moving_mean),
        conv1.mean(axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn1.moving_variance),
        conv1.var(axis=(0, 1, 2)),
        rtol=1e-3,
        atol=1e-5,
    )
    # and bn2's statistics moved away from the defaults too
    assert not np.allclose(keras.ops.convert_to_numpy(model.get_layer("bn2").moving_mean), 0.0)


def test_batchnorm_calibration_of_a_bfloat16_model_is_that_of_its_float32_copy():
    import keras

    from pipelines.config import ModelParams
    from pipelines.model import build_model, serving_copy
    from pipelines.train import recalibrate_batchnorm

    # given a model training in mixed bfloat16, and its float32 copy with the same weights
    shape = ModelParams(conv1_filters=4, conv2_filters=4, kernel_size=3, dense_units=8, dropout=0.0)
    keras.utils.set_random_seed(2)
    mixed = build_model(shape, fused_batchnorm=True, dtype="mixed_bfloat16")
    plain = serving_copy(mixed, shape)
    images = np.random.default_rng(1).integers(0, 256, size=(300, 28, 28)).astype(np.uint8)
    # when both are recalibrated on the same clean images
    recalibrate_batchnorm(mixed, images, batch_size=128)
    recalibrate_batchnorm(plain, images, batch_size=128)
    # then the mixed model gets exactly the float32 model's statistics (the model as served),
    # not statistics of its bfloat16 activations (those differ by bfloat16's rounding)
    for name in ("bn1", "bn2"):
        for stat in ("moving_mean", "moving_variance"):
            ours = keras.ops.convert_to_numpy(getattr(mixed.get_layer(name), stat))
            theirs = keras.ops.convert_to_numpy(getattr(plain.get_layer(name), stat))
            np.testing.assert_array_equal(ours, theirs)


# --- end to end: a killed training resumes from its last epoch checkpoint, on the same MLflow run


def train_cmd() -> list[str]:
    """The train stage's command, exactly as dvc.yaml declares it."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    return cmd.split()


@pytest.mark.e2e
def test_killed_training_resumes_from_checkpoint(tmp_path):
    from flows.env import stage_env

    # Given the data stages done, and a 3-epoch training on a small slice
    workdir = scratch_repo(
        tmp_path / "repo",
        {"train": {"epochs": 3, "max_images": 1000}, "tune": {"enabled": False}},
    )
    prep = run_in(workdir, "dvc", "repro", "tune")
    assert prep.returncode == 0, prep.stdout + prep.stderr
    cmd = [sys.executable if part == "python" else part for part in train_cmd()]
    env = stage_env({"TF_CPP_MIN_LOG_LEVEL": "3"})

    # When it is killed right after epoch 1 has been checkpointed
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
    first_lines = []
    for line in proc.stderr:
        first_lines.append(line)
        if "epoch 1/3" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0, "".join(first_lines)
    assert not (workdir / "data/model/model.keras").exists()
    (checkpoint,) = (workdir / "data/checkpoints").iterdir()
    killed_run_id = (checkpoint / "mlflow_run_id").read_text().strip()

    # Then a rerun resumes at epoch 2 on the same MLflow run, and finishes
    rerun = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from checkpoint" in rerun.stderr
    assert (
        "epoch 1/3" not in rerun.stderr
        and "epoch 2/3" in rerun.stderr
        and "epoch 3/3" in rerun.stderr
    )
    run_id = json.loads((workdir / "data/model/run.json").read_text())["run_id"]
    assert run_id == killed_run_id
    # the checkpoint is cleaned up once training completed
    assert not any((workdir / "data/checkpoints").iterdir())


# --- end to end: the tracking server goes away for 30 s in the middle of a training


def mlflow_server(port: int, folder: Path) -> subprocess.Popen:
    """A real `mlflow server` on ``port``, its store in ``folder`` (kept across restarts)."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
        + ["--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_healthy(port: int, timeout_s: float = 180) -> None:
    from flows.servers import http_ok

    deadline = time.monotonic() + timeout_s
    while not http_ok(f"http://127.0.0.1:{port}/health"):
        assert time.monotonic() < deadline, f"mlflow server on {port} did not answer"
        time.sleep(0.5)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_30_s_tracking_server_outage_mid_training_loses_no_metric(tmp_path):
    """MLflow's client retries a refused request with exponential backoff
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR): the epoch that hits the
    outage waits for the server, and every epoch's metrics arrive."""
    import mlflow

    from flows.env import stage_env
    from tests.team_support import free_port

    workdir = scratch_repo(
        tmp_path / "repo",
        {"train": {"epochs": 4, "max_images": 1000}, "tune": {"enabled": False}},
    )
    prep = run_in(workdir, "dvc", "repro", "tune")
    assert prep.returncode == 0, prep.stdout + prep.stderr
    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    server = mlflow_server(port, store)
    procs = [server]
    try:
        wait_healthy(port)
        env = stage_env({"TF_CPP_MIN_LOG_LEVEL": "3"})
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
        cmd = [sys.executable if part == "python" else part for part in train_cmd()]
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        procs.append(proc)
        # when the server is killed right after epoch 1, and back 30 s later
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "epoch 1/4" in line:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
                break
        time.sleep(30)
        server = mlflow_server(port, store)
        procs.append(server)
        wait_healthy(port)
        rest = proc.communicate(timeout=600)[1]
        # then the training finishes
        assert proc.returncode == 0, "".join(seen) + rest[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # every one leads its own session
                p.wait(timeout=30)
    # and every epoch's metrics are on the run
    run_id = json.loads((workdir / "data/model/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "val_accuracy")
    assert len({m.step for m in history}) == 4, history
