"""HIL: a VM's components follow its lifetime (start, shutdown, destroy, crash, undefine) on a real
guest with a shim-backed disk."""
from __future__ import annotations

import os
import signal

import pytest

from hvsim.core.components import ComponentState
from hvsim.core.errors import BusyError
from hvsim.core.lifecycle import VMState
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.core.procfs import alive
from hvsim.drivers.shim.component import ShimComponent, ShimDriver

pytestmark = pytest.mark.hil


async def test_components_start_and_stop_with_their_vm(hvsim_cluster) -> None:
    cl = await hvsim_cluster("comps", drivers=(ShimDriver(),))
    cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    vm = await cl.define_vm(VMSpec("g1", memory_mib=192, disks=(DiskSpec("swap", 32, kind="shim"),)), "h1")
    shim = vm.component("shim:swap")
    assert isinstance(shim, ShimComponent) and shim.state is ComponentState.CREATED and shim.pids() == []

    pids = []
    for stop in ("destroy", "crash", "shutdown"):
        await vm.start(wait_ready=True, ready_timeout=120)
        assert shim.state is ComponentState.READY and len(shim.pids()) == 1
        pid = shim.pids()[0]
        pids.append(pid)
        # the guest really uses the component's disk
        assert (await vm.exec("cat /sys/block/vda/serial", check=True)).stdout.strip() == "disk-swap"
        if stop == "destroy":
            await vm.destroy()
        elif stop == "crash":
            with vm.subscribe("crash") as sub:
                os.kill(vm.pid, signal.SIGKILL)
                await sub.wait_for(lambda e: e.new is VMState.CRASHED, timeout=10)
        else:
            await vm.shutdown(timeout=60)
        assert shim.state is ComponentState.STOPPED, (stop, shim.state)
        assert not alive(pid), f"the shim outlived its VM's {stop}"
    assert len(set(pids)) == 3
    # undefine removes the component's files; nothing of the VM is left
    backing = shim.backing
    assert backing.exists()
    await cl.undefine_vm("g1")
    assert shim.state is ComponentState.REMOVED and not backing.exists() and not vm.run_dir.exists()


async def test_undefine_refuses_while_a_process_holds_a_backing_file(hvsim_cluster) -> None:
    cl = await hvsim_cluster("held", drivers=(ShimDriver(),))
    host = cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    vm = await cl.define_vm(VMSpec("g1", memory_mib=192, disks=(DiskSpec("swap", 32, kind="shim"),)), "h1")
    shim = vm.component("shim:swap")
    await shim.prepare(host)            # a live shim, the VM itself shut off
    with pytest.raises(BusyError, match=r"files are in use: component shim:swap is ready.*pid \d+ holds"):
        await cl.undefine_vm("g1")
    assert shim.backing.exists() and "g1" in cl.vms
    await shim.stop()
    await cl.undefine_vm("g1")
    assert not shim.backing.exists()
