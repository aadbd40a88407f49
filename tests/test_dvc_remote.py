"""The DVC remote: what `make push` sends, a fresh clone gets back with `make pull`, byte for byte,
and then DVC finds nothing to rerun.

The round trip runs on a throwaway git + DVC project with two cheap stages (not the project's
pipeline), which carries the project's own .dvc/config, .gitignore and Makefile targets. Its
stages write random bytes, so an output that matches after the pull came from the remote, not
from a rerun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.env import stage_env
from tests.conftest import REPO

BIN = Path(sys.executable).parent  # the venv that runs the tests: its dvc and its python
REMOTE = "team"
REMOTE_FOLDER = "mnist-mlops-dvc-remote"  # beside the checkout, as .dvc/config says

PREPARE = """\
import json, os, pathlib
out = pathlib.Path("data/raw")
out.mkdir(parents=True, exist_ok=True)
for name in ("train.bin", "test.bin"):
    (out / name).write_bytes(os.urandom(4096))
(out / "SOURCE.json").write_text(json.dumps({"data_source": "random"}))
"""
TRAIN = """\
import hashlib, json, os, pathlib
raw = b"".join(p.read_bytes() for p in sorted(pathlib.Path("data/raw").iterdir()))
pathlib.Path("data/model").mkdir(parents=True, exist_ok=True)
pathlib.Path("data/model/weights.bin").write_bytes(os.urandom(2048))
for path in ("data/reports/metrics.json", "data/register/registration.json"):
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps({"raw": hashlib.sha256(raw).hexdigest(), "v": 1}))
"""
DVC_YAML = {
    "stages": {
        "prepare": {
            "cmd": "python prepare.py",
            "deps": ["prepare.py"],
            "outs": [{"data/raw": {"persist": True}}],
        },
        "train": {  # the kinds of outputs the project's stages have
            "cmd": "python train.py",
            "deps": ["train.py", "data/raw"],
            "outs": ["data/model", {"data/register/registration.json": {"cache": False}}],
            "metrics": [{"data/reports/metrics.json": {"cache": False}}],
        },
    }
}


def env_in(root: Path) -> dict[str, str]:
    """This venv first on PATH; DVC's and git's user-wide settings, and an outer make's flags
    (`make test`), kept out of the way."""
    env = stage_env(
        {
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(root / "dvc-site"),
            "DVC_GLOBAL_CONFIG_DIR": str(root / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(root / "dvc-system"),
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }
    )
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)
    return env


def run(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in ``cwd``, output captured; ``dvc`` is this venv's. In this checkout, with the
    caller's settings; anywhere else, with DVC's user-wide folders in the folder above ``cwd``."""
    if cmd[0] == "dvc":
        cmd = (sys.executable, "-m", "dvc", *cmd[1:])
    env = stage_env() if cwd == REPO else env_in(cwd.parent)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def make(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The project's Makefile run in ``cwd``, with this venv and no install step."""
    makefile = str(REPO / "Makefile")
    return run(
        cwd, "make", "-f", makefile, "-o", ".venv/.installed", f"BIN={BIN}", *args, check=check
    )


def outputs(root: Path) -> dict[str, bytes]:
    """Every file under ``root``/data, by path, with its bytes (DVC's own .gitignore files left out)."""
    data = root / "data"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(data.rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


def dvc_status(root: Path) -> dict:
    return json.loads(run(root, "dvc", "status", "--json").stdout)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> dict:
    """A project that ran its stages, committed the result and ran `make push`."""
    if shutil.which("make") is None:
        pytest.skip("no make on PATH")
    root = tmp_path_factory.mktemp("remote")
    origin = root / "origin"
    origin.mkdir()
    run(origin, "git", "init", "-q")
    run(origin, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", origin / ".dvc" / "config")
    shutil.copy(REPO / ".gitignore", origin / ".gitignore")
    (origin / "prepare.py").write_text(PREPARE)
    (origin / "train.py").write_text(TRAIN)
    (origin / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    run(origin, "dvc", "repro")
    run(origin, "git", "add", "-A")
    run(origin, "git", "commit", "-qm", "a run")
    return {"root": root, "origin": origin, "push": make(origin, "push")}


def test_make_push_says_where_and_sends_every_cached_output(pushed):
    # given a committed run, when `make push` ran with no REMOTE
    remote = pushed["root"] / REMOTE_FOLDER
    # then it named the default remote, the folder beside the checkout, and pushed there
    assert f"dvc push to remote '{REMOTE}': {remote}\n" in pushed["push"].stdout
    assert (remote / "files" / "md5").is_dir()
    left = run(pushed["origin"], "dvc", "data", "status", "--not-in-remote", "--json").stdout
    assert json.loads(left).get("not_in_remote", []) == []


def test_a_fresh_clone_pulls_the_run_byte_for_byte_and_has_nothing_to_rerun(pushed):
    root, origin = pushed["root"], pushed["origin"]
    # given a fresh clone beside the original: no DVC cache, no outputs but the committed records
    clone = root / "clone"
    run(root, "git", "clone", "-q", str(origin), str(clone))
    assert "train" in dvc_status(clone)
    # when it runs `make pull`
    pulled = make(clone, "pull")
    # then it pulled from the same folder, every output is the original's byte for byte,
    assert f"dvc pull from remote '{REMOTE}': {root / REMOTE_FOLDER}\n" in pulled.stdout
    assert outputs(clone) == outputs(origin)
    assert {"data/model/weights.bin", "data/register/registration.json"} <= set(outputs(clone))
    # DVC sees the workspace as dvc.lock records it, and `dvc repro` reruns nothing
    assert dvc_status(clone) == {}
    again = run(clone, "dvc", "repro")
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date." in again.stdout
    assert outputs(clone) == outputs(origin)  # random bytes: a rerun would have changed them


def test_make_push_fails_when_the_checkout_lacks_an_output_the_remote_lacks(pushed):
    # given a clone that never pulled, and a second remote that is empty
    root = pushed["root"]
    clone = root / "unpulled"
    run(root, "git", "clone", "-q", str(pushed["origin"]), str(clone))
    run(clone, "dvc", "remote", "add", "--local", "empty", str(root / "empty-remote"))
    # when it pushes there (`dvc push` alone only warns and exits 0)
    result = make(clone, "push", "REMOTE=empty", check=False)
    # then make fails and names what is missing
    assert result.returncode != 0
    assert "not on the remote, and not in this checkout to push" in result.stderr
    assert "data/model/" in result.stderr and "data/raw/" in result.stderr


def test_the_projects_default_remote_is_a_folder_beside_the_checkout():
    # the project's config alone (--project: not a user's .dvc/config.local override)
    assert run(REPO, "dvc", "remote", "default", "--project").stdout.strip() == REMOTE
    listed = run(REPO, "dvc", "remote", "list", "--project").stdout.split()
    assert listed[:2] == [REMOTE, str(REPO.parent / REMOTE_FOLDER)]


def uncached_outputs(stages: dict) -> list[str]:
    """The paths dvc.yaml marks ``cache: false``: DVC never pushes them, so git must hold them."""
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    found += [path for path, spec in entry.items() if spec.get("cache") is False]
    return found


def test_no_output_dvc_leaves_uncached_is_ignored_by_git():
    # given every output dvc.yaml does not cache (metrics, records, the registration)
    uncached = uncached_outputs(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert "data/register/registration.json" in uncached and len(uncached) >= 8
    # then .gitignore lets git commit each: otherwise a fresh clone would lack it after `dvc pull`,
    # `dvc status` would report it deleted, and `dvc repro` would rerun its stage
    ignored = run(REPO, "git", "check-ignore", "--no-index", *uncached, check=False)
    assert ignored.returncode == 1, f"ignored by git: {ignored.stdout.split()}"
