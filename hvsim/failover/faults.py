"""Faults injected into a running :class:`~hvsim.failover.scene.Scene` while a client writes, and
what each one measured (shared by the benchmark and the lab; the HIL tests assert on the same
figures).

``run_fault(scene, fault, delay)`` starts a writer, injects ``fault`` ``delay`` seconds later, waits
for the controller's takeover, lets the writer go on against the new leader, and returns:
``detect_s`` (fault to the controller seeing the lease gone), ``rto_s`` (fault to the first write
*and* its read-back answered by the new manager, as the client saw it), ``serving_s`` (the same
from the controller's check), ``acked_lost`` (acknowledged writes missing afterwards),
``stale_accepted`` and ``overlaps`` (the fencing audit), ``guests_stopped`` (QEMUs gone on hosts
that survived) and the controller's timeline.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from .errors import FailoverError
from .scene import SLOTS, Scene, Writer

FAULTS = ("sigkill", "sigstop", "link-down", "takeover-host-killed", "dc1-off")


async def wait_acks(w: Writer, n: int, after: float = 0.0, timeout: float = 240.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [e for e in w.acked() if e["acked"] > after]
        if len(got) >= n:
            return got
        if w.proc.poll() is not None:
            raise FailoverError(f"the writer exited ({w.proc.returncode})")
        await asyncio.sleep(0.1)
    raise FailoverError(f"fewer than {n} writes acknowledged after {after} within {timeout:g} s")


async def ensure_dc1(sc: Scene) -> dict[str, Any]:
    """The manager on dc1-m (fail back if it is elsewhere); the leader record."""
    leader = await sc.leader()
    if leader is None:
        raise FailoverError("no leader")
    if leader["datacenter"] != "dc1":
        tl = await sc.failback("dc1-m")
        if "done" not in tl["events"]:
            raise FailoverError(f"fail back did not complete: {tl}")
        leader = await sc.leader()
        if leader is None or leader["datacenter"] != "dc1":
            raise FailoverError(f"after fail back the leader is {leader}")
    return leader


async def run_fault(sc: Scene, fault: str, delay: float, *, survivors: tuple[str, ...] = ("dc1-h1", "dc2-h1"),
                    tag: str = "") -> dict[str, Any]:
    if fault not in FAULTS:
        raise FailoverError(f"unknown fault {fault!r} ({', '.join(FAULTS)})")
    before = await ensure_dc1(sc)
    if fault == "dc1-off":
        survivors = tuple(h for h in survivors if not h.startswith("dc1"))
    pids = {h: sc.qemu_pids(h) for h in survivors}
    victim = sc.current_manager_pid()
    w = sc.start_writer(f"{fault}{tag}")
    await wait_acks(w, 3)
    await asyncio.sleep(delay)
    n = len(sc.status().get("timelines", []))
    t_fault = time.time()
    cut = False
    stopped = False
    try:
        if fault == "sigkill":
            sc.kill_pid(victim)
        elif fault == "sigstop":
            os.kill(victim, signal.SIGSTOP)
            stopped = True
        elif fault == "link-down":
            await sc.sites.set_host_link("dc1-m", False)
            cut = True
        elif fault == "dc1-off":
            await sc.power_off_dc1()
        elif fault == "takeover-host-killed":
            sc.kill_pid(victim)
            st = await sc.wait_status(lambda s: len(s.get("timelines", [])) > n and s.get("initiated")
                                      and "host-initiated" in s["timelines"][-1]["events"], what="a host initiated")
            await sc.power_off_initiated(st["timelines"][-1]["slot"])
        tl = await sc.wait_takeover(after=n, timeout=400)
    finally:
        if stopped:
            os.kill(victim, signal.SIGCONT)
        if cut:
            await sc.sites.set_host_link("dc1-m", True)
    leader = await sc.leader()
    if "done" not in tl["events"] or leader is None:
        raise FailoverError(f"{fault}: the takeover did not complete: {tl}")
    await wait_acks(w, 5, after=time.time())
    await w.stop()
    if fault in ("sigstop", "link-down"):
        sc.kill_pid(victim)              # the woken / reconnected old manager: out of the way of fail back
    acked = w.acked()
    new = [e for e in acked if e["read"] > t_fault and (e.get("token") or 0) >= leader["token"]]
    rto = min(e["read"] for e in new) - t_fault if new else None
    lost = await sc.missing([e["name"] for e in acked])
    audit = await sc.audit(t_fault)
    vms = (await sc.api("GET", "/v1/vms"))["items"]
    on_reserved = sorted(v["name"] for v in vms if v["host"] in SLOTS["dc2"])
    ev = tl["events"]
    return {"fault": fault, "store": "etcd", "delay_s": round(delay, 3),
            "detect_s": round(ev["detected"] - t_fault, 3), "rto_s": round(rto, 3) if rto is not None else None,
            "serving_s": round(ev["manager-serving"] - t_fault, 3) if "manager-serving" in ev else None,
            "acked": len(acked), "acked_lost": len(lost), "stale_accepted": audit["stale_accepted"],
            "overlaps": len(audit["overlaps"]), "audit_commands": audit.get("commands"),
            "audit_store_writes": audit.get("store_writes"), "audit_tokens": audit.get("tokens"),
            "guests_stopped": sum(len(p - sc.qemu_pids(h)) for h, p in pids.items()),
            "reserved_used_by": on_reserved, "ha_restarted": sorted(sc.ha_restarted()),
            "reserved_only_failover": set(on_reserved) <= set(sc.ha_restarted()),
            "old_token": before["token"], "new_token": leader["token"], "attempts": len(tl.get("attempts", [])),
            "timeline": {k: round(v - t_fault, 3) for k, v in ev.items()}, "t_fault": t_fault,
            "protected": tl.get("protected"), "readopted": tl.get("readopted")}
