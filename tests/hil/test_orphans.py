"""QEMU dies with the process that started it, and its run dir is reclaimed later."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from hvsim.core.cluster import remove_stale_run_dirs

pytestmark = pytest.mark.hil

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from hvsim.core.cluster import Cluster
    from hvsim.core.model import HostSpec, VMSpec
    async def main():
        cl = Cluster("orphan")
        cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
        vm = await cl.define_vm(VMSpec("g1", memory_mib=128), "h1")
        await vm.start(wait_ready=True, ready_timeout=120)
        print(vm.pid, cl.run_dir, flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


def test_qemu_dies_when_its_parent_is_killed(tmp_path):
    # the orphan's run dir under a private TMPDIR: no other hvsim process on this machine reclaims it
    # before this test does (every Cluster() reclaims the stale run dirs of dead owners in its TMPDIR)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline().split()
        assert line, "child did not start its guest"
        qemu_pid, run_dir = int(line[0]), Path(line[1])
        assert psutil.pid_exists(qemu_pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(qemu_pid) and psutil.Process(qemu_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "QEMU outlived the process that started it"
            time.sleep(0.1)
        assert run_dir.parent == tmp_path and run_dir.exists()   # nobody cleaned up: the owner was SIGKILLed
        assert run_dir in remove_stale_run_dirs(run_dir.parent)
        assert not run_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
