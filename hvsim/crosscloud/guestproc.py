"""A long-running guest program driven through the guest agent's streamed exec: its stdout lines
arrive with the host's receive time, are kept (a bounded tail) and handed to a callback; the exit
code is kept. Used for the migration agents and the writer application."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from hvbase.aio import wait_for
from ..core.errors import AgentError
from .provider import ProviderDriver

log = logging.getLogger("hvsim.crosscloud.guest")


def fields(line: str) -> dict[str, str]:
    """``k=v`` tokens of a line (values may be quoted with ")."""
    out: dict[str, str] = {}
    key, val, quoted = "", "", False
    for tok in line.split(" "):
        if quoted:
            val += " " + tok
            if tok.endswith('"'):
                out[key] = val.strip('"')
                quoted = False
            continue
        if "=" in tok:
            key, _, val = tok.partition("=")
            if val.startswith('"') and not (val.endswith('"') and len(val) > 1):
                quoted = True
                continue
            out[key] = val.strip('"')
    return out


class GuestProcess:
    def __init__(self, provider: ProviderDriver, vm: str, command: str, name: str,
                 on_line: Callable[[str, float], None] | None = None, tail: int = 200) -> None:
        self.provider = provider
        self.vm = vm
        self.command = command
        self.name = name
        self.on_line = on_line
        self.lines: deque[str] = deque(maxlen=tail)
        self.kept = 0                  # lines ever appended to ``lines`` (the tail drops the oldest)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> GuestProcess:
        self._task = asyncio.create_task(self._run(), name=f"{self.name}@{self.vm}")
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def tail(self, n: int = 20) -> str:
        return "\n".join(list(self.lines)[-n:])

    async def _run(self) -> None:
        buf = b""
        try:
            async with self.provider.exec_stream(self.vm, self.command, timeout=None) as stream:
                async for chunk in stream:
                    if chunk.fd != 1:
                        self._keep(chunk.data.decode(errors="replace").rstrip())
                        continue
                    buf += chunk.data
                    *done, buf = buf.split(b"\n")
                    t = time.monotonic()
                    for raw in done:
                        line = raw.decode(errors="replace")
                        self._keep(line)
                        if self.on_line is not None:
                            self.on_line(line, t)
                    self.changed.set()
            self.exit_code = stream.result.exit_code if stream.result else None
        except (AgentError, OSError) as exc:
            self.error = exc
        finally:
            self.changed.set()
            log.info("%s on %s ended: exit %s %s", self.name, self.vm, self.exit_code, self.error or "")

    def _keep(self, line: str) -> None:
        self.lines.append(line)
        self.kept += 1

    async def wait(self, timeout: float | None = None) -> int | None:
        if self._task is not None:
            await wait_for(asyncio.shield(self._task), timeout)
        return self.exit_code

    async def wait_line(self, pred: Callable[[str], bool], timeout: float) -> str:
        """The first kept line (from now on, or already in the tail) for which ``pred`` holds."""
        deadline = time.monotonic() + timeout
        seen = self.kept - len(self.lines)      # counted over every line kept, not over the bounded tail
        while True:
            lines, kept = list(self.lines), self.kept
            for line in lines[max(0, seen - (kept - len(lines))):]:
                if pred(line):
                    return line
            seen = kept
            if not self.running:
                raise AgentError(f"{self.name} on {self.vm} ended (exit {self.exit_code}, {self.error}) before the "
                                 f"expected output; tail:\n{self.tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"{self.name} on {self.vm}: expected output not seen in {timeout:g} s; tail:\n"
                                 f"{self.tail()}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await wait_for(self.changed.wait(), min(left, 1.0))

    async def stop(self) -> None:
        """Kill it (closing the stream kills its process group in the guest)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
