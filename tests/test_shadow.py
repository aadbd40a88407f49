"""Shadow scoring and the shadow gate: the evidence and the verdict as pure functions on small
frames, the server's shadow thread with stand-in models, and the gate against a real MLflow
registry (sqlite in a temporary folder). The whole loop through the real server is in
tests/test_serving.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest

from pipelines import locks, tracking
from pipelines.config import load_params
from pipelines.register import SHADOW_PENDING_TAG
from pipelines.shadow import ShadowEvidence, decide_shadow, promote_from_shadow, shadow_evidence
from serving.champion import Loaded
from serving.inference_log import Answered, InferenceLog
from serving.shadow import Shadow
from tests.conftest import PARAMS_PATH

NAME = "shadowed"


@pytest.fixture(scope="module")
def gate():
    """params.yaml's gate, with the shadow on: 4 requests, 75% agreement."""
    register = load_params(PARAMS_PATH).register
    return register.model_copy(
        update={"model_name": NAME, "shadow_min_requests": 4, "shadow_min_agreement": 0.75}
    )


def logged(champion: str, shadow: str, digits, shadow_digits, batch_size: int) -> pd.DataFrame:
    """Log rows of requests of ``batch_size`` images each, as the inference log writes them."""
    n = len(digits)
    return pd.DataFrame(
        {
            "model_version": [champion] * n,
            "shadow_version": [shadow] * n,
            "digit": np.asarray(digits, np.int8),
            "shadow_digit": np.asarray(shadow_digits, np.int8),
            "batch_size": np.full(n, batch_size, np.int32),
        }
    )


# --- the evidence and the verdict -------------------------------------------------------------


def test_evidence_counts_requests_and_agreement_of_that_pair_only():
    frame = pd.concat(
        [
            logged("1", "2", [3, 3, 4, 5, 6, 7], [3, 3, 4, 5, 0, 0], batch_size=2),  # 3 requests
            logged("1", "9", [1] * 4, [2] * 4, batch_size=1),  # another challenger
            logged("8", "2", [1] * 4, [2] * 4, batch_size=1),  # while another version served
            logged("1", "", [1] * 4, [-1] * 4, batch_size=4),  # not scored in shadow
        ]
    )
    evidence = shadow_evidence(frame, champion="1", challenger="2")
    assert evidence == ShadowEvidence(requests=3, images=6, agreement=pytest.approx(4 / 6))


def test_evidence_from_an_empty_log_or_one_written_before_the_shadow_is_none():
    assert shadow_evidence(pd.DataFrame(), "1", "2") == ShadowEvidence(0, 0, None)
    older = logged("1", "2", [1], [1], 1).drop(columns=["shadow_version", "shadow_digit"])
    assert shadow_evidence(older, "1", "2") == ShadowEvidence(0, 0, None)


@pytest.mark.parametrize(
    ("evidence", "outcome", "words"),
    [
        (ShadowEvidence(3, 3, 1.0), "wait", "3 of register.shadow_min_requests (4)"),
        (ShadowEvidence(0, 0, None), "wait", "0 of register.shadow_min_requests (4)"),
        (ShadowEvidence(4, 8, 0.5), "reject", "agreement 50.00% is below"),
        (ShadowEvidence(4, 8, 0.75), "promote", "agreement 75.00% passes"),
        (ShadowEvidence(40, 80, 1.0), "promote", "40 shadow requests (80 images)"),
    ],
)
def test_the_verdict_waits_for_the_requests_then_holds_agreement_to_the_floor(
    gate, evidence, outcome, words
):
    verdict = decide_shadow(gate, evidence)
    assert verdict.outcome == outcome and words in verdict.reason


# --- the server's shadow thread, with stand-in models ------------------------------------------


class Answers:
    """A stand-in predictor: the same digit for every image, or an exception."""

    def __init__(self, digit: int | None, wait: threading.Event | None = None):
        self.digit, self.wait = digit, wait

    def predict(self, images):
        if self.wait is not None:
            self.wait.wait(10)
        if self.digit is None:
            raise RuntimeError("the shadow model broke")
        return np.eye(10, dtype=np.float32)[np.full(len(images), self.digit)]


class Holder:
    """What Shadow reads of a Champion: the alias, the model held and the last error."""

    def __init__(self, predictor, version: str | None = "2"):
        self.alias, self.last_error = "challenger", None
        self.current = None
        if version is not None:
            self.current = Loaded(predictor, NAME, version, "challenger", "model.onnx", "run")


def answered(digits, version: str = "1") -> Answered:
    digits = np.asarray(digits)
    probs = np.eye(10, dtype=np.float32)[digits]
    return Answered(time.time(), "/predict", version, 0.001, np.zeros((len(digits), 28, 28)), probs)


def run_shadow(shadow: Shadow, requests: list[Answered]) -> list[Answered]:
    passed: list[Answered] = []
    shadow.forward = passed.append
    shadow.start()
    for request in requests:
        shadow.submit(request)
    shadow.stop()
    return passed


def test_the_shadow_scores_each_answer_and_hands_it_on_with_its_digits():
    scored = []
    shadow = Shadow(Holder(Answers(3)), on_scored=lambda *a: scored.append(a))
    passed = run_shadow(shadow, [answered([3, 3]), answered([3, 5, 7])])
    assert [a.shadow_version for a in passed] == ["2", "2"]
    assert [a.shadow_digits.tolist() for a in passed] == [[3, 3], [3, 3, 3]]
    assert scored == [("2", 2, 2), ("2", 3, 1)]
    described = shadow.describe()
    assert described["version"] == "2" and described["requests"] == 2
    assert described["images"] == 5 and described["agreement"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("holder", [Holder(Answers(3), version="1"), Holder(None, version=None)])
def test_no_shadow_model_or_the_served_version_itself_scores_nothing(holder):
    passed = run_shadow(Shadow(holder), [answered([3])])
    assert [a.shadow_version for a in passed] == [""] and passed[0].shadow_digits is None
    assert Shadow(holder).describe()["requests"] == 0


def test_a_broken_shadow_model_costs_the_answers_nothing():
    shadow = Shadow(Holder(Answers(None)))
    passed = run_shadow(shadow, [answered([1]), answered([2])])
    assert len(passed) == 2 and all(a.shadow_version == "" for a in passed)
    assert shadow.failures == 2 and shadow.describe()["requests"] == 0


def test_a_full_queue_passes_answers_on_unscored_and_counts_them():
    release, drops = threading.Event(), []
    shadow = Shadow(Holder(Answers(1, wait=release)), on_drop=lambda: drops.append(1), max_queue=2)
    passed: list[Answered] = []
    shadow.forward = passed.append
    shadow.start()
    for digit in range(6):  # the thread holds one, the queue two: the other three are dropped
        shadow.submit(answered([digit]))
        time.sleep(0.05)
    release.set()
    shadow.stop()
    assert len(passed) == 6 and shadow.dropped == 3 == len(drops)
    assert sum(a.shadow_version == "2" for a in passed) == 3


def test_the_log_writes_the_shadow_columns(tmp_path):
    log = InferenceLog(tmp_path, max_bytes=10**8)
    scored = Shadow(Holder(Answers(3))).score(answered([3, 4]))
    log.record(scored)
    log.record(answered([5]))
    frame = pd.read_parquet(log.flush())
    assert frame.shadow_version.tolist() == ["2", "2", ""]
    assert frame.shadow_digit.tolist() == [3, 3, -1]


# --- the gate against a real registry -----------------------------------------------------------


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """A sqlite registry with v1 champion and v2 challenger waiting in shadow of v1."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(locks.ENV_VAR, raising=False)  # the lock file beside the database
    tracking.use_store()  # MLflow's URI, which an earlier test may have set elsewhere
    client = tracking.client()
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(NAME, tmp_path.as_uri())
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_registered_model_alias(NAME, "challenger", "2")
    client.set_model_version_tag(NAME, "2", SHADOW_PENDING_TAG, "1")
    return client


def write_log(folder, frame: pd.DataFrame) -> None:
    part = folder / "date=2026-12-03" / "hour=10"
    part.mkdir(parents=True, exist_ok=True)
    n = len(list(part.iterdir()))
    frame.assign(time=pd.Timestamp.now(tz="UTC")).to_parquet(part / f"part-{n}.parquet")


def aliases(client) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def test_a_challenger_that_agrees_on_enough_requests_takes_champion(registry, gate, tmp_path):
    log_dir = tmp_path / "monitoring"
    write_log(log_dir, logged("1", "2", [1, 2, 3], [1, 2, 3], batch_size=1))
    # with 3 of 4 requests it waits, and says so on the version
    first = promote_from_shadow(registry, gate, log_dir)
    assert first["outcome"] == "wait" and first["requests"] == 3
    assert aliases(registry) == {"champion": "1", "challenger": "2"}
    tags = registry.get_model_version(NAME, "2").tags
    assert tags[SHADOW_PENDING_TAG] == "1" and tags["shadow_verdict"].startswith("wait: 3 of")
    # with one request more, agreeing on 3 of 4 images (the floor), it takes champion
    write_log(log_dir, logged("1", "2", [4], [0], batch_size=1))
    second = promote_from_shadow(registry, gate, log_dir)
    assert second["outcome"] == "promote" and second["agreement"] == pytest.approx(0.75)
    assert aliases(registry) == {"champion": "2"}  # the challenger alias went with the move
    tags = registry.get_model_version(NAME, "2").tags
    assert SHADOW_PENDING_TAG not in tags and tags["decision"] == "champion"
    assert tags["previous_champion"] == "1" and "in shadow of champion v1" in tags["reason"]
    assert tags["shadow_requests"] == "4" and tags["gate_lock"].startswith("file: ")
    # and afterwards nothing waits
    assert promote_from_shadow(registry, gate, log_dir)["outcome"] == "none"


def test_a_challenger_that_disagrees_keeps_challenger_and_stops_waiting(registry, gate, tmp_path):
    log_dir = tmp_path / "monitoring"
    write_log(log_dir, logged("1", "2", [1, 2, 3, 4], [1, 0, 0, 0], batch_size=2))
    write_log(log_dir, logged("1", "2", [5, 6, 7, 8], [5, 0, 0, 0], batch_size=2))
    result = promote_from_shadow(registry, gate, log_dir)
    assert result["outcome"] == "reject" and result["agreement"] == pytest.approx(0.25)
    assert aliases(registry) == {"champion": "1", "challenger": "2"}
    tags = registry.get_model_version(NAME, "2").tags
    assert SHADOW_PENDING_TAG not in tags
    assert "below register.shadow_min_agreement 75.00%" in tags["shadow_verdict"]
    assert promote_from_shadow(registry, gate, log_dir)["outcome"] == "none"


def test_a_challenger_whose_champion_changed_is_set_aside(registry, gate, tmp_path):
    registry.create_model_version(NAME, tmp_path.as_uri())
    registry.set_registered_model_alias(NAME, "champion", "3")  # someone promoted v3 meanwhile
    log_dir = tmp_path / "monitoring"
    write_log(log_dir, logged("1", "2", [1] * 8, [1] * 8, batch_size=1))
    result = promote_from_shadow(registry, gate, log_dir)
    assert result["outcome"] == "stale" and "the champion is now v3" in result["reason"]
    assert aliases(registry) == {"champion": "3", "challenger": "2"}
    assert SHADOW_PENDING_TAG not in registry.get_model_version(NAME, "2").tags


def test_a_challenger_that_did_not_beat_the_champion_is_never_promoted(registry, gate, tmp_path):
    registry.delete_model_version_tag(NAME, "2", SHADOW_PENDING_TAG)
    log_dir = tmp_path / "monitoring"
    write_log(log_dir, logged("1", "2", [1] * 8, [1] * 8, batch_size=1))
    assert promote_from_shadow(registry, gate, log_dir)["outcome"] == "none"
    assert aliases(registry) == {"champion": "1", "challenger": "2"}


def test_the_monitoring_flow_runs_the_shadow_gate_only_when_it_is_on(registry, gate, tmp_path):
    from flows.monitoring import shadow_gate

    params = load_params(PARAMS_PATH)
    log_dir = tmp_path / "monitoring"
    write_log(log_dir, logged("1", "2", [1] * 4, [1] * 4, batch_size=1))
    assert shadow_gate(params, tmp_path, log_dir) == {}  # params.yaml: off
    on = params.model_copy(update={"register_": gate})
    assert shadow_gate(on, tmp_path, log_dir)["shadow"]["outcome"] == "promote"
    assert aliases(registry) == {"champion": "2"}
