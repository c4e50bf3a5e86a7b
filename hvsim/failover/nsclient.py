"""Clients of the manager API that run *inside* a namespace of the sites (the traffic rule: the root
namespace never dials a namespace address), found through the store's leader record.

* ``writer``: writes through the API for as long as it runs (a group ``PREFIX-SEQ`` per write, then
  reads it back), following the leader across failovers, and appends every acknowledged write to a
  JSON-lines log (fsync'd) the test or benchmark checks afterwards: nothing acknowledged may be lost.
  A write whose answer was lost is retried under the same name: the manager answers 409 "exists"
  when the first attempt was applied, which is its acknowledgement.
* ``serve``: an RPC over its stdin/stdout (JSON lines, no network between the caller and it): the
  caller (a test in the root namespace) asks it to send API requests from inside the namespace.

    python -m hvsim.failover.nsclient --spec spec.json writer --log acks.jsonl --prefix w
    python -m hvsim.failover.nsclient --spec spec.json serve
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiConflictError, ApiError, ApiUnavailableError, ControlError, StoreError
from hvsim.control.leader import find_leader
from hvsim.control.pki import Issued, client_context
from hvsim.control.store import TLSFiles, make_store
from hvsim.control.store.base import Store

from .hosted import ControlSpec

log = logging.getLogger("hvsim.failover.nsclient")


class LeaderClient:
    """A manager client that finds the leader in the store and finds it again when it goes away."""

    def __init__(self, spec: ControlSpec, store: Store, name: str, timeout: float = 10.0) -> None:
        self.spec = spec
        self.store = store
        ca, cert, key = spec.api_client_tls(name)
        self._ctx = client_context(Issued(name, Path(cert), Path(key)), Path(ca))
        self._token = spec.token
        self.timeout = timeout
        self.client: ManagerClient | None = None
        self.leader: Any = None

    async def connect(self, deadline: float) -> ManagerClient:
        while True:
            try:
                info = await find_leader(self.store)
            except (StoreError, ControlError) as e:
                info = None
                log.info("find_leader: %s", e)
            if info is not None:
                if self.client is not None and self.client.address == info.address:
                    return self.client
                if self.client is not None:
                    await self.client.close()
                self.client = ManagerClient(info.address, self._token, timeout=self.timeout, ssl_context=self._ctx)
                self.leader = info
                return self.client
            if time.monotonic() > deadline:
                raise ApiUnavailableError(0, "no leader in the store")
            await asyncio.sleep(0.1)

    async def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
                      retry_for: float = 60.0) -> Any:
        """One request to the leader; an unreachable or not-leading manager: find the leader and retry
        (only use for requests that are safe to repeat)."""
        deadline = time.monotonic() + retry_for
        while True:
            c = self.client or await self.connect(deadline)
            try:
                return await c.request(method, path, json=json_body, params=params)
            except ApiUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await self.drop()
                await asyncio.sleep(0.05)
                await self.connect(deadline)

    async def drop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def close(self) -> None:
        await self.drop()


async def writer(lc: LeaderClient, log_path: Path, prefix: str, interval: float, stop: asyncio.Event) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            name = f"{prefix}-{seq:06d}"
            t0 = time.time()
            attempts = 0
            while not stop.is_set():
                attempts += 1
                try:
                    c = lc.client or await lc.connect(time.monotonic() + 3600)
                    try:
                        await c.request("POST", "/v1/groups", json={"name": name, "description": "writer"})
                    except ApiConflictError:
                        pass                         # an earlier attempt was applied: that is the ack
                    t1 = time.time()
                    got = await c.request("GET", f"/v1/groups/{name}")
                    t2 = time.time()
                    if lc.leader is None or c.address != lc.leader.address:
                        # the client followed a not-leader answer (a woken old manager names the new
                        # one): record the token of the manager that answered, not of the one dialled
                        info = await find_leader(lc.store)
                        if info is not None and info.address == c.address:
                            lc.leader = info
                    entry = {"seq": seq, "name": name, "sent": t0, "acked": t1, "read": t2,
                             "read_ok": got.get("name") == name, "attempts": attempts, "address": c.address,
                             "token": getattr(lc.leader, "token", None)}
                    os.write(fd, (json.dumps(entry) + "\n").encode())
                    os.fsync(fd)
                    break
                except ApiUnavailableError:
                    await lc.drop()
                    await asyncio.sleep(0.05)
                except ApiError as e:
                    os.write(fd, (json.dumps({"seq": seq, "name": name, "error": str(e)[:300],
                                              "at": time.time()}) + "\n").encode())
                    await lc.drop()
                    await asyncio.sleep(0.2)
            await asyncio.sleep(interval)
    finally:
        os.close(fd)


async def run_audit(store: Store, histories: dict[str, str]) -> dict[str, Any]:
    """The fencing audit over the agents' histories (host -> its state dir) and the store's journal."""
    from hvsim.control.fencing import audit_all
    out: dict[str, Any] = (await audit_all(store, histories)).summary()
    return out


async def serve(lc: LeaderClient) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    tasks: set[asyncio.Task[None]] = set()

    async def one(req: dict[str, Any]) -> None:
        rid = req.get("id")
        body: Any
        try:
            if req.get("op") == "audit":
                body = await run_audit(lc.store, req["histories"])
            elif req.get("op") == "leader":
                await lc.connect(time.monotonic() + float(req.get("timeout", 30)))
                body = lc.leader.brief() if lc.leader else None
            else:
                body = await lc.request(req["method"], req["path"], json_body=req.get("json"),
                                        params=req.get("params"), retry_for=float(req.get("retry_for", 60)))
            resp = {"id": rid, "ok": True, "body": body}
        except ApiError as e:
            resp = {"id": rid, "ok": False, "status": e.status, "error": str(e), "body": getattr(e, "body", None)}
        except Exception as e:  # an answer to the caller, not a crash of the RPC
            resp = {"id": rid, "ok": False, "status": -1, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(resp, default=str) + "\n")
        out.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        t = asyncio.create_task(one(json.loads(line)))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks, return_exceptions=True)


async def amain(a: argparse.Namespace) -> None:
    spec = ControlSpec.from_json(json.loads(Path(a.spec).read_text()))
    async with make_store(spec.store_url, tls=TLSFiles(*map(Path, spec.store_tls)), ) as store:
        # a guest's start is answered once it booted (a minute under TCG and load); a writer's
        # request is small (milliseconds; 3 s leaves room for a loaded machine): a short timeout
        # lets it move on to the new leader quickly when the manager it dialled is gone without a
        # reset (a powered-off host: its packets are dropped, no RST comes back); a retried write
        # that had been applied answers 409, taken as its acknowledgement
        lc = LeaderClient(spec, store, f"client-{a.mode}-{os.getpid()}", timeout=3.0 if a.mode == "writer" else 600.0)
        try:
            if a.mode == "writer":
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                await writer(lc, Path(a.log), a.prefix, a.interval, stop)
            else:
                await serve(lc)
        finally:
            with contextlib.suppress(Exception):
                await lc.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hvsim.failover.nsclient")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--log-level", default="WARNING")
    sub = ap.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("writer")
    w.add_argument("--log", required=True)
    w.add_argument("--prefix", default="w")
    w.add_argument("--interval", type=float, default=0.05)
    sub.add_parser("serve")
    a = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.WARNING), stream=sys.stderr)
    asyncio.run(amain(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
