"""HIL: a supervised shim that dies while its guest swaps in is restarted automatically from its
backing file and state file; the guest's I/O stalls within QEMU's reconnect-delay, then resumes,
and every page verifies."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from hvbase.aio import wait_for
from hvsim.core.cluster import Cluster
from hvsim.core.components import ComponentState, RestartPolicy
from hvsim.core.events import ComponentFailed, ComponentRestarted
from hvsim.drivers.shim.component import ShimComponent, ShimOptions
from hvsim.memory import consolidate_memory, restore_memory

from .test_swap_shim import FILL_MIB, TARGET_MIB, boot_swap_guest, parse_ok

pytestmark = [pytest.mark.hil, pytest.mark.timeout(400)]


async def test_a_shim_that_dies_mid_swap_in_is_restarted_and_the_guest_continues(cluster: Cluster) -> None:
    opts = ShimOptions(latency_ms=0.0, reconnect_delay=20, restart=RestartPolicy(max_restarts=3, window_s=60))
    vm = await boot_swap_guest(cluster, "supervised", opts)
    shim = vm.component("shim:swap")
    assert isinstance(shim, ShimComponent) and shim.restart_policy is not None
    cons = await consolidate_memory(vm, TARGET_MIB, timeout=120)
    assert cons.swapped_bytes and cons.swapped_bytes > 16 * 1024 * 1024
    await restore_memory(vm, timeout=120, prefetch=False)     # every swap-in goes to the shim
    tracked = (await shim.stats())["tracked_pages"]
    await asyncio.sleep(1.5)                                    # its state file is written by now
    events: list = []
    retouch = asyncio.ensure_future(vm.exec("retouch rev", timeout=300))
    try:
        for _ in range(100):
            if (await shim.control.stats())["misses"] > 200:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the guest never read from the shim")
        with vm.subscribe("supervision", kinds=(ComponentFailed, ComponentRestarted), callback=events.append):
            old = shim.pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            for _ in range(200):
                if any(isinstance(e, ComponentRestarted) for e in events):
                    break
                await asyncio.sleep(0.1)
        res = await wait_for(retouch, 300)
    finally:
        if not retouch.done():
            retouch.cancel()
            await asyncio.gather(retouch, return_exceptions=True)
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["ComponentFailed", "ComponentRestarted"], kinds
    assert events[1].ok and events[1].attempt == 1, events[1]
    assert shim.state is ComponentState.READY and shim.pid not in (None, old) and shim.restarts == 1
    assert vm.component_failures and vm.component_failures[-1].component == "shim:swap"
    assert parse_ok(res.stdout) == (FILL_MIB * 256, 0), res.stdout
    st = await shim.stats()
    assert st["tracked_pages"] >= tracked // 2 and st["reads"] > 0   # came back with its swap map, served the rest
