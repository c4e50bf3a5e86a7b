"""Replay recorded ``query-migrate`` sequences into a policy (no QEMU)."""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

from hvsim.migration.policies.base import Action, MigrationContext, Policy
from hvsim.migration.progress import Observation

DATA = Path(__file__).resolve().parent / "data"
_FIELDS = {f.name for f in fields(Observation)}


def load(name: str) -> tuple[dict, list[Observation]]:
    rec = json.loads((DATA / f"{name}.json").read_text())
    obs = [Observation(**{k: v for k, v in s.items() if k in _FIELDS}) for s in rec["samples"]]
    return rec, obs


def ctx(rec: dict, postcopy: bool = True, dirty: float | None = None) -> MigrationContext:
    return MigrationContext(vm="g", guest_ram_bytes=rec["guest_mib"] * 2**20, postcopy_available=postcopy,
                            dirty_rate_estimate=dirty)


def replay(policy: Policy, c: MigrationContext, samples: list[Observation],
           until_first: bool = True) -> list[tuple[Observation, Action]]:
    """Feed samples; returns (observation, action) for every action after start(). Stops after the
    first switch-over/postcopy decision when ``until_first`` (what QEMU would then do is not recorded)."""
    out: list[tuple[Observation, Action]] = []
    policy.setup(c)
    policy.start(c)
    for o in samples:
        o = replace(o, predicted_downtime_ms=None)
        for a in policy.observe(o):
            out.append((o, a))
            if until_first and a.kind.value in ("switchover", "start-postcopy"):
                return out
    return out
