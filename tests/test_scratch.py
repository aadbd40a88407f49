"""Scratch copies of the repo: what a copy holds and leaves behind, the params override merged in
(and checked before any stage runs), and `python -m flows.scratch` running DVC in the copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.scratch import SMOKE_OVERRIDES, main, make_scratch_copy, tracked_files
from pipelines.config import ParamsError, deep_merge
from tests.conftest import PARAMS_PATH, REPO

KEPT = [  # what a clone plus your edits holds, and so what a copy holds
    "params.yaml",
    SMOKE_OVERRIDES,
    "dvc.yaml",
    "pipelines/stage.py",
    "notes.md",  # untracked, not ignored
    ".dvc/config",
    "data/.gitkeep",
    "data/incoming/.gitkeep",
]
LEFT = [  # produced data, stores, caches and the environment belong to the original
    "dvc.lock",
    "data/raw/train.gz",
    "data/export/parity.json",
    "mlruns/mlflow.db",
    ".venv/bin/python",
    ".run/training.lock",
    ".smoke/params.yaml",
    ".dvc/cache/files/md5/ab/cdef",
    ".dvc/tmp/lock",
    "__pycache__/stage.cpython-312.pyc",
]
IGNORED = ["debug.log"]  # git ignores it, so a clone would not have it


def project(root: Path, git: bool) -> Path:
    """A small project at ``root``: the real params files, and one file of each kind above."""
    for rel in KEPT + LEFT + IGNORED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{rel}\n")
    (root / ".dvc/config").write_text("[core]\n    autostage = false\n")
    (root / "params.yaml").write_text(PARAMS_PATH.read_text())
    (root / SMOKE_OVERRIDES).write_text((REPO / SMOKE_OVERRIDES).read_text())
    if git:
        (root / ".gitignore").write_text("*.log\n.venv/\n.run/\n.smoke/\n")
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "add", "params.yaml", "dvc.yaml"], check=True)
    return root


def overrides(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def files_in(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_copy_of_a_git_checkout_holds_what_a_clone_holds_and_no_produced_data(tmp_path):
    # given a git checkout with tracked, untracked, ignored, produced and cached files
    src = project(tmp_path / "src", git=True)
    # when it is copied with an override
    dest = make_scratch_copy(src, tmp_path / "copy", overrides(tmp_path / "o.yaml", {}))
    # then the copy holds the project's files, the folders the stages write to, and DVC's
    # no-scm setting; no produced data, store, cache, lock or ignored file
    assert files_in(dest) == set(KEPT) | {".gitignore", ".dvc/config.local"}
    assert (dest / "data").is_dir() and (dest / "mlruns").is_dir()
    assert (dest / ".dvc/config.local").read_text() == "[core]\n    no_scm = true\n"
    assert (src / "dvc.lock").exists()  # the original keeps its lock


def test_outside_git_the_tree_is_walked_with_the_same_exclusions(tmp_path):
    src = project(tmp_path / "src", git=False)
    assert "debug.log" in {p.as_posix() for p in tracked_files(src)}  # nothing ignores it here
    dest = make_scratch_copy(src, tmp_path / "copy", overrides(tmp_path / "o.yaml", {}))
    assert files_in(dest) == set(KEPT) | set(IGNORED) | {".dvc/config.local"}


def test_the_override_is_merged_into_the_copys_params(tmp_path):
    # given the real params and an override of two nested keys and one section's key
    src = project(tmp_path / "src", git=False)
    original = yaml.safe_load(PARAMS_PATH.read_text())
    change = {"train": {"epochs": 2, "model": {"dropout": 0.1}}, "tune": {"enabled": False}}
    # when copied with it
    dest = make_scratch_copy(src, tmp_path / "copy", overrides(tmp_path / "o.yaml", change))
    # then the copy's params are the original with just those keys changed
    merged = yaml.safe_load((dest / "params.yaml").read_text())
    assert merged == deep_merge(original, change)
    assert merged["train"]["model"]["dropout"] == 0.1
    assert merged["train"]["model"]["dense_units"] == original["train"]["model"]["dense_units"]
    assert merged["train"]["model"] != original["train"]["model"]
    # and the original's params are untouched
    assert (src / "params.yaml").read_text() == PARAMS_PATH.read_text()


def test_without_an_override_file_the_projects_smoke_overrides_apply(tmp_path):
    src = project(tmp_path / "src", git=False)
    dest = make_scratch_copy(src, tmp_path / "copy")
    smoke = yaml.safe_load((REPO / SMOKE_OVERRIDES).read_text())
    merged = yaml.safe_load((dest / "params.yaml").read_text())
    assert merged == deep_merge(yaml.safe_load(PARAMS_PATH.read_text()), smoke)


def test_an_existing_copy_is_replaced_not_added_to(tmp_path):
    src = project(tmp_path / "src", git=False)
    dest = tmp_path / "copy"
    (dest / "data/model").mkdir(parents=True)
    (dest / "data/model/model.keras").write_text("from an earlier run")
    make_scratch_copy(src, dest, overrides(tmp_path / "o.yaml", {}))
    assert not (dest / "data/model").exists()


def test_a_bad_override_is_refused_naming_the_files_and_the_setting(tmp_path):
    src = project(tmp_path / "src", git=False)
    bad = overrides(tmp_path / "bad.yaml", {"train": {"epochs": 0}})
    with pytest.raises(ParamsError) as error:
        make_scratch_copy(src, tmp_path / "copy", bad)
    message = str(error.value)
    assert message.startswith("params.yaml + bad.yaml: 1 invalid setting(s):")
    assert "train.epochs" in message and "(found 0)" in message


def test_a_bad_override_leaves_an_earlier_copy_as_it_was(tmp_path):
    # given a good copy from an earlier run
    src = project(tmp_path / "src", git=False)
    dest = make_scratch_copy(src, tmp_path / "copy", overrides(tmp_path / "o.yaml", {}))
    (dest / "data/model").mkdir(parents=True)
    (dest / "data/model/model.keras").write_text("from an earlier run")
    before = (dest / "params.yaml").read_text()
    # when a bad override is refused
    with pytest.raises(ParamsError):
        make_scratch_copy(src, dest, overrides(tmp_path / "bad.yaml", {"train": {"epochs": 0}}))
    # then the earlier copy is untouched: nothing half-written
    assert (dest / "data/model/model.keras").read_text() == "from an earlier run"
    assert (dest / "params.yaml").read_text() == before


def test_a_missing_override_file_is_named(tmp_path):
    src = project(tmp_path / "src", git=False)
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ParamsError, match=f"{missing}: file not found"):
        make_scratch_copy(src, tmp_path / "copy", missing)


def test_main_runs_dvc_repro_in_the_copy_with_this_interpreter(monkeypatch, tmp_path, capfd):
    # given a project whose one stage records which python ran it
    src = project(tmp_path / "src", git=False)
    (src / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "which": {
                        "cmd": "python -c \"import sys; open('which.txt', 'w').write(sys.prefix)\"",
                        "outs": ["which.txt"],
                    }
                }
            }
        )
    )
    dest = tmp_path / "copy"
    monkeypatch.chdir(src)
    monkeypatch.setattr(
        sys, "argv", ["flows.scratch", "--dest", str(dest), "--overrides", SMOKE_OVERRIDES]
    )
    # when `python -m flows.scratch` runs
    with pytest.raises(SystemExit) as exit_:
        main()
    # then DVC ran the stage in the copy, with this interpreter, and the summary says so
    out, err = capfd.readouterr()
    assert exit_.value.code == 0, out + err
    assert (dest / "which.txt").read_text() == sys.prefix
    assert (dest / "dvc.lock").exists() and not (src / "which.txt").exists()
    assert f"scratch copy in {dest} with {SMOKE_OVERRIDES} applied" in out
    assert "smoke run passed in" in out and f"MLRUNS={dest / 'mlruns'}" in out
