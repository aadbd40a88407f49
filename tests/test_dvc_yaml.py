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
