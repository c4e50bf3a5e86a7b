"""The store interface, one suite run against both backends (SQLite file, real 3-member etcd)."""
from __future__ import annotations

import asyncio

import pytest

from hvsim.control.errors import ControlInputError, FencedError, LeaseExpiredError
from hvsim.control.store import Compare, Delete, EventKind, Get, Put, Store, Txn

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_put_get_revisions(store: Store) -> None:
    r1 = await store.put("/k/a", b"1")
    kv = await store.get("/k/a")
    assert kv is not None and kv.value == b"1" and kv.version == 1
    assert kv.create_revision == kv.mod_revision == r1
    r2 = await store.put("/k/a", b"2")
    kv2 = await store.get("/k/a")
    assert r2 > r1
    assert kv2 is not None and (kv2.value, kv2.version, kv2.create_revision, kv2.mod_revision) == (b"2", 2, r1, r2)
    assert await store.revision() >= r2
    assert await store.get("/k/none") is None


async def test_delete(store: Store) -> None:
    await store.put("/d/x", b"x")
    assert await store.delete("/d/x") is True
    assert await store.get("/d/x") is None
    assert await store.delete("/d/x") is False


async def test_list_pages_in_order_and_prefix_isolated(store: Store) -> None:
    keys = [f"/vms/vm{i:04d}" for i in range(250)]
    for i in range(0, 250, 50):  # 5 transactions of 50 puts
        await store.txn((), [Put(k, k.encode()) for k in keys[i:i + 50]])
    await store.put("/vmsX", b"not under /vms/")
    await store.put("/vm", b"nor this")
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = await store.list("/vms/", limit=100, after=after)
        assert page.remaining == 250 - len(seen)
        pages += 1
        seen += [kv.key for kv in page.items]
        assert all(kv.value == kv.key.encode() for kv in page.items)
        if page.after is None:
            break
        after = page.after
    assert seen == keys
    assert pages == 3
    assert await store.count("/vms/") == 250
    last = await store.list("/vms/", limit=50, after=keys[-1])
    assert last.items == () and last.after is None


async def test_txn_all_or_nothing(store: Store) -> None:
    await store.put("/t/a", b"1")
    res = await store.txn([Compare.absent("/t/a")], [Put("/t/b", b"x"), Put("/t/c", b"x")], [Get("/t/a")])
    assert not res.succeeded
    got = res.results[0]
    assert got is not None and not isinstance(got, int) and getattr(got, "value", None) == b"1"
    assert await store.get("/t/b") is None and await store.get("/t/c") is None
    kv = await store.get("/t/a")
    assert kv is not None
    res = await store.txn([Compare.mod_revision("/t/a", kv.mod_revision), Compare.absent("/t/b")],
                          [Put("/t/b", b"y"), Delete("/t/a"), Get("/t/b")])
    assert res.succeeded
    kb = res.results[2]
    assert getattr(kb, "value", None) == b"y"          # a read inside the txn sees its own write
    assert await store.get("/t/a") is None
    b = await store.get("/t/b")
    assert b is not None and b.mod_revision == res.revision


async def test_nested_txn(store: Store) -> None:
    await store.put("/n/gate", b"open")
    res = await store.txn([Compare.value_is("/n/gate", b"open")],
                          [Txn((Compare.absent("/n/x"),), (Put("/n/x", b"1"),), (Get("/n/x"),))])
    assert res.succeeded
    inner = res.results[0]
    assert getattr(inner, "succeeded", None) is True
    assert (await store.get("/n/x")) is not None


async def test_cas_counter_no_lost_update(store: Store) -> None:
    await store.put("/c/n", b"0")

    async def incr() -> None:
        while True:
            kv = await store.get("/c/n")
            assert kv is not None
            if await store.cas("/c/n", str(int(kv.value) + 1).encode(), expected_mod=kv.mod_revision):
                return
    await asyncio.gather(*(incr() for _ in range(20)))
    kv = await store.get("/c/n")
    assert kv is not None and kv.value == b"20"
    assert await store.cas("/c/new", b"1", expected_mod=None)
    assert not await store.cas("/c/new", b"2", expected_mod=None)


@pytest.mark.parametrize("call", [
    lambda s: s.put("no-slash", b"x"),
    lambda s: s.put("/has space", b"x"),
    lambda s: s.put("/" + "x" * 600, b"x"),
    lambda s: s.put("/k", "not bytes"),
    lambda s: s.list("/k/", limit=0),
    lambda s: s.list("/k/", limit=1001),
    lambda s: s.list("/k/", after="/other/x"),
    lambda s: s.grant(0),
    lambda s: s.txn((), [Put("/dup", b"1"), Put("/dup", b"2")]),
    lambda s: s.txn((), ["not an op"]),
])
async def test_bad_input_refused_and_changes_nothing(store: Store, call) -> None:  # type: ignore[no-untyped-def]
    before = await store.revision()
    with pytest.raises(ControlInputError):
        await call(store)
    assert await store.revision() == before
    assert await store.get("/dup") is None


async def test_watch_delivers_later_changes_in_order(store: Store) -> None:
    await store.put("/w/before", b"0")
    async with store.watch("/w/") as w:
        await store.put("/w/a", b"1")
        await store.put("/other", b"x")
        await store.txn((), [Put("/w/b", b"2"), Delete("/w/before")])
        await store.delete("/w/a")
        evs = [await w.next(timeout=10) for _ in range(4)]
    assert [(e.kind, e.key) for e in evs] == [
        (EventKind.PUT, "/w/a"), (EventKind.PUT, "/w/b"), (EventKind.DELETE, "/w/before"),
        (EventKind.DELETE, "/w/a")]
    assert evs[0].value == b"1"
    assert evs[1].revision == evs[2].revision < evs[3].revision


async def test_watch_from_past_revision(store: Store) -> None:
    r1 = await store.put("/h/1", b"a")
    await store.put("/h/2", b"b")
    async with store.watch("/h/", start_revision=r1) as w:
        evs = [await w.next(timeout=10) for _ in range(2)]
    assert [e.key for e in evs] == ["/h/1", "/h/2"]


async def test_lease_expiry_deletes_its_keys(store: Store) -> None:
    lease = await store.grant(2)
    async with store.watch("/l/") as w:
        await store.put("/l/eph", b"x", lease=lease)
        await store.put("/l/keep", b"y")
        ev = await w.next(timeout=10)
        assert ev.kind is EventKind.PUT
        await w.next(timeout=10)
        ev = await w.next(timeout=15)           # the expiry
    assert (ev.kind, ev.key) == (EventKind.DELETE, "/l/eph")
    assert await store.get("/l/eph") is None and await store.get("/l/keep") is not None
    assert await store.lease_ttl(lease) is None
    with pytest.raises(LeaseExpiredError):
        await store.keep_alive(lease)
    with pytest.raises(LeaseExpiredError):
        await store.put("/l/late", b"z", lease=lease)
    assert await store.get("/l/late") is None


async def test_kept_lease_outlives_its_ttl_and_revoke_deletes(store: Store) -> None:
    kept = await store.keep(2)
    async with kept:
        await store.put("/kl/x", b"x", lease=kept.lease)
        await asyncio.sleep(4.5)                 # more than twice the TTL
        assert not kept.lost.is_set()
        assert await store.get("/kl/x") is not None
    assert await store.get("/kl/x") is None     # revoked on exit
    assert await store.lease_ttl(kept.lease) is None


async def test_fencing(store: Store) -> None:
    l1 = await store.grant(30)
    f1 = await store.acquire("manager", "m-1", l1)
    assert f1 is not None
    assert await store.acquire("manager", "m-2", await store.grant(30)) is None
    assert await store.holder("manager") == ("m-1", f1.token)
    await store.fenced_put(f1, "/f/a", b"1")
    res = await store.fenced_txn(f1, [Compare.absent("/f/a")], [Put("/f/a", b"2")])
    assert not res.succeeded                         # the inner compare failed: nothing written
    assert (await store.get("/f/a")).value == b"1"  # type: ignore[union-attr]
    await store.revoke(l1)                           # m-1 loses the lease (as if it expired)
    l2 = await store.grant(30)
    f2 = await store.acquire("manager", "m-2", l2)
    assert f2 is not None and f2.token > f1.token
    before = await store.revision()
    with pytest.raises(FencedError):
        await store.fenced_put(f1, "/f/a", b"stale")
    assert (await store.get("/f/a")).value == b"1"  # type: ignore[union-attr]
    assert await store.revision() == before
    await store.fenced_put(f2, "/f/a", b"3")
    assert not await store.release(f1)
    assert await store.release(f2)
    assert await store.holder("manager") is None
    await store.revoke(l2)
