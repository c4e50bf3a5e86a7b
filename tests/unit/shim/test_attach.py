"""hvsim.drivers.shim.attach: per-disk options and one real shim process per shim disk (no QEMU)."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from hvsim.core.cluster import Cluster
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.drivers.shim.attach import (DEFAULT_OPTIONS, SHIM_EXPORT, ShimOptions, set_shim_options, shim_options_for,
                               start_shim_for_disk)
from hvsim.drivers.shim.errors import ShimConfigError
from hvsim.drivers.shim.process import ProcState

from .conftest import run


def test_options_are_validated() -> None:
    for bad in ({"latency_ms": -1}, {"bandwidth_mib_s": 0}, {"prefetch_concurrency": 0}, {"reconnect_delay": -2},
                {"reconnect_delay": 1.5}):
        with pytest.raises(ShimConfigError):
            ShimOptions(**bad)  # type: ignore[arg-type]


async def test_most_specific_options_win(tmp_path: Path) -> None:
    async with Cluster("opts", run_dir=tmp_path / "run") as cl:
        assert shim_options_for(cl, "a", "swap") is DEFAULT_OPTIONS
        every, vm_a, disk = ShimOptions(latency_ms=1), ShimOptions(latency_ms=2), ShimOptions(latency_ms=3)
        set_shim_options(cl, every)
        set_shim_options(cl, vm_a, vm="a")
        set_shim_options(cl, disk, vm="a", disk="swap")
        assert shim_options_for(cl, "a", "swap") is disk
        assert shim_options_for(cl, "a", "data") is vm_a
        assert shim_options_for(cl, "b", "swap") is every
        with pytest.raises(ShimConfigError, match="vm name"):
            set_shim_options(cl, disk, disk="swap")


async def test_start_shim_for_disk_serves_a_sparse_backing_file_privately() -> None:
    async with Cluster("attach") as cl:
        cl.add_host(HostSpec("h1"))
        set_shim_options(cl, ShimOptions(latency_ms=0.5, reconnect_delay=7), vm="g1")
        vm = await cl.define_vm(VMSpec("g1", disks=(DiskSpec("swap", 16, kind="shim"),)), "h1")
        drive = await start_shim_for_disk(cl, vm, vm.spec.disks[0])
        shim: Any = vm.shims["swap"]
        assert shim.state is ProcState.RUNNING
        assert (drive.id, drive.kind, drive.export, drive.reconnect_delay) == ("disk-swap", "nbd", SHIM_EXPORT, 7)
        sock = Path(drive.path)
        assert sock.parent == cl.run_dir / "shims" / "g1"
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert not sock.is_relative_to(vm.instance_dir)
        backing = cl.disk_path(vm, vm.spec.disks[0])
        assert backing.stat().st_size == 16 << 20 and backing.stat().st_blocks == 0  # sparse
        _, out, _ = await run("nbdinfo", "--size", shim.nbd_uri())
        assert int(out.split()[0]) == 16 << 20
        assert (await shim.control.stats())["latency_ms"] == 0.5
        with pytest.raises(ShimConfigError, match="not 'shim'"):
            await start_shim_for_disk(cl, vm, DiskSpec("data", 8))
    assert shim.state is ProcState.STOPPED  # stopped by the cluster's on_close
