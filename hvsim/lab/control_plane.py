"""Lab scenario: the control plane. A real 3-member etcd cluster (loopback) as the store, two
emulated hosts (each a power domain with its own host agent process) and a manager process; a
guest placed, started and exec'd through the manager's API; the host agent under the running
guest SIGKILLed (the manager sees the host unreachable, the guest keeps beating) and restarted (it
re-adopts the guest: same QEMU pid, no heartbeat gap beyond a second); the guest live-migrated to
the other host and stopped; the operations the store recorded. Everything is powered off at the end.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hvsim.control.agent_client import AgentClient
from hvsim.control.client import ManagerClient
from hvsim.control.errors import ControlError
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.launch import EmulatedHost, ManagerProcess, short_dir
from hvsim.control.schema import ExecRequest, HostCreate, MigrateRequest, VMDefine
from hvsim.control.state import HostStatus
from hvsim.guest.heartbeat import HeartbeatMonitor


class SceneError(ControlError):
    """The scene saw something the control plane promises not to do."""


@contextlib.asynccontextmanager
async def _hosts(base: Path, names: list[str]) -> AsyncIterator[dict[str, EmulatedHost]]:
    hosts: dict[str, EmulatedHost] = {}
    try:
        for n in names:
            h = EmulatedHost(n, base, vcpus=2, memory_mib=1024)
            hosts[n] = h
            await h.power_on()
            await h.start_agent()
        yield hosts
    finally:
        for h in hosts.values():
            await h.close()


async def _until(what: str, pred: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise SceneError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.2)


async def run(console: Console, out_dir: Path) -> None:
    base = short_dir("hvsim-lab-cp-")
    summary: dict[str, Any] = {}
    try:
        async with EtcdCluster() as etcd, _hosts(base, ["h1", "h2"]) as hosts:
            mgr = ManagerProcess(base / "manager", etcd.store_url, lease_ttl=3)
            async with mgr, ManagerClient(mgr.address, mgr.token, timeout=300) as c:
                console.print(f"store: etcd x{len(etcd.members)} ({etcd.store_url}); manager on {mgr.address}; "
                              f"host agents: {', '.join(f'{n} (pid {h.agent_pid})' for n, h in hosts.items())}")
                for n, h in hosts.items():
                    await c.add_host(HostCreate(name=n, agent=h.address))
                vm, _ = await c.define_vm(VMDefine(name="web", memory_mib=256))     # placed by the manager
                assert vm.host is not None
                src = vm.host
                dst = "h2" if src == "h1" else "h1"
                t = time.monotonic()
                await c.start_vm("web")
                console.print(f"vm web placed on {src} and started through the API in {time.monotonic() - t:.1f} s")
                out = await c.exec_vm("web", ExecRequest(command="echo \"$(hostname) $(uname -r)\""))
                console.print(f"  guest says: {out.stdout.strip()}")
                await c.exec_vm("web", ExecRequest(command="memfill 16 --seed 11 --sock /run/mf.sock", timeout=90))
                await c.exec_vm("web", ExecRequest(command="dirty 8 2 >/dev/null 2>&1 &"))   # it writes the heartbeat

                async with AgentClient(hosts[src].address, tls=None, timeout=60) as agent:
                    before = await agent.vm("web")
                assert before.heartbeat_socket is not None
                hb = HeartbeatMonitor()
                await hb.attach(Path(before.heartbeat_socket))
                try:
                    await hb.wait_beats(10, timeout=30)
                    t_kill = time.monotonic()
                    await hosts[src].kill_agent()
                    await _until("the manager marks the host unreachable",
                                 lambda: _status(c, src, HostStatus.UNREACHABLE))
                    console.print(f"host agent of {src} SIGKILLed: the manager says {src} is unreachable; "
                                  "the guest keeps running")
                    await hosts[src].start_agent()
                    await _until("the host comes back", lambda: _status(c, src, HostStatus.UP))
                    async with AgentClient(hosts[src].address, tls=None, timeout=60) as agent:
                        after = await agent.vm("web")
                    await hb.wait_beats(40, timeout=30)
                    st = hb.stats(since=t_kill - 1.0)
                finally:
                    await hb.close()
                if after.pid != before.pid or st.lost or st.max_gap_ms >= 1000:
                    raise SceneError(f"the restarted agent did not re-adopt the guest untouched: pid {before.pid} -> "
                                     f"{after.pid}, heartbeat {st}")
                console.print(f"new agent (pid {hosts[src].agent_pid}) re-adopted QEMU pid {after.pid}: heartbeat "
                              f"max gap {st.max_gap_ms:.0f} ms, {st.lost} beats lost")
                summary["readopt"] = {"host": src, "qemu_pid": after.pid, "max_gap_ms": st.max_gap_ms, "lost": st.lost}

                op = await c.migrate_vm("web", MigrateRequest(destination=dst, policy="hvsim-predictive"))
                done = await c.wait_op(op.id, timeout=240)
                rec = await c.get_vm("web")
                chk = await c.exec_vm("web", ExecRequest(command="retouch seq --sock /run/mf.sock", timeout=90))
                console.print(f"live migration {src} -> {dst}: {done.state.value} (steps {', '.join(done.steps)}); "
                              f"vm on {rec.host}, memory check: {chk.stdout.strip()}")
                if rec.host != dst or "bad=0" not in chk.stdout:
                    raise SceneError(f"migration: vm on {rec.host}, memory check {chk.stdout.strip()!r}")
                await c.stop_vm("web")

                ht = Table(title="hosts (manager API)")
                for col in ("host", "status", "vcpus", "memory MiB", "agent"):
                    ht.add_column(col)
                hosts_json = []
                async for hrec in c.iter_hosts():
                    ht.add_row(hrec.name, hrec.status.value, str(hrec.vcpus), str(hrec.memory_mib), hrec.agent or "-")
                    hosts_json.append(hrec.name)
                console.print(ht)
                ot = Table(title="operations (recorded in etcd before they started)")
                for col in ("kind", "vm", "state", "steps"):
                    ot.add_column(col)
                ops, _, _ = await c.list_ops(limit=100)
                for o in ops:
                    ot.add_row(o.kind.value, o.vm, o.state.value, ", ".join(o.steps))
                console.print(ot)
                summary["operations"] = [(o.kind.value, o.state.value) for o in ops]
                summary["hosts"] = hosts_json
        (out_dir / "control_plane.json").write_text(json.dumps(summary, indent=2, default=str))
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _status(c: ManagerClient, host: str, want: HostStatus) -> bool:
    return (await c.get_host(host)).status is want
