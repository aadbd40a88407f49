"""What every stage entry point shares: the ``--params`` option, and a clean exit (one line, status 1)
on an expected error, while an unexpected one keeps its traceback."""

from __future__ import annotations

import logging

import pytest

from pipelines.cli import StageError, base_parser, run_stage
from pipelines.config import ParamsError
from pipelines.data import DataError


@pytest.fixture(autouse=True)
def root_logger():
    """run_stage reconfigures the root logger (force=True): put its handlers and level back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_base_parser_reads_params_with_params_yaml_as_default():
    parser = base_parser("Ingest the raw files.")
    assert parser.parse_args([]).params == "params.yaml"
    assert parser.parse_args(["--params", "other.yaml"]).params == "other.yaml"
    assert parser.description == "Ingest the raw files."


def test_base_parser_names_an_unknown_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        base_parser("a stage").parse_args(["--epochs", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err


def test_a_stage_that_succeeds_logs_its_name_and_time(capsys):
    # given a stage that logs one line
    def main() -> None:
        logging.getLogger("pipelines.ingest").info("read 4 files")

    # when it runs
    run_stage("ingest", main)  # no SystemExit: status 0
    # then its line and a closing 'done in' line go to stderr, each with its logger and time
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("pipelines.ingest: read 4 files")
    assert lines[1].split(" ", 1)[1].startswith("pipelines.ingest: stage 'ingest' done in ")
    assert lines[1].endswith(" s")
    assert lines[0][2] == ":" and lines[0][5] == ":"  # HH:MM:SS first


@pytest.mark.parametrize(
    "error",
    [
        DataError("data/raw/train-images-idx3-ubyte.gz: truncated at byte 16"),
        ParamsError("params.yaml: train.epochs: must be > 0 (found 0)"),
        StageError("validation failed: 3 duplicate images"),
        FileNotFoundError("data/model/run.json: no training run id; run the train stage first"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_expected_error_is_one_line_naming_the_stage_and_exits_1(capsys, error):
    # given a stage whose main raises an error the stages expect
    def main() -> None:
        raise error

    # when it runs
    with pytest.raises(SystemExit) as exit_:
        run_stage("validate", main)
    # then the process exits 1 with one line that names the stage and keeps the message whole
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.rstrip().endswith(f"pipelines.validate: stage 'validate' failed: {error}")
    assert "done in" not in err


def test_a_file_a_stage_cannot_open_is_named_in_its_one_line(capsys, tmp_path):
    # given a stage that opens a file that is not there (open()'s own FileNotFoundError)
    missing = tmp_path / "data" / "dataset.npz"
    # when it runs, then it exits 1 and the line says which file
    with pytest.raises(SystemExit) as exit_:
        run_stage("merge", lambda: missing.open().close())
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "stage 'merge' failed: [Errno 2] No such file or directory" in err
    assert str(missing) in err


def test_an_unexpected_error_keeps_its_traceback(capsys):
    # given a bug in a stage (an error no stage is meant to raise)
    def main() -> None:
        raise KeyError("accuracy")

    # then it is not swallowed into a one-line exit: it propagates as itself
    with pytest.raises(KeyError, match="accuracy"):
        run_stage("evaluate", main)
    err = capsys.readouterr().err
    assert "failed" not in err and "done in" not in err
