"""Making the plan of one migration: the survey (:mod:`.survey`) and what the cluster learnt
(:mod:`.costs`) become a :class:`~.planner.Measurement`, the planner (:mod:`.planner`) predicts.

Every value says where it came from (``Measurement.sources``): ``sampled`` (this guest, now),
``probed`` (the link, now), ``learnt`` (earlier migrations), ``hint`` (the caller) or ``assumed``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from qmp_bridge import QEMUBridgeError, QMPSession

from .costs import MigrationCosts
from .planner import Contract, Measurement, Plan, plan
from .survey import GuestSample, SurveyError, probe_link, sample_guest

log = logging.getLogger("hvsim.migration")

MIB = 2**20
DEVICE_STATE_BYTES = 256 * 1024
ASSUMED_BANDWIDTH = 100e6 / 8          # when nothing else is known (probe failed, no hint, never migrated)


async def measure(qmp: QMPSession, qemu_pid: int | None, ram_bytes: int, *, src_host: str, dst_host: str,
                  src_netns: str | None, dst_netns: str | None, dst_address: str, costs: MigrationCosts,
                  bandwidth_hint: float | None = None, margin: float = 1.2, vm: str | None = None,
                  device_state_bytes: int = DEVICE_STATE_BYTES) -> tuple[Measurement, dict[str, Any]]:
    """The guest sample and the link probe, at the same time (~2.3 s); (measurement, raw survey)."""
    async def guest() -> GuestSample | None:
        if qemu_pid is None:
            return None
        try:
            return await sample_guest(qmp, qemu_pid, ram_bytes)
        except (SurveyError, QEMUBridgeError) as exc:
            log.warning("guest sample failed, planning from learnt values: %s", exc)
            return None
    g, bw = await asyncio.gather(guest(), probe_link(src_netns, dst_netns, dst_address))
    sources: dict[str, str] = {}
    pair = f"{src_host}->{dst_host}"
    if bw:
        sources["bandwidth"] = "probed"
    elif bandwidth_hint:
        bw, sources["bandwidth"] = bandwidth_hint, "hint"
    elif pair in costs.bandwidth:
        bw, sources["bandwidth"] = costs.bandwidth[pair], "learnt"
    else:
        bw, sources["bandwidth"] = ASSUMED_BANDWIDTH, "assumed"
    mib = ram_bytes // MIB
    if g is not None:
        touched, rate, wss, load = g.touched_bytes, g.dirty_rate, g.wss_bytes, g.vcpu_load
        sources.update(touched="sampled", dirty_rate="sampled", vcpu_load="sampled",
                       wss="sampled" if wss else f"sampled: larger than {g.curve[-1][1] // MIB if g.curve else 0} MiB")
        seen = costs.working_set.get(vm) if vm else None
        floor = g.curve[-1][1] if g.curve else 0
        if wss is None and seen is not None and seen >= 0.8 * floor:
            wss = seen
            sources["wss"] = f"learnt: the last migration of {vm} saw {seen // MIB} MiB"
    else:
        touched, rate, wss, load = ram_bytes, 0.0, None, None
        sources.update(touched="assumed: all of RAM", dirty_rate="unknown: 0 assumed")
    sources["fixed_cost_ms"] = "learnt" if costs.fixed.samples else "assumed"
    sources["postcopy_stall_ms"] = "learnt" if costs.postcopy_stall.samples else "assumed"
    sources["switch_fill"] = "learnt" if costs.switch_fill.samples else "assumed"
    m = Measurement(guest_ram_bytes=ram_bytes, touched_bytes=touched, dirty_rate=rate, bandwidth=float(bw),
                    wss_bytes=wss, vcpu_load=load, fixed_cost_ms=costs.fixed_for(mib),
                    postcopy_stall_ms=costs.postcopy_stall_for(mib), device_state_bytes=device_state_bytes,
                    margin=margin, switch_fill=costs.switch_fill.get(), sources=sources)
    return m, {"guest": g.to_dict() if g is not None else None, "probe_Bps": bw}


def make_plan(m: Measurement, contract: Contract) -> Plan:
    return plan(m, contract)
