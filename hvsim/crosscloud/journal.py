"""The durable record of cross-cloud migrations: one key per operation in the control plane's
store (:class:`hvsim.control.store.Store`: SQLite embedded, or etcd), written at every state
change, every round and every cutover step, so that an orchestrator started after a crash (the
manager's restart) can pick the operation up where it was (:meth:`CrossCloudMigration.resume
<hvsim.crosscloud.orchestrator.CrossCloudMigration.resume>`).

One orchestrator drives one operation at a time: it holds the operation's named lease
(``/_lease/xcloud/<id>``, kept alive every TTL/3) and every write of the record is fenced by it
(:meth:`Store.fenced_put`). An orchestrator that crashed stops renewing; its lease expires after the
TTL and only then can another take the operation over. A stale orchestrator that comes back cannot
write any more (:class:`~hvsim.control.errors.FencedError`): no two orchestrators of one migration.

Credentials are never stored: the resuming orchestrator is given them again (as a tool reads its
configuration again after a restart).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from hvbase.aio import run_to_completion
from ..control.store import Fence, KeptLease, Store
from .errors import CrossCloudInputError, OperationBusyError

log = logging.getLogger("hvsim.crosscloud.journal")

PREFIX = "/xcloud/ops/"
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RECORD_VERSION = 1


def check_op_id(op_id: object) -> str:
    if not isinstance(op_id, str) or not _ID_RE.match(op_id):
        raise CrossCloudInputError(f"operation id {op_id!r}: 1-63 characters, lowercase letters, digits and '-', "
                                   "starting with a letter or digit")
    return op_id


class OperationJournal:
    """Records of cross-cloud operations in ``store``; ``holder`` names this orchestrator."""

    def __init__(self, store: Store, holder: str, *, ttl: float = 5.0) -> None:
        self.store = store
        self.holder = holder
        self.ttl = ttl
        self._kept: dict[str, KeptLease] = {}
        self._fences: dict[str, Fence] = {}

    def key(self, op_id: str) -> str:
        return PREFIX + check_op_id(op_id)

    async def claim(self, op_id: str, *, wait_s: float = 0.0) -> Fence:
        """Take the operation's lease; waits up to ``wait_s`` for a crashed holder's lease to
        expire. :class:`OperationBusyError` (naming the holder) if it is still held then."""
        check_op_id(op_id)
        if op_id in self._fences:
            return self._fences[op_id]
        deadline = time.monotonic() + wait_s
        kept = await self.store.keep(self.ttl)
        try:
            while True:
                fence = await self.store.acquire(f"xcloud/{op_id}", self.holder, kept.lease)
                if fence is not None:
                    break
                if time.monotonic() >= deadline:
                    held = await self.store.holder(f"xcloud/{op_id}")
                    raise OperationBusyError(
                        f"cross-cloud operation {op_id!r} is driven by {held[0] if held else 'someone'!r} "
                        f"(token {held[1] if held else '?'}); its lease has not expired"
                        + (f" within {wait_s:g} s" if wait_s else ""))
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        except BaseException:
            await run_to_completion(kept.stop())
            raise
        self._kept[op_id] = kept
        self._fences[op_id] = fence
        log.info("operation %s claimed by %s (token %d)", op_id, self.holder, fence.token)
        return fence

    def holds(self, op_id: str) -> bool:
        kept = self._kept.get(op_id)
        return kept is not None and kept.valid()

    async def save(self, op_id: str, record: dict[str, Any]) -> int:
        """Write the record under the operation's fence (FencedError if another took it over)."""
        fence = self._fences.get(op_id)
        if fence is None:
            raise CrossCloudInputError(f"operation {op_id!r} is not claimed by {self.holder!r}")
        body = json.dumps({**record, "version": RECORD_VERSION, "holder": self.holder, "token": fence.token,
                           "saved_at": time.time()}, default=str).encode()
        return await self.store.fenced_put(fence, self.key(op_id), body)

    async def load(self, op_id: str) -> dict[str, Any] | None:
        kv = await self.store.get(self.key(op_id))
        if kv is None:
            return None
        rec = json.loads(kv.value)
        if not isinstance(rec, dict) or rec.get("version") != RECORD_VERSION:
            raise CrossCloudInputError(f"operation {op_id!r}: record of unknown version {rec.get('version')!r}"
                                       if isinstance(rec, dict) else f"operation {op_id!r}: malformed record")
        return rec

    async def list(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = await self.store.list(PREFIX, limit=100, after=after)
            out.extend(json.loads(kv.value) for kv in page.items)
            if page.after is None:
                return out
            after = page.after

    async def release(self, op_id: str) -> None:
        """Give the operation up (its record stays)."""
        fence = self._fences.pop(op_id, None)
        kept = self._kept.pop(op_id, None)
        if fence is not None:
            await self.store.release(fence)
        if kept is not None:
            await kept.stop()

    async def abandon(self) -> None:
        """What a crash leaves: the keep-alives stop, nothing is released or revoked (the leases
        run out on their own after the TTL). For the tests of a manager restart."""
        for kept in self._kept.values():
            await kept.stop(revoke=False)
        self._kept.clear()
        self._fences.clear()

    async def close(self) -> None:
        for op_id in list(self._fences):
            await self.release(op_id)
