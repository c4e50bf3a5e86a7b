"""Two real manager processes on one real 3-member etcd (no guests): the standby serves and answers
503 "not leader" naming the leader, changing nothing; a client follows it to the leader (same bearer
token) and one built from the store finds it; the leader SIGSTOPped past its lease is replaced (a
newer token), and once SIGCONTed it answers every write 503 naming the new leader, and the store's
fence journal shows no write under its token after the new one was acquired."""
from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiNotLeaderError, ApiUnavailableError
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.fencing import audit, store_terms
from hvsim.control.launch import ManagerProcess, short_dir
from hvsim.control.leader import find_leader
from hvsim.control.schema import HostCreate
from hvsim.control.store import EtcdStore

from .conftest import wipe_etcd

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Pair:
    def __init__(self, base: Path, url: str) -> None:
        shared = base / "secret" / "token"
        self.m1 = ManagerProcess(base / "m1", url, lease_ttl=3, name="m1", datacenter="dc1", token_file=shared)
        self.m2 = ManagerProcess(base / "m2", url, lease_ttl=3, name="m2", datacenter="dc2", token_file=shared)


@pytest_asyncio.fixture(loop_scope="module")
async def pair(etcd_cluster: EtcdCluster) -> AsyncIterator[Pair]:
    await wipe_etcd(etcd_cluster)
    base = short_dir("hvsim-ml-")
    p = Pair(base, etcd_cluster.store_url)
    try:
        await p.m1.start()
        await p.m2.start(wait="serving")
        yield p
    finally:
        for m in (p.m1, p.m2):
            if m.pid is not None:
                m.proc.send_signal(signal.SIGCONT)             # type: ignore[union-attr]
            await m.stop()
        import shutil
        shutil.rmtree(base, ignore_errors=True)


async def test_standby_names_the_leader_and_the_client_follows(pair: Pair, etcd_cluster: EtcdCluster) -> None:
    m1, m2 = pair.m1, pair.m2
    async with ManagerClient(m2.address, m2.token, follow_leader=False) as direct:
        h = await direct.health()
        assert h["leader"] is False and h["state"] == "campaigning"
        before = h["revision"]
        with pytest.raises(ApiNotLeaderError) as ei:
            await direct.add_host(HostCreate(name="h1", vcpus=2, memory_mib=1024))
        assert ei.value.retry_safe and ei.value.operation is None
        assert ei.value.leader is not None
        assert (ei.value.leader["manager"], ei.value.leader["address"]) == ("m1", m1.address)
        with pytest.raises(ApiNotLeaderError):
            await direct.list_hosts()                                  # reads too: one leader answers
        assert (await direct.health())["revision"] == before           # the refused write changed nothing
    async with ManagerClient(m2.address, m2.token) as c:               # follow_leader: on by default
        rec = await c.add_host(HostCreate(name="h1", vcpus=2, memory_mib=1024))
        assert rec.name == "h1" and c.address == m1.address and c.followed == 1
        assert (await c.get_host("h1")).vcpus == 2
    async with EtcdStore(etcd_cluster.client_urls) as store:
        info = await find_leader(store)
        assert info is not None and (info.manager, info.datacenter, info.address) == ("m1", "dc1", m1.address)
        async with await ManagerClient.from_store(store, token=m1.token) as c:
            assert c.address == m1.address
            assert (await c.health())["token"] == info.token


async def test_leader_sigstopped_past_its_lease_never_acts_again(pair: Pair, etcd_cluster: EtcdCluster) -> None:
    m1, m2 = pair.m1, pair.m2
    assert m1.proc is not None
    async with EtcdStore(etcd_cluster.client_urls) as store:
        old = await find_leader(store)
        assert old is not None and old.manager == "m1"
        acked: list[str] = []
        async with ManagerClient(m1.address, m1.token, follow_leader=False) as c1:
            await c1.add_host(HostCreate(name="before", vcpus=1, memory_mib=512))
            acked.append("before")
            m1.proc.send_signal(signal.SIGSTOP)
            try:
                await m2.wait_leading(timeout=60)                       # the standby takes the lease
            finally:
                m1.proc.send_signal(signal.SIGCONT)
            new = await find_leader(store)
            assert new is not None and new.manager == "m2" and new.token > old.token
            # the woken manager: every write answered 503 naming the new leader, none applied
            answers = []
            deadline = time.monotonic() + 8                             # across its keep-alive noticing
            i = 0
            while time.monotonic() < deadline:
                i += 1
                try:
                    await c1.add_host(HostCreate(name=f"late{i}", vcpus=1, memory_mib=512))
                    acked.append(f"late{i}")
                    answers.append("applied")
                except ApiNotLeaderError as e:
                    assert e.retry_safe, e.body
                    answers.append((e.leader or {}).get("manager", "?"))
                await asyncio.sleep(0.1)
            assert answers and all(a == "m2" for a in answers), answers
            assert (await c1.health())["leader"] is False
        async with ManagerClient(m2.address, m2.token) as c2:
            names = {h.name async for h in c2.iter_hosts()}
            assert set(acked) <= names and not any(n.startswith("late") for n in names)
        a = audit({}, await store_terms(store))
        assert a.stale_accepted == 0 and a.ok, a.summary()
        assert old.token in a.tokens and new.token in a.tokens


async def test_a_client_with_the_store_finds_the_next_leader_after_a_kill(pair: Pair,
                                                                          etcd_cluster: EtcdCluster) -> None:
    m1, m2 = pair.m1, pair.m2
    async with EtcdStore(etcd_cluster.client_urls) as store:
        c = await ManagerClient.from_store(store, token=m1.token)
        async with c:
            assert c.address == m1.address
            await m1.kill()                                             # SIGKILL: its socket stays, nothing answers
            await m2.wait_leading(timeout=60)
            deadline = time.monotonic() + 30
            while True:
                try:
                    await c.add_host(HostCreate(name="after", vcpus=1, memory_mib=512))
                    break
                except ApiUnavailableError:                             # before m2 published its record
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            assert c.address == m2.address
            assert (await c.get_host("after")).memory_mib == 512
