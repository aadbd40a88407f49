"""The promotion gate as a pure function: floor, then first champion, then strictly better."""

from __future__ import annotations

import pytest

from pipelines.config import Params, RegisterParams
from pipelines.register import decide_promotion


@pytest.fixture
def rparams(params: Params) -> RegisterParams:
    return params.register  # floor 0.99, aliases champion / challenger


def test_below_the_floor_gets_no_alias(rparams: RegisterParams) -> None:
    # given a candidate under the 99% floor, even with no champion to beat
    decision = decide_promotion(rparams, 0.985, None, None)
    # then no alias, and the reason names the floor
    assert decision.alias is None
    assert "below the floor 99.0000%" in decision.reason
    assert "98.5000%" in decision.reason


def test_below_the_floor_loses_even_against_a_worse_champion(rparams: RegisterParams) -> None:
    assert decide_promotion(rparams, 0.98, 0.5, "3").alias is None


def test_first_version_over_the_floor_becomes_champion(rparams: RegisterParams) -> None:
    decision = decide_promotion(rparams, 0.992, None, None)
    assert decision.alias == "champion"
    assert "no current champion" in decision.reason


def test_exactly_the_floor_passes(rparams: RegisterParams) -> None:
    assert decide_promotion(rparams, 0.99, None, None).alias == "champion"


def test_strictly_better_candidate_takes_champion(rparams: RegisterParams) -> None:
    decision = decide_promotion(rparams, 0.995, 0.993, "4")
    assert decision.alias == "champion"
    assert "beats champion v4" in decision.reason


@pytest.mark.parametrize("candidate", [0.993, 0.991], ids=["equal", "worse"])
def test_equal_or_worse_candidate_is_challenger(rparams: RegisterParams, candidate: float) -> None:
    # given a champion v7 at 99.3%
    decision = decide_promotion(rparams, candidate, 0.993, "7")
    # then the candidate is only a challenger, and the reason names the champion's version
    assert decision.alias == "challenger"
    assert "does not beat champion v7" in decision.reason


def test_aliases_come_from_params(rparams: RegisterParams) -> None:
    custom = rparams.model_copy(update={"champion_alias": "prod", "challenger_alias": "staging"})
    assert decide_promotion(custom, 0.999, None, None).alias == "prod"
    assert decide_promotion(custom, 0.991, 0.999, "2").alias == "staging"
