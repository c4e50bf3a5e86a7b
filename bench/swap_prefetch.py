"""Swap prefetch after memory consolidation (issue 4).

A 256 MiB TCG guest fills 128 MiB with ``memfill``; the balloon consolidates it to 128 MiB, which
forces well over half of the fill out to the swap disk (page-cluster 0); the memory is restored and
``retouch`` re-reads and verifies every page in seq / rev / rand order. Each (config, pattern) is a
fresh guest; the same datastore latency D (1 ms) everywhere but ``floor``:

  baseline                       no consolidation (context: the no-swap re-read)
  floor                          shim with zero latency, no prefetch (best a block-level cache can do)
  shim-no-prefetch               shim, D, no prefetch
  shim-prefetch                  shim, D, prefetch with budget = memory given back
  shim-prefetch-guest-assisted   as above, then the guest swaps everything back (swapoff/swapon)
                                 before retouch; retouch_s includes the swap-back
  nbdkit-delay                   nbdkit file + delay filter
  nbdkit-readahead               nbdkit file + readahead + cache (max size = budget) + delay; nbdkit
                                 restarts after consolidation so its cache starts empty at restore,
                                 like the shim's

Every (config, pattern) runs ``repeats`` times (full 3, quick 2), all of them interleaved: round 1
of every case in a shuffled order, then round 2 in another order, ... (bench/_common.py).

Writes bench/results/swap_prefetch.json: {"latency_ms", "runs": [{config, pattern, retouch_s,
hit_rate, accuracy, cache_bytes, budget_bytes, swapped_bytes, verified}], "ratios", "floor_check",
"errors", "context", "schedule"}: one row per (config, pattern) whose numbers are the medians of
its runs, every run's value beside as ``KEY_samples``, ``verified`` true only if every run verified.
``cache_bytes`` is the largest the shim's cache got (reservations included) during a run.
``ratios`` are ratios of medians with the range they can take and a verdict ("win"/"loss" only
when the two configs' min-max ranges do not overlap); ``floor_check`` says, per pattern, whether
``floor`` really was below every other block-level path in this run.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._common import (
    LOSS,
    WIN,
    Comparison,
    compare,
    context,
    fmt_stat,
    meets,
    merge_samples,
    plan,
    print_context,
    print_table,
    repeats,
    run_interleaved,
    write_result,
)
from hvsim.lab.swap_prefetch import CONFIGS, PATTERNS, CaseResult, Setup, run_case

LATENCY_MS = 1.0
QUICK_CONFIGS = ("floor", "shim-no-prefetch", "shim-prefetch", "nbdkit-readahead")
QUICK_PATTERNS = ("seq", "rand")
# block-level paths the floor must be below (baseline never swaps; guest-assisted swaps back in bulk)
FLOOR_PEERS = ("shim-no-prefetch", "shim-prefetch", "nbdkit-delay", "nbdkit-readahead")
# (subject, other, ratio label, target): the targets, as ratios of retouch times
RATIO_TARGETS: tuple[tuple[str, str, str, dict[str, float]], ...] = (
    ("shim-prefetch", "shim-no-prefetch", "no-prefetch/prefetch", {"at_least": 5.0}),
    ("shim-prefetch", "floor", "prefetch/floor", {"at_most": 1.25}),
    ("shim-prefetch", "nbdkit-readahead", "nbdkit-ra/prefetch", {"at_least": 1.0}),
    ("shim-prefetch-guest-assisted", "shim-prefetch", "prefetch/assisted", {"at_least": 1.0}),
)
MIB = 2**20
Case = tuple[str, str]   # (config, pattern)


def times(results: list[CaseResult]) -> list[float | None]:
    """Retouch seconds of the runs that verified (None for the others)."""
    return [r.retouch_s if r.verified else None for r in results]


def _target_text(t: dict[str, float]) -> str:
    return " ".join(f"{'>=' if k == 'at_least' else '<='} {v:g}" for k, v in t.items())


Row = tuple[dict[str, Any], Comparison]   # what a table row says, and the comparison behind it


def _json(rows: list[Row]) -> list[dict[str, Any]]:
    return [{**meta, **cmp.to_json()} for meta, cmp in rows]


def ratio_rows(by: dict[Case, list[CaseResult]], patterns: tuple[str, ...]) -> list[Row]:
    """The issue's targets per pattern: ratio of medians, its range, verdict, target verdict."""
    out: list[Row] = []
    for p in patterns:
        for subject, other, name, target in RATIO_TARGETS:
            if (subject, p) not in by or (other, p) not in by:
                continue
            ts, to = times(by[(subject, p)]), times(by[(other, p)])
            # every ratio is written so that > 1 favours the subject except prefetch/floor
            cmp: Comparison = (compare(ts, to, better="lower") if name == "prefetch/floor"
                               else compare(to, ts, better="higher"))
            out.append(({"pattern": p, "ratio": name, "subject": subject, "other": other,
                         "target": _target_text(target), "target_verdict": meets(cmp, **target)}, cmp))
    return out


def floor_rows(by: dict[Case, list[CaseResult]], patterns: tuple[str, ...]) -> list[Row]:
    """Was ``floor`` really the floor? floor against every other block-level path, per pattern."""
    out: list[Row] = []
    for p in patterns:
        if ("floor", p) not in by:
            continue
        for c in FLOOR_PEERS:
            if (c, p) not in by:
                continue
            cmp = compare(times(by[("floor", p)]), times(by[(c, p)]), better="lower")
            holds = {WIN: "yes", LOSS: f"NO: {c} faster"}.get(cmp.verdict, cmp.verdict)
            out.append(({"pattern": p, "config": c, "floor_is_lower": holds}, cmp))
    return out


def _row(r: CaseResult) -> dict[str, Any]:
    """The run's JSON row; a run that did not verify has no retouch time."""
    return {**r.bench_row(), "retouch_s": r.retouch_s if r.verified else None}


def _progress(r: CaseResult, dt: float) -> None:
    nan = float("nan")
    print(f"  {r.config:30s} {r.pattern:4s} retouch {r.retouch_s if r.retouch_s is not None else nan:7.2f}s"
          f" hit {r.hit_rate if r.hit_rate is not None else nan:.3f}"
          f" swapped {(r.swapped_bytes or 0) / MIB:5.0f} MiB verified {r.verified} ({dt:.0f}s)", flush=True)


async def _main(quick: bool) -> None:
    ctx = context(quick)
    print_context(ctx)
    setup = Setup(latency_ms=LATENCY_MS, timeout_s=240.0)
    configs = QUICK_CONFIGS if quick else CONFIGS
    patterns = QUICK_PATTERNS if quick else PATTERNS
    cases: list[Case] = [(c, p) for p in patterns for c in configs]
    sched = plan(cases, repeats(quick))

    async def one(case: Case, _round: int) -> CaseResult:
        t0 = time.monotonic()
        r = await run_case(case[0], case[1], setup)
        _progress(r, time.monotonic() - t0)
        return r

    t_all = time.monotonic()
    samples = await run_interleaved(sched, one)
    print(f"[swap_prefetch] {len(samples.trials)} runs in {time.monotonic() - t_all:.0f}s")
    by = samples.by_config()
    rows = [merge_samples([_row(r) for r in by[c]], ident=("config", "pattern")) for c in cases]
    ratios, floor = ratio_rows(by, patterns), floor_rows(by, patterns)

    print_table(["config", "pattern", "retouch s", "hit_rate", "accuracy", "cache MiB", "budget MiB",
                 "swapped MiB", "verified"],
                [[c[0], c[1], fmt_stat(times(by[c])), fmt_stat(row["hit_rate_samples"]),
                  fmt_stat(row["accuracy_samples"]), fmt_stat(row["cache_bytes_samples"], 1 / MIB),
                  fmt_stat(row["budget_bytes_samples"], 1 / MIB), fmt_stat(row["swapped_bytes_samples"], 1 / MIB),
                  f"{sum(r.verified for r in by[c])}/{len(by[c])}"] for c, row in zip(cases, rows, strict=True)])
    print("\nratios of median retouch times (range: min/max .. max/min); verdict 'win' = the subject is faster")
    print_table(["pattern", "ratio", "subject", "median (range)", "verdict", "target", "target met"],
                [[r["pattern"], r["ratio"], r["subject"], cmp.fmt(), cmp.verdict, r["target"],
                  r["target_verdict"]] for r, cmp in ratios])
    if floor:
        print("\nwas floor (0 ms, no prefetch) the floor in this run?")
        print_table(["pattern", "config", "config s", "floor s", "floor/config", "floor lower?"],
                    [[f["pattern"], f["config"], fmt_stat(cmp.b), fmt_stat(cmp.a), cmp.fmt(), f["floor_is_lower"]]
                     for f, cmp in floor])
    errors = [f"{r.config}/{r.pattern} round {t.round + 1}: {r.error or 'not verified'}"
              for t in samples.trials for r in [t.value] if not r.verified]
    write_result("swap_prefetch", {"latency_ms": LATENCY_MS, "runs": rows, "ratios": _json(ratios),
                                   "floor_check": _json(floor),
                                   "errors": errors}, ctx, samples)
    if errors:
        raise RuntimeError("swap_prefetch runs failed: " + "; ".join(errors))


def main(quick: bool) -> None:
    asyncio.run(_main(quick))
