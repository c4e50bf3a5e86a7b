"""The leader record and fencing in the store (both backends): the record appears with the lease
and vanishes with it, find_leader; a stale token is refused by the store and the journal shows it
(the audit over the store is clean; a forged late write is caught); a kept lease is not acted on
past its TTL."""
from __future__ import annotations

import asyncio
import time

import pytest

from hvbase.aio import wait_for
from hvsim.control.errors import ControlInputError, FencedError, StoreError
from hvsim.control.fencing import audit, store_terms
from hvsim.control.leader import LEADER_KEY, LeaderInfo, find_leader, publish_leader
from hvsim.control.store import Compare, Get, Put, Store, journal_key

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_leader_record_appears_and_vanishes_with_the_lease(store: Store) -> None:
    assert await find_leader(store) is None
    lease = await store.grant(30)
    fence = await store.acquire("manager", "m-1", lease)
    assert fence is not None
    info = await publish_leader(store, fence, address="unix:/run/m1.sock", datacenter="dc1")
    assert await find_leader(store) == info
    assert (info.manager, info.token, info.datacenter) == ("m-1", fence.token, "dc1")
    kv = await store.get(LEADER_KEY)
    assert kv is not None and kv.lease == lease.id                 # bound to the lease
    await store.revoke(lease)                                      # the lease ends: so does the record
    assert await find_leader(store) is None
    assert await store.holder("manager") is None


async def test_leader_record_expires_with_an_unkept_lease(store: Store) -> None:
    lease = await store.grant(2)
    fence = await store.acquire("manager", "m-1", lease)
    assert fence is not None
    await publish_leader(store, fence, address="https://127.0.0.1:7000", datacenter="dc1")
    assert await find_leader(store) is not None
    deadline = time.monotonic() + 30
    while await find_leader(store) is not None:                   # nobody keeps the lease alive
        assert time.monotonic() < deadline, "the leader record outlived its lease"
        await asyncio.sleep(0.2)
    # and a holder whose lease expired cannot publish again
    with pytest.raises(FencedError):
        await publish_leader(store, fence, address="https://127.0.0.1:7000", datacenter="dc1")
    assert await find_leader(store) is None


async def test_a_malformed_leader_record_is_an_error(store: Store) -> None:
    await store.put(LEADER_KEY, b'{"manager": "x", "address": "ftp://nope", "token": 3}')
    with pytest.raises(StoreError, match="malformed"):
        await find_leader(store)
    await store.delete(LEADER_KEY)


async def test_stale_token_refused_by_the_store_and_the_journal_audits_clean(store: Store) -> None:
    l1 = await store.grant(30)
    f1 = await store.acquire("manager", "m-1", l1)
    assert f1 is not None
    await store.fenced_put(f1, "/x/a", b"1")
    await store.fenced_put(f1, "/x/b", b"1")
    await store.revoke(l1)                                         # as if m-1 were frozen past its TTL
    l2 = await store.grant(30)
    f2 = await store.acquire("manager", "m-2", l2)
    assert f2 is not None and f2.token > f1.token
    before = await store.revision()
    with pytest.raises(FencedError):                               # m-1 wakes and writes: refused
        await store.fenced_put(f1, "/x/a", b"stale")
    assert await store.revision() == before
    assert (await store.get("/x/a")).value == b"1"               # type: ignore[union-attr]
    await store.fenced_put(f2, "/x/a", b"2")
    terms = await store_terms(store)
    assert [(t.token, t.holder, t.writes) for t in terms] == [(f1.token, "m-1", 2), (f2.token, "m-2", 1)]
    assert terms[0].last_write_revision < f2.token                # m-1's last write precedes m-2's lease
    a = audit({}, terms)
    assert a.ok and a.stale_accepted == 0 and a.store_writes == 3, a.summary()

    # the audit is not vacuous: a write stamped with m-1's token after m-2 took over (forged here
    # with a raw put, which is what an unfenced writer would do) is caught
    raw = (await store.get(journal_key("manager", f1.token))).value  # type: ignore[union-attr]
    await store.txn([], [Put(journal_key("manager", f1.token), raw)])
    bad = audit({}, await store_terms(store))
    assert bad.stale_accepted == 1 and not bad.ok
    await store.revoke(l2)


async def test_a_read_only_or_failed_fenced_txn_journals_nothing(store: Store) -> None:
    lease = await store.grant(30)
    f = await store.acquire("manager", "m-1", lease)
    assert f is not None
    await store.fenced_txn(f, (), [Get("/y/a")])
    res = await store.fenced_txn(f, [Compare.exists("/y/none")], [Put("/y/a", b"1")])
    assert not res.succeeded
    assert await store.get(journal_key("manager", f.token)) is None
    await store.revoke(lease)


async def test_kept_lease_valid_only_within_its_ttl(store: Store) -> None:
    kept = await store.keep(2)
    try:
        assert kept.valid() and 0 < kept.remaining() <= 2
        kept.valid_until = time.monotonic() - 0.01                 # as a process waking from SIGSTOP sees it
        assert not kept.valid() and kept.remaining() == 0
        await wait_for(kept.lost.wait(), 10)               # the keeper notices and gives up
    finally:
        await kept.stop()


async def test_leader_info_validation() -> None:
    info = LeaderInfo(manager="m", address="https://10.0.0.1:7000", token=5, datacenter="dc2", since=1.0)
    assert LeaderInfo.parse(info.to_json()) == info
    for bad in ({"manager": "", "address": "unix:/x", "token": 1}, {"manager": "m", "address": "unix:x", "token": 1},
                {"manager": "m", "address": "unix:/x", "token": True}, {"manager": "m", "address": "unix:/x"}):
        with pytest.raises(ControlInputError):
            LeaderInfo.parse(bad)
