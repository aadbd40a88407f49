"""What every stage entry point shares: logging set-up and clean exits on expected errors."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from pipelines.config import ParamsError
from pipelines.data import DataError


class StageError(RuntimeError):
    """A stage refused to go on (failed validation, failed promotion pre-check, ...)."""


EXPECTED_ERRORS = (DataError, ParamsError, StageError, FileNotFoundError)


def configure_logging() -> None:
    """One line per event, with the time: what a person watching `dvc repro` wants to read."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def base_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the ``--params`` option every stage takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    return parser


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's ``main``; an expected error becomes one clear line and exit status 1."""
    configure_logging()
    log = logging.getLogger(f"pipelines.{name}")
    start = time.perf_counter()
    try:
        main()
    except EXPECTED_ERRORS as exc:
        log.error("stage '%s' failed: %s", name, exc)
        sys.exit(1)
    log.info("stage '%s' done in %.1f s", name, time.perf_counter() - start)
