"""Multi-process VM migration on real guests over the shaped underlay (issue 10): the user-level
drivers (the swap shim, a qemu-storage-daemon) move with the VM, and every fault leaves the source
running with its drivers serving, nothing of the destination, and every page the guest wrote intact."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hvsim.core.cluster import Cluster
from hvsim.core.components import Checkpoint, Component, ComponentState
from hvsim.core.lifecycle import VMState
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.core.procfs import alive
from hvsim.core.vm import VM
from hvsim.drivers.qsd import QsdComponent, QsdDriver
from hvsim.drivers.shim.component import ShimComponent, ShimDriver, ShimOptions
from hvsim.guest.heartbeat import HeartbeatMonitor
from hvsim.memory import consolidate_memory, restore_memory, setup_guest_swap
from hvsim.migration import MigrationError, MigrationState, UldHooks, migrate
from hvsim.network.underlay import HOST_IFACE, Underlay

pytestmark = [pytest.mark.hil, pytest.mark.timeout(420)]

GUEST_MIB = 192
FILL_MIB = 64
TARGET_MIB = 96
PAGES = FILL_MIB * 256
OK_RE = re.compile(r"OK order=(\w+) pages=(\d+) bad=(\d+)")


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


async def verify(vm: VM, order: str = "seq") -> None:
    res = await vm.exec(f"retouch {order} --sock /run/mf.sock", timeout=300)
    m = OK_RE.search(res.stdout)
    assert m, f"retouch printed no report: {res.stdout!r} {res.stderr!r}"
    assert (int(m.group(2)), int(m.group(3))) == (PAGES, 0), res.stdout


def assert_guest_healthy(vm: VM) -> None:
    console = vm.console_tail(1000)
    for word in ("BUG", "Oops", "not a head", "I/O error"):
        assert word not in console, f"guest kernel reports {word!r}:\n{console[-3000:]}"


async def shim_guest(cl: Cluster, name: str, host: str = "a", **opts: Any) -> VM:
    """A guest whose swap is on a shim disk, with FILL_MIB verifiable pages of which a good part was
    swapped out and prefetched back into the shim's cache (a warm cache)."""
    drv = cl.drivers["shim"]
    assert isinstance(drv, ShimDriver)
    drv.set_options(ShimOptions(latency_ms=0.2, **opts), vm=name)
    vm = await cl.define_vm(VMSpec(name, memory_mib=GUEST_MIB, disks=(DiskSpec("swap", 128, kind="shim"),)), host)
    await vm.start(wait_ready=True, ready_timeout=120)
    await setup_guest_swap(vm, "swap", page_cluster=0)
    out = await vm.exec(f"memfill {FILL_MIB} --seed 11 --sock /run/mf.sock", timeout=120, check=True)
    assert "FILLED" in out.stdout
    await consolidate_memory(vm, TARGET_MIB, timeout=120)
    await restore_memory(vm, timeout=120)
    shim = vm.component("shim:swap")
    assert isinstance(shim, ShimComponent)
    await shim.control.wait_prefetch()
    st = await shim.stats()
    assert st["cache_pages"] > 1000 and st["tracked_pages"] >= st["cache_pages"], st
    return vm


@pytest.fixture
async def mp(underlay: Underlay, cluster: Cluster) -> Cluster:
    for h in underlay.hosts:
        cluster.add_host(HostSpec(h, vcpus=4, memory_mib=2048), network=underlay.host_network(h))
    cluster.add_driver(ShimDriver())
    cluster.add_driver(QsdDriver())
    return cluster


async def assert_rolled_back(vm: VM, src_shim: ShimComponent, host: str = "a") -> None:
    """The migration failed cleanly: the source runs with its shim serving, nothing of the destination."""
    assert vm.state is VMState.RUNNING and vm.host.name == host
    assert (await vm.query_status())["status"] == "running"
    shim = vm.component("shim:swap")
    assert shim is src_shim and shim.state is ComponentState.READY and shim.pids()
    assert (await shim.control.ping())["exports"]
    assert not list(vm.run_dir.glob("mig*")), "destination files left behind"
    assert (await vm.exec("echo alive", timeout=30)).stdout.strip() == "alive"


async def test_shim_guest_migrates_with_its_driver_state(mp: Cluster, underlay: Underlay) -> None:
    vm = await shim_guest(mp, "mover")
    src = vm.component("shim:swap")
    assert isinstance(src, ShimComponent) and src.pid is not None
    before = await src.stats()
    src_pid, src_dir = src.pid, src.dir
    await vm.exec("dirty 8 2 >/dev/null 2>&1 &", check=True)
    hb = HeartbeatMonitor()
    await hb.attach(vm.heartbeat_socket)
    await hb.wait_beats(10, timeout=20)

    m = await migrate(vm, "b", policy="hvsim-predictive", timeout=180, heartbeat=hb)
    res = m.result
    assert m.state is MigrationState.COMPLETED and vm.host.name == "b"
    # the destination shim is another process, in the destination host's namespace, own sockets
    dst = vm.component("shim:swap")
    assert isinstance(dst, ShimComponent) and dst is not src and dst.state is ComponentState.READY
    assert dst.pid is not None and dst.pid != src_pid
    ns_b = netns_inode(underlay.host_ns("b"))
    assert netns_of(dst.pid) == ns_b and netns_of(vm.pid or 0) == ns_b and ns_b != netns_inode(underlay.host_ns("a"))
    assert dst.socket_path != src.socket_path and dst.dir.is_relative_to(vm.instance_dir)
    assert dst.backing == src.backing and dst.backing.exists()          # the shared datastore
    assert not alive(src_pid) and src.state is ComponentState.REMOVED
    assert not src.socket_path.exists() and not src.log_path.exists()
    assert not (src_dir.exists() and any(src_dir.iterdir())), "the source instance's files were left"
    # its state moved: swap map, cache (pages and index), counters
    after = await dst.stats()
    assert after["tracked_pages"] == before["tracked_pages"]
    assert abs(after["cache_pages"] - before["cache_pages"]) <= before["cache_pages"] // 50
    assert after["hits"] >= before["hits"]
    u = res.uld
    assert u["mode"] == "precopy" and u["components"] == ["shim:swap"] and u["states"] == {"shim:swap": "committed"}
    assert u["precopy_bytes"] > before["cache_pages"] * 4096 and 0 < u["final_bytes"] < u["precopy_bytes"] / 10
    assert [r["final"] for r in u["rounds"]][-1] is True and u["rounds"][0]["base_seq"] is None
    b = u["breakdown"]
    for k in ("stop_to_pause_ms", "quiesce_ms", "transfer_ms", "restore_ms", "resume_ms", "uld_ms", "total_ms"):
        assert b[k] is not None and b[k] >= 0, (k, b)
    assert b["uld_ms"] <= b["total_ms"] and res.downtime_ms_guest is not None
    assert any("uld_pending_bytes" in d.inputs for d in res.decisions[1:]) or len(res.decisions) == 1
    await hb.wait_beats(10, timeout=20)
    assert hb.stats().lost == 0
    await hb.close()
    assert_guest_healthy(vm)
    # every page verifies, and the first pass after the migration hits the carried-over cache
    await dst.control.reset_stats()
    await verify(vm, "seq")
    st = await dst.stats()
    assert st["hits"] > 0 and st["hit_rate"] > 0.9, st
    # and back with the whole state inside the pause (stop-copy): a peer of the peer, verified again
    m2 = await migrate(vm, "a", policy="hvsim-predictive", timeout=180, uld="stop-copy",
                       policy_params={"hard_max_ms": 20000})
    assert m2.result.outcome == "completed" and vm.host.name == "a"
    u2 = m2.result.uld
    assert [r["final"] for r in u2["rounds"]] == [True] and u2["precopy_bytes"] == 0
    assert u2["final_bytes"] > before["cache_pages"] * 4096
    back = vm.component("shim:swap")
    assert back is not dst and not alive(dst.pid) and back.state is ComponentState.READY
    await verify(vm, "rev")
    assert_guest_healthy(vm)


async def test_cold_and_shared_modes(mp: Cluster) -> None:
    """cold: the destination shim starts empty (nothing moves); shared: today's behaviour, the
    destination QEMU uses the source's shim (nothing of the driver moves)."""
    vm = await shim_guest(mp, "modes")
    src = vm.component("shim:swap")
    m = await migrate(vm, "b", timeout=180, uld="cold")
    dst = vm.component("shim:swap")
    assert m.result.uld["bytes"] == 0 and dst is not src
    st = await dst.stats()
    assert st["cache_pages"] == 0 and st["tracked_pages"] == 0
    await verify(vm)                      # correct, only cold
    m = await migrate(vm, "a", timeout=180, uld="shared")
    assert m.result.uld == {} and vm.component("shim:swap") is dst and dst.host is not None
    assert dst.host.name == "b" and dst.pids()                            # still serving from b
    await verify(vm, "rand")


class Faults(UldHooks):
    """Runs ``action`` once, the first time ``phase`` is reached (after ``skip`` earlier hits)."""

    def __init__(self, phase: str, action: Any, skip: int = 0) -> None:
        self.phase, self.action, self.skip = phase, action, skip
        self.fired = False
        self.seen: list[str] = []

    async def at(self, phase: str, uld: str, component: Component) -> None:
        self.seen.append(phase)
        if phase == self.phase and not self.fired:
            if self.skip:
                self.skip -= 1
                return
            self.fired = True
            r = self.action(component)
            if asyncio.iscoroutine(r):
                await r


class Tamper(UldHooks):
    def __init__(self, how: str) -> None:
        self.how = how

    def tamper(self, uld: str, data: bytes) -> bytes:
        if self.how == "truncate":
            return data[: len(data) // 2]
        if self.how == "corrupt":
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0xFF
            return bytes(bad)
        # another format version of the shim's checkpoint, in a valid envelope
        env = Checkpoint.decode(data, kind="shim", versions={2})
        inner = bytearray(env.payload)
        inner[8] = 9                        # u16 version field of the shim format
        inner[-32:] = hashlib.sha256(bytes(inner[:-32])).digest()
        return Checkpoint(env.component, env.kind, env.version, env.seq, bytes(inner), env.base_seq, env.meta).encode()


def kill(component: Component) -> None:
    for pid in component.pids():
        os.kill(pid, signal.SIGKILL)


async def attempt(vm: VM, hooks: UldHooks, **opts: Any) -> MigrationError:
    gen, pid = vm.generation, vm.pid
    with pytest.raises(MigrationError) as ei:
        await migrate(vm, "b", timeout=120, uld_hooks=hooks, uld_stall_timeout=2.0, **opts)
    err = ei.value
    assert err.result is not None and err.result.outcome == "failed", err
    assert err.migration.state is MigrationState.FAILED
    assert vm.generation == gen and vm.pid == pid
    assert err.result.uld["states"] == {"shim:swap": "rolled-back"}
    for pids in err.result.uld["peer_pids"].values():
        assert not any(alive(p) for p in pids), "a destination ULD survived"
    return err


async def shim_serving(vm: VM) -> bool:
    """The shared shim guest's driver is up and serving (what each test's rollback checks assert)."""
    shim = vm.component("shim:swap")
    return (isinstance(shim, ShimComponent) and shim.state is ComponentState.READY and bool(shim.pids())
            and bool((await shim.control.ping())["exports"]))


async def shared_shim_guest(lab: Any) -> VM:
    """The class's shim guest (``shim_guest``: warm cache, FILL_MIB verifiable pages) on a, reused when
    the previous test left it running there with its shim serving (each of these tests ends by
    asserting that, and that every page still verifies), else a fresh one."""
    return await lab.guest("shimmed", boot=lambda: shim_guest(lab.cl, "shimmed"), still_good=shim_serving)


@pytest.mark.asyncio(loop_scope="class")
class TestFaultsLeaveTheSourceServing:
    """Refused and failed migrations of one shim guest (``shared_mp``, see tests/hil/migration/conftest.py):
    each leaves the source running with its shim serving and every page intact, which each test asserts;
    the link test, which ends with the guest migrated, comes last."""

    async def test_a_bad_checkpoint_is_refused_naming_the_driver(self, shared_mp) -> None:
        # three refused migrations: each leaves the source as it was, so the next one starts from a
        # running source with its shim serving (and the pages still verify after all three)
        vm = await shared_shim_guest(shared_mp)
        src = vm.component("shim:swap")
        assert isinstance(src, ShimComponent)
        for how, why in (("truncate", "truncated"), ("corrupt", "checksum mismatch"),
                         ("version", "format version 9 is not supported")):
            err = await attempt(vm, Tamper(how))
            assert f"{vm.name}/shim:swap" in str(err) and why in str(err), f"{how}: {err}"
            await assert_rolled_back(vm, src)
        await verify(vm)

    async def test_faults_on_the_source_and_the_destination_driver(self, shared_mp) -> None:
        vm = await shared_shim_guest(shared_mp)
        src = vm.component("shim:swap")
        assert isinstance(src, ShimComponent)
        await vm.exec("dirty 8 2 >/dev/null 2>&1 &", check=True)
        # the source shim killed during pre-copy (the second round: the migration is under way)
        f = Faults("precopy-checkpoint", kill, skip=1)
        err = await attempt(vm, f)
        assert f.fired and "shim:swap" in str(err) and "precopy-checkpoint" in str(err)
        await assert_rolled_back(vm, src)
        assert src.restarts >= 1
        # the source shim killed while its final checkpoint is taken (inside the pause)
        f = Faults("final-checkpoint", kill)
        err = await attempt(vm, f)
        assert f.fired and "final-checkpoint" in str(err)
        await assert_rolled_back(vm, src)
        # the destination shim cannot start (its directory is taken by a file)
        f = Faults("peer-starting", lambda c: c.dir.parent.mkdir(parents=True, exist_ok=True) or c.dir.write_text("x"))
        err = await attempt(vm, f)
        assert f.fired and "peer-starting" in str(err) and "shim:swap" in str(err)
        await assert_rolled_back(vm, src)
        # the destination shim dies before it can restore the final checkpoint
        f = Faults("final-restore", kill)
        err = await attempt(vm, f)
        assert f.fired and "final-restore" in str(err)
        await assert_rolled_back(vm, src)
        assert_guest_healthy(vm)
        await verify(vm, "rand")

    async def test_the_link_going_down_mid_transfer(self, shared_mp) -> None:
        underlay = shared_mp.ul
        vm = await shared_shim_guest(shared_mp)
        src = vm.component("shim:swap")
        assert isinstance(src, ShimComponent)
        ns = underlay.host_ns("a")

        def down(_: Component) -> None:
            subprocess.run(["ip", "-n", ns, "link", "set", HOST_IFACE, "down"], check=True)
        f = Faults("precopy-transfer", down)
        t0 = time.monotonic()
        try:
            err = await attempt(vm, f)
        finally:
            subprocess.run(["ip", "-n", ns, "link", "set", HOST_IFACE, "up"], check=True)
        assert f.fired and "no ULD state arrived" in str(err) and time.monotonic() - t0 < 60
        await assert_rolled_back(vm, src)
        await verify(vm)
        # the link is back: the same VM migrates now
        m = await migrate(vm, "b", timeout=180)
        assert m.result.outcome == "completed"
        await verify(vm, "rev")


async def test_qemu_storage_daemon_data_disk_keeps_its_content(mp: Cluster, underlay: Underlay) -> None:
    vm = await mp.define_vm(VMSpec("db", memory_mib=160, disks=(DiskSpec("data", 64, kind="qsd"),)), "a")
    await vm.start(wait_ready=True, ready_timeout=120)
    src = vm.component("qsd:data")
    assert isinstance(src, QsdComponent) and src.pids()
    dev = (await vm.exec('for d in /sys/block/vd*; do [ "$(cat $d/serial)" = disk-data ] && basename $d; done',
                         check=True)).stdout.strip()
    assert dev.startswith("vd")
    await vm.exec(f"dd if=/dev/urandom of=/dev/{dev} bs=1M count=24 seek=8 conv=fsync 2>/dev/null", timeout=120,
                  check=True)

    async def md5(skip_mib: int, count_mib: int) -> str:
        r = await vm.exec(f"dd if=/dev/{dev} bs=1M skip={skip_mib} count={count_mib} 2>/dev/null | md5sum",
                          timeout=120, check=True)
        return r.stdout.split()[0]
    region_before = await md5(0, 48)
    ck = await src.checkpoint()
    assert ck.meta["dirty_bytes"] >= 24 << 20
    # while it migrates the guest keeps reading the disk and writing its last 16 MiB
    await vm.exec(f"(while :; do dd if=/dev/{dev} of=/dev/null bs=64k count=64 skip=100 2>/dev/null; "
                  f"dd if=/dev/urandom of=/dev/{dev} bs=64k count=4 seek=800 conv=fsync 2>/dev/null; done) "
                  ">/dev/null 2>&1 & echo $! > /run/io.pid", check=True)
    await asyncio.sleep(1)
    m = await migrate(vm, "b", timeout=180)
    assert m.result.outcome == "completed" and m.result.uld["components"] == ["qsd:data"]
    dst = vm.component("qsd:data")
    assert isinstance(dst, QsdComponent) and dst is not src and dst.pids() and not src.pids()
    assert netns_of(dst.pids()[0]) == netns_inode(underlay.host_ns("b"))
    # its dirty bitmap moved bit for bit (restore compares QEMU's sha256 of it with the source's)
    assert dst.restored is not None and dst.restored["extents"] >= ck.meta["extents"]
    await vm.exec("kill $(cat /run/io.pid); sleep 1", timeout=30, check=True)
    assert await md5(0, 48) == region_before              # what the migration did not touch is intact
    whole = (await vm.exec(f"md5sum /dev/{dev}", timeout=120, check=True)).stdout.split()[0]
    img = subprocess.run(["md5sum", str(dst.image)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert whole == img                                   # the guest sees exactly the shared datastore
    ck2 = await dst.checkpoint()                          # and the destination keeps tracking writes
    assert ck2.meta["dirty_bytes"] >= ck.meta["dirty_bytes"] + (256 << 10)
    assert_guest_healthy(vm)


def test_the_example_runs_as_written() -> None:
    example = Path(__file__).resolve().parents[3] / "examples" / "multiprocess" / "migrate_with_uld.py"
    out = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "destination shim" in out.stdout and " on b " in out.stdout and "ULDs precopy shim:swap" in out.stdout
    assert re.search(r"OK order=seq pages=16384 bad=0", out.stdout), out.stdout
