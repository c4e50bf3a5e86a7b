"""JSON control channel of the shim (unix socket, mode 0600): one JSON object per line each way.

Request ``{"cmd": NAME, ...args}``; answer ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. Commands: ``ping``, ``stats``, ``reset_stats``,
``prefetch {budget_bytes, wait?, skip_recent_pages?}``, ``wait_prefetch``, ``drop_cache``, ``checkpoint``,
``restore {state}``, ``shutdown``. Every command but ping/shutdown takes an optional ``export``.

Device state (format version 2, :mod:`.checkpoint`; binary, so not inside the JSON):
``checkpoint_bin {since?, index_only?}`` answers the JSON line ``{"ok": true, "result": {"length": N,
...}}`` followed by N bytes of checkpoint; ``restore_bin {length, final?, refill?}`` is followed by
``length`` bytes of checkpoint (at most :data:`MAX_CHECKPOINT_FACTOR` x the export size + 16 MiB,
else refused before anything is read into memory beyond that); ``state_size {since?}``;
``quiesce``, ``resume``, ``stop_tracking``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .checkpoint import decode, encode
from .devstate import DeviceState
from .errors import ControlError, ShimConfigError, ShimError
from .export import Export
from .sockets import prepare_socket_path, secure_socket


class _Server(Protocol):
    def stats(self) -> dict[str, Any]: ...


class ControlTarget(Protocol):
    """What the control server steers (the shim daemon)."""
    @property
    def exports(self) -> Sequence[Export]: ...

    @property
    def server(self) -> _Server: ...

    def export(self, name: str | None) -> Export: ...

    def device(self, name: str | None) -> DeviceState: ...

    def request_stop(self) -> None: ...

log = logging.getLogger(__name__)
MAX_LINE = 64 * 1024 * 1024  # a checkpoint of a large swap disk is a long line
MAX_CHECKPOINT_FACTOR = 1.01  # a checkpoint holds at most the whole export in its cache, plus its index
_BIN = frozenset({"checkpoint_bin", "restore_bin"})


class ControlServer:
    def __init__(self, path: str | os.PathLike[str], daemon: ControlTarget) -> None:
        self.path = Path(path)
        self.daemon = daemon
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        path = prepare_socket_path(self.path)
        self._server = await asyncio.start_unix_server(self._client, str(path), limit=MAX_LINE)
        secure_socket(path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while line := await reader.readline():
                answer, payload = await self._answer_any(line, reader)
                writer.write(json.dumps(answer).encode() + b"\n")
                if payload is not None:
                    writer.write(payload)
                await writer.drain()
                if answer.get("drop"):
                    break   # a payload of unknown length may follow: the stream cannot be trusted
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.info("control client dropped: %s", exc)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _answer_any(self, line: bytes, reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes | None]:
        try:
            req = json.loads(line)
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"invalid JSON: {exc}"}, None
        if not isinstance(req, dict) or req.get("cmd") not in _BIN:
            return await self._answer(line), None
        try:
            return await self._binary(req, reader)
        except ShimError as exc:
            return {"ok": False, "error": str(exc)}, None
        except (TypeError, ValueError, KeyError) as exc:
            return {"ok": False, "error": f"bad arguments: {exc!r}"}, None

    async def _binary(self, req: dict[str, Any], reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes | None]:
        export = self.daemon.export(req.get("export"))
        dev = self.daemon.device(req.get("export"))
        if req["cmd"] == "checkpoint_bin":
            since = req.get("since")
            if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
                raise ShimConfigError(f"since must be an integer >= 0, got {since!r}")
            ck = dev.capture(since, index_only=bool(req.get("index_only")))
            data = encode(ck)
            return {"ok": True, "result": {"length": len(data), "quiesced": dev.quiesced, **ck.summary()}}, data
        length = req.get("length")
        limit = int(export.size * MAX_CHECKPOINT_FACTOR) + (16 << 20)
        if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= limit:
            # the payload cannot be skipped safely: answer, then drop the connection
            return {"ok": False, "drop": True,
                    "error": f"restore_bin: length must be within 1..{limit} bytes, got {length!r}"}, None
        data = await reader.readexactly(length)
        ck = decode(data, max_bytes=limit)
        result = await dev.apply(ck, final=bool(req.get("final")), refill=bool(req.get("refill")))
        return {"ok": True, "result": result}, None

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ShimConfigError('a request must be a JSON object with a string "cmd"')
            return {"ok": True, "result": await self.dispatch(req)}
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"invalid JSON: {exc}"}
        except ShimError as exc:
            return {"ok": False, "error": str(exc)}
        except (TypeError, ValueError, KeyError) as exc:
            return {"ok": False, "error": f"bad arguments: {exc!r}"}

    async def dispatch(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        d = self.daemon
        if cmd == "ping":
            return {"pid": os.getpid(), "exports": [e.name for e in d.exports]}
        if cmd == "shutdown":
            asyncio.get_running_loop().call_soon(d.request_stop)
            return {}
        export = d.export(req.get("export"))
        if cmd == "stats":
            return {**export.stats(), "server": d.server.stats()}
        if cmd == "reset_stats":
            export.reset_stats()
            return {}
        if cmd == "prefetch":
            if "budget_bytes" not in req:
                raise ShimConfigError("prefetch needs budget_bytes")
            result = await export.prefetch(req["budget_bytes"], req.get("skip_recent_pages", 0))
            if req.get("wait"):
                await export.wait_prefetch()
            return result
        if cmd == "wait_prefetch":
            await export.wait_prefetch()
            return export.stats()
        if cmd == "drop_cache":
            await export.drop_cache()
            return {}
        if cmd == "checkpoint":
            return export.checkpoint()
        if cmd == "restore":
            await export.restore(req["state"])
            return {}
        dev = d.device(req.get("export"))
        if cmd == "state_size":
            since = req.get("since")
            if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
                raise ShimConfigError(f"since must be an integer >= 0, got {since!r}")
            return {"bytes": dev.state_size(since), "seq": dev.seq, "chain": dev.chain}
        if cmd == "quiesce":
            return await dev.quiesce()
        if cmd == "resume":
            await dev.resume()
            return {}
        if cmd == "stop_tracking":
            dev.stop_tracking()
            return {}
        raise ShimConfigError(f"unknown control command {cmd!r}")


class ShimControlClient:
    """Async client of the control socket: one short connection per call."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    async def call(self, cmd: str, **args: Any) -> Any:
        req = {"cmd": cmd, **{k: v for k, v in args.items() if v is not None}}
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
                try:
                    writer.write(json.dumps(req).encode() + b"\n")
                    await writer.drain()
                    line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            raise ControlError(f"control call {cmd!r} on {self.path} failed: {exc!r}") from exc
        if not line:
            raise ControlError(f"shim closed the control socket {self.path} without answering {cmd!r}")
        try:
            answer = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ControlError(f"shim answered {cmd!r} with invalid JSON") from exc
        if not answer.get("ok"):
            raise ControlError(f"shim refused {cmd!r}: {answer.get('error')}")
        return answer.get("result")

    async def call_bin(self, cmd: str, payload: bytes | None = None, *, timeout: float = 120.0,
                       **args: Any) -> tuple[Any, bytes | None]:
        """A device-state command: ``payload`` is sent after the request line (restore_bin); an
        answer with a ``length`` is followed by that many bytes (checkpoint_bin)."""
        req = {"cmd": cmd, **{k: v for k, v in args.items() if v is not None}}
        if payload is not None:
            req["length"] = len(payload)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
                try:
                    writer.write(json.dumps(req).encode() + b"\n")
                    if payload is not None:
                        writer.write(payload)
                    await writer.drain()
                    line = await reader.readline()
                    answer = json.loads(line) if line else None
                    data = None
                    if isinstance(answer, dict) and answer.get("ok") and cmd == "checkpoint_bin":
                        n = int(answer["result"]["length"])
                        data = await reader.readexactly(n)
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise ControlError(f"control call {cmd!r} on {self.path} failed: {exc!r}") from exc
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ControlError(f"shim answered {cmd!r} with an invalid reply: {exc!r}") from exc
        if not answer:
            raise ControlError(f"shim closed the control socket {self.path} without answering {cmd!r}")
        if not answer.get("ok"):
            raise ControlError(f"shim refused {cmd!r}: {answer.get('error')}")
        return answer.get("result"), data

    async def ping(self) -> dict[str, Any]:
        return await self.call("ping")

    async def stats(self, export: str | None = None) -> dict[str, Any]:
        return await self.call("stats", export=export)

    async def reset_stats(self, export: str | None = None) -> None:
        await self.call("reset_stats", export=export)

    async def prefetch(self, budget_bytes: int, *, wait: bool = False, export: str | None = None,
                       skip_recent_pages: int | None = None) -> dict[str, Any]:
        return await self.call("prefetch", budget_bytes=budget_bytes, wait=wait or None, export=export,
                               skip_recent_pages=skip_recent_pages)

    async def wait_prefetch(self, export: str | None = None) -> dict[str, Any]:
        return await self.call("wait_prefetch", export=export)

    async def drop_cache(self, export: str | None = None) -> None:
        await self.call("drop_cache", export=export)

    async def checkpoint(self, export: str | None = None) -> dict[str, Any]:
        return await self.call("checkpoint", export=export)

    async def restore(self, state: dict[str, Any], export: str | None = None) -> None:
        await self.call("restore", state=state, export=export)

    async def shutdown(self) -> None:
        await self.call("shutdown")
