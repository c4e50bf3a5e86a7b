"""GuestProcess.wait_line over a bounded tail: a line that arrives after the tail is full is still
seen (the writer keeps 50 lines; its STOP came after hundreds of ACKs and was missed, so the cross-cloud
revert test failed now and then: "writer ended before the expected output", STOP last in its tail)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hvsim.core.agent import Chunk, ExecResult
from hvsim.core.errors import AgentError
from hvsim.crosscloud.guestproc import GuestProcess


class ScriptedStream:
    """A guest command's stream played from a script: every line of ``before`` at once, then each
    line of ``after`` once ``go`` is set (the command is still running in between)."""

    def __init__(self, before: list[str], after: list[str], go: asyncio.Event) -> None:
        self.before, self.after, self.go = before, after, go
        self.result: ExecResult | None = None

    async def __aenter__(self) -> ScriptedStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.result = ExecResult("hvsim-writer", 0, "", "")

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        for line in self.before:
            yield Chunk(1, f"{line}\n".encode())
        await self.go.wait()
        for line in self.after:
            await asyncio.sleep(0)
            yield Chunk(1, f"{line}\n".encode())


class ScriptedProvider:
    def __init__(self, stream: ScriptedStream) -> None:
        self.stream = stream

    def exec_stream(self, name: str, command: str, timeout: float | None = None) -> ScriptedStream:
        return self.stream


async def test_a_line_after_the_tail_filled_up_is_seen() -> None:
    go = asyncio.Event()
    acks = [f"ACK {i} 0" for i in range(1, 61)]
    stream = ScriptedStream(acks, ["ACK 61 0", "STOP 61"], go)
    proc = GuestProcess(ScriptedProvider(stream), "vm", "hvsim-writer", "writer", tail=50).start()  # type: ignore[arg-type]
    while proc.kept < 60:
        await asyncio.sleep(0)
    assert len(proc.lines) == 50 and proc.running           # the tail is full, the command still runs
    waiter = asyncio.create_task(proc.wait_line(lambda s: s.startswith("STOP"), 10))
    await asyncio.sleep(0.05)                                # it has looked at the full tail once
    go.set()
    assert await waiter == "STOP 61"
    await proc.wait(10)
    assert proc.exit_code == 0


async def test_a_line_already_in_the_tail_is_found_and_an_old_dropped_one_is_not() -> None:
    go = asyncio.Event()
    stream = ScriptedStream(["READY"] + [f"ACK {i} 0" for i in range(1, 60)], [], go)
    proc = GuestProcess(ScriptedProvider(stream), "vm", "hvsim-writer", "writer", tail=50).start()  # type: ignore[arg-type]
    while proc.kept < 60:
        await asyncio.sleep(0)
    assert await proc.wait_line(lambda s: s == "ACK 59 0", 1) == "ACK 59 0"
    go.set()
    await proc.wait(10)
    with pytest.raises(AgentError, match="ended"):      # dropped from the tail before the wait began
        await proc.wait_line(lambda s: s == "READY", 1)
