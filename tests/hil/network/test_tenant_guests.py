"""Real guests on tenant networks: QEMU opens the ENI's tap, the guest configures itself from the
ENI (kernel command line), two guests on different hosts talk, one migrates under probe.

The migration is the engine's (``start_migration``); it moves the ENI by itself through the ENI
component (a migratable component without state): staged before the destination QEMU starts,
activated at pause-before-switchover, released after completion, rolled back on failure or cancel."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hvsim.core.cluster import Cluster
from hvsim.core.model import HostSpec, NicSpec, VMSpec
from hvsim.core.vm import VM
from hvsim.migration import start_migration
from hvsim.migration.components import UldHooks
from hvsim.network.component import EniDriver
from hvsim.network.controller import MoveState, NetworkController
from hvsim.network.endpoint import NsEndpoint
from hvsim.network.eni import BindingState, EniSpec, NetworkSpec
from hvsim.network.prober import Prober
from hvsim.network.underlay import Underlay

pytestmark = [pytest.mark.hil, pytest.mark.timeout(300)]

BLUE = NetworkSpec("blue", 100, "10.77.0.0/24", gateway="10.77.0.254")
# A TCG guest on 2 busy cores cannot echo 1000 probes/s (its vCPU thread may get a sixth of a core):
# its own drops would look like network loss. 100/s is a rate it keeps up with; the 1 ms probe
# runs against namespace endpoints (test_tenant.py) and in the benchmark.
PROBE_US = 10_000
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}   # QEMU's defaults


def eni(i: int) -> EniSpec:
    return EniSpec(f"eni-{i}", "blue", f"52:54:00:77:00:{i:02x}", (f"10.77.0.{i}",))


@pytest.fixture
async def underlay() -> AsyncIterator[Underlay]:
    assert os.geteuid() == 0
    async with Underlay(["a", "b", "c"], mbit=400) as ul:
        yield ul


@pytest.fixture
async def ctl(underlay: Underlay, request: pytest.FixtureRequest) -> AsyncIterator[NetworkController]:
    async with NetworkController(underlay, mode=getattr(request, "param", "hvsim")) as c:
        await c.add_network(BLUE)
        yield c


class Lab:
    def __init__(self, ul: Underlay, ctl: NetworkController, cl: Cluster, stack: contextlib.AsyncExitStack) -> None:
        self.ul, self.ctl, self.cl, self.stack = ul, ctl, cl, stack

    async def boot(self, name: str, host: str, spec: EniSpec) -> VM:
        self.ctl.define_eni(spec)
        vm = await self.cl.define_vm(VMSpec(name, memory_mib=160, nics=(NicSpec(spec.id, network=spec.network),),
                                            kernel_args=self.ctl.kernel_args([spec.id])), host)
        await vm.start(wait_ready=True, ready_timeout=120)    # the ENI component binds it: tap, FDB, ARP
        return vm

    async def peer(self, name: str, host: str, spec: EniSpec) -> NsEndpoint:
        e = self.ctl.define_eni(spec)
        ep = await self.stack.enter_async_context(NsEndpoint(name, spec, e.network))
        await self.ctl.attach(f"vm-{name}", host, [spec.id], ports=ep.port)
        assert e.active is not None
        await ep.plug(e.active.peer_ifname)
        return ep


@pytest.fixture
async def lab(underlay: Underlay, ctl: NetworkController, cluster: Cluster) -> AsyncIterator[Lab]:
    # set up after the controller, so the guests (QEMU holds the taps) are gone before it tears down
    cluster.add_driver(EniDriver(ctl))
    for h in underlay.hosts:
        cluster.add_host(HostSpec(h, vcpus=4, memory_mib=1024), network=underlay.host_network(h))
    async with contextlib.AsyncExitStack() as stack:
        yield Lab(underlay, ctl, cluster, stack)


async def test_two_guests_on_different_hosts_reach_each_other(lab: Lab) -> None:
    g1, g2 = await asyncio.gather(lab.boot("g1", "a", eni(1)), lab.boot("g2", "b", eni(2)))
    show = await g2.exec("ip -o addr show; ip -o link show", timeout=30)
    assert "10.77.0.2/24" in show.stdout and "52:54:00:77:00:02" in show.stdout and "mtu 1450" in show.stdout
    r = await g1.exec("ping -c 3 -W 3 10.77.0.2", timeout=60)
    assert r.exit_code == 0, r.stdout + r.stderr
    # the guest's frames are legitimate: nothing was dropped as spoofed at its port
    c = await lab.ctl.counters("eni-1")
    assert c.spoof == 0 and c.blk_in == 0


def _migration_moves(ctl: NetworkController, vm: str) -> list[Any]:
    return [m for m in ctl.moves.values() if m.id.startswith(f"migration:{vm}/")]


@pytest.mark.parametrize("ctl", ["hvsim", "after-completion", "learning"], indirect=True)
async def test_a_guest_migrates_under_probe_and_the_peer_keeps_reaching_it(lab: Lab) -> None:
    """The migration moves the ENI by itself (the ENI component's peer is staged before the
    destination QEMU starts, activated at pause-before-switchover, the source released after), in
    each of the three modes of the controller."""
    ctl, mode = lab.ctl, lab.ctl.mode.value
    vm = await lab.boot("mover", "a", eni(1))
    peer = await lab.peer("p", "c", eni(3))
    r = await vm.exec("udpecho -d -q -p 7777", timeout=30)
    assert r.exit_code == 0 and "udpecho pid=" in r.stdout, r.stdout + r.stderr
    e = ctl.eni("eni-1")
    tap = e.spec.port_name
    async with Prober(peer.ns, "10.77.0.1", interval_us=PROBE_US) as pr:
        await asyncio.sleep(1.0)
        mig: Any = start_migration(vm, "b", policy="qemu-default", timeout=180)
        await mig.wait()
        t_done = time.monotonic_ns()
        await asyncio.sleep(2.0)
        report = await pr.stop()
    print(f"probe ({mode}):", report.summary(), f"| lost after completion: {report.lost_after(t_done)}",
          "| ULD:", mig.result.uld.get("breakdown"))
    assert vm.host.name == "b"
    assert report.lost_after(t_done) == 0, report.summary()
    assert report.duplicates == 0, report.summary()
    assert report.tcp is not None and report.tcp.ok, report.summary()
    (move,) = _migration_moves(ctl, "mover")
    assert move.state is MoveState.DONE and move.source == "a" and move.destination == "b"
    phases = [j.phase for j in ctl.journal_of(move.id)]
    assert phases[0] == "stage" and phases[-1] == "release", phases
    assert [(b.host, b.state) for b in e.bindings] == [("b", BindingState.ACTIVE)]
    inv = await ctl.inventory()
    assert tap not in inv["a"].links and tap in inv["b"].links
    r = await vm.exec("ping -c 2 -W 3 10.77.0.3", timeout=60)
    assert r.exit_code == 0, r.stdout


async def test_a_cancelled_migration_leaves_the_eni_on_the_source(lab: Lab) -> None:
    from hvsim.migration import MigrationCancelledError, MigrationState
    vm = await lab.boot("stayer", "a", eni(1))
    peer = await lab.peer("p", "c", eni(3))
    await vm.exec("udpecho -d -q -p 7777", timeout=30, check=True)
    await vm.exec("dirty 96 0 >/dev/null 2>&1 &", timeout=30, check=True)
    await lab.ul.set_bandwidth("b", 40)            # slow enough to be caught midway
    e = lab.ctl.eni("eni-1")
    async with Prober(peer.ns, "10.77.0.1", interval_us=PROBE_US) as pr:
        mig: Any = start_migration(vm, "b", policy="qemu-default", timeout=120)
        async for p in mig:
            if p.state is MigrationState.ACTIVE and p.transferred > 4 * 2**20:
                break
        inv = await lab.ctl.inventory()
        assert e.spec.port_name in inv["b"].links      # staged: the destination QEMU has it open
        assert {b.host: b.state for b in e.bindings} == {"a": BindingState.ACTIVE, "b": BindingState.STAGED}
        mig.cancel()
        with pytest.raises(MigrationCancelledError):
            await mig
        await asyncio.sleep(1.0)
        report = await pr.stop()
    print("probe (cancelled migration):", report.summary())
    (move,) = _migration_moves(lab.ctl, "stayer")
    assert vm.host.name == "a" and move.state is MoveState.ROLLED_BACK
    assert [(b.host, b.state) for b in e.bindings] == [("a", BindingState.ACTIVE)]
    inv = await lab.ctl.inventory()
    assert e.spec.port_name not in inv["b"].links
    # the source was never blocked or repointed: the peer reached it all along (a guest this busy
    # under TCG may still be late with an echo; the TCP stream shows whether anything broke)
    assert report.duplicates == 0 and report.tcp is not None and report.tcp.ok, report.summary()
    assert "activate" not in {j.phase for j in lab.ctl.journal_of(move.id)}
    r = await vm.exec("ping -c 2 -W 3 10.77.0.3", timeout=60)
    assert r.exit_code == 0, r.stdout


class KillDestinationAtSwitchover(UldHooks):
    """At the switch-over (the source paused before it), just before the ENI's final step: kill the
    destination QEMU (a process this migration started, found by pid in the destination's namespace).
    The activation still runs, then the migration fails: the activation must be reverted."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.killed: list[int] = []

    async def at(self, phase: str, uld: str, component: Any) -> None:
        if phase != "quiesce":
            return
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=True)
        for pid in map(int, out.stdout.split()):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu"):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)


@pytest.mark.parametrize("how", ["destination-qemu", "switchover"])
async def test_a_failed_migration_leaves_the_eni_on_the_source(lab: Lab, how: str) -> None:
    from hvsim.migration import MigrationError
    vm = await lab.boot("stayer", "a", eni(1))
    peer = await lab.peer("p", "c", eni(3))
    await vm.exec("udpecho -d -q -p 7777", timeout=30, check=True)
    e = lab.ctl.eni("eni-1")
    opts: dict[str, Any] = {}
    if how == "destination-qemu":      # the destination QEMU refuses to start (after the ENI was staged)
        opts["dest_extra_args"] = ["-device", "no-such-device"]
    else:                              # the destination QEMU dies at the switch-over, after the activation
        hooks = KillDestinationAtSwitchover(lab.ul.host_ns("b"))
        opts["uld_hooks"] = hooks
    async with Prober(peer.ns, "10.77.0.1", interval_us=PROBE_US) as pr:
        await asyncio.sleep(0.5)
        mig: Any = start_migration(vm, "b", policy="qemu-default", timeout=120, **opts)
        with pytest.raises(MigrationError):
            await mig
        t_end = time.monotonic_ns()
        await asyncio.sleep(1.5)
        report = await pr.stop()
    print(f"probe (failed migration, {how}):", report.summary(), "| lost after the rollback:",
          report.lost_after(t_end))
    (move,) = _migration_moves(lab.ctl, "stayer")
    assert vm.host.name == "a" and move.state is MoveState.ROLLED_BACK, move.to_dict()
    phases = {j.phase for j in lab.ctl.journal_of(move.id)}
    if how == "switchover":
        assert hooks.killed and {"activate", "revert"} <= phases, phases   # activated, then reverted
    else:
        assert "activate" not in phases and "rollback" in phases, phases
    assert [(b.host, b.state) for b in e.bindings] == [("a", BindingState.ACTIVE)]
    inv = await lab.ctl.inventory()
    assert e.spec.port_name not in inv["b"].links and e.spec.port_name in inv["a"].links
    assert report.lost_after(t_end) == 0 and report.duplicates == 0, report.summary()
    assert report.tcp is not None and report.tcp.ok, report.summary()
    c = await lab.ctl.counters("eni-1")
    r = await vm.exec("ping -c 2 -W 3 10.77.0.3", timeout=60)
    assert r.exit_code == 0, (r.stdout, c)
