"""The host agent on real guests: a guest outlives its agent (SIGKILL or SIGTERM), a new agent
re-adopts it without stopping it (no heartbeat gap beyond a second, memory intact), stale fencing
tokens are refused, and a guest never outlives its host (power-off kills every process of it)."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from hvsim.control.agentrpc import ExecBody, GuestSpec, StartRequest, StopRequest
from hvsim.control.errors import ApiConflictError, ApiNotFoundError
from hvsim.core.procfs import alive

from .conftest import ControlPlane

pytestmark = pytest.mark.hil
T = 7          # a fencing token


async def test_killed_agent_restarts_and_readopts_its_running_guest(cp: ControlPlane) -> None:
    h = await cp.host("h1", memory_mib=1024)
    a = cp.agent("h1")
    info = await a.start(StartRequest(vm=GuestSpec(name="web", memory_mib=256)), T)
    assert info.state == "running" and info.qemu_status == "running" and info.pid in h.pids()
    filled = await a.exec("web", ExecBody(command="memfill 24 --seed 7 --sock /run/mf.sock", timeout=90), T)
    assert "FILLED" in filled.stdout, filled
    await a.exec("web", ExecBody(command="dirty 8 2 >/dev/null 2>&1 &"), T)
    assert info.heartbeat_socket is not None
    hb = await cp.heartbeat(info.heartbeat_socket)
    await hb.wait_beats(30, timeout=30)
    cp.note_pids()

    t_kill = time.monotonic()
    old_agent = h.agent_pid
    await h.kill_agent()                                   # SIGKILL: no chance to clean anything up
    assert old_agent is not None and not alive(old_agent)
    assert alive(info.pid or 0), "the guest died with its host agent"
    await h.start_agent()
    again = await a.vm("web")
    assert (again.pid, again.generation, again.state) == (info.pid, info.generation, "running")
    assert again.qemu_status == "running"

    # the guest never stopped: no heartbeat gap beyond a second, no beat lost, memory intact
    await hb.wait_beats(100, timeout=30)
    st = hb.stats(since=t_kill - 1.0)
    assert st.lost == 0 and st.max_gap_ms < 1000, st
    chk = await a.exec("web", ExecBody(command="retouch seq --sock /run/mf.sock", timeout=90), T)
    assert chk.exit_code == 0 and "bad=0" in chk.stdout, chk
    uptime = float((await a.exec("web", ExecBody(command="cut -d' ' -f1 /proc/uptime"), T)).stdout)
    assert uptime > time.monotonic() - t_kill, "the guest rebooted"

    # a graceful stop (SIGTERM) lets the guest go too; the next agent adopts it again
    assert await h.stop_agent() == 0
    assert alive(info.pid or 0)
    await h.start_agent()
    assert (await a.vm("web")).pid == info.pid
    assert (await a.info()).used_memory_mib == 256          # its capacity is accounted again

    # the newest fencing token survives restarts: an older one is refused and changes nothing
    with pytest.raises(ApiConflictError, match=f"stale fencing token {T - 1}.* {T}"):
        await a.destroy("web", T - 1)
    assert alive(info.pid or 0)

    await a.stop("web", StopRequest(timeout=60), T + 1)   # ACPI shutdown, then the VM is gone here
    assert not alive(info.pid or 0)
    assert h.pids() == [h.agent_pid]
    with pytest.raises(ApiNotFoundError):
        await a.vm("web")


async def test_powering_a_host_off_kills_everything_and_the_next_agent_reports_the_guest_lost(
        cp: ControlPlane) -> None:
    h = await cp.host("h1", memory_mib=1024)
    a = cp.agent("h1")
    info = await a.start(StartRequest(vm=GuestSpec(name="db", memory_mib=128)), T)
    pids = h.pids()
    assert info.pid in pids and h.agent_pid in pids
    await h.power_cycle()                                  # every process of the host dies at once
    assert not any(alive(p) for p in pids)
    ql = await a.qemus()
    assert ql.items == [] and "db" in ql.lost
    # the crash of a guest on a running host is noticed and reported too
    info = await a.start(StartRequest(vm=GuestSpec(name="db", memory_mib=128)), T)
    assert "db" not in (await a.qemus()).lost
    os.kill(info.pid or 0, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "db" not in (ql := await a.qemus()).lost or ql.items:      # reported, then forgotten
        assert time.monotonic() < deadline, ql
        await asyncio.sleep(0.1)
    assert "qemu exited unexpectedly (signal 9)" in ql.lost["db"]
