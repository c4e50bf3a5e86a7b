"""A detached QEMU outlives the process that started it (a host agent restarting must not take its
guests along), a new owner re-attaches to it by pid and QMP socket, and it never outlives its host:
powering the host's power domain off kills it."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from hvsim.core.agent import GuestAgent
from hvsim.core.cluster import KERNEL_FILE, images_dir
from hvsim.core.power import PowerDomain, reclaim_stale
from hvsim.core.procfs import alive
from qmp_bridge import AttachError, MachineSpec, ProcState, QemuProcess, SerialPort
from qmp_bridge.accel import choose_accel
from qmp_bridge.process import UNKNOWN_EXIT

pytestmark = pytest.mark.hil

OWNER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from qmp_bridge import MachineSpec, QemuProcess, SerialPort
    async def main():
        run, cg, kernel, initrd, accel = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
        spec = MachineSpec(name="survivor", memory_mib=128, vcpus=1, kernel=kernel, initrd=initrd, accel=accel,
                           console_log=str(run / "console.log"),
                           serial_ports=(SerialPort("agent0", "org.hvsim.agent", str(run / "agent.sock")),))
        p = QemuProcess(spec, run, qmp_socket=run / "qmp.sock", detached=True, cgroup=cg)
        await p.launch()
        print(json.dumps({"pid": p.pid}), flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


def spec(run: Path, accel: str) -> MachineSpec:
    return MachineSpec(name="survivor", memory_mib=128, vcpus=1, kernel=str(images_dir() / KERNEL_FILE),
                       initrd=str(images_dir() / "initrd.img"), accel=accel,  # type: ignore[arg-type]
                       console_log=str(run / "console.log"),
                       serial_ports=(SerialPort("agent0", "org.hvsim.agent", str(run / "agent.sock")),))


async def ready(agent: GuestAgent, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                await agent.connect()
                await agent.ping(timeout=1)
                return
            except Exception:
                await agent.close()
                await asyncio.sleep(0.2)


async def test_a_detached_qemu_survives_its_owner_is_reattached_and_dies_with_its_host(tmp_path: Path) -> None:
    reclaim_stale()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    accel = choose_accel(str(images_dir() / KERNEL_FILE), str(images_dir() / "initrd.img"))
    dom = PowerDomain.create("reattach-h")
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(run), str(dom.path), str(images_dir() / KERNEL_FILE),
                              str(images_dir() / "initrd.img"), accel], stdout=subprocess.PIPE, text=True)
    proc: QemuProcess | None = None
    try:
        assert owner.stdout is not None
        pid = json.loads(owner.stdout.readline())["pid"]
        assert dom.pids() == [pid], "the QEMU did not join its host's power domain"
        agent = GuestAgent("survivor", run / "agent.sock")
        await ready(agent)
        await agent.exec("echo before > /run/marker", check=True)
        await agent.close()
        qmp_sock = run / "qmp.sock"
        assert oct(qmp_sock.stat().st_mode & 0o777) == oct(0o600)

        os.kill(owner.pid, signal.SIGKILL)          # the "host agent" dies
        owner.wait(10)
        await asyncio.sleep(1.0)
        assert alive(pid), "the guest died with the process that manages it"

        with pytest.raises(AttachError, match="is not the QEMU"):
            await QemuProcess.reattach(spec(run, accel), run, os.getpid(), qmp_sock)
        proc = await QemuProcess.reattach(spec(run, accel), run, pid, qmp_sock)
        assert proc.state is ProcState.RUNNING and proc.pid == pid and not proc.is_child
        assert (await proc.qmp.execute("query-status"))["status"] == "running"   # type: ignore[union-attr]
        agent = GuestAgent("survivor", run / "agent.sock")
        await ready(agent, 30)
        assert (await agent.exec("cat /run/marker", check=True)).stdout == "before\n"   # same guest, not rebooted
        await agent.close()

        killed = dom.power_off()                     # the host loses power
        assert killed == [pid] and not alive(pid)
        assert await wait_for(proc.wait_exit(), 10) == UNKNOWN_EXIT
        assert proc.state is ProcState.EXITED
    finally:
        if proc is not None:
            await proc.kill()
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        dom.remove()
    assert not dom.path.exists()


async def test_stale_power_domains_of_dead_owners_are_powered_off_and_removed(tmp_path: Path) -> None:
    # a domain created by a process that then died (with a process still in it)
    script = ("import subprocess; from hvsim.core.power import PowerDomain; from qmp_bridge.process import join_cgroup;"
              "d = PowerDomain.create('stale-h'); p = subprocess.Popen(['sleep', '600'], stdout=subprocess.DEVNULL,"
              " stderr=subprocess.DEVNULL, preexec_fn=lambda: join_cgroup(d.path)); print(d.path, p.pid, flush=True)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    path_s, pid_s = out.stdout.split()
    path, pid = Path(path_s), int(pid_s)
    assert path.exists() and alive(pid)
    live = PowerDomain.create("live-h")          # ours: must not be touched
    try:
        removed = reclaim_stale()
        assert str(path) in removed and not path.exists() and not alive(pid)
        assert live.path.exists()
    finally:
        live.remove()
