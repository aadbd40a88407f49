"""The shadow gate: a challenger takes ``champion`` once it has agreed with it on real traffic.

    python -m pipelines.shadow                     # decide now, from serve.log_dir
    python -m pipelines.shadow --log-dir data/monitoring --json

Off while ``register.shadow_min_requests`` is 0 (the default). Above 0, the promotion gate
(``pipelines.register``) gives a candidate that beats the champion the ``challenger`` alias
instead, tagged ``shadow_pending`` with the champion version it beat. A server with
``serve.shadow: challenger`` scores each request with it as well (``serving.shadow``) and writes
both answers to the inference log. Here the log is read and, under the registry lock (the one the
gate holds), the challenger is:

- **promoted** to ``champion`` once it has scored ``register.shadow_min_requests`` requests that
  the champion it beat answered, agreeing on at least ``register.shadow_min_agreement`` of their
  images; the ``challenger`` alias is removed, as the version now serves;
- **rejected** when it has the requests but not the agreement: it keeps ``challenger`` and loses
  ``shadow_pending``, and its tags say why;
- **set aside** when the champion has changed since (the comparison no longer holds);
- left **waiting** otherwise.

The figures and the verdict are tags of the version (``shadow_requests``, ``shadow_agreement``,
``shadow_verdict``, ``shadow_checked_at``). The monitoring flow runs this after each drift check.
Pure parts (``shadow_evidence``, ``decide_shadow``) are tested on small frames.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from pipelines.config import RegisterParams
from pipelines.locks import HeldLock, registry_lock
from pipelines.register import SHADOW_PENDING_TAG as PENDING_TAG

log = logging.getLogger("pipelines.shadow")


@dataclass(frozen=True)
class ShadowEvidence:
    """What the log holds about a challenger scored in shadow of one champion version."""

    requests: int  # requests both answered
    images: int
    agreement: float | None  # share of those images both gave the same digit; None: none


def shadow_evidence(log_frame: pd.DataFrame, champion: str, challenger: str) -> ShadowEvidence:
    """The requests the ``champion`` version answered and the ``challenger`` scored in shadow."""
    if log_frame.empty or "shadow_version" not in log_frame:
        return ShadowEvidence(0, 0, None)
    rows = log_frame[
        (log_frame["model_version"].astype(str) == str(champion))
        & (log_frame["shadow_version"].astype(str) == str(challenger))
    ]
    if rows.empty:
        return ShadowEvidence(0, 0, None)
    # each request's images are logged together, each with the request's size
    requests = int(round(float((1.0 / rows["batch_size"]).sum())))
    agreement = float((rows["digit"] == rows["shadow_digit"]).mean())
    return ShadowEvidence(requests, len(rows), agreement)


@dataclass(frozen=True)
class ShadowVerdict:
    outcome: Literal["promote", "wait", "reject", "stale"]
    reason: str


def decide_shadow(params: RegisterParams, evidence: ShadowEvidence) -> ShadowVerdict:
    """Promote, wait or reject, as a pure function of the evidence (the module docstring)."""
    need, floor = params.shadow_min_requests, params.shadow_min_agreement
    if evidence.requests < need:
        return ShadowVerdict(
            "wait", f"{evidence.requests} of register.shadow_min_requests ({need}) shadow requests"
        )
    agreement = evidence.agreement if evidence.agreement is not None else 1.0
    figures = (
        f"{evidence.requests} shadow requests ({evidence.images} images), agreement {agreement:.2%}"
    )
    if agreement < floor:
        return ShadowVerdict(
            "reject", f"{figures} is below register.shadow_min_agreement {floor:.2%}"
        )
    return ShadowVerdict("promote", f"{figures} passes register.shadow_min_agreement {floor:.2%}")


def promote_from_shadow(
    client,
    params: RegisterParams,
    log_dir: Path,
    lock: AbstractContextManager[HeldLock] | None = None,
) -> dict:
    """Decide on the challenger waiting in shadow, if one is (the module docstring). Returns
    ``outcome`` (``none``, ``wait``, ``promote``, ``reject`` or ``stale``), ``reason`` and the
    figures."""
    from pipelines import tracking
    from pipelines.monitoring import read_log

    name = params.model_name

    def challenger():
        found = tracking.current_champion(client, name, params.challenger_alias)
        return found if found is not None and found.tags.get(PENDING_TAG) else None

    waiting = challenger()
    if waiting is None:
        return {"outcome": "none", "reason": f"no @{params.challenger_alias} waits in shadow"}
    log_frame = read_log(log_dir)  # outside the lock: it may be large
    with lock or registry_lock(name) as held:
        waiting = challenger()  # again, under the lock: another writer may have moved it
        if waiting is None:
            return {"outcome": "none", "reason": f"no @{params.challenger_alias} waits in shadow"}
        version, beaten = str(waiting.version), waiting.tags[PENDING_TAG]
        champion = tracking.current_champion(client, name, params.champion_alias)
        current = str(champion.version) if champion is not None else None
        evidence = shadow_evidence(log_frame, beaten, version)
        if current != beaten:
            verdict = ShadowVerdict(
                "stale",
                f"it beat champion v{beaten}, and the champion is now "
                f"{'v' + current if current else 'none'}: the comparison no longer holds",
            )
        else:
            verdict = decide_shadow(params, evidence)
        tags = {
            "shadow_requests": str(evidence.requests),
            "shadow_images": str(evidence.images),
            "shadow_agreement": "none"
            if evidence.agreement is None
            else f"{evidence.agreement:.6f}",
            "shadow_verdict": f"{verdict.outcome}: {verdict.reason}",
            "shadow_checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if verdict.outcome == "promote":
            tags |= {
                "decision": params.champion_alias,
                "reason": f"in shadow of champion v{beaten}: {verdict.reason}",
                "previous_champion": beaten,
                "decided_at": tags["shadow_checked_at"],
                "gate_lock": held.describe(),
            }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if verdict.outcome != "wait":
            held.check()  # a PostgreSQL session that died has let someone else in: do not write
            client.delete_model_version_tag(name, version, PENDING_TAG)
        if verdict.outcome == "promote":
            client.set_registered_model_alias(name, params.champion_alias, version)
            client.delete_registered_model_alias(name, params.challenger_alias)
    log.info("v%s in shadow of v%s: %s, %s", version, beaten, verdict.outcome, verdict.reason)
    return {"outcome": verdict.outcome, "reason": verdict.reason, "version": version,
            "champion_beaten": beaten, **asdict(evidence)}  # fmt: skip


def main() -> None:
    import argparse
    import json

    from pipelines import tracking
    from pipelines.cli import configure_logging
    from pipelines.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--log-dir", help="the inference log (default: serve.log_dir)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args()
    configure_logging()
    params = load_params(args.params)
    tracking.use_store()
    result = promote_from_shadow(
        tracking.client(), params.register, Path(args.log_dir or params.serve.log_dir)
    )
    print(json.dumps(result) if args.json else f"{result['outcome']}: {result['reason']}")


if __name__ == "__main__":
    main()
