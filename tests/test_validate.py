"""Stage validate: Great Expectations on the raw arrays; each kind of bad data fails by name."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PARAMS_PATH, write_raw

from pipelines.config import Params, ValidateParams, deep_merge, read_yaml
from pipelines.data import Dataset
from pipelines.validate import ValidationReport, validate_dataset

LOWERED = {"min_train_images": 10, "min_test_images": 10}


@pytest.fixture
def vparams(params: Params) -> ValidateParams:
    return params.validate.model_copy(update=LOWERED)


def failed(report: ValidationReport) -> set[tuple[str, str, str | None]]:
    return {(f["suite"], f["expectation"], f["column"]) for f in report.failures}


def test_tiny_dataset_passes(vparams: ValidateParams, tiny_dataset: Dataset) -> None:
    # when the clean dataset is validated
    report = validate_dataset(vparams, tiny_dataset)
    # then every expectation holds and the summary says so
    assert report.success, report.summary()
    assert report.failures == []
    assert {r["suite"] for r in report.results} == {"train_images", "test_images", "class_balance"}
    assert report.summary().startswith(f"validation PASSED: {len(report.results)}/")


def test_default_minimum_counts_fail_the_tiny_dataset(
    params: Params, tiny_dataset: Dataset
) -> None:
    # given the real thresholds (1000 train, 500 test), which 200/100 images do not meet
    report = validate_dataset(params.validate, tiny_dataset)
    # then exactly the row-count expectations fail, reporting the observed counts
    assert failed(report) == {
        ("train_images", "expect_table_row_count_to_be_between", None),
        ("test_images", "expect_table_row_count_to_be_between", None),
    }
    observed = sorted(f["observed_value"] for f in report.failures)
    assert observed == [100, 200]


def test_test_image_copied_into_train_is_leakage(
    vparams: ValidateParams, tiny_dataset: Dataset
) -> None:
    # given one test image copied over a train image
    x_train = tiny_dataset.x_train.copy()
    x_train[5] = tiny_dataset.x_test[17]
    data = dataclasses.replace(tiny_dataset, x_train=x_train)
    # when
    report = validate_dataset(vparams, data)
    # then exactly the leakage expectation fails, on one row
    assert not report.success
    assert len(report.failures) == 1
    failure = report.failures[0]
    assert failure["expectation"] == "expect_column_values_to_not_be_in_set"
    assert failure["column"] == "sha1"
    assert failure["suite"] == "train_images"
    assert failure["unexpected_count"] == 1
    assert failure["element_count"] == 200
    summary = report.summary()
    assert summary.startswith("validation FAILED")
    assert "FAIL [train_images] expect_column_values_to_not_be_in_set(sha1): 1 of 200" in summary


def test_label_outside_0_to_9_fails_the_label_domain(
    vparams: ValidateParams, tiny_dataset: Dataset
) -> None:
    # given a label 11
    y_train = tiny_dataset.y_train.copy()
    y_train[3] = 11
    data = dataclasses.replace(tiny_dataset, y_train=y_train)
    # when
    report = validate_dataset(vparams, data)
    # then
    assert failed(report) == {("train_images", "expect_column_values_to_be_in_set", "label")}
    failure = report.failures[0]
    assert failure["unexpected_count"] == 1
    assert 11 in failure["examples"]
    assert "FAIL [train_images] expect_column_values_to_be_in_set(label)" in report.summary()


def test_missing_digit_in_train_fails_class_balance(
    vparams: ValidateParams, tiny_dataset: Dataset
) -> None:
    # given a training set without a single 3
    keep = tiny_dataset.y_train != 3
    data = dataclasses.replace(
        tiny_dataset, x_train=tiny_dataset.x_train[keep], y_train=tiny_dataset.y_train[keep]
    )
    # when
    report = validate_dataset(vparams, data)
    # then the balance suite fails on count and share, and the examples name the digit
    assert failed(report) == {
        ("class_balance", "expect_column_values_to_be_between", "count"),
        ("class_balance", "expect_column_values_to_be_between", "share"),
    }
    for failure in report.failures:
        assert failure["unexpected_count"] == 1
        assert failure["examples"] == ["train digit 3: 0 images (0.0%)"]
    summary = report.summary()
    assert "FAIL [class_balance] expect_column_values_to_be_between(count)" in summary
    assert "train digit 3: 0 images" in summary


def test_float_images_with_nan_fail_nan_count_and_dtype(
    vparams: ValidateParams, tiny_dataset: Dataset
) -> None:
    # given float images, one holding a NaN
    x_test = tiny_dataset.x_test.astype(np.float32)
    x_test[0, 14, 14] = np.nan
    data = dataclasses.replace(tiny_dataset, x_test=x_test)
    # when
    report = validate_dataset(vparams, data)
    # then
    assert failed(report) == {
        ("test_images", "expect_column_values_to_be_between", "nan_count"),
        ("test_images", "expect_column_values_to_be_in_set", "dtype"),
    }
    by_column = {f["column"]: f for f in report.failures}
    assert by_column["nan_count"]["unexpected_count"] == 1
    assert by_column["dtype"]["unexpected_count"] == 100
    assert by_column["dtype"]["examples"][0] == "float32"
    summary = report.summary()
    assert "FAIL [test_images] expect_column_values_to_be_between(nan_count): 1 of 100" in summary


def test_pixel_above_range_fails_pixel_max(vparams: ValidateParams, tiny_dataset: Dataset) -> None:
    # given float images with one pixel at 300
    x_train = tiny_dataset.x_train.astype(np.float64)
    x_train[7, 10, 10] = 300.0
    data = dataclasses.replace(tiny_dataset, x_train=x_train)
    # when
    report = validate_dataset(vparams, data)
    # then
    assert failed(report) == {
        ("train_images", "expect_column_values_to_be_between", "pixel_max"),
        ("train_images", "expect_column_values_to_be_in_set", "dtype"),
    }
    pixel_max = next(f for f in report.failures if f["column"] == "pixel_max")
    assert pixel_max["unexpected_count"] == 1
    assert pixel_max["examples"] == [300.0]
    assert "FAIL [train_images] expect_column_values_to_be_between(pixel_max)" in report.summary()


def test_cli_on_bad_raw_folder_exits_1_writes_report_and_logs_failed_run(
    tmp_path: Path, params: Params, tiny_dataset: Dataset
) -> None:
    import mlflow

    # given a raw folder with train/test leakage and a params file with lowered minimum counts
    x_train = tiny_dataset.x_train.copy()
    x_train[0] = tiny_dataset.x_test[0]
    raw = write_raw(tmp_path / "raw", params, dataclasses.replace(tiny_dataset, x_train=x_train))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(deep_merge(read_yaml(PARAMS_PATH), {"validate": LOWERED}))
    )
    out = tmp_path / "validation"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # when the stage runs as dvc would run it (from a scratch working directory)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.validate"]
        + ["--raw", str(raw), "--out", str(out), "--params", str(params_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # then it fails cleanly, naming the expectation
    assert proc.returncode == 1, proc.stderr
    assert "stage 'validate' failed" in proc.stderr
    assert "expect_column_values_to_not_be_in_set(sha1) on train_images" in proc.stderr
    assert "Traceback" not in proc.stderr
    report = (out / "report.txt").read_text()
    assert "FAIL" in report
    assert "expect_column_values_to_not_be_in_set(sha1)" in report
    assert (out / "report.json").exists()
    # and MLflow holds a FAILED run named validate-failed in the configured experiment
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name = 'validate-failed'"
    )
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["validation"] == "failed"
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "validation")]
    assert "validation/report.txt" in artifacts
