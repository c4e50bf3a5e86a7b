"""Two clouds of different providers on one WAN, for the tests, the lab, the benchmark and the CLI.

``cloud-a`` (profile A: pc, qemu64, virtio-blk, virtio-net) and ``cloud-b`` (profile B: q35,
Westmere, virtio-scsi, e1000), each its own in-process cluster with its own credentials and API
address, one host each on a shared underlay whose host links are the WAN (``wan_mbit``); a third
underlay host ``client`` reaches the service address."""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..core.cluster import Cluster
from ..core.model import HostSpec, VMSpec
from ..network.underlay import Underlay
from .app import AckLog, WriterApp
from .network import WanNetwork, WanNicDriver
from .profiles import PROFILE_A, PROFILE_B
from .provider import CloudRegistry, InProcessProvider


@dataclass
class Scene:
    underlay: Underlay
    wan: WanNetwork
    a: InProcessProvider
    b: InProcessProvider
    registry: CloudRegistry
    workdir: Path

    async def source_vm(self, name: str = "app1", *, disk_mib: int = 64, prefill_mib: int = 16,
                        memory_mib: int = 256, rate_kib: float = 64.0, record: int = 4096) -> WriterApp:
        """A running guest in cloud A with an ext4 data disk holding ``prefill_mib`` of data and the
        writer running on it; returns the writer (its AckLog collects every acknowledged record)."""
        img = self.workdir / f"{name}-data.img"
        await asyncio.to_thread(make_ext4, img, disk_mib, prefill_mib)
        await self.a.authenticate(self.a.credentials)
        await self.a.create_instance(VMSpec(name, memory_mib=memory_mib), data_disk=img, data_size_mib=disk_mib)
        await self.a.start(name)
        app = WriterApp(self.a, name, PROFILE_A.guest_disk, AckLog(), rate_kib=rate_kib, record=record,
                        service_ip=self.wan.service_ip)
        await app.start()
        await self.wan.move_service(name, self.a.host)
        return app


def make_ext4(path: Path, size_mib: int, prefill_mib: int) -> None:
    """An ext4 image of ``size_mib`` with a ``dataset`` file of ``prefill_mib`` random bytes."""
    with tempfile.TemporaryDirectory(prefix="hvsim-ext4-") as d:
        if prefill_mib:
            with open(os.path.join(d, "dataset"), "wb") as f:
                for _ in range(prefill_mib):
                    f.write(os.urandom(1 << 20))
        with open(path, "wb") as f:
            f.truncate(size_mib << 20)
        os.chmod(path, 0o600)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "hvdata", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        "-d", d, str(path)], check=True, capture_output=True)


@contextlib.asynccontextmanager
async def two_clouds(wan_mbit: float = 40.0, *, lan_mbit: float = 1000.0,
                     run_dir: Path | None = None) -> AsyncIterator[Scene]:
    workdir = Path(tempfile.mkdtemp(prefix="hvsim-xcloud-", dir=run_dir))
    os.chmod(workdir, 0o700)
    try:
        async with Underlay(["a1", "b1", "client"], mbit=lan_mbit, overrides={"a1": wan_mbit, "b1": wan_mbit}) as ul:
            wan = WanNetwork(ul)
            await wan.setup()
            async with Cluster("cloud-a") as ca, Cluster("cloud-b") as cb:
                ca.add_host(HostSpec("a1", vcpus=4, memory_mib=2048, datacenter="dc-a",
                                             profile=PROFILE_A.machine_profile()), network=ul.host_network("a1"))
                cb.add_host(HostSpec("b1", vcpus=4, memory_mib=2048, datacenter="dc-b",
                                             profile=PROFILE_B.machine_profile()), network=ul.host_network("b1"))
                ca.add_driver(WanNicDriver(wan))
                cb.add_driver(WanNicDriver(wan))
                a = InProcessProvider("cloud-a", ca, "a1", PROFILE_A, wan, secrets.token_urlsafe(16))
                b = InProcessProvider("cloud-b", cb, "b1", PROFILE_B, wan, secrets.token_urlsafe(16))
                yield Scene(ul, wan, a, b, CloudRegistry({"cloud-a": a, "cloud-b": b}), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
