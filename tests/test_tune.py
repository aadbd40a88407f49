"""Stage tune: the search space in params, nested MLflow runs, pruning, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from pipelines.config import ParamsError, apply_overrides, deep_merge, parse_params, read_yaml
from tests.conftest import PARAMS_PATH, REPO

# Trials on the tiny 200-image set: 180 to fit, 20 to validate, 2 epochs.
TINY_TUNE = {
    "trial_images": 0,
    "trial_epochs": 2,
    "metric": "val_loss",
    "sampler_seed": 0,
    "pruner": "median",
    "pruner_startup_trials": 1,  # aggressive: from the second trial on ...
    "pruner_warmup_epochs": 0,  # ... from its first epoch on
    "heartbeat_s": 1,
    "grace_s": 1,
    "timeout_s": 0,
    "min_improvement": 0.0,  # always hand train the best trial
    # A rate that cannot learn next to one that cannot stay stable: trials differ a lot.
    "space": {"train.learning_rate": {"choices": [1.0e-12, 30.0]}},
}


def tiny_params(tmp_path: Path, n_trials: int, **tune) -> Path:
    raw = read_yaml(PARAMS_PATH)
    raw = deep_merge(
        raw,
        {
            "tune": {**TINY_TUNE, "n_trials": n_trials, **tune},
            "train": {"bn_calibration_images": 100, "batch_size": 32},
        },
    )
    raw["tune"]["space"] = {**TINY_TUNE["space"], **tune.get("space", {})}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tune_cmd(tmp_path: Path, params_file: Path, raw_dir: Path) -> tuple[list[str], dict]:
    from pipelines.config import load_params
    from pipelines.ingest import write_source

    write_source(raw_dir, load_params(params_file).ingest, "mnist")  # what ingest leaves
    policy = tmp_path / "policy.json"
    policy.write_text(load_params(params_file).augment.model_dump_json())
    cmd = [
        sys.executable,
        "-m",
        "pipelines.tune",
        "--params",
        str(params_file),
        "--raw",
        str(raw_dir),
        "--policy",
        str(policy),
        "--out",
        str(tmp_path / "tune"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    return cmd, env


def load_study(tmp_path: Path) -> optuna.Study:
    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")


def test_space_key_that_is_not_a_setting_is_rejected_by_name() -> None:
    raw = deep_merge(
        read_yaml(PARAMS_PATH),
        {"tune": {"space": {"train.model.dropuot": {"low": 0.1, "high": 0.5}}}},
    )
    with pytest.raises(ParamsError, match="train.model.dropuot"):
        parse_params(raw)


def test_search_dimension_needs_choices_or_an_ordered_range() -> None:
    raw = deep_merge(
        read_yaml(PARAMS_PATH), {"tune": {"space": {"train.learning_rate": {"low": 0.1}}}}
    )
    with pytest.raises(ParamsError, match="tune.space.train.learning_rate"):
        parse_params(raw)
    raw["tune"]["space"]["train.learning_rate"] = {"low": 0.1, "high": 0.01}
    with pytest.raises(ParamsError, match="must be < high"):
        parse_params(raw)


def test_overrides_apply_to_train_and_the_policy_and_are_validated(params) -> None:
    tuned, policy = apply_overrides(
        params, params.augment, {"train.model.dropout": 0.3, "augment.shift": 0.12}
    )
    assert tuned.train.model.dropout == 0.3 and policy.shift == 0.12
    assert tuned.train.learning_rate == params.train.learning_rate  # untouched keys stay
    with pytest.raises(ParamsError, match="dropout"):
        apply_overrides(params, params.augment, {"train.model.dropout": 1.5})


def test_suggest_draws_ints_floats_and_choices(params) -> None:
    from pipelines.config import SearchDim
    from pipelines.tune import suggest

    trial = optuna.trial.FixedTrial({"a": 48, "b": 0.25, "c": 3})
    assert suggest(trial, "a", SearchDim(choices=[32, 48])) == 48
    assert suggest(trial, "b", SearchDim(low=0.2, high=0.5)) == 0.25
    assert suggest(trial, "c", SearchDim(low=1, high=5)) == 3


def test_first_trial_is_the_hand_set_params_where_they_lie_in_the_space(params) -> None:
    from pipelines.tune import current_settings

    settings = current_settings(params, params.augment)
    assert settings["train.learning_rate"] == params.train.learning_rate
    assert settings["train.model.conv1_filters"] == params.train.model.conv1_filters
    assert settings["augment.rotation_deg"] == params.augment.rotation_deg
    # a value outside its dimension is left to the sampler
    raw = deep_merge(read_yaml(PARAMS_PATH), {"train": {"learning_rate": 0.5}})
    assert "train.learning_rate" not in current_settings(parse_params(raw), params.augment)


def test_the_best_trial_replaces_params_yaml_only_when_it_wins_by_min_improvement() -> None:
    from pipelines.tune import choose

    # given a study whose trial 0 (params.yaml) scores 0.990 and trial 2 scores 0.993
    study = optuna.create_study(direction="maximize")
    dist = {"train.model.dropout": optuna.distributions.FloatDistribution(0.2, 0.5)}
    for dropout, value in ((0.5, 0.990), (0.3, 0.985), (0.4, 0.993)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"train.model.dropout": dropout}, distributions=dist, value=value
            )
        )
    # when the bar is above the 0.003 win, then train keeps trial 0, and says why
    kept = choose(study, "val_accuracy", min_improvement=0.005)
    assert (kept["best_trial"], kept["chosen_trial"]) == (2, 0)
    assert kept["overrides"] == {"train.model.dropout": 0.5}
    assert "less than tune.min_improvement 0.005" in kept["reason"]
    # when the bar is below it, then train gets the best trial
    taken = choose(study, "val_accuracy", min_improvement=0.002)
    assert (taken["chosen_trial"], taken["overrides"]) == (2, {"train.model.dropout": 0.4})
    # and for a loss, lower is better: trial 1's lower loss wins by 0.005
    losses = optuna.create_study(direction="minimize")
    for dropout, value in ((0.5, 0.030), (0.3, 0.025), (0.4, 0.029)):
        losses.add_trial(
            optuna.trial.create_trial(
                params={"train.model.dropout": dropout}, distributions=dist, value=value
            )
        )
    assert choose(losses, "val_loss", min_improvement=0.004)["chosen_trial"] == 1
    assert choose(losses, "val_loss", min_improvement=0.006)["chosen_trial"] == 0


@pytest.mark.e2e
def test_tuning_logs_nested_trials_prunes_and_hands_train_the_best(tmp_path, raw_dir) -> None:
    import mlflow

    # given 4 trials on the tiny set with a forced-aggressive median pruner
    cmd, env = tune_cmd(tmp_path, tiny_params(tmp_path, n_trials=4), raw_dir)
    # when the stage runs
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # then the study holds 4 finished trials, at least one of them pruned
    summary = json.loads((tmp_path / "tune/summary.json").read_text())
    assert summary["trials_finished"] == 4
    assert summary["trials_pruned"] >= 1, done.stderr[-3000:]
    study = load_study(tmp_path)
    # and best_params.json carries the best trial's settings, which train applies
    best = json.loads((tmp_path / "tune/best_params.json").read_text())
    assert best["best_trial"] == best["chosen_trial"] == study.best_trial.number
    assert best["overrides"] == study.best_trial.params
    assert "tune/plots/optimization_history.png" in {
        str(p.relative_to(tmp_path)) for p in (tmp_path / "tune/plots").iterdir()
    }
    # and MLflow has one parent run with a nested run per trial, each with state and metrics
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist-classifier").experiment_id], max_results=100
    )
    (parent,) = [r for r in runs if r.info.run_name == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert {c.data.tags["state"] for c in children} <= {"COMPLETE", "PRUNED"}
    assert sum(c.data.tags["state"] == "PRUNED" for c in children) == summary["trials_pruned"]
    for child in children:
        assert "train.learning_rate" in child.data.params
        assert "val_loss" in child.data.metrics
    complete = [c for c in children if c.data.tags["state"] == "COMPLETE"]
    assert all("value" in c.data.metrics for c in complete)
    assert parent.data.metrics["trials_finished"] == 4
    assert parent.data.tags["optuna.study"] == study.study_name
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_params.json", "summary.json", "trials.csv"} <= artifacts
    assert (
        "optimization_history.png"
        in {a.path.split("/")[-1] for a in client.list_artifacts(parent.info.run_id, "plots")}
        or "optimization_history.png" in artifacts
    )


@pytest.mark.e2e
def test_killed_tuning_resumes_the_same_study(tmp_path, raw_dir) -> None:
    # given a 4-trial study
    cmd, env = tune_cmd(tmp_path, tiny_params(tmp_path, n_trials=4, pruner="none"), raw_dir)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    # when the process is killed while its second trial runs
    for line in proc.stderr:
        seen.append(line)
        if "trial 0:" in line:
            time.sleep(1.5)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    first = load_study(tmp_path)
    finished = [t for t in first.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 1
    assert not (tmp_path / "tune/best_params.json").exists()
    started = finished[0].datetime_start
    time.sleep(3)  # past heartbeat + grace, so the dead trial counts as failed

    # then a rerun resumes: trial 0 is kept, the dead trial is retried, 4 finish in all
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming study" in rerun.stderr
    assert "1 finished trials so far" in rerun.stderr
    study = load_study(tmp_path)
    assert study.study_name == first.study_name
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    assert study.trials[0].datetime_start == started
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) <= 1  # the killed trial, if it had started
    summary = json.loads((tmp_path / "tune/summary.json").read_text())
    assert summary["trials_finished"] == 4


def test_a_study_that_chooses_again_can_log_onto_its_run(tmp_path, raw_dir) -> None:
    """A resumed (or shared) study logs onto the same parent run; its choice may differ from the
    last one's, which MLflow's immutable params would refuse."""
    import mlflow

    cmd, env = tune_cmd(tmp_path, tiny_params(tmp_path, n_trials=1, pruner="none"), raw_dir)
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mnist-classifier").experiment_id
    (parent,) = [r for r in client.search_runs([experiment]) if r.info.run_name == "tune"]
    # when another run of the same study records a different choice on that run
    client.set_tag(parent.info.run_id, "chosen.train.learning_rate", "different")
    second = subprocess.run(
        cmd[: cmd.index("--params") + 1]
        + [str(tiny_params(tmp_path, n_trials=2, pruner="none"))]
        + cmd[cmd.index("--params") + 2 :],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # then it resumes the study on the same run and overwrites the choice
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming study" in second.stderr
    data = client.get_run(parent.info.run_id).data
    assert data.tags["chosen.train.learning_rate"] != "different"
    assert not [key for key in data.params if key.startswith("chosen.")]  # params never change
