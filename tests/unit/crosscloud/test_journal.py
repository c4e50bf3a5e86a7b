"""The cross-cloud operation journal on a real SQLite store: one driver per operation, a crashed
driver's lease runs out before another may take over, and the stale one can write no more."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hvsim.control.errors import FencedError
from hvsim.control.store import SQLiteStore
from hvsim.crosscloud.errors import CrossCloudInputError, OperationBusyError
from hvsim.crosscloud.journal import OperationJournal, check_op_id


async def test_a_crashed_holder_blocks_until_its_lease_expires_then_cannot_write(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "j.db") as a_store, SQLiteStore(tmp_path / "j.db") as b_store:
        a = OperationJournal(a_store, "mgr-a", ttl=1)
        b = OperationJournal(b_store, "mgr-b", ttl=1)
        fence_a = await a.claim("op1")
        await a.save("op1", {"state": "replicating", "rounds": 1})
        with pytest.raises(OperationBusyError, match="mgr-a"):
            await b.claim("op1")                      # held and kept alive
        await asyncio.sleep(1.5)
        with pytest.raises(OperationBusyError):
            await b.claim("op1")                      # still kept alive: a is not dead
        await a.abandon()                             # a crashes: no keep-alive, no release
        await b.claim("op1", wait_s=5)
        await b.save("op1", {"state": "replicating", "rounds": 2})
        with pytest.raises(FencedError):              # the stale holder comes back: refused
            await a_store.fenced_put(fence_a, a.key("op1"), b"{}")
        rec = await a.load("op1")
        assert rec is not None and rec["rounds"] == 2 and rec["holder"] == "mgr-b"
        assert [r["holder"] for r in await b.list()] == ["mgr-b"]
        await b.release("op1")
        assert await b_store.holder("xcloud/op1") is None


async def test_save_without_a_claim_and_bad_ids_are_refused(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "j.db") as st:
        j = OperationJournal(st, "mgr", ttl=2)
        with pytest.raises(CrossCloudInputError, match="not claimed"):
            await j.save("op1", {})
        for bad in ("", "Op1", "a/b", "-x", "x" * 64, 7):
            with pytest.raises(CrossCloudInputError):
                check_op_id(bad)
        assert await j.load("nothing") is None
