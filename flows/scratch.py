"""A scratch copy of the repo with a params override: how `make smoke` and the e2e tests run the
real pipeline on a small slice without touching this checkout's data, dvc.lock or MLflow store.

    python -m flows.scratch                    # copy to .smoke/ with params.smoke.yaml, then `dvc repro`
    python -m flows.scratch --flow             # the same through the Prefect flow
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from flows.env import stage_env
from pipelines.config import deep_merge, parse_params, read_yaml

SMOKE_OVERRIDES = "params.smoke.yaml"
# What a scratch copy leaves behind: produced data, stores and caches belong to the original.
SKIP = {".git", ".venv", ".smoke", ".run", "mlruns", ".pytest_cache", ".ruff_cache", "__pycache__"}


def tracked_files(src: Path) -> list[Path]:
    """Files git tracks plus untracked ones it does not ignore (what a clone plus your edits holds)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=src,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [Path(p) for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it instead
        return [p.relative_to(src) for p in src.rglob("*") if p.is_file()]


def make_scratch_copy(src: Path, dest: Path, overrides: Path | None = None) -> Path:
    """Copy the project to ``dest`` (replacing it) and merge ``overrides`` into its params.yaml."""
    src, dest = Path(src).resolve(), Path(dest).resolve()
    overrides = Path(overrides) if overrides else src / SMOKE_OVERRIDES
    merged = deep_merge(read_yaml(src / "params.yaml"), read_yaml(overrides))
    # Fail here, before an earlier copy is replaced, not three stages in.
    parse_params(merged, source=f"params.yaml + {overrides.name}")
    if dest.exists():
        shutil.rmtree(dest)
    for rel in tracked_files(src):
        if rel.parts and (
            rel.parts[0] in SKIP or rel.parts[0] == "data" and rel.name != ".gitkeep"
        ):
            continue
        if rel.parts[:2] == (".dvc", "cache") or rel.parts[:2] == (".dvc", "tmp"):
            continue
        if not (src / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
    (dest / "data").mkdir(exist_ok=True)
    (dest / "mlruns").mkdir(exist_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    # The copy is not a git repo: tell DVC so, and drop the original's lock (it is for the full data).
    (dest / "dvc.lock").unlink(missing_ok=True)
    (dest / ".dvc").mkdir(exist_ok=True)
    (dest / ".dvc" / "config.local").write_text("[core]\n    no_scm = true\n")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run the pipeline on a small slice in a scratch copy."
    )
    parser.add_argument(
        "--dest", default=".smoke", help="scratch folder (default: .smoke, replaced)"
    )
    parser.add_argument("--overrides", default=SMOKE_OVERRIDES, help="params override file")
    parser.add_argument(
        "--flow", action="store_true", help="run through the Prefect flow, not dvc repro"
    )
    args = parser.parse_args()
    src = Path.cwd()
    dest = make_scratch_copy(src, Path(args.dest), Path(args.overrides))
    print(f"scratch copy in {dest} with {args.overrides} applied", flush=True)
    start = time.perf_counter()
    if args.flow:
        cmd = [sys.executable, "-m", "flows.training", "--root", str(dest)]
    else:
        cmd = [sys.executable, "-m", "dvc", "repro"]
    rc = subprocess.call(cmd, cwd=dest if not args.flow else src, env=stage_env())
    print(
        f"smoke run {'passed' if rc == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s; "
        f"see it with: make ui MLRUNS={dest / 'mlruns'}",
        flush=True,
    )
    sys.exit(rc)


if __name__ == "__main__":
    main()
