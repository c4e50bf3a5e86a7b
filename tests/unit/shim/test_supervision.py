"""Supervision of a shim component (real shim processes, no guest): a shim that dies is restarted
from its backing file and its state file, at a bounded rate, and every attempt is reported."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from hvsim.core.cluster import Cluster
from hvsim.core.components import ComponentState, RestartPolicy
from hvsim.core.errors import ComponentError
from hvsim.core.events import ComponentFailed, ComponentRestarted
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.drivers.shim.component import ShimComponent, ShimDriver, ShimOptions

from .conftest import run


async def supervised(cl: Cluster, policy: RestartPolicy) -> ShimComponent:
    host = cl.add_host(HostSpec("h1"))
    vm = await cl.define_vm(VMSpec("g1", disks=(DiskSpec("swap", 16, kind="shim"),)), "h1")
    comp = vm.component("shim:swap")
    assert isinstance(comp, ShimComponent) and comp.restart_policy == policy
    await comp.prepare(host)
    return comp


async def test_a_dead_shim_comes_back_with_its_swap_map_and_data() -> None:
    policy = RestartPolicy(max_restarts=2, window_s=60, delay_s=0.05)
    async with Cluster("sup", drivers=(ShimDriver(ShimOptions(restart=policy)),)) as cl:
        comp = await supervised(cl, policy)
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 256k", "-c", "write -P 0x4d 4M 64k", comp.nbd_uri())
        tracked = (await comp.stats())["tracked_pages"]
        assert tracked == 80
        for _ in range(50):                     # the shim saves its state file within a second
            if comp.state_path.exists():
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.2)
        old = comp.pid
        assert old is not None
        with cl.events.subscribe("sup", kinds=(ComponentFailed, ComponentRestarted)) as sub:
            os.kill(old, signal.SIGKILL)
            failed = await sub.get(timeout=10)
            restarted = await sub.get(timeout=20)
        assert isinstance(failed, ComponentFailed) and "exited" in failed.error
        assert isinstance(restarted, ComponentRestarted) and restarted.ok and restarted.attempt == 1
        assert comp.state is ComponentState.READY and comp.pid not in (None, old) and comp.restarts == 1
        assert (await comp.stats())["tracked_pages"] == tracked       # the swap map came back
        _, out, _ = await run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 1M 256k", comp.nbd_uri())
        assert "read 262144/262144" in out
    assert cl.survivors() == []


async def test_the_restart_rate_is_bounded_and_the_limit_reported() -> None:
    policy = RestartPolicy(max_restarts=1, window_s=60, delay_s=0.05)
    async with Cluster("sup2", drivers=(ShimDriver(ShimOptions(restart=policy)),)) as cl:
        comp = await supervised(cl, policy)
        seen: list[ComponentRestarted] = []
        with cl.events.subscribe("sup", kinds=(ComponentRestarted,), callback=seen.append):
            assert comp.pid is not None
            os.kill(comp.pid, signal.SIGKILL)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.1)
            assert seen and seen[0].ok and comp.state is ComponentState.READY
            assert comp.pid is not None
            os.kill(comp.pid, signal.SIGKILL)          # a second death within the window: not restarted
            for _ in range(100):
                if len(seen) > 1:
                    break
                await asyncio.sleep(0.1)
        assert len(seen) == 2 and not seen[1].ok and "restart limit reached: 1 restart(s) within 60 s" in seen[1].error
        await asyncio.sleep(0.5)
        assert comp.state is ComponentState.FAILED and comp.pids() == []
    assert cl.survivors() == []


@pytest.mark.parametrize("kwargs", [{"max_restarts": -1}, {"window_s": 0}, {"delay_s": -1}, {"max_restarts": 1.5}])
def test_bad_restart_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ComponentError, match="restart policy"):
        RestartPolicy(**kwargs)
