"""Stage validate: Great Expectations checks on the raw data; a failure stops the pipeline.

The images become pandas frames of per-image summary columns (one row per image) plus a
class-balance frame (one row per split and digit); GX validates those frames. The report names
every expectation, its column, whether it passed and how many rows broke it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd

from pipelines.config import ValidateParams, load_params
from pipelines.constants import NUM_CLASSES
from pipelines.data import Dataset, atomic_write_text, load_raw, write_json

log = logging.getLogger("pipelines.validate")

DIGITS = list(range(NUM_CLASSES))


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of all suites: ``success`` only if every expectation passed."""

    success: bool
    results: list[dict]

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.results if not r["success"]]

    def summary(self) -> str:
        """Human-readable lines, failed expectations first."""
        lines = [
            f"validation {'PASSED' if self.success else 'FAILED'}: "
            f"{len(self.results) - len(self.failures)}/{len(self.results)} expectations met"
        ]
        for r in sorted(self.results, key=lambda r: r["success"]):
            mark = "ok  " if r["success"] else "FAIL"
            detail = (
                f"{r['unexpected_count']} of {r['element_count']} rows unexpected"
                if r["unexpected_count"] is not None
                else f"observed {r['observed_value']}"
            )
            lines.append(
                f"  {mark} [{r['suite']}] {r['expectation']}({r['column'] or ''}): {detail}"
            )
            if not r["success"] and r["examples"]:
                lines.append(f"       examples: {r['examples']}")
        return "\n".join(lines)


def image_summary(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per image: shape, dtype, pixel range, NaN count, label and a content hash."""
    flat = images.reshape(len(images), -1)
    floating = np.issubdtype(images.dtype, np.floating)
    nan_count = np.isnan(flat).sum(axis=1) if floating else np.zeros(len(images), dtype=np.int64)
    return pd.DataFrame(
        {
            "rows": np.full(len(images), images.shape[1] if images.ndim == 3 else -1),
            "cols": np.full(len(images), images.shape[2] if images.ndim == 3 else -1),
            "dtype": str(images.dtype),
            "pixel_min": np.nanmin(flat, axis=1) if len(flat) else [],
            "pixel_max": np.nanmax(flat, axis=1) if len(flat) else [],
            "nan_count": nan_count,
            "label": labels.astype(np.int64),
            "sha1": [hashlib.sha1(row.tobytes()).hexdigest() for row in flat],
        }
    )


def class_balance(labels_by_split: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per (split, digit): count and share of the split, zero for a missing digit."""
    rows = []
    for split, labels in labels_by_split.items():
        counts = np.bincount(
            labels.astype(np.int64).clip(0, NUM_CLASSES - 1), minlength=NUM_CLASSES
        )
        for digit in DIGITS:
            rows.append(
                {
                    "split": split,
                    "digit": digit,
                    "count": int(counts[digit]),
                    "share": counts[digit] / max(1, len(labels)),
                }
            )
    return pd.DataFrame(rows)


def image_expectations(
    params: ValidateParams, min_rows: int, forbidden_hashes: list[str] | None
) -> list:
    """Per-image expectations for one split; ``forbidden_hashes`` are images of the other split."""
    rows, cols = params.image_shape
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=rows, max_value=rows),
        gxe.ExpectColumnValuesToBeBetween(column="cols", min_value=cols, max_value=cols),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        gxe.ExpectColumnValuesToBeBetween(
            column="pixel_min", min_value=params.pixel_min, max_value=params.pixel_max
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="pixel_max", min_value=params.pixel_min, max_value=params.pixel_max
        ),
        gxe.ExpectColumnValuesToBeBetween(column="nan_count", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=DIGITS),
    ]
    if forbidden_hashes is not None:
        expectations.append(
            gxe.ExpectColumnValuesToNotBeInSet(column="sha1", value_set=forbidden_hashes)
        )
    return expectations


def balance_expectations(params: ValidateParams, splits: list[str]) -> list:
    """Every digit present in every split, each with at least ``min_class_share``."""
    return [
        gxe.ExpectTableRowCountToEqual(value=NUM_CLASSES * len(splits)),
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(
            column="share", min_value=params.min_class_share, max_value=1
        ),
    ]


def run_suite(context, name: str, frame: pd.DataFrame, expectations: list) -> list[dict]:
    """Validate ``frame`` against a suite of ``expectations`` and flatten the results."""
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe(name).get_batch(
        batch_parameters={"dataframe": frame}
    )
    result = batch.validate(suite, result_format="SUMMARY")
    flat = []
    for r in result.results:
        cfg, res = r.expectation_config, r.result or {}
        examples = res.get("partial_unexpected_list") or []
        flat.append(
            {
                "suite": name,
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "success": bool(r.success),
                "element_count": res.get("element_count"),
                "unexpected_count": res.get("unexpected_count"),
                "observed_value": _jsonable(res.get("observed_value")),
                "examples": [_jsonable(e) for e in examples[:5]],
            }
        )
    return flat


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate_dataset(params: ValidateParams, data: Dataset) -> ValidationReport:
    """Run every suite on the dataset; never raises on bad data, only reports it."""
    context = gx.get_context(mode="ephemeral")
    train = image_summary(data.x_train, data.y_train)
    test = image_summary(data.x_test, data.y_test)
    results = run_suite(
        context,
        "train_images",
        train,
        image_expectations(params, params.min_train_images, sorted(set(test["sha1"]))),
    )
    results += run_suite(
        context, "test_images", test, image_expectations(params, params.min_test_images, None)
    )
    balance = class_balance({"train": data.y_train, "test": data.y_test})
    results += run_suite(
        context, "class_balance", balance, balance_expectations(params, ["train", "test"])
    )
    # GX reports which rows broke the balance check, not which digit; add that for the reader.
    for r in results:
        if r["suite"] == "class_balance" and not r["success"]:
            low = balance[balance["share"] < params.min_class_share]
            r["examples"] = [
                f"{s} digit {d}: {c} images ({sh:.1%})"
                for s, d, c, sh in low.itertuples(index=False)
            ][:10]
    return ValidationReport(success=all(r["success"] for r in results), results=results)


def main() -> None:
    from pipelines.cli import StageError, base_parser

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    all_params = load_params(args.params)
    data = load_raw(Path(args.raw), all_params.ingest.file_names)
    log.info(
        "validating %d train and %d test images (%s)",
        len(data.x_train),
        len(data.x_test),
        data.data_source,
    )
    report = validate_dataset(all_params.validate, data)
    out = Path(args.out)
    write_json(
        out / "report.json",
        {"success": report.success, "data_source": data.data_source, "results": report.results},
    )
    atomic_write_text(out / "report.txt", report.summary() + "\n")
    for line in report.summary().splitlines():
        log.info(line)
    if not report.success:
        log_failure(all_params.tracking.experiment, out)
        names = ", ".join(
            f"{f['expectation']}({f['column'] or ''}) on {f['suite']}" for f in report.failures
        )
        raise StageError(
            f"{len(report.failures)} expectation(s) failed: {names}; report in {out / 'report.txt'}"
        )


def log_failure(experiment: str, report_dir: Path) -> None:
    """Record a failed validation in MLflow as a FAILED run carrying the report."""
    import mlflow

    from pipelines import tracking

    tracking.setup(experiment)
    with mlflow.start_run(run_name="validate-failed") as run:
        mlflow.set_tags({"stage": "validate", "validation": "failed"})
        mlflow.log_artifacts(str(report_dir), artifact_path="validation")
    tracking.client().set_terminated(run.info.run_id, status="FAILED")


if __name__ == "__main__":
    from pipelines.cli import run_stage

    run_stage("validate", main)
