"""What undefining a VM removes from the datastore, without QEMU guests: the VM's directory goes
(renamed away in one step first), no link is ever followed out of the datastore, a retried removal
succeeds, a clone's qcow2 overlay marks its base as still used; the inventory keeps a clone index
and settles a recorded undefine in one transaction."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hvsim.control.datastore import clones_of, qcow2_backing, remove_vm_files, sweep_deleting, vm_dir
from hvsim.control.errors import ConflictError, ControlInputError
from hvsim.control.inventory import Inventory
from hvsim.control.ops import OpKind, OpState
from hvsim.control.state import CLONES, HostRecord, VMRecord
from hvsim.control.store import Store


def _qcow2(path: Path, backing: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(path)],
                   check=True)


def _vm(ds: Path, name: str, mib: int = 1) -> Path:
    d = ds / name
    d.mkdir(parents=True)
    with open(d / "disk0.img", "wb") as f:
        f.truncate(mib << 20)
    return d


def test_names_are_checked(tmp_path: Path) -> None:
    for bad in ("..", ".", "a/b", "../x", "", "A", "x" * 40, "-a"):
        with pytest.raises(ControlInputError):
            vm_dir(tmp_path, bad)
        with pytest.raises(ControlInputError):
            remove_vm_files(tmp_path, bad)
    assert vm_dir(tmp_path, "web-1") == tmp_path / "web-1"


def test_remove_deletes_everything_and_a_retry_succeeds(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    d = _vm(ds, "web")
    (d / "disk0.active").write_text("disk0-top-abc.qcow2\n")
    _qcow2(d / "disk0-top-abc.qcow2", d / "disk0.img")
    other = _vm(ds, "db")
    assert remove_vm_files(ds, "web") == ["disk0-top-abc.qcow2", "disk0.active", "disk0.img"]
    assert not d.exists() and sorted(os.listdir(ds)) == ["db"]          # no hidden leftover either
    assert (other / "disk0.img").exists()
    assert remove_vm_files(ds, "web") == []                              # nothing left: not an error
    assert remove_vm_files(tmp_path / "missing", "web") == []


def test_links_are_never_followed_out_of_the_datastore(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.img").write_bytes(b"keep me")
    d = _vm(ds, "web")
    (d / "disk1.img").symlink_to(outside / "precious.img")
    (d / "sub").symlink_to(outside)
    removed = remove_vm_files(ds, "web")
    assert "disk1.img" in removed and "sub" in removed and not d.exists()
    assert (outside / "precious.img").read_bytes() == b"keep me"
    # the VM's directory itself a link: the link goes, its target stays
    (ds / "db").symlink_to(outside)
    assert remove_vm_files(ds, "db") == ["db (link)"]
    assert not os.path.lexists(ds / "db") and (outside / "precious.img").read_bytes() == b"keep me"


def test_an_interrupted_removal_is_swept(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    _vm(ds, "keep")
    left = ds / ".web.deleting-abcdef"
    left.mkdir(parents=True)
    (left / "disk0.img").write_bytes(b"x")
    assert sweep_deleting(ds) == [".web.deleting-abcdef"]
    assert sorted(os.listdir(ds)) == ["keep"]


def test_a_clone_overlay_marks_its_base_as_used(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    base = _vm(ds, "base")
    _vm(ds, "other")
    (ds / "cl").mkdir()
    _qcow2(ds / "cl" / "disk0-overlay.qcow2", base / "disk0.img")
    assert qcow2_backing(ds / "cl" / "disk0-overlay.qcow2") == str(base / "disk0.img")
    assert qcow2_backing(base / "disk0.img") is None                      # raw: no backing file
    assert clones_of(ds, "base") == ["cl"]
    assert clones_of(ds, "other") == [] and clones_of(ds, "cl") == []
    # a second clone on a later frozen top (a qcow2 beside the image) counts too
    _qcow2(base / "disk0-top-1.qcow2", base / "disk0.img")
    (ds / "cl2").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base / "disk0-top-1.qcow2"), "-F", "qcow2",
                    str(ds / "cl2" / "disk0-overlay.qcow2")], check=True)
    assert clones_of(ds, "base") == ["cl", "cl2"]
    # a link to the overlay is not followed
    (ds / "cl3").mkdir()
    (ds / "cl3" / "disk0-overlay.qcow2").symlink_to(ds / "cl" / "disk0-overlay.qcow2")
    assert clones_of(ds, "base") == ["cl", "cl2"]


@pytest.mark.asyncio(loop_scope="module")
async def test_inventory_clone_index_and_recorded_undefine(store: Store) -> None:
    inv = Inventory(store, manager="m1")
    await inv.add_host(HostRecord(name="a"))
    await inv.define_vm(VMRecord(name="base", host="a", disk_mib=8))
    await inv.define_vm(VMRecord(name="base-c", host="a", disk_mib=8, clone_of="base"))
    assert await inv.clones_of("base") == ["base-c"] and await inv.clones_of("base-c") == []
    await inv.undefine_vm("base-c")
    assert await inv.clones_of("base") == []
    assert not (await store.list(CLONES)).items
    # a recorded undefine: the lock held meanwhile, then record, index keys and operation in one step
    op, rev = await inv.begin(OpKind.UNDEFINE, "base", host="a")
    op.start()
    rev = await inv.update(op, rev)
    with pytest.raises(ConflictError, match="in flight"):
        await inv.begin(OpKind.START, "base")
    op.step("disks-removed")
    rec = await inv.finish_undefine(op, rev)
    assert rec.state is OpState.SUCCEEDED and rec.steps == ("disks-removed",)
    assert not (await inv.list_vms()).items and await inv.in_flight() == []
    assert not (await store.list("/hvsim/index/")).items
