"""The manager's own fencing logic, in process on a real SQLite store (no guests): a manager whose
lease is no longer held for sure on its clock (what a process woken from SIGSTOP sees) refuses to
act before anything is written and answers 503 not-leader naming the new leader; a manager told
by the store that its fence is gone is deposed, steps down and campaigns again (a newer token);
leader record published while it leads, gone once it stops."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from hvsim.control.api import create_app
from hvsim.control.errors import FencedError, NotLeaderError
from hvsim.control.leader import find_leader, publish_leader
from hvsim.control.manager import Manager, ManagerState
from hvsim.control.state import HOSTS
from hvsim.control.store import SQLiteStore

pytestmark = pytest.mark.asyncio(loop_scope="module")
TOKEN = "t" * 32


@pytest_asyncio.fixture(loop_scope="module")
async def mgr(tmp_path: Path) -> AsyncIterator[Manager]:
    async with SQLiteStore(tmp_path / "state.db") as store:
        m = Manager(store, name="m1", lease_ttl=3, advertise="unix:/run/m1.sock", datacenter="dc1")
        await m.start(timeout=30)
        try:
            yield m
        finally:
            await m.close()


def http(m: Manager) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(m, TOKEN)), base_url="http://m",
                             headers={"Authorization": f"Bearer {TOKEN}"})


async def test_a_manager_past_its_lease_on_its_clock_changes_nothing(mgr: Manager) -> None:
    info = await find_leader(mgr.store)
    assert info is not None and (info.manager, info.token, info.datacenter) == ("m1", mgr.token, "dc1")
    async with http(mgr) as c:
        assert (await c.post("/v1/hosts", json={"name": "h1"})).status_code == 201
        lead = mgr.lead
        assert lead is not None
        journal = lead.fence.journal_key
        last_write = (await mgr.store.get(journal)).mod_revision    # type: ignore[union-attr]
        lead.kept.valid_until = time.monotonic() - 0.01    # frozen past its lease, just woken
        assert not mgr.leading_now()
        with pytest.raises(NotLeaderError):
            mgr.token                                          # noqa: B018 (no agent call can be made)
        with pytest.raises(NotLeaderError):
            mgr.inventory                                      # noqa: B018 (nor a store write)
        # meanwhile m2 took the lease over (so m1's keep-alive cannot just lead again)
        await mgr.store.revoke(lead.kept.lease)
        f2 = await mgr.store.acquire("manager", "m2", await mgr.store.grant(60))
        assert f2 is not None
        await publish_leader(mgr.store, f2, address="unix:/run/m2.sock", datacenter="dc2")
        r = await c.post("/v1/hosts", json={"name": "h2"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        body = r.json()
        assert body["not_leader"] is True and body["applied"] is False and body["operation"] is None
        assert body["leader"] == {"manager": "m2", "address": "unix:/run/m2.sock", "token": f2.token,
                                  "datacenter": "dc2"}
        assert (await c.get("/v1/hosts/h1")).status_code == 503
        health = (await c.get("/v1/health")).json()
        assert health["leader"] is False and health["token"] in (0, info.token)
        # nothing was written under its token (its keep-alive may meanwhile have given the lease up:
        # a revoke, which is not a write of its)
        assert await mgr.store.get(HOSTS + "h2") is None
        assert (await mgr.store.get(journal)).mod_revision == last_write    # type: ignore[union-attr]


async def test_a_store_refusal_deposes_and_the_manager_campaigns_again(mgr: Manager) -> None:
    assert mgr.lead is not None
    lead = mgr.lead
    old = lead.fence
    await mgr.store.revoke(old.lease)                          # its lease ended behind its back
    with pytest.raises(FencedError):
        await lead.inventory.touch()                           # the store refuses the write...
    assert lead.deposed.is_set()                               # ...and that alone deposes it
    deadline = time.monotonic() + 30
    while not (mgr.state is ManagerState.LEADING and mgr.lead is not None and mgr.lead.fence.token > old.token):
        assert time.monotonic() < deadline, mgr.state
        await asyncio.sleep(0.1)
    info = await find_leader(mgr.store)
    assert info is not None and info.token == mgr.token > old.token


async def test_the_leader_record_goes_with_a_graceful_stop(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.db") as store:
        m = Manager(store, name="m1", lease_ttl=3, advertise="unix:/run/m1.sock")
        await m.start(timeout=30)
        assert (await find_leader(store)) is not None
        await m.close()
        assert await find_leader(store) is None and await store.holder("manager") is None
