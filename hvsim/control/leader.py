"""The leader record: how clients (and a failover controller) find the manager that leads.

While a manager leads it keeps ``/ctl/leader`` =
``LeaderInfo{manager, address, token, datacenter, since}`` (JSON) in the store, **put under its
manager lease and fenced** (:meth:`Store.fenced_txn`): it is written only while the lease key is
held with that token, and it vanishes with the lease (expiry, revoke), in the same store revision
as the lease key. So a record that exists names the current holder, never one whose lease ended;
between a lease's end and the next leader's first write there is no record (``find_leader``
answers ``None``: try again).

    info = await find_leader(store)          # LeaderInfo | None
    async with ManagerClient.from_store(store, token=..., tls=...) as c: ...
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ControlInputError, StoreError
from .store import Fence, Put, Store

LEADER_KEY = "/ctl/leader"
MAX_ADDRESS = 300


def check_advertise(address: object) -> str:
    """An address clients may dial: ``unix:/PATH`` or ``http(s)://HOST:PORT``."""
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS:
        raise ControlInputError("advertise", f"must be a string of 1..{MAX_ADDRESS} characters")
    if address.startswith("unix:/"):
        return address
    if address.startswith(("https://", "http://")):
        host, _, port = address.split("://", 1)[1].rstrip("/").rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return address.rstrip("/")
    raise ControlInputError("advertise", f"{address[:60]!r}: give unix:/PATH or https://IP:PORT")


@dataclass(frozen=True)
class LeaderInfo:
    manager: str           # the manager's name (its identity in the lease)
    address: str           # what clients dial: unix:/PATH or https://IP:PORT
    token: int             # its fencing token (the lease key's create revision)
    datacenter: str
    since: float           # wall clock when it took the lease

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def brief(self) -> dict[str, Any]:
        """What a 503 "not leader" body carries."""
        return {"manager": self.manager, "address": self.address, "token": self.token,
                "datacenter": self.datacenter}

    @classmethod
    def parse(cls, raw: bytes | str | dict[str, Any]) -> LeaderInfo:
        """A leader record, validated (it comes from the store, or from another process)."""
        try:
            d = json.loads(raw) if isinstance(raw, bytes | str) else raw
        except ValueError as e:
            raise ControlInputError("leader", f"not JSON: {e}") from e
        if not isinstance(d, dict):
            raise ControlInputError("leader", "must be an object")
        manager, token, dc, since = d.get("manager"), d.get("token"), d.get("datacenter", ""), d.get("since", 0.0)
        if not isinstance(manager, str) or not 0 < len(manager) <= 200:
            raise ControlInputError("leader.manager", "must be a string of 1..200 characters")
        if not isinstance(token, int) or isinstance(token, bool) or token <= 0:
            raise ControlInputError("leader.token", f"must be a positive integer, got {token!r}")
        if not isinstance(dc, str) or len(dc) > 64:
            raise ControlInputError("leader.datacenter", "must be a string of at most 64 characters")
        if not isinstance(since, int | float) or isinstance(since, bool):
            raise ControlInputError("leader.since", "must be a number")
        return cls(manager=manager, address=check_advertise(d.get("address")), token=token, datacenter=dc,
                   since=float(since))


async def publish_leader(store: Store, fence: Fence, *, address: str, datacenter: str) -> LeaderInfo:
    """Write the leader record for the holder of ``fence`` (fenced, under its lease). Raises
    :class:`~hvsim.control.errors.FencedError` if the fence is no longer held."""
    info = LeaderInfo(manager=fence.holder, address=check_advertise(address), token=fence.token,
                      datacenter=datacenter, since=fence.since or time.time())
    await store.fenced_txn(fence, (), [Put(LEADER_KEY, info.to_json(), lease=fence.lease.id)])
    return info


async def find_leader(store: Store) -> LeaderInfo | None:
    """The manager that leads now, from the store; ``None`` if none does (or none wrote its record
    yet). A record that does not parse is a :class:`StoreError` (never guessed around)."""
    kv = await store.get(LEADER_KEY)
    if kv is None:
        return None
    try:
        return LeaderInfo.parse(kv.value)
    except ControlInputError as e:
        raise StoreError(f"leader record {LEADER_KEY} is malformed: {e}") from e
