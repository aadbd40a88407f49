"""Environment for the subprocesses that run DVC stages."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the running interpreter's bin folder first on PATH.

    dvc.yaml's commands say `python -m pipelines.x`; this makes that `python` the one running us
    (the project's .venv), even when the caller did not activate it.
    """
    env = {**os.environ, **(extra or {})}
    # With no PATH at all, "bin:" would put the current folder on it: keep only ours then.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env
