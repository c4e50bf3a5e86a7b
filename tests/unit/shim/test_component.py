"""The shim as a VM component (no QEMU): per-disk options, one real shim process per shim disk,
served privately, stopped with the VM, reported when it dies, removed with the VM's files."""
from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from hvsim.core.cluster import Cluster
from hvsim.core.components import ComponentState
from hvsim.core.errors import BusyError, SpecError
from hvsim.core.events import ComponentFailed
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.drivers.shim.component import DEFAULT_OPTIONS, SHIM_EXPORT, ShimComponent, ShimDriver, ShimOptions
from hvsim.drivers.shim.errors import ShimConfigError
from hvsim.drivers.shim.process import ProcState

from .conftest import run


def test_options_are_validated() -> None:
    for bad in ({"latency_ms": -1}, {"bandwidth_mib_s": 0}, {"prefetch_concurrency": 0}, {"reconnect_delay": -2},
                {"reconnect_delay": 1.5}):
        with pytest.raises(ShimConfigError):
            ShimOptions(**bad)  # type: ignore[arg-type]


def test_most_specific_options_win() -> None:
    drv = ShimDriver()
    assert drv.options_for("a", "swap") is DEFAULT_OPTIONS
    every, vm_a, disk = ShimOptions(latency_ms=1), ShimOptions(latency_ms=2), ShimOptions(latency_ms=3)
    drv = ShimDriver(every)
    drv.set_options(vm_a, vm="a")
    drv.set_options(disk, vm="a", disk="swap")
    assert drv.options_for("a", "swap") is disk
    assert drv.options_for("a", "data") is vm_a
    assert drv.options_for("b", "swap") is every
    with pytest.raises(ShimConfigError, match="vm name"):
        drv.set_options(disk, disk="swap")


async def test_a_shim_disk_needs_a_registered_driver() -> None:
    async with Cluster("nodrv") as cl:
        cl.add_host(HostSpec("h1"))
        with pytest.raises(SpecError, match="no driver for 'shim' devices"):
            await cl.define_vm(VMSpec("g1", disks=(DiskSpec("swap", 16, kind="shim"),)), "h1")
        assert "g1" not in cl.vms


async def test_component_serves_a_sparse_backing_file_privately_and_follows_the_vm() -> None:
    drv = ShimDriver()
    drv.set_options(ShimOptions(latency_ms=0.5, reconnect_delay=7), vm="g1")
    async with Cluster("comp", drivers=(drv,)) as cl:
        host = cl.add_host(HostSpec("h1"))
        vm = await cl.define_vm(VMSpec("g1", disks=(DiskSpec("swap", 16, kind="shim"),)), "h1")
        comp = vm.component("shim:swap")
        assert isinstance(comp, ShimComponent) and comp.state is ComponentState.CREATED
        att = await comp.prepare(host)
        drive = att.drives[0]
        assert comp.state is ComponentState.READY and comp.process and comp.process.state is ProcState.RUNNING
        assert (drive.id, drive.kind, drive.export, drive.reconnect_delay) == ("disk-swap", "nbd", SHIM_EXPORT, 7)
        sock = Path(drive.path)
        assert sock.parent == vm.run_dir / "shim"
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700 and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert comp.backing.stat().st_size == 16 << 20 and comp.backing.stat().st_blocks == 0  # sparse
        _, out, _ = await run("nbdinfo", "--size", comp.nbd_uri())
        assert int(out.split()[0]) == 16 << 20
        assert (await comp.control.stats())["latency_ms"] == 0.5
        # the backing file is held by a live process: undefine is refused and deletes nothing
        with pytest.raises(BusyError, match="files are in use"):
            await cl.undefine_vm("g1")
        assert comp.backing.exists() and "g1" in cl.vms
        pid = comp.pid
        assert pid is not None and any(p == pid for p, _, _ in cl.processes)
        await comp.stop()
        assert comp.state is ComponentState.STOPPED and comp.pids() == []
        await cl.undefine_vm("g1")
        assert comp.state is ComponentState.REMOVED and not comp.backing.exists() and not vm.run_dir.exists()
    assert cl.survivors() == []


async def test_a_shim_that_dies_is_reported_and_can_be_restarted() -> None:
    async with Cluster("crash", drivers=(ShimDriver(),)) as cl:
        host = cl.add_host(HostSpec("h1"))
        vm = await cl.define_vm(VMSpec("g1", disks=(DiskSpec("swap", 16, kind="shim"),)), "h1")
        comp = vm.component("shim:swap")
        assert isinstance(comp, ShimComponent)
        await comp.prepare(host)
        with cl.events.subscribe("test", kinds=(ComponentFailed,)) as sub:
            assert comp.pid is not None
            os.kill(comp.pid, signal.SIGKILL)
            failed = await sub.get(timeout=10)
        assert isinstance(failed, ComponentFailed) and failed.vm == "g1" and failed.component == "shim:swap"
        assert "exited" in failed.error and comp.state is ComponentState.FAILED
        assert vm.component_failures == [failed]
        await comp.restart()
        assert comp.state is ComponentState.READY and comp.restarts == 1
        _, out, _ = await run("nbdinfo", "--size", comp.nbd_uri())
        assert int(out.split()[0]) == 16 << 20
    assert comp.state is ComponentState.STOPPED and cl.survivors() == []
