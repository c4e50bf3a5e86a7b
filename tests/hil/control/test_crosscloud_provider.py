"""The cross-cloud provider driver over a real manager's HTTP API (one host agent, a real guest):
credentials and capacity refused before anything is defined; an instance of provider profile B
(q35, Westmere, virtio-scsi) defined and started through the API, and the guest really is that
machine; exec, file push (SHA-256 checked), the streamed exec (output as it is written, the exit
status, the command killed when the stream is closed), pause/resume, delete."""
from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from hvsim.control.errors import ApiInputError
from hvsim.control.schema import HostCreate, VMDefine
from hvsim.core.model import VMSpec
from hvsim.crosscloud.errors import CredentialsError, NoCapacityError
from hvsim.crosscloud.guestproc import GuestProcess
from hvsim.crosscloud.manager_provider import ManagerProvider, ProviderRefusedError
from hvsim.crosscloud.profiles import PROFILE_A, PROFILE_B, native_blockers
from hvsim.crosscloud.provider import ProviderDriver

from .conftest import ControlPlane

pytestmark = [pytest.mark.hil, pytest.mark.timeout(600)]


async def test_manager_provider_runs_a_profile_b_instance_through_the_api(cp: ControlPlane, tmp_path: Path) -> None:
    await cp.host("h1", memory_mib=1024)
    m = await cp.manager(lease_ttl=3)
    c = cp.client(m)
    await c.add_host(HostCreate(name="h1", agent=cp.hosts["h1"].address))
    p = ManagerProvider("cloud-b", m.address, PROFILE_B, network=None)     # this host agent has no --wan
    drv: ProviderDriver = p          # it is a ProviderDriver (mypy checks the protocol here)
    try:
        with pytest.raises(CredentialsError):
            await drv.authenticate("not-the-token-of-this-manager")
        await drv.authenticate(m.token)
        with pytest.raises(NoCapacityError, match="1024 MiB free"):
            await drv.create_instance(VMSpec("big", memory_mib=2048), data_size_mib=16)
        assert [v async for v in c.iter_vms()] == []                     # refused before anything was defined

        await drv.create_instance(VMSpec("inst", memory_mib=256), data_size_mib=32)
        spec = await drv.describe("inst")
        assert (spec.machine, spec.cpu_model, spec.disks[0].bus) == ("q35", "Westmere", "scsi")
        assert {"machine pc vs q35", "cpu qemu64 vs Westmere", "disk bus virtio-blk vs scsi"} <= set(
            native_blockers(PROFILE_A.apply(spec), spec))
        assert await drv.vm_state("inst") == "shutoff"
        await drv.start("inst")
        assert await drv.vm_state("inst") == "running"
        await drv.probe_agent("inst")
        # the guest is the profile's machine: a Westmere CPU, the data disk on SCSI (sda), a Q35 board
        cpu = (await drv.exec("inst", "grep -m1 'model name' /proc/cpuinfo", check=True)).stdout
        assert "Westmere" in cpu
        blocks = (await drv.exec("inst", "ls /sys/block", check=True)).stdout.split()
        assert "sda" in blocks and "vda" not in blocks
        board = (await drv.exec("inst", "cat /sys/class/dmi/id/product_name", check=True)).stdout
        assert "Q35" in board

        src = tmp_path / "blob"
        src.write_bytes(os.urandom(48 << 10))
        await drv.push_file("inst", src, "/run/blob", 0o600)
        got = (await drv.exec("inst", "sha256sum /run/blob; stat -c %a /run/blob", check=True)).stdout.split()
        assert got[0] == hashlib.sha256(src.read_bytes()).hexdigest() and got[-1] == "600"
        # the file route with curl: an incompressible 3 MiB file arrives whole in one request; a body
        # that is not the one its digest names, or a path that climbs out, is refused and writes nothing
        big = tmp_path / "big"
        big.write_bytes(os.urandom(3 << 20))
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        curl = ["curl", "-sS", "--unix-socket", str(m.socket), "-H", f"Authorization: Bearer {m.token}", "-X", "PUT",
                "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{big}", "-w", "\n%{http_code}"]
        url = "http://m/v1/vms/inst/files?path="
        for query, code, why in ((f"/run/big&mode=0640&sha256={'0' * 64}", "400", "does not have SHA-256"),
                                 ("/run/../etc/big", "400", "component '..'"),
                                 (f"/run/big&mode=0640&sha256={digest}", "200", digest)):
            out = subprocess.run([*curl, url + query], capture_output=True, text=True, check=True).stdout
            assert out.endswith(code) and why in out, (query, out)
            if code != "200":
                assert (await drv.exec("inst", "ls /run/big* /etc/big 2>/dev/null | wc -l")).stdout.strip() == "0"
        got = (await drv.exec("inst", "sha256sum /run/big; stat -c %a /run/big", check=True)).stdout.split()
        assert got == [digest, "/run/big", "640"]

        # the streamed exec: lines as they are written, then the exit status
        lines: list[tuple[float, str]] = []
        proc = GuestProcess(drv, "inst", "for i in 1 2 3; do echo line$i; sleep 1; done; exit 7", "t",
                            on_line=lambda ln, t: lines.append((t, ln))).start()
        await proc.wait(120)
        assert [ln for _, ln in lines] == ["line1", "line2", "line3"] and proc.exit_code == 7
        assert lines[2][0] > lines[0][0]          # they arrived one by one, not at the end in one piece
        # closing the stream kills the command in the guest
        long = GuestProcess(drv, "inst", "echo started $$; exec sleep 601", "sleeper").start()
        pid = int((await long.wait_line(lambda s: s.startswith("started "), 60)).split()[1])
        alive = f"tr '\\0' ' ' < /proc/{pid}/cmdline | grep -q '^sleep 601'"   # (init runs sleeps of its own)
        assert (await drv.exec("inst", alive)).exit_code == 0
        await long.stop()
        deadline = time.monotonic() + 60
        while (await drv.exec("inst", alive)).exit_code == 0:
            assert time.monotonic() < deadline, "the streamed command outlived its stream"
            await asyncio.sleep(0.5)

        # pause / resume through the API: QEMU's runstate as the host agent reports it
        ag = cp.agent("h1")
        await drv.pause("inst")
        assert (await ag.vm("inst")).qemu_status == "paused"
        # the record's power stays running (pause is not an operation); the driver says paused
        assert (await c.get_vm("inst")).power.value == "running" and await drv.vm_state("inst") == "paused"
        await drv.resume("inst")
        assert (await ag.vm("inst")).qemu_status == "running" and await drv.vm_state("inst") == "running"
        assert (await drv.exec("inst", "echo back", check=True)).stdout.strip() == "back"

        # an instance without a NIC on the inter-cloud network: no address there, no service address
        with pytest.raises(ProviderRefusedError, match="no NIC on the inter-cloud network"):
            await drv.guest_address("inst")
        with pytest.raises(ProviderRefusedError, match="cannot carry the service address"):
            await drv.route_service("inst")
        # an image import on a manager without an import directory is refused, naming it
        with pytest.raises(ApiInputError, match="no import directory configured"):
            await c.define_vm(VMDefine(name="imp", disk_mib=16, data_image="disk.img"))

        await drv.delete("inst")
        assert await drv.vm_state("inst") is None
        assert [q for q in (await ag.qemus()).items if q.vm == "inst"] == []
    finally:
        await p.close()
