"""The Prefect flow runs the same DVC stages, on Prefect's ephemeral API (no server)."""

from __future__ import annotations

import json

import pytest
import yaml

from flows.training import stage_order
from tests.e2e_support import MODEL_NAME, REPO, STAGES, client_for, run_in, scratch_repo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs ~25 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_stage_order_comes_from_dvc_yaml():
    names = [s.name for s in stage_order(REPO)]
    declared = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert sorted(names) == sorted(declared)
    assert (
        names.index("ingest")
        < names.index("merge")
        < names.index("validate")
        < names.index("augment")
        < names.index("tune")
        < names.index("train")
    )
    assert names.index("train") < names.index("evaluate") < names.index("register")
    retries = {s.name: s.retries for s in stage_order(REPO)}
    assert retries["ingest"] == 2 and retries["register"] == 0


def test_flow_runs_all_stages_and_writes_the_same_lock(prefect_harness, tmp_path, monkeypatch):

    from flows.training import training

    workdir = scratch_repo(tmp_path / "repo")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    state = training(root=str(workdir), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == STAGES

    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(state.result())
    # Same stages, same params and the same data hashes that `dvc repro` records.
    assert lock["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    raw_dep = next(d for d in lock["merge"]["deps"] if d["path"] == "data/raw")
    assert raw_dep["md5"] == lock["ingest"]["outs"][0]["md5"]
    dataset_dep = next(d for d in lock["validate"]["deps"] if d["path"] == "data/dataset")
    assert dataset_dep["md5"] == lock["merge"]["outs"][0]["md5"]

    # dvc.lock is exactly what `dvc repro` would leave: DVC finds nothing to do.
    status = run_in(workdir, "dvc", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr

    registration = json.loads((workdir / "data/register/registration.json").read_text())
    client = client_for(workdir)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert int(champion.version) == registration["version"] == 1

    # Rerunning the flow finds everything up to date: DVC, not the flow, decides what runs.
    again = training(root=str(workdir), return_state=True)
    assert again.is_completed()
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
