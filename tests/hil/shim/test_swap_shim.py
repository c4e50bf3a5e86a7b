"""HIL: a real guest swaps to its shim-backed disk; consolidation, restore with prefetch, and a
shim restart in the middle of the guest's swap-in."""
from __future__ import annotations

import asyncio
import os
import signal
import re

import pytest

from hvbase.aio import wait_for
from hvsim.core.cluster import Cluster
from hvsim.core.components import ComponentState
from hvsim.core.errors import SpecError
from hvsim.core.events import ComponentFailed
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.drivers.shim.component import ShimComponent, ShimDriver, ShimOptions
from hvsim.drivers.shim.process import ProcState
from hvsim.memory import (MemoryState, MemoryStateError, consolidate_memory, memory_state, restore_memory,
                          setup_guest_swap)

pytestmark = pytest.mark.hil

GUEST_MIB = 256
FILL_MIB = 128
TARGET_MIB = 128
OK_RE = re.compile(r"OK order=(\w+) pages=(\d+) bad=(\d+)")


async def boot_swap_guest(cl: Cluster, name: str, opts: ShimOptions):  # type: ignore[no-untyped-def]
    if "h1" not in cl.hosts:
        cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    if "shim" not in cl.drivers:
        cl.add_driver(ShimDriver())
    driver = cl.drivers["shim"]
    assert isinstance(driver, ShimDriver)
    driver.set_options(opts, vm=name)
    vm = await cl.define_vm(VMSpec(name, memory_mib=GUEST_MIB, disks=(DiskSpec("swap", 384, kind="shim"),)), "h1")
    await vm.start(wait_ready=True, ready_timeout=120)
    swap = await setup_guest_swap(vm, "swap", page_cluster=0)
    assert swap.device.startswith("/dev/vd")
    res = await vm.exec(f"memfill {FILL_MIB}", timeout=120, check=True)
    assert "FILLED" in res.stdout
    return vm


def parse_ok(out: str) -> tuple[int, int]:
    m = OK_RE.search(out)
    assert m, f"retouch printed no report: {out!r}"
    return int(m.group(2)), int(m.group(3))


async def test_consolidate_restore_prefetch_serves_swap_ins(cluster: Cluster) -> None:
    vm = await boot_swap_guest(cluster, "swapper", ShimOptions(latency_ms=0.2))
    shim = vm.component("shim:swap")
    assert isinstance(shim, ShimComponent) and shim.state is ComponentState.READY
    assert shim.process is not None and shim.process.state is ProcState.RUNNING
    assert memory_state(vm) is MemoryState.FULL
    with pytest.raises(MemoryStateError):
        await restore_memory(vm)
    with pytest.raises(SpecError):
        await consolidate_memory(vm, GUEST_MIB + 64)

    cons = await consolidate_memory(vm, TARGET_MIB, timeout=120)
    assert memory_state(vm) is MemoryState.CONSOLIDATED
    assert cons.reached_mib <= TARGET_MIB
    assert cons.guest_total_mib is not None and cons.guest_total_mib < TARGET_MIB
    assert cons.swapped_bytes is not None and cons.swapped_bytes >= FILL_MIB // 2 * 1024 * 1024
    st = await shim.control.stats()
    assert st["swap_header"] is True
    assert st["tracked_pages"] * 4096 >= cons.swapped_bytes // 2
    with pytest.raises(SpecError):  # cannot "consolidate" upwards
        await consolidate_memory(vm, TARGET_MIB + 32)
    await shim.control.reset_stats()

    rest = await restore_memory(vm, timeout=120)
    assert memory_state(vm) is MemoryState.FULL
    assert rest.reached_mib == GUEST_MIB
    assert rest.budget_bytes == (GUEST_MIB - TARGET_MIB) * 1024 * 1024
    assert rest.prefetch["shim:swap"]["planned_pages"] > 0

    res = await vm.exec("retouch seq", timeout=180)
    pages, bad = parse_ok(res.stdout)
    assert (pages, bad) == (FILL_MIB * 256, 0), res.stdout
    assert res.exit_code == 0
    st = await shim.control.stats()
    assert st["hits"] > 0 and st["hit_rate"] > 0.5, st
    assert st["cache_bytes"] <= st["budget_bytes"] == rest.budget_bytes
    assert st["prefetched_pages"] > 0 and st["accuracy"] > 0
    res = await vm.exec("retouch rand", timeout=180)
    assert parse_ok(res.stdout) == (FILL_MIB * 256, 0), res.stdout


async def test_shim_killed_mid_swap_in_guest_stalls_then_continues(cluster: Cluster) -> None:
    vm = await boot_swap_guest(cluster, "crashy", ShimOptions(latency_ms=0.0, reconnect_delay=20))
    shim = vm.component("shim:swap")
    assert isinstance(shim, ShimComponent)
    cons = await consolidate_memory(vm, TARGET_MIB, timeout=120)
    assert cons.swapped_bytes and cons.swapped_bytes > 16 * 1024 * 1024
    await restore_memory(vm, timeout=120, prefetch=False)  # every swap-in goes to the shim

    retouch = asyncio.ensure_future(vm.exec("retouch rev", timeout=240))
    try:
        # wait until the guest is visibly swapping in through the shim, then kill the shim
        for _ in range(100):
            if (await shim.control.stats())["misses"] > 200:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the guest never read from the shim")
        failures: list = []
        with vm.subscribe("shim failures", kinds=(ComponentFailed,), callback=failures.append):
            assert shim.pid is not None
            os.kill(shim.pid, signal.SIGKILL)          # a crash, not a stop we asked for
            before = await vm.exec("grep '^pswpin ' /proc/vmstat", timeout=30, check=True)
            await asyncio.sleep(2.0)
            after = await vm.exec("grep '^pswpin ' /proc/vmstat", timeout=30, check=True)
        assert not retouch.done(), "retouch finished while its swap device was gone"
        assert before.stdout == after.stdout, "the guest swapped in while its swap device was gone"
        assert failures and failures[0].component == "shim:swap", "the shim crash was not reported to the VM"
        assert "exited" in failures[0].error and vm.component_failures == failures
        assert shim.state is ComponentState.FAILED
        await shim.restart()  # same socket: QEMU reconnects within reconnect-delay
        res = await wait_for(retouch, 240)
    finally:
        if not retouch.done():
            retouch.cancel()
            await asyncio.gather(retouch, return_exceptions=True)
    assert parse_ok(res.stdout) == (FILL_MIB * 256, 0), res.stdout
    assert res.exit_code == 0
    st = await shim.control.stats()  # the restarted shim served the rest
    assert st["reads"] > 0 and st["misses"] > 0
    res = await vm.exec("retouch seq", timeout=180)
    assert parse_ok(res.stdout) == (FILL_MIB * 256, 0)
