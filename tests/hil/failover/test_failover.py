"""Failover of the management process from dc1 to dc2 (issue 14), one test per fault, on one
shared scene (real etcd with a member per site, TCP+mTLS host agents, real guests). In every case
a client inside the client site's namespace writes through the API the whole time (it finds the
leader in the store), and afterwards: every acknowledged write is there, no guest on a surviving
host stopped (same QEMU pids), the fencing audit over every agent's command history and the store
finds no stale command accepted and no two tokens accepted at once, and reserved capacity holds
nothing but what failover put there. The faults run in order; fail back returns the manager to
dc1 between them."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from hvsim.failover.scene import RESERVE_RULE, SLOTS, Scene, Writer

from .conftest import GUESTS

pytestmark = [pytest.mark.hil, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]
SURVIVORS = ("dc1-h1", "dc2-h1")


async def wait_acks(w: Writer, n: int, after: float = 0.0, timeout: float = 240.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [e for e in w.acked() if e["acked"] > after]
        if len(got) >= n:
            return got
        assert w.proc.poll() is None, f"the writer exited ({w.proc.returncode})"
        await asyncio.sleep(0.2)
    raise AssertionError(f"the writer got fewer than {n} writes acknowledged after {after} in {timeout} s: "
                         f"{w.entries()[-5:]}")


async def invariants(sc: Scene, w: Writer, pids: dict[str, set[int]], since: float) -> None:
    """What every fault must leave true."""
    await w.stop()
    acked = w.acked()
    assert all(e["read_ok"] for e in acked)
    lost = await sc.missing([e["name"] for e in acked])
    assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    for h, before in pids.items():
        now = sc.qemu_pids(h)
        assert before <= now, f"guests stopped on surviving host {h}: pids {sorted(before - now)} gone"
    audit = await sc.audit(since)
    # not vacuous: the agents recorded commands, and the store journal holds the old and new terms
    assert audit["commands"] > 0 and len(audit["tokens"]) >= 2, audit
    assert audit["stale_accepted"] == 0, audit
    assert not audit["overlaps"], audit
    vms = (await sc.api("GET", "/v1/vms"))["items"]
    on_reserved = [v["name"] for v in vms if v["host"] in SLOTS["dc2"]]
    restarted = set(sc.ha_restarted())
    assert set(on_reserved) <= restarted, f"reserved capacity used by {set(on_reserved) - restarted}"


async def on_dc1(sc: Scene) -> dict[str, Any]:
    """The manager back on dc1-m (fail back) if it is elsewhere; the leader record."""
    leader = await sc.leader()
    assert leader is not None
    if leader["datacenter"] != "dc1":
        tl = await sc.failback("dc1-m")
        assert "done" in tl["events"], tl
        leader = await sc.leader()
        assert leader is not None and leader["datacenter"] == "dc1", leader
    return leader


async def test_reserved_capacity_refuses_ordinary_defines(scene: Scene) -> None:
    status, body = await scene.api_status("POST", "/v1/vms", {"name": "sneaky", "memory_mib": 128,
                                                             "host": "dc2-r1"})
    assert status == 409 and RESERVE_RULE in str(body), (status, body)
    placed = []
    for i in range(3):
        out = await scene.api("POST", "/v1/vms", {"name": f"placed-{i}", "memory_mib": 64})
        placed.append(out["vm"]["host"])
    assert not set(placed) & set(SLOTS["dc2"]), placed
    for i in range(3):
        await scene.api("DELETE", f"/v1/vms/placed-{i}")


async def test_manager_sigkilled(scene: Scene) -> None:
    sc = scene
    before = await sc.leader()
    assert before is not None and before["datacenter"] == "dc1"
    pids = {h: sc.qemu_pids(h) for h in SURVIVORS}
    assert all(pids.values()), pids
    w = sc.start_writer("kill")
    await wait_acks(w, 5)
    n = len(sc.status().get("timelines", []))
    t_fault = time.time()
    await sc.manager.kill()
    tl = await sc.wait_takeover(after=n)
    assert "done" in tl["events"], tl
    leader = await sc.leader()
    assert leader is not None and leader["datacenter"] == "dc2" and leader["token"] > before["token"], leader
    assert sorted(tl["readopted"]) == sorted(GUESTS), tl
    await wait_acks(w, 5, after=tl["events"]["manager-serving"])
    vms = {v["name"]: v for v in (await sc.api("GET", "/v1/vms"))["items"]}
    assert all(vms[g]["power"] == "running" and vms[g]["host"] == GUESTS[g][0] for g in GUESTS), vms
    await invariants(sc, w, pids, t_fault - 60)


async def test_fail_back(scene: Scene) -> None:
    sc = scene
    pids = {h: sc.qemu_pids(h) for h in SURVIVORS}
    leader = await sc.leader()
    assert leader is not None and leader["datacenter"] == "dc2", "runs after the SIGKILL takeover"
    w = sc.start_writer("back")
    await wait_acks(w, 5)
    t0 = time.time()
    tl = await sc.failback("dc1-m")
    assert "done" in tl["events"], tl
    now = await sc.leader()
    assert now is not None and now["datacenter"] == "dc1" and now["token"] > leader["token"], now
    assert sorted(tl["readopted"]) == sorted(GUESTS), tl
    assert not sc.status()["initiated"], "the dc2 management host went back into the reservation"
    await wait_acks(w, 5, after=tl["events"]["manager-serving"])
    await invariants(sc, w, pids, t0 - 60)


async def test_manager_sigstopped_past_its_lease(scene: Scene) -> None:
    sc = scene
    before = await on_dc1(sc)
    pid = sc.current_manager_pid()
    pids = {h: sc.qemu_pids(h) for h in SURVIVORS}
    w = sc.start_writer("stop")
    await wait_acks(w, 5)
    n = len(sc.status().get("timelines", []))
    t_fault = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        tl = await sc.wait_takeover(after=n)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "done" in tl["events"], tl
    leader = await sc.leader()
    assert leader is not None and leader["token"] > before["token"] and leader["datacenter"] == "dc2"
    await wait_acks(w, 10, after=time.time())      # the woken manager had time to try whatever it had in hand
    still = await sc.leader()
    assert still == leader, f"the woken manager took over again: {still}"
    await invariants(sc, w, pids, t_fault - 60)
    sc.kill_pid(pid)                               # the woken standby: out of the way of fail back


async def test_manager_host_cut_off(scene: Scene) -> None:
    sc = scene
    before = await on_dc1(sc)
    pid = sc.current_manager_pid()
    pids = {h: sc.qemu_pids(h) for h in SURVIVORS}
    w = sc.start_writer("cut")
    await wait_acks(w, 5)
    n = len(sc.status().get("timelines", []))
    t_fault = time.time()
    await sc.sites.set_host_link("dc1-m", False)
    try:
        tl = await sc.wait_takeover(after=n)
        assert "done" in tl["events"], tl
        leader = await sc.leader()
        assert leader is not None and leader["token"] > before["token"] and leader["datacenter"] == "dc2"
        assert os.path.exists(f"/proc/{pid}"), "the cut-off manager kept running"
        # dc1-m's agent is cut off too: its guests (none) are not the new manager's to re-adopt
        await wait_acks(w, 5, after=tl["events"]["manager-serving"])
    finally:
        await sc.sites.set_host_link("dc1-m", True)
    await wait_acks(w, 10, after=time.time())
    assert (await sc.leader()) == leader
    await invariants(sc, w, pids, t_fault - 60)
    sc.kill_pid(pid)


async def test_new_manager_host_killed_during_takeover(scene: Scene) -> None:
    sc = scene
    before = await on_dc1(sc)
    pids = {h: sc.qemu_pids(h) for h in SURVIVORS}
    w = sc.start_writer("twice")
    await wait_acks(w, 5)
    n = len(sc.status().get("timelines", []))
    t_fault = time.time()
    sc.kill_pid(sc.current_manager_pid())
    st = await sc.wait_status(lambda s: len(s.get("timelines", [])) > n and s["initiated"]
                              and "host-initiated" in s["timelines"][-1]["events"], what="a host initiated")
    first = st["timelines"][-1]["slot"]
    await sc.power_off_initiated(first)            # the new manager's host dies mid-takeover
    tl = await sc.wait_takeover(after=n)
    assert "done" in tl["events"] and tl["attempts"], tl
    assert tl["slot"] != first or len(tl["attempts"]) >= 1, tl
    leader = await sc.leader()
    assert leader is not None and leader["token"] > before["token"] and leader["datacenter"] == "dc2"
    assert sorted(tl["readopted"]) == sorted(GUESTS), tl
    await wait_acks(w, 5, after=tl["events"]["manager-serving"])
    await invariants(sc, w, pids, t_fault - 60)


async def test_dc1_powered_off(scene: Scene) -> None:
    sc = scene
    await on_dc1(sc)
    pids = {"dc2-h1": sc.qemu_pids("dc2-h1")}
    w = sc.start_writer("dc1off")
    await wait_acks(w, 5)
    n = len(sc.status().get("timelines", []))
    t_fault = time.time()
    await sc.power_off_dc1()
    tl = await sc.wait_takeover(after=n, timeout=400)
    assert "done" in tl["events"], tl
    assert "protected-restarted" in tl["events"], tl
    back = dict(tl["protected"])
    assert set(back) == {g for g, (h, p, _) in GUESTS.items() if p and h.startswith("dc1")}, tl
    vms = {v["name"]: v for v in (await sc.api("GET", "/v1/vms"))["items"]}
    assert vms["scratch"]["power"] != "running", "an unprotected VM of a lost host restarted"
    assert all(vms[g]["host"].startswith("dc2") for g in back), vms
    await wait_acks(w, 5, after=tl["events"]["manager-serving"])
    await invariants(sc, w, pids, t_fault - 60)
