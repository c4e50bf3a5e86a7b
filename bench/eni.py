"""ENI mobility: a guest's network blackout when it live-migrates, per network configuration (issue 13).

Three hosts on a 400 Mbit/s underlay; a 160 MiB TCG guest on a tenant network (VXLAN) migrates N
times back and forth between hosts a and b (qemu-default policy, the same in every configuration)
while a peer on host c sends it a UDP probe every 1 ms (the guest echoes; the C prober runs at
SCHED_FIFO) and a TCP stream (16 bytes every 10 ms, echoed in order). The migration moves the ENI by
itself (the ENI component); the configurations differ only in what the controller reprograms
(:mod:`hvsim.lab.network`): ``learning`` (no controller reprogramming: flood-and-learn, the guest's
announce), ``after-completion`` (reprogrammed once the migration completed), ``hvsim`` (staged
before the destination starts, activated at pause-before-switchover). Quick: 10 migrations per
configuration, full: 50; the configurations run interleaved in blocks (bench/_common.py ``plan``,
a fresh underlay, controller and guest per block), so load drifts hit all three alike.

Per migration: network blackout (the largest echo gap), vCPU blackout (the guest heartbeat's largest
gap, 10 ms beats), network minus vCPU, duplicated echoes (two live copies), TCP survival, probes lost
after completion; QEMU's own pause (source STOP -> destination RESUME events) and the network
blackout minus it, the ENI activation's time inside the pause; the longest run of unanswered probes
(not split by the late echoes of probes the guest received before it stopped) minus the vCPU
blackout. Writes bench/results/eni.json:
{"runs": [{"config", "n", "net_blackout_ms": {p50, p99, max}, "vcpu_blackout_ms", "net_minus_vcpu_ms":
{p50, p99}, "qemu_pause_ms", "net_minus_pause_ms", "final_step_ms", "duplicates", "tcp_survived",
"lost_after_completion"}], "targets", "samples", "context", "schedule"}.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._common import context, plan, print_context, print_table, run_interleaved, write_result
from hvsim.lab.network import HEADERS, MODES, ConfigResult, Setup, pct, run_config, summarize, table_rows

N = {"quick": 10, "full": 50}
BLOCKS = {"quick": 2, "full": 5}       # each configuration's migrations in this many blocks, interleaved


def targets(rows: dict[str, dict[str, Any]], diffs: dict[str, list[float]], pauses: dict[str, list[float]],
            losses: dict[str, list[float]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, measured: Any, goal: str, ok: bool | None) -> None:
        out.append({"target": name, "measured": measured, "goal": goal,
                    "verdict": "no data" if ok is None else "met" if ok else "missed"})

    hv = rows.get("hvsim")
    if hv:
        for key, what in (("net_minus_vcpu_ms", "network (echo gap)"), ("loss_minus_vcpu_ms", "unanswered run")):
            d = hv[key]
            add(f"hvsim {what} - vCPU blackout p50", d["p50"], "<= 20 ms", None if d["p50"] is None else d["p50"] <= 20)
            add(f"hvsim {what} - vCPU blackout p99", d["p99"], "<= 50 ms", None if d["p99"] is None else d["p99"] <= 50)
        add("hvsim duplicates", hv["duplicates"], "0", hv["duplicates"] == 0)
        add("hvsim TCP survives every migration", hv["tcp_survived"], "yes", hv["tcp_survived"])
        out.append({"target": "hvsim probes lost after completion (information: a TCG guest drops some of "
                              "1000 probes/s under load, in every configuration)",
                    "measured": hv["lost_after_completion"], "goal": "-", "verdict": "info"})
    for other in ("after-completion", "learning"):
        o = rows.get(other)
        if hv and o and hv["lost_per_migration"]["p50"] is not None and o["lost_per_migration"]["p50"] is not None:
            a, b = hv["lost_per_migration"]["p50"], o["lost_per_migration"]["p50"]
            add(f"{other} / hvsim, probes lost per migration p50 (the gain)", f"{b:.0f} / {a:.0f}", "> 1 (visible)",
                b > a)
        for name, d in (("network - vCPU", diffs), ("network - QEMU pause", pauses),
                        ("unanswered run - vCPU", losses)):
            if hv and rows.get(other) and d.get("hvsim") and d.get(other):
                a, b = pct(d["hvsim"], 0.5), pct(d[other], 0.5)
                add(f"{other} - hvsim, {name} p50 (the gain)",
                    None if a is None or b is None else round(b - a, 1), "> 0 (visible)",
                    None if a is None or b is None else b > a)
    return out


async def _main(quick: bool) -> None:
    mode = "quick" if quick else "full"
    ctx = context(quick)
    print_context(ctx)
    setup = Setup()
    blocks = BLOCKS[mode]
    per_block = N[mode] // blocks
    sched = plan(list(MODES), blocks)          # round r runs one block of every configuration
    print(f"[eni] {N[mode]} migrations per configuration in {blocks} interleaved blocks of {per_block}; "
          f"probe every {setup.probe_us} us, {setup.guest_mib} MiB guest, {setup.link_mbit:g} Mbit/s underlay")

    async def one(config: str, _round: int) -> ConfigResult:
        t0 = time.monotonic()
        r = await run_config(config, per_block, setup)
        print(f"  [{config}] block of {len(r.samples)} in {time.monotonic() - t0:.0f}s"
              f"{' ERROR ' + r.error if r.error else ''}", flush=True)
        return r

    t_all = time.monotonic()
    samples = await run_interleaved(sched, one)
    print(f"[eni] {len(samples.trials)} blocks in {time.monotonic() - t_all:.0f}s")
    by = samples.by_config()
    merged: dict[str, ConfigResult] = {}
    for cfg in MODES:
        m = ConfigResult(cfg)
        for r in by.get(cfg, []):
            m.samples.extend(r.samples)
            if r.error:
                m.error = (m.error + "; " if m.error else "") + r.error
        merged[cfg] = m
    rows = {c: summarize(m) for c, m in merged.items()}
    print_table(HEADERS, table_rows(list(rows.values())))
    diffs = {c: [d for s in m.samples if (d := s.net_minus_vcpu_ms) is not None] for c, m in merged.items()}
    pauses = {c: [d for s in m.samples if (d := s.net_minus_pause_ms) is not None] for c, m in merged.items()}
    losses = {c: [d for s in m.samples if (d := s.loss_minus_vcpu_ms) is not None] for c, m in merged.items()}
    tg = targets(rows, diffs, pauses, losses)
    print("\ntargets")
    print_table(["target", "measured", "goal", "verdict"], [[t["target"], t["measured"], t["goal"], t["verdict"]]
                                                             for t in tg])
    errors = [f"{c}: {m.error}" for c, m in merged.items() if m.error]
    write_result("eni", {"setup": {k: v for k, v in vars(setup).items()}, "runs": list(rows.values()),
                         "targets": tg, "samples": [s.to_dict() for m in merged.values() for s in m.samples],
                         "errors": errors}, ctx, samples)
    if errors:
        raise RuntimeError("eni runs failed: " + "; ".join(errors))


def main(quick: bool) -> None:
    asyncio.run(_main(quick))
