"""Failover of the management process from dc1 to dc2 (issue 14): detection and RTO per fault.

One scene (two datacenters and a witness on a shaped WAN, etcd with a member per site, TCP+mTLS
host agents, two real guests, the manager on a dc1 host, the failover controller in the witness
site). For each fault, runs with the fault injected at a random moment (0.5-3 s after the client's
first acknowledged writes) while a client in the client site writes through the API the whole
time; the manager is failed back to dc1 between runs. ``dc1-off`` destroys dc1, so each of its runs
is the last of a scene (a fresh scene per run).

Per run: ``detect_s`` (fault to the controller seeing the lease gone: bounded by the lease TTL),
``rto_s`` (fault to the first write and its read-back answered by the new manager, as the client
saw it), ``acked_lost``, ``stale_accepted`` (agents' histories + store, B's audit),
``guests_stopped`` (QEMUs gone on surviving hosts). Quick: one run per fault; full: 20.
Writes bench/results/failover.json.
"""
from __future__ import annotations

import asyncio
import random
import statistics
from typing import Any

from bench._common import context, meets, print_context, print_table, write_result
from hvsim.core.cluster import images_dir
from hvsim.failover.faults import FAULTS, run_fault
from hvsim.failover.scene import failover_scene

LEASE_TTL = 2.0
ANCHORS = {"vSphere HA host failure declared": "15 s without heartbeats, then VMs restarted",
           "vCenter HA API back": "about 2 minutes",
           "Kubernetes leader election": "15 s lease; the client says it does not fence"}
TARGETS = {"rto_p50_s": 5.0, "rto_p99_s": 10.0}


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))
    return s[k]


async def scene_runs(faults: list[str], seed: int, log: list[str]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    async with failover_scene(images=images_dir(), lease_ttl=LEASE_TTL) as sc:
        await sc.define_start("app", "dc1-h1", protected=True, priority=10)
        await sc.define_start("db", "dc2-h1")
        for i, f in enumerate(faults):
            r = await run_fault(sc, f, rng.uniform(0.5, 3.0), tag=f"-{seed}-{i}")
            print(f"[failover] {f}: detect {r['detect_s']} s, rto {r['rto_s']} s, serving {r['serving_s']} s, "
                  f"acked {r['acked']} lost {r['acked_lost']}, stale {r['stale_accepted']}, "
                  f"stopped {r['guests_stopped']}, timeline {r['timeline']}", flush=True)
            out.append(r)
    return out


async def run(quick: bool) -> list[dict[str, Any]]:
    n = 1 if quick else 20
    others = [f for f in FAULTS if f != "dc1-off"]
    runs: list[dict[str, Any]] = []
    log: list[str] = []
    # the non-destructive faults interleaved (shuffled per round) on one scene; dc1-off ends a scene
    rng = random.Random(14)
    order: list[str] = []
    for _ in range(n):
        rnd = list(others)
        rng.shuffle(rnd)
        order += rnd
    runs += await scene_runs(order + ["dc1-off"], 1, log)
    for k in range(n - 1):
        runs += await scene_runs(["dc1-off"], 2 + k, log)
    return runs


def summary(runs: list[dict[str, Any]]) -> tuple[list[list[Any]], list[list[Any]]]:
    rows = []
    for f in FAULTS:
        rs = [r for r in runs if r["fault"] == f]
        if not rs:
            continue
        rto = [r["rto_s"] for r in rs if r["rto_s"] is not None]
        det = [r["detect_s"] for r in rs]
        rows.append([f, len(rs), f"{statistics.median(det):.2f}", f"{statistics.median(rto):.2f}" if rto else "-",
                     f"{pct(rto, 0.99):.2f}" if rto else "-", sum(r["acked_lost"] for r in rs),
                     sum(r["stale_accepted"] for r in rs), sum(r["guests_stopped"] for r in rs)])
    rto_all = [r["rto_s"] for r in runs if r["rto_s"] is not None]
    p50, p99 = pct(rto_all, 0.5), pct(rto_all, 0.99)
    prot = [r["timeline"].get("protected-restarted") for r in runs if r["fault"] == "dc1-off"]
    verdicts = [
        ["RTO p50 <= 5 s (etcd, all faults)", f"{p50:.2f} s" if p50 is not None else "-",
         meets((p50, p50), at_most=TARGETS["rto_p50_s"]) if p50 is not None else "no data"],
        ["RTO p99 <= 10 s", f"{p99:.2f} s" if p99 is not None else "-",
         meets((p99, p99), at_most=TARGETS["rto_p99_s"]) if p99 is not None else "no data"],
        ["0 acknowledged writes lost", str(sum(r["acked_lost"] for r in runs)),
         "met" if all(r["acked_lost"] == 0 for r in runs) else "missed"],
        ["0 stale commands accepted", str(sum(r["stale_accepted"] for r in runs)),
         "met" if all(r["stale_accepted"] == 0 and r["overlaps"] == 0 for r in runs) else "missed"],
        ["0 guests stopped on surviving hosts", str(sum(r["guests_stopped"] for r in runs)),
         "met" if all(r["guests_stopped"] == 0 for r in runs) else "missed"],
        ["reserved capacity used only by failover", str(all(r["reserved_only_failover"] for r in runs)),
         "met" if all(r["reserved_only_failover"] for r in runs) else "missed"],
        ["protected VMs of a lost dc1 running in dc2 within 60 s",
         ", ".join(f"{p:.1f} s" for p in prot if p is not None) or "-",
         meets((min(prot), max(prot)), at_most=60.0) if prot and all(p is not None for p in prot) else "no data"],
    ]
    return rows, verdicts


def main(quick: bool = False) -> None:
    ctx = context(quick)
    print_context(ctx)
    runs = asyncio.run(run(quick))
    rows, verdicts = summary(runs)
    rto_all = [r["rto_s"] for r in runs if r["rto_s"] is not None]
    write_result("failover", {"runs": runs, "rto_p50_s": pct(rto_all, 0.5), "rto_p99_s": pct(rto_all, 0.99),
                              "targets": [dict(zip(("target", "value", "verdict"), v)) for v in verdicts],
                              "anchors": ANCHORS,
                              "setup": {"lease_ttl_s": LEASE_TTL, "wan_mbit": 100, "lan_mbit": 1000,
                                        "etcd": "3 members: dc1, dc2, witness", "faults": list(FAULTS),
                                        "runs_per_fault": 1 if quick else 20}}, ctx)
    print_table(["fault", "runs", "detect p50 s", "RTO p50 s", "RTO p99 s", "acked lost", "stale accepted",
                 "guests stopped"], rows)
    print_table(["target", "value", "verdict"], verdicts)
    print_table(["anchor", "figure"], [[k, v] for k, v in ANCHORS.items()])


if __name__ == "__main__":
    main()
