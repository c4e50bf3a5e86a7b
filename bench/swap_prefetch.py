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

Writes bench/results/swap_prefetch.json: {"latency_ms", "runs": [{config, pattern, retouch_s,
hit_rate, accuracy, cache_bytes, budget_bytes, swapped_bytes, verified}]}. ``cache_bytes`` is the
largest the shim's cache got (reservations included) during the run.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._common import print_table, write_result
from hvsim.lab.swap_prefetch import CONFIGS, PATTERNS, CaseResult, Setup, run_case

LATENCY_MS = 1.0
QUICK_CONFIGS = ("floor", "shim-no-prefetch", "shim-prefetch", "nbdkit-readahead")
QUICK_PATTERNS = ("seq", "rand")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(results: list[CaseResult]) -> list[list[Any]]:
    by = {(r.config, r.pattern): r for r in results}
    rows = []
    for p in PATTERNS:
        def t(c: str) -> float | None:
            r = by.get((c, p))
            return r.retouch_s if r is not None and r.verified else None
        if t("shim-prefetch") is None:
            continue
        rows.append([p, _ratio(t("shim-no-prefetch"), t("shim-prefetch")), _ratio(t("shim-prefetch"), t("floor")),
                     _ratio(t("nbdkit-readahead"), t("shim-prefetch")),
                     _ratio(t("shim-prefetch"), t("shim-prefetch-guest-assisted"))])
    return rows


async def _main(quick: bool) -> None:
    setup = Setup(latency_ms=LATENCY_MS, timeout_s=240.0)
    configs = QUICK_CONFIGS if quick else CONFIGS
    patterns = QUICK_PATTERNS if quick else PATTERNS
    results: list[CaseResult] = []
    t_all = time.monotonic()
    for pattern in patterns:  # configs interleaved in time: load drift on the shared host hits them alike
        for config in configs:
            t0 = time.monotonic()
            r = await run_case(config, pattern, setup)
            results.append(r)
            print(f"  {config:30s} {pattern:4s} retouch {r.retouch_s if r.retouch_s is not None else float('nan'):7.2f}s"
                  f" hit {r.hit_rate if r.hit_rate is not None else float('nan'):.3f}"
                  f" swapped {(r.swapped_bytes or 0) / 2**20:5.0f} MiB verified {r.verified}"
                  f" ({time.monotonic() - t0:.0f}s)", flush=True)
    print(f"[swap_prefetch] {len(results)} runs in {time.monotonic() - t_all:.0f}s")
    print_table(["config", "pattern", "retouch_s", "hit_rate", "accuracy", "cache_MiB", "budget_MiB",
                 "swapped_MiB", "verified"],
                [[r.config, r.pattern, r.retouch_s, r.hit_rate, r.accuracy,
                  None if r.cache_bytes is None else r.cache_bytes / 2**20,
                  None if r.budget_bytes is None else r.budget_bytes / 2**20,
                  None if r.swapped_bytes is None else r.swapped_bytes / 2**20, r.verified] for r in results])
    print()
    print_table(["pattern", "no-prefetch/prefetch (>=5)", "prefetch/floor (<=1.25)",
                 "nbdkit-ra/prefetch (>1)", "prefetch/assisted (>1)"], summarize(results))
    write_result("swap_prefetch", {"latency_ms": LATENCY_MS, "runs": [r.bench_row() for r in results]})
    failed = [f"{r.config}/{r.pattern}: {r.error or 'not verified'}" for r in results if not r.verified]
    if failed:
        raise RuntimeError("swap_prefetch runs failed: " + "; ".join(failed))


def main(quick: bool) -> None:
    asyncio.run(_main(quick))
