"""`python -m flows.locked COMMAND`: the command runs holding the training lock, with the stages'
environment, and its exit status is passed on; bad use and bad params say what is wrong.

(The skip with status 75 while another training holds the lock is tested in test_deploy.py.)"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.locked import main
from flows.training import LOCK_FILE, read_holder, training_lock
from pipelines.config import ParamsError
from tests.conftest import PARAMS_PATH

# A child that reports who holds the lock while it runs and which bin folder leads its PATH.
REPORT = (
    "import json, os, sys; "
    "holder = json.loads(open(sys.argv[1]).read()); "
    "print(json.dumps({'flow_run': holder['flow_run'], 'pid': holder['pid'], "
    "'path0': os.environ['PATH'].split(os.pathsep)[0]})); "
    "sys.exit(int(sys.argv[2]))"
)


def checkout(root: Path, **deploy) -> Path:
    """``root`` with the real params.yaml, its ``deploy`` section updated with ``deploy``."""
    raw = yaml.safe_load(PARAMS_PATH.read_text())
    raw["deploy"].update(deploy)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def run_locked(monkeypatch, root: Path, *command: str) -> int | str | None:
    """``python -m flows.locked *command`` in ``root``, in this process; its exit code."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["flows.locked", *command])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code


def test_the_command_runs_holding_the_lock_and_its_status_is_passed_on(
    monkeypatch, tmp_path, capfd
):
    # given a checkout where no training runs
    root = checkout(tmp_path)
    command = [sys.executable, "-c", REPORT, str(root / LOCK_FILE), "4"]
    # when a command runs through flows.locked
    status = run_locked(monkeypatch, root, *command)
    # then it ran while this process held the lock under the command's name, with the
    # interpreter's bin folder first on PATH, and its exit status is flows.locked's
    seen = json.loads(capfd.readouterr().out)
    assert seen == {
        "flow_run": " ".join(command),
        "pid": os.getpid(),
        "path0": str(Path(sys.executable).parent),
    }
    assert status == 4
    # and the lock is free again
    assert read_holder(root / LOCK_FILE) == {}


def test_a_training_that_ends_within_lock_wait_s_lets_the_command_run(monkeypatch, tmp_path):
    # given deploy.lock_wait_s of 10 s and a training that holds the lock for 0.5 s more
    root = checkout(tmp_path, lock_wait_s=10)
    held = threading.Event()

    def short_training() -> None:
        with training_lock(root / LOCK_FILE, "short-run"):
            held.set()
            time.sleep(0.5)

    holder = threading.Thread(target=short_training)
    holder.start()
    assert held.wait(5)
    # when a command is started through flows.locked meanwhile
    t0 = time.monotonic()
    status = run_locked(monkeypatch, root, sys.executable, "-c", "raise SystemExit(0)")
    holder.join()
    # then it waited for the lock instead of being skipped, and ran
    assert status == 0
    assert time.monotonic() - t0 >= 0.3


def test_no_command_is_a_usage_error(monkeypatch, tmp_path):
    status = run_locked(monkeypatch, checkout(tmp_path))
    assert status == "usage: python -m flows.locked COMMAND [ARG ...]"
    assert not (tmp_path / LOCK_FILE).exists()  # nothing was locked


def test_a_checkout_without_params_yaml_is_named_and_nothing_runs(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    with pytest.raises(ParamsError, match=r"params\.yaml: file not found"):
        run_locked(monkeypatch, tmp_path, *command)
    assert not marker.exists()


def test_a_bad_lock_wait_s_is_named_with_its_value(monkeypatch, tmp_path):
    root = checkout(tmp_path, lock_wait_s=-5)
    with pytest.raises(ParamsError, match=r"deploy\.lock_wait_s: .*\(found -5\)") as error:
        run_locked(monkeypatch, root, sys.executable, "-c", "pass")
    assert str(root / "params.yaml") in str(error.value)


def test_a_command_that_does_not_exist_is_named_and_the_lock_released(monkeypatch, tmp_path):
    root = checkout(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-tool"):
        run_locked(monkeypatch, root, "no-such-tool", "repro")
    assert read_holder(root / LOCK_FILE) == {}
    with training_lock(root / LOCK_FILE, "next-run", wait_s=0) as got:  # free for the next one
        assert got["flow_run"] == "next-run"
