"""dvc.yaml against the code: each stage lists exactly the project modules its command runs."""

from __future__ import annotations

import ast

import yaml

from tests.conftest import REPO


def imported_modules(module: str) -> set[str]:
    """The ``pipelines`` modules ``pipelines/<module>.py`` imports, anywhere in the file (imports
    inside functions included: the stage may call them)."""
    tree = ast.parse((REPO / "pipelines" / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pipelines":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipelines.")}
    return found


def module_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imported_modules(current))
    return seen


def dependency_errors(stages: dict) -> dict[str, dict[str, list[str]]]:
    """Per stage, the project modules it runs but does not list, and those it lists but never runs."""
    wrong = {}
    for name, stage in stages.items():
        module = stage["cmd"].split("-m pipelines.", 1)[1].split()[0]
        needed = {f"pipelines/{m}.py" for m in module_closure(module)} | {"pipelines/__init__.py"}
        listed = {d for d in stage["deps"] if isinstance(d, str) and d.startswith("pipelines/")}
        if needed != listed:
            wrong[name] = {"missing": sorted(needed - listed), "not run": sorted(listed - needed)}
    return wrong


def test_each_stage_depends_on_exactly_the_modules_it_runs():
    """A module a stage runs but does not list would not rerun the stage when it changes; one it
    lists but never runs reruns it for nothing. The package's __init__.py (it switches oneDNN
    on) is run by every stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert len(stages) >= 9
    assert dependency_errors(stages) == {}


def test_the_check_names_a_missing_and_a_needless_module():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # validate logs a failed validation through pipelines.tracking, imported inside a function
    stages["validate"]["deps"].remove("pipelines/tracking.py")
    stages["register"]["deps"].append("pipelines/insight.py")
    assert dependency_errors(stages) == {
        "validate": {"missing": ["pipelines/tracking.py"], "not run": []},
        "register": {"missing": [], "not run": ["pipelines/insight.py"]},
    }


def changed(value):
    """Another value of the same kind, for probing which settings a hash reads."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value / 2 if value else 1
    if isinstance(value, str):
        return {"auto": "float32", "float32": "bfloat16", "bfloat16": "float32"}.get(
            value, value + "x"
        )
    raise TypeError(f"no probe for {value!r}")


def test_tune_depends_on_exactly_the_train_settings_a_trial_uses(params):
    """The recipe a trial tunes is what the study's key reads of ``train`` (``study_key``); the
    rest of ``train`` is the final run's schedule (epochs, max_images, early stopping, weight
    averaging). dvc.yaml's tune stage must list exactly the recipe: a setting it misses would not
    rerun tune when it changes, one it lists needlessly would rerun tune for nothing."""
    from pipelines.tune import study_key

    source = {"files": {"a.gz": "0" * 64}}
    base = study_key(params, source)
    recipe = set()
    for field, value in params.train.model_dump().items():
        if isinstance(value, dict):  # a section (the model): probe one of its settings
            inner, inner_value = next(iter(value.items()))
            probe = getattr(params.train, field).model_copy(update={inner: changed(inner_value)})
        else:
            probe = changed(value)
        probed = params.model_copy(update={"train": params.train.model_copy(update={field: probe})})
        if study_key(probed, source) != base:
            recipe.add(f"train.{field}")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    listed = {p for p in stages["tune"]["params"] if isinstance(p, str) and p.startswith("train.")}
    assert recipe == listed, {
        "not listed": sorted(recipe - listed),
        "needless": sorted(listed - recipe),
    }
    assert {"train.epochs", "train.max_images"}.isdisjoint(recipe)  # the schedule is train's alone
