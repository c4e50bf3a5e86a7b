"""Undefining a VM through the manager removes its disks (issue: a VM defined again with a deleted
VM's name got the deleted VM's disk): a marker written into a guest's disk is gone once the VM is
undefined and a new VM of the same name is started; a VM whose frozen image a clone stands on is
refused (409 naming the clone) until the clone is undefined; a host whose agent is unreachable is
refused (naming the host), nothing changed, and the undefine succeeds once a new agent serves."""
from __future__ import annotations

import asyncio
import time

import pytest

from hvsim.control.errors import ApiConflictError, ApiNotFoundError
from hvsim.control.ops import OpKind, OpState
from hvsim.control.schema import ExecRequest, HostCreate, VMDefine
from hvsim.control.state import HostStatus, VMPower

from .conftest import ControlPlane

pytestmark = pytest.mark.hil
MARKER = "hvsim-marker-4f1c9e"
WRITE = f"printf '{MARKER}' > /dev/vda && sync && echo written"
READ = "head -c 64 /dev/vda | tr -d '\\000'; echo"


async def test_undefine_removes_the_disk_a_reused_name_starts_fresh_and_clones_protect_their_base(
        cp: ControlPlane) -> None:
    h = await cp.host("h1", memory_mib=1024)
    m = await cp.manager(lease_ttl=3)
    c = cp.client(m)
    await c.add_host(HostCreate(name="h1", agent=h.address))
    ds = h.datastore

    # a marker in the disk of "web"; stopped and undefined; a new "web" starts on a fresh disk
    await c.define_vm(VMDefine(name="web", memory_mib=128, disk_mib=8, host="h1"))
    await c.start_vm("web")
    out = await c.exec_vm("web", ExecRequest(command=WRITE, timeout=60))
    assert out.exit_code == 0 and "written" in out.stdout, out
    assert (await c.exec_vm("web", ExecRequest(command=READ))).stdout.strip() == MARKER
    await c.stop_vm("web")
    assert MARKER.encode() in (ds / "web" / "disk0.img").read_bytes()[:64]     # it reached the image file
    op = await c.undefine_vm("web")
    with pytest.raises(ApiNotFoundError):
        await c.get_vm("web")
    await c.define_vm(VMDefine(name="web", memory_mib=128, disk_mib=8, host="h1"))
    await c.start_vm("web")
    fresh = await c.exec_vm("web", ExecRequest(command=READ))
    assert fresh.exit_code == 0 and MARKER not in fresh.stdout, f"the deleted VM's data is in the new one: {fresh}"
    assert fresh.stdout.strip() == "", fresh                                 # all zeros: a fresh disk
    assert (op.kind, op.state) == (OpKind.UNDEFINE, OpState.SUCCEEDED) and "disks-removed" in op.steps, op
    await c.destroy_vm("web")
    await c.undefine_vm("web")
    assert not (ds / "web").exists(), sorted(p.name for p in ds.iterdir())

    # a clone's overlay stands on its base's frozen image: the base is refused while the clone exists
    await c.define_vm(VMDefine(name="base", memory_mib=128, disk_mib=8, host="h1"))
    await c.start_vm("base")
    assert "written" in (await c.exec_vm("base", ExecRequest(command=WRITE, timeout=60))).stdout
    await c.clone_vm("base", "base-c")
    await c.stop_vm("base")
    with pytest.raises(ApiConflictError, match="base-c") as refused:
        await c.undefine_vm("base")
    print(f"refused: {refused.value}")
    assert (await c.get_vm("base")).power is VMPower.SHUTOFF
    assert (ds / "base" / "disk0.img").exists() and (ds / "base" / "disk0.active").exists()
    await c.start_vm("base-c")                                    # the clone still reads the base's data
    assert (await c.exec_vm("base-c", ExecRequest(command=READ))).stdout.strip() == MARKER
    await c.destroy_vm("base-c")
    await c.undefine_vm("base-c")
    assert not (ds / "base-c").exists()
    assert (await c.undefine_vm("base")).state is OpState.SUCCEEDED     # no clone left: it goes
    assert not (ds / "base").exists()

    # the host agent unreachable: refused naming the host, record and files kept; retried later
    await c.define_vm(VMDefine(name="db", memory_mib=128, disk_mib=8, host="h1"))
    await c.start_vm("db")
    await c.stop_vm("db")
    assert (ds / "db" / "disk0.img").exists()
    await h.kill_agent()
    deadline = time.monotonic() + 30
    while (await c.get_host("h1")).status is not HostStatus.UNREACHABLE:
        assert time.monotonic() < deadline, "the host never became unreachable"
        await asyncio.sleep(0.2)
    with pytest.raises(ApiConflictError, match="h1.*unreachable"):
        await c.undefine_vm("db")
    assert (await c.get_vm("db")).power is VMPower.SHUTOFF and (ds / "db" / "disk0.img").exists()
    await h.start_agent()
    deadline = time.monotonic() + 30
    while (await c.get_host("h1")).status is not HostStatus.UP:
        assert time.monotonic() < deadline, "the host never came back"
        await asyncio.sleep(0.2)
    assert (await c.undefine_vm("db")).state is OpState.SUCCEEDED
    assert not (ds / "db").exists()
    assert [p.name for p in ds.iterdir()] == []
