"""The stages' subprocess environment: ``python`` in dvc.yaml's commands is the interpreter running
us, whoever started it and whatever PATH they had."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.env import stage_env

BIN = str(Path(sys.executable).parent)


def test_the_running_interpreters_bin_folder_comes_first_on_path(monkeypatch):
    # given a PATH on which some other python would be found first
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin"]))
    # when the stage environment is built
    env = stage_env()
    # then our bin folder leads, and the caller's PATH follows in its order
    assert env["PATH"].split(os.pathsep) == [BIN, "/usr/local/bin", "/usr/bin"]


def test_a_bare_python_in_that_environment_is_this_interpreter(tmp_path):
    # when a stage command says just `python`, as dvc.yaml's do
    out = subprocess.run(
        ["python", "-c", "import sys; print(sys.prefix)"],
        env=stage_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    # then it runs in this interpreter's environment (the project's .venv)
    assert out.stdout.strip() == sys.prefix


def test_extra_variables_are_added_and_win_over_the_callers(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setenv("MNIST_UNRELATED", "kept")
    env = stage_env({"TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    assert env["MNIST_UNRELATED"] == "kept"


def test_a_path_given_in_extra_still_gets_our_bin_folder_first():
    env = stage_env({"PATH": "/opt/tools/bin"})
    assert env["PATH"] == os.pathsep.join([BIN, "/opt/tools/bin"])


def test_building_it_leaves_this_processs_environment_alone(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    before = dict(os.environ)
    stage_env({"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert dict(os.environ) == before
    assert stage_env()["PATH"] == stage_env()["PATH"]  # no growth from one call to the next


def test_without_any_path_only_our_bin_folder_is_on_it(monkeypatch):
    # an empty entry would mean the current folder: it must not appear
    monkeypatch.delenv("PATH", raising=False)
    assert stage_env()["PATH"] == BIN
