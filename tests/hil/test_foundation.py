"""Foundation HIL tests: real QEMU, real Debian kernel, real guest agent."""
from __future__ import annotations

import asyncio
import os
import signal
import stat
import time

import psutil
import pytest

from hvsim.core.cluster import KERNEL_FILE, images_dir
from hvsim.core.errors import CapacityError, GuestNotReadyError, IllegalTransitionError, SpecError, VMError
from hvsim.core.events import VMStateChanged
from hvsim.core.lifecycle import VMState
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from qmp_bridge import LaunchError, QMPTimeoutError

pytestmark = pytest.mark.hil


def qemu_children() -> set[int]:
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True) if "qemu" in (p.name() or "")}


async def boot(cluster, name="g1", memory_mib=256, host="h1", **kw):
    if host not in cluster.hosts:
        cluster.add_host(HostSpec(host, vcpus=2, memory_mib=2048))
    vm = await cluster.define_vm(VMSpec(name, memory_mib=memory_mib, **kw), host)
    await vm.start(wait_ready=True, ready_timeout=120)
    return vm


@pytest.mark.asyncio(loop_scope="class")
class TestOneRunningGuest:
    """Facts of one guest (``shared_host``: one guest for the class, re-checked before each test and
    booted afresh if a test left it otherwise): all but the last leave it running (the reset reboots it
    in the same QEMU, the kill -9 test starts the crashed VM again); the ACPI shutdown comes last."""

    async def test_boot_and_agent_exec(self, shared_host):
        vm = await shared_host.guest("g1", host="h1", memory_mib=256)
        assert vm.state is VMState.RUNNING and vm.boot_time_s and vm.boot_time_s > 0
        res = await vm.exec("echo out; echo err >&2; uname -r; exit 7")
        assert res.exit_code == 7
        assert res.stdout.splitlines()[0] == "out" and res.stdout.splitlines()[1].endswith("-amd64")
        assert res.stderr == "err\n"
        # zswap is off, swap is real: the guest init disabled it
        assert (await vm.exec("cat /sys/module/zswap/parameters/enabled")).stdout.strip() == "N"
        # binary-safe, large output round-trips exactly
        big = await vm.exec("head -c 300000 /dev/zero | tr '\\0' 'x'")
        assert big.stdout == "x" * 300000
        # concurrent commands on the one channel each get their own result
        outs = await asyncio.gather(*(vm.exec(f"sleep 0.{i}; echo {i}") for i in range(5)))
        assert [o.stdout.strip() for o in outs] == [str(i) for i in range(5)]
        st = await vm.query_status()
        assert st["status"] == "running"

    async def test_agent_command_timeout_kills_the_command(self, shared_host):
        vm = await shared_host.guest("g1", host="h1", memory_mib=256)
        from hvsim.core.errors import AgentTimeoutError
        with pytest.raises(AgentTimeoutError, match="timed out"):
            await vm.exec("sleep 30", timeout=1)
        await asyncio.sleep(0.5)
        ps = await vm.exec("ps -o args")
        assert "sleep 30" not in ps.stdout

    async def test_pause_stops_guest_time_and_resume_continues(self, shared_host):
        vm = await shared_host.guest("g1", host="h1", memory_mib=256)
        g0, h0 = await vm.agent.ping(), time.monotonic()
        await vm.pause()
        assert vm.state is VMState.PAUSED
        assert (await vm.query_status())["status"] == "paused"
        pending = asyncio.ensure_future(vm.exec("echo alive", timeout=60))
        await asyncio.sleep(2.0)
        assert not pending.done(), "a paused guest answered a command"
        await vm.resume()
        assert (await pending).stdout == "alive\n"
        g1, h1 = await vm.agent.ping(), time.monotonic()
        guest_s, host_s = (g1 - g0) / 1e9, h1 - h0
        assert guest_s < host_s - 1.5, f"guest clock ran while paused: guest {guest_s:.2f}s vs host {host_s:.2f}s"
        assert guest_s > 0

    async def test_qmp_command_timeout_raises_typed_error(self, shared_host):
        vm = await shared_host.guest("g1", host="h1", memory_mib=256)
        os.kill(vm.pid, signal.SIGSTOP)
        try:
            with pytest.raises(QMPTimeoutError, match="query-status"):
                await vm.qmp.execute("query-status", timeout=1.0)
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        assert (await vm.query_status())["status"] == "running"

    async def test_reset_reboots_guest(self, shared_host):
        vm = await shared_host.guest("g1", host="h1", memory_mib=256)
        boot_id = (await vm.exec("cat /proc/sys/kernel/random/boot_id", check=True)).stdout.strip()
        await vm.exec("echo before-reset > /run/hvsim-marker", check=True)      # RAM only: a reboot loses it
        pid = vm.pid
        await vm.reset()
        await vm.wait_ready(timeout=120)
        after = (await vm.exec("cat /proc/sys/kernel/random/boot_id", check=True)).stdout.strip()
        assert after and after != boot_id, "same boot_id: the guest did not reboot"
        assert (await vm.exec("test -e /run/hvsim-marker")).exit_code != 0, "RAM survived the reset"
        assert vm.state is VMState.RUNNING and vm.pid == pid          # same QEMU, rebooted guest
        assert any(c.reason == "reset" for c in vm.history)

    async def test_kill_9_becomes_crashed_within_1s_and_listeners_hear(self, shared_host):
        vm = await shared_host.guest("g1", host="h1", memory_mib=256)
        heard: list = []
        pid = vm.pid
        with vm.subscribe("callback", callback=heard.append), vm.subscribe("queue") as q:
            os.kill(pid, signal.SIGKILL)
            change = await q.get(timeout=5)
        assert isinstance(change, VMStateChanged) and change.vm == vm.name
        assert change.old is VMState.RUNNING and change.new is VMState.CRASHED and "signal 9" in change.reason
        assert heard == [change]
        assert [s for s in shared_host.cl.events.subscriptions() if s.startswith(f"vm {vm.name}: ")] == []
        assert vm.host.used_memory_mib == 0
        with pytest.raises(IllegalTransitionError):
            await vm.pause()
        await vm.start(wait_ready=True)          # a crashed VM can be started again
        assert (await vm.exec("true")).ok

    async def test_acpi_shutdown_is_honoured(self, shared_host):
        vm = await shared_host.guest("g1", host="h1", memory_mib=256)
        proc = vm.process
        await vm.shutdown(timeout=60)
        assert vm.state is VMState.SHUTOFF and vm.reason == "shutdown"
        assert proc.returncode == 0
        assert "ACPI power button" in proc.console_tail(10)
        with pytest.raises(IllegalTransitionError, match="it is shutoff"):
            await vm.resume()


async def test_destroy_leaves_nothing_behind(cluster):
    before = qemu_children()
    vm = await boot(cluster, disks=(DiskSpec("data", 16),))
    pid = vm.pid
    assert pid in qemu_children()
    await vm.destroy()
    assert vm.state is VMState.SHUTOFF and vm.reason == "destroyed"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert qemu_children() == before
    assert not list(cluster.run_dir.rglob("*.sock")), "sockets left after destroy"
    run_dir = cluster.run_dir
    await cluster.close()
    assert not run_dir.exists(), "run directory left after cluster close"


async def test_four_guests_at_once(cluster):
    cluster.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    cluster.add_host(HostSpec("h2", vcpus=2, memory_mib=1024))
    vms = [await cluster.define_vm(VMSpec(f"g{i}", memory_mib=192), "h1" if i < 2 else "h2") for i in range(4)]
    await asyncio.gather(*(vm.start(wait_ready=True, ready_timeout=180) for vm in vms))
    names = await asyncio.gather(*(vm.exec("hostname") for vm in vms))
    assert [n.stdout.strip() for n in names] == [f"g{i}" for i in range(4)]
    assert len({vm.pid for vm in vms}) == 4
    assert cluster.hosts["h1"].used_memory_mib == 384


async def test_guest_that_never_becomes_ready_fails_with_console_tail(cluster):
    cluster.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    # rdinit=/bin/false: the kernel has no working init and panics; the agent never answers
    vm = await cluster.define_vm(VMSpec("broken", kernel_args="rdinit=/bin/false"), "h1")
    await vm.start()
    for _ in range(1200):            # the guest really panics (however slow the machine is) ...
        if "Attempted to kill init" in vm.console_log.read_text(errors="replace"):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the guest never panicked:\n" + vm.console_log.read_text(errors="replace")[-2000:])
    with pytest.raises(GuestNotReadyError) as ei:   # ... and waiting for its agent fails, with the console
        await vm.wait_ready(timeout=5)
    console = vm.console_log.read_text(errors="replace")
    tail = ei.value.console_tail
    assert tail and console.rstrip().endswith(tail.rstrip().splitlines()[-1])   # the error carries the real tail
    assert "guest console (tail)" in str(ei.value)


async def test_over_capacity_start_refused_before_any_process(cluster):
    cluster.add_host(HostSpec("small", vcpus=1, memory_mib=512, cpu_overcommit=1.0))
    vm = await cluster.define_vm(VMSpec("big", memory_mib=1024), "small")
    before = qemu_children()
    with pytest.raises(CapacityError, match="needs 1024 MiB memory but only 512"):
        await vm.start()
    assert vm.process is None and vm.state is VMState.SHUTOFF
    assert qemu_children() == before


async def test_a_disk_path_that_does_not_exist_is_refused_before_any_process(cluster):
    cluster.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    missing = cluster.run_dir / "no-such-image.img"
    vm = await cluster.define_vm(VMSpec("g1", disks=(DiskSpec("data", 8, path=str(missing)),)), "h1")
    before = qemu_children()
    with pytest.raises(SpecError, match="no-such-image.img.*does not exist"):
        await vm.start()
    assert not missing.exists() and qemu_children() == before
    assert vm.state is VMState.SHUTOFF and vm.host.used_memory_mib == 0


async def test_launch_failure_carries_exit_code_and_argv(hvsim_cluster, tmp_path):
    # a kernel QEMU cannot load: QEMU itself exits before its monitor comes up
    real = images_dir()
    (tmp_path / KERNEL_FILE).write_bytes(b"this is not a kernel" * 100)
    (tmp_path / "initrd.img").symlink_to(real / "initrd.img")
    cl = await hvsim_cluster("badkernel", images=tmp_path, accel="tcg")
    cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    vm = await cl.define_vm(VMSpec("g1"), "h1")
    with pytest.raises(VMError, match="failed to start") as ei:
        await vm.start()
    cause = ei.value.__cause__
    assert isinstance(cause, LaunchError) and cause.exit_code not in (None, 0)
    assert "qemu-system-x86_64" in cause.argv[0] and str(tmp_path / KERNEL_FILE) in cause.argv
    assert cause.log_tail.strip(), "QEMU's own error output is missing from the LaunchError"
    assert vm.state is VMState.SHUTOFF and vm.host.used_memory_mib == 0 and not vm.has_process


async def test_every_socket_of_a_vm_is_private(hvsim_cluster):
    from hvsim.drivers.shim.component import ShimDriver
    cl = await hvsim_cluster("sockets", drivers=(ShimDriver(),))
    vm = await boot(cl, disks=(DiskSpec("swap", 32, kind="shim"),))
    socks = [p for p in cl.run_dir.rglob("*") if p.is_socket()]
    names = {p.name for p in socks}
    assert {"agent.sock", "hb.sock", "swap.sock", "swap.ctl"} <= names, names
    for p in socks:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, f"{p} is {oct(stat.S_IMODE(p.stat().st_mode))}"
        d = p.parent
        while d != cl.run_dir.parent:
            assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, f"{d} is open to others"
            d = d.parent
    assert vm.state is VMState.RUNNING
