"""Run a command while holding the training lock, so that a `dvc repro` started by hand and a flow
run (a deployment's included) never train over the same files. `make run` goes through it.

    python -m flows.locked dvc repro

It waits ``deploy.lock_wait_s`` for a training in progress, then gives up with a message naming
it and exit status 75, as ``python -m flows.training`` does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flows.env import stage_env
from flows.training import LOCK_FILE, SKIPPED_EXIT, TrainingBusy, training_lock
from pipelines.config import load_params


def main() -> None:
    command = sys.argv[1:]
    if not command:
        sys.exit("usage: python -m flows.locked COMMAND [ARG ...]")
    root = Path.cwd()
    wait_s = load_params(root / "params.yaml").deploy.lock_wait_s
    try:
        with training_lock(root / LOCK_FILE, " ".join(command), wait_s):
            status = subprocess.call(command, env=stage_env())
    except TrainingBusy as busy:
        print(f"{' '.join(command)}: {busy}", file=sys.stderr)
        sys.exit(SKIPPED_EXIT)
    sys.exit(status)


if __name__ == "__main__":
    main()
