"""A whole cross-cloud migration between two hvsim managers (issue 15), every step through their
HTTP APIs (:class:`~hvsim.crosscloud.manager_provider.ManagerProvider`): cloud-a (profile A: pc,
qemu64, virtio-blk) and cloud-b (profile B: q35, Westmere, virtio-scsi, e1000), each its own manager
with its own token and address and one host agent, the hosts in underlay namespaces whose shaped
links are the WAN (the agents are told it with ``--wan``). The source's ext4 data disk is imported
from an image in cloud-a's import directory; its writer acknowledges records the whole time.
Replication, a test cutover (a copy-on-write clone booted isolated, then discarded), cutover (the
service address moves to cloud-b), every acknowledged record verified at the destination,
finalize (the source is gone from cloud-a's manager and host); the destination stopped and
started again through its manager still has every record (its disk's snapshot chain is kept)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvsim.control.agent_client import AgentClient
from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiInputError
from hvsim.control.launch import EmulatedHost, ManagerProcess, short_dir
from hvsim.control.schema import HostCreate, VMDefine
from hvsim.core.model import VMSpec
from hvsim.core.procfs import alive
from hvsim.crosscloud.app import AckLog, WriterApp, verify_records
from hvsim.crosscloud.errors import CredentialsError, CrossCloudInputError
from hvsim.crosscloud.manager_provider import ManagerProvider, ProviderRefusedError
from hvsim.crosscloud.network import SERVICE_IP, WanConfig
from hvsim.crosscloud.orchestrator import CrossCloudMigration, XState
from hvsim.crosscloud.profiles import PROFILE_A, PROFILE_B, ProviderProfile
from hvsim.crosscloud.provider import CloudRegistry
from hvsim.crosscloud.scene import make_ext4
from hvsim.network import netns as nsutil
from hvsim.network.underlay import Underlay
from hvsim.testing.plugin import Artifacts

pytestmark = [pytest.mark.hil, pytest.mark.timeout(900)]

WAN_MBIT = 40.0


@dataclass
class Cloud:
    name: str
    host: EmulatedHost
    manager: ManagerProcess
    client: ManagerClient
    agent: AgentClient
    provider: ManagerProvider
    import_dir: Path


@dataclass
class Clouds:
    underlay: Underlay
    a: Cloud
    b: Cloud
    base: Path

    def registry(self) -> CloudRegistry:
        return CloudRegistry({"cloud-a": self.a.provider, "cloud-b": self.b.provider})


async def _cloud(base: Path, ul: Underlay, name: str, host: str, profile: ProviderProfile, pool: str,
                 stack: contextlib.AsyncExitStack) -> Cloud:
    d = base / name
    imp = d / "images"
    imp.mkdir(parents=True, mode=0o700)
    h = EmulatedHost(host, d, vcpus=2, memory_mib=1024, datacenter=name.replace("cloud-", "dc-"),
                     netns=ul.host_ns(host), wan=WanConfig.of_underlay(ul, host, pool=pool).to_json(), import_dir=imp)
    stack.push_async_callback(h.close)
    await h.power_on()
    await h.start_agent()
    m = ManagerProcess(d / "manager", f"sqlite://{d / 'state.db'}", lease_ttl=3, import_dir=imp, datacenter=name)
    stack.push_async_callback(m.stop)
    await m.start()
    c = ManagerClient(m.address, m.token, timeout=300)
    stack.push_async_callback(c.close)
    await c.add_host(HostCreate(name=host, agent=h.address))
    ag = AgentClient(h.address, tls=None, timeout=120)
    stack.push_async_callback(ag.close)
    p = ManagerProvider(name, m.address, profile, import_dir=imp)
    stack.push_async_callback(p.close)
    return Cloud(name, h, m, c, ag, p, imp)


@pytest.fixture
async def clouds(request: pytest.FixtureRequest) -> AsyncIterator[Clouds]:
    base = short_dir("hvsim-hil-xm-")
    art = Artifacts(request)
    seen: set[int] = set()
    try:
        async with Underlay(["a1", "b1", "client"], mbit=1000.0, overrides={"a1": WAN_MBIT, "b1": WAN_MBIT}) as ul:
            async with contextlib.AsyncExitStack() as stack:
                a = await _cloud(base, ul, "cloud-a", "a1", PROFILE_A, "198.19.0.0/20", stack)
                b = await _cloud(base, ul, "cloud-b", "b1", PROFILE_B, "198.19.16.0/20", stack)
                try:
                    yield Clouds(ul, a, b, base)
                finally:
                    seen.update(a.host.pids() + b.host.pids())
                    if art.failed:
                        for p in base.rglob("*.log"):
                            dest = art.dir / p.relative_to(base)
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            with contextlib.suppress(OSError):
                                shutil.copy2(p, dest)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    await asyncio.sleep(0.2)
    survivors = [p for p in sorted(seen) if alive(p)]
    assert not survivors, f"processes of the emulated hosts survived their power-off: {survivors}"


async def _client_route(ul: Underlay) -> str:
    """Where the client host sends the service address (``ip route get``)."""
    return await nsutil.ip("route", "get", SERVICE_IP, netns=ul.host_ns("client"))


async def _ping_service(ul: Underlay) -> bool:
    argv = nsutil.argv_in(ul.host_ns("client"), ["ping", "-c", "1", "-W", "2", SERVICE_IP])
    try:
        await nsutil.run(argv, timeout=10)
    except Exception:  # unreachable: an answer in itself
        return False
    return True


async def test_whole_migration_between_two_managers(clouds: Clouds) -> None:
    t0 = time.monotonic()
    a, b, ul = clouds.a, clouds.b, clouds.underlay
    pa, pb = a.provider, b.provider
    with pytest.raises(CredentialsError):
        await pa.authenticate(b.manager.token)     # each cloud its own credentials
    await pa.authenticate(a.manager.token)
    await pb.authenticate(b.manager.token)

    # data disks come only from inside the import directory: refused before anything is defined
    outside = clouds.base / "outside.img"
    outside.write_bytes(b"\0" * 4096)
    with pytest.raises(CrossCloudInputError, match="not inside the import directory"):
        await pa.create_instance(VMSpec("bad"), data_disk=outside, data_size_mib=16)
    os.symlink(outside, a.import_dir / "link.img")
    (a.import_dir / "dir.img").mkdir()
    (a.import_dir / "big.img").write_bytes(b"\1" * (2 << 20))
    for image, disk, why in (("../outside.img", 16, "'..'"), ("link.img", 16, "leaves the import directory"),
                             ("dir.img", 16, "not a regular file"), ("big.img", 1, "more than the disk"),
                             ("none.img", 16, "not found")):
        with pytest.raises(ApiInputError, match=why):
            await a.client.define_vm(VMDefine(name="bad", disk_mib=disk, data_image=image))
    assert [v async for v in a.client.iter_vms()] == []

    # the source: an ext4 data disk imported from an image, the writer on it, the service address on it
    img = a.import_dir / "app1-data.img"
    await asyncio.to_thread(make_ext4, img, 64, 8)
    await pa.create_instance(VMSpec("app1", memory_mib=256), data_disk=img, data_size_mib=64)
    rec = await a.client.get_vm("app1")
    assert (rec.network, rec.data_image, rec.disk_mib) == ("wan", "app1-data.img", 64)
    await pa.start("app1")
    src_ip = await pa.guest_address("app1")
    assert src_ip == "198.19.0.6"                            # the first /30 of cloud-a's host's slice
    app = WriterApp(pa, "app1", PROFILE_A.guest_disk, AckLog(), rate_kib=64, record=4096, service_ip=SERVICE_IP)
    await app.start()
    await pa.route_service("app1")
    assert ul.host_ip("a1") in await _client_route(ul) and await _ping_service(ul)
    t_ready = time.monotonic()
    phases: list[tuple[float, str, str]] = []

    m = CrossCloudMigration(clouds.registry(), vm="app1", source_cloud="cloud-a",
                            source_credentials=a.manager.token, dest_cloud="cloud-b",
                            dest_credentials=b.manager.token, source_app=app, workdir=clouds.base / "work",
                            budget_s=10.0, on_event=lambda kind, data: phases.append(
                                (time.monotonic() - t_ready, kind, str(data.get("phase", ""))))
                            if kind in ("phase", "test-cutover", "cutover") else None)
    (clouds.base / "work").mkdir(mode=0o700)
    await m.prepare()
    assert m.state is XState.REPLICATING
    dst = await b.client.get_vm("app1")
    assert dst.profile is not None and (dst.profile.machine, dst.profile.disk_bus) == ("q35", "scsi")
    dst_ip = await pb.guest_address("app1")
    assert dst_ip.startswith("198.19.16.") and dst_ip != src_ip
    # the guests reach each other across the WAN (the agents' TLS connection ran over it already)
    assert (await pa.exec("app1", f"ping -c 1 -W 2 {dst_ip} >/dev/null && echo ok")).stdout.strip() == "ok"
    await m.replicate(rounds=1, until_ready=False)

    # test cutover: a copy-on-write clone of the destination, isolated, checked and discarded
    res = await m.test_cutover()
    assert res["ok"] and res["isolated"] and res["records"]["missing"] == 0 and res["point_seq"] > 0, res
    assert await pb.vm_state(res["clone"]) is None
    assert [q.vm for q in (await b.agent.qemus()).items] == ["app1"]
    assert m.state is XState.REPLICATING
    # an isolated clone reaches nobody on the WAN and nobody reaches it; the API refuses it the service address
    iso = await pb.clone_for_test("app1", "app1-iso")
    await pb.start(iso)
    iso_ip = await pb.guest_address(iso)
    assert (await b.client.get_vm(iso)).network == "isolated"
    ping = "ping -c 1 -W 2 {} >/dev/null 2>&1; echo $?"
    assert (await pb.exec(iso, ping.format(src_ip))).stdout.strip() != "0"
    assert (await pb.exec(iso, ping.format(dst_ip))).stdout.strip() != "0"
    assert (await pa.exec("app1", ping.format(iso_ip))).stdout.strip() != "0"
    assert (await pb.exec("app1", ping.format(src_ip))).stdout.strip() == "0"      # the routed side does
    with pytest.raises(ProviderRefusedError, match="isolated"):
        await pb.route_service(iso)
    await pb.delete(iso)
    assert await pb.vm_state(iso) is None

    # cutover once the criterion says the final delta fits
    d = await m.replicate()
    assert d.fits, d.reason
    out = await m.cutover()
    assert m.state is XState.CUT_OVER
    assert out["verify"]["source"]["digest"] == out["verify"]["destination"]["digest"]
    assert ul.host_ip("b1") in await _client_route(ul) and await _ping_service(ul)
    assert m.dest_app is not None and m.acks.first.get(m.dest_app.origin) is not None
    await m.dest_app.stop()
    v = await m.verify_destination()
    assert v["missing"] == 0 and v["changed"] == 0 and v["acked"] > out["last_source_seq"] > 0, v

    # finalize: the source is gone from cloud-a (its manager's records and its host)
    await m.finalize()
    assert m.state is XState.FINALIZED
    assert await pa.vm_state("app1") is None
    assert [q.vm for q in (await a.agent.qemus()).items] == []
    assert await pb.vm_state("app1") == "running"
    t_done = time.monotonic()
    # the destination's disk was snapshotted for the clone: a stop and a start through the manager
    # open the chain (what was written since is there), not the frozen image
    await b.client.stop_vm("app1")
    await pb.start("app1")
    await WriterApp(pb, "app1", PROFILE_B.guest_disk, AckLog()).mount()
    v2 = await verify_records(pb, "app1", m.acks, record=4096)
    assert v2["missing"] == 0 and v2["changed"] == 0 and v2["acked"] == v["acked"], v2
    print(f"\nmanagers migration: setup {t_ready - t0:.1f} s, migration {t_done - t_ready:.1f} s, "
          f"restart check {time.monotonic() - t_done:.1f} s, "
          f"downtime {out['downtime_s']} s (predicted {out['predicted_downtime_s']}), rounds {out['rounds']}, "
          f"acked {v['acked']}; " + ", ".join(f"{k} {ph} at {t:.1f} s" for t, k, ph in phases))

