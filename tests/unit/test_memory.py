"""hvsim.memory without QEMU: the state machine, input checks, and the balloon protocol against a
fake QMP session whose guest gives memory up (or gets stuck) step by step."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from hvbase.fsm import StateMachine
from hvsim import memory as M
from hvsim.core.agent import ExecResult
from hvsim.core.errors import SpecError
from hvsim.core.lifecycle import VMState
from hvsim.core.model import VMSpec

MIB = 1024 * 1024
FULL_TOTAL = 210 * MIB  # what a 256 MiB guest reports as its total memory


class FakeQMP:
    """Balloon of a guest that moves ``step`` MiB per query towards the target, down to ``floor_mib``."""

    def __init__(self, full_mib: int, step_mib: int = 32, floor_mib: int = 0, stats: bool = True) -> None:
        self.full = full_mib * MIB
        self.actual = self.full
        self.target = self.full
        self.step = step_mib * MIB
        self.floor = floor_mib * MIB
        self.stats = stats
        self.calls: list[tuple[str, Any]] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        self.calls.append((cmd, args))
        if cmd == "balloon":
            self.target = args["value"]  # type: ignore[index]
            return {}
        if cmd == "query-balloon":
            if self.actual > self.target:
                self.actual = max(self.target, self.actual - self.step, self.floor)
            elif self.actual < self.target:
                self.actual = min(self.target, self.actual + self.step)
            return {"actual": self.actual}
        if cmd == "qom-set":
            return {}
        if cmd == "qom-get":
            if not self.stats:
                return {"stats": {"stat-total-memory": -1}, "last-update": 0}
            return {"stats": {"stat-total-memory": FULL_TOTAL - (self.full - self.actual)}, "last-update": 1}
        raise AssertionError(f"unexpected QMP {cmd}")


class FakeControl:
    def __init__(self) -> None:
        self.budgets: list[int] = []
        self.skips: list[int | None] = []

    async def prefetch(self, budget_bytes: int, *, wait: bool = False,
                       skip_recent_pages: int | None = None) -> dict[str, Any]:
        self.budgets.append(budget_bytes)
        self.skips.append(skip_recent_pages)
        return {"budget_bytes": budget_bytes, "planned_pages": 7}


@dataclass
class FakeShim:
    """Implements the core's SwapBackend as the shim component does (passes 0 as None)."""
    control: FakeControl = field(default_factory=FakeControl)
    id: str = "shim:swap"

    async def prefetch(self, budget_bytes: int, skip_recent_pages: int = 0) -> dict[str, Any]:
        return await self.control.prefetch(budget_bytes, skip_recent_pages=skip_recent_pages or None)


class FakeVM:
    def __init__(self, qmp: FakeQMP, memory_mib: int = 256, balloon: bool = True) -> None:
        self.spec = VMSpec("fake", memory_mib=memory_mib, balloon=balloon)
        self.name = "fake"
        self.state = VMState.RUNNING
        self.generation = 1
        self.qmp = qmp
        self.shim = FakeShim()
        self.components: dict[str, Any] = {self.shim.id: self.shim}
        self.extensions: dict[str, Any] = {}
        self.commands: list[str] = []

    def extension(self, key: str, factory: Any) -> Any:
        if key not in self.extensions:
            self.extensions[key] = factory(self)
        return self.extensions[key]

    async def exec(self, command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        self.commands.append(command)
        out = ("Filename\tType\tSize\tUsed\tPriority\n/dev/vda partition 393212 81920 -2\n"
               "pswpin 12\npswpout 20480\nSwapCached:         4096 kB\n")
        return ExecResult(command, 0, out, "")


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "POLL_S", 0.001)


def test_transition_table() -> None:
    S = M.MemoryState

    def at(state: M.MemoryState) -> StateMachine[M.MemoryState]:
        return StateMachine("memory of vm 'v'", state, M.TRANSITIONS, error=M.MemoryStateError)
    for old, new in [(S.FULL, S.CONSOLIDATING), (S.CONSOLIDATED, S.RESTORING), (S.CONSOLIDATED, S.CONSOLIDATING)]:
        m = at(old)
        m.set(new)
        assert m.state is new
    for old, new in [(S.FULL, S.RESTORING), (S.FULL, S.CONSOLIDATED), (S.CONSOLIDATING, S.RESTORING),
                     (S.RESTORING, S.CONSOLIDATING), (S.CONSOLIDATED, S.FULL)]:
        m = at(old)
        with pytest.raises(M.MemoryStateError, match=f"{old.value} -> {new.value}"):
            m.set(new)
        assert m.state is old


async def test_consolidate_then_restore_tells_the_shims_the_budget() -> None:
    vm = FakeVM(FakeQMP(256))
    res = await M.consolidate_memory(vm, 128)  # type: ignore[arg-type]
    assert M.memory_state(vm) is M.MemoryState.CONSOLIDATED  # type: ignore[arg-type]
    assert res.reached_mib == 128 and res.target_mib == 128
    assert res.guest_total_mib == pytest.approx((FULL_TOTAL - 128 * MIB) / MIB)
    assert res.swapped_bytes == 81920 * 1024 and res.pswpout == 20480
    assert ("balloon", {"value": 128 * MIB}) in vm.qmp.calls
    assert any(c == "qom-set" and a["property"] == "guest-stats-polling-interval" for c, a in vm.qmp.calls)
    deeper = await M.consolidate_memory(vm, 96)  # type: ignore[arg-type]
    assert deeper.reached_mib == 96
    rest = await M.restore_memory(vm)  # type: ignore[arg-type]
    assert M.memory_state(vm) is M.MemoryState.FULL  # type: ignore[arg-type]
    assert rest.reached_mib == 256 and rest.budget_bytes == 160 * MIB
    assert vm.shim.control.budgets == [160 * MIB]
    assert vm.shim.control.skips == [1024]  # SwapCached 4096 kB: the guest holds 1024 swapped pages
    assert rest.prefetch == {"shim:swap": {"budget_bytes": 160 * MIB, "planned_pages": 7}}


async def test_restore_without_prefetch_leaves_the_shims_alone() -> None:
    vm = FakeVM(FakeQMP(256))
    await M.consolidate_memory(vm, 200)  # type: ignore[arg-type]
    rest = await M.restore_memory(vm, prefetch=False)  # type: ignore[arg-type]
    assert rest.budget_bytes == 0 and vm.shim.control.budgets == []
    await M.consolidate_memory(vm, 200)  # type: ignore[arg-type]
    await M.restore_memory(vm, swap_cache_hint=False)  # type: ignore[arg-type]
    assert vm.shim.control.skips == [None]


async def test_bad_requests_are_refused_with_the_reason() -> None:
    vm = FakeVM(FakeQMP(256))
    with pytest.raises(M.MemoryStateError, match="not consolidated"):
        await M.restore_memory(vm)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="not below its current memory"):
        await M.consolidate_memory(vm, 300)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="not below"):
        await M.consolidate_memory(vm, 256)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="minimum"):
        await M.consolidate_memory(vm, 4)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="integer"):
        await M.consolidate_memory(vm, 100.5)  # type: ignore[arg-type]
    assert M.memory_state(vm) is M.MemoryState.FULL  # type: ignore[arg-type]
    assert not any(c == "balloon" for c, _ in vm.qmp.calls)

    no_balloon = FakeVM(FakeQMP(256), balloon=False)
    with pytest.raises(M.BalloonUnavailable, match="no balloon"):
        await M.consolidate_memory(no_balloon, 128)  # type: ignore[arg-type]
    paused = FakeVM(FakeQMP(256))
    paused.state = VMState.PAUSED
    with pytest.raises(M.MemoryStateError, match="paused"):
        await M.consolidate_memory(paused, 128)  # type: ignore[arg-type]


async def test_stuck_guest_times_out_naming_how_far_it_got_and_can_be_restored() -> None:
    vm = FakeVM(FakeQMP(256, floor_mib=192))
    with pytest.raises(M.MemoryTimeoutError, match="from 256 to 192 MiB") as ei:
        await M.consolidate_memory(vm, 64, timeout=0.2)  # type: ignore[arg-type]
    assert "64 MiB" in str(ei.value)
    assert M.memory_state(vm) is M.MemoryState.CONSOLIDATED  # type: ignore[arg-type]
    rest = await M.restore_memory(vm)  # type: ignore[arg-type]
    assert rest.budget_bytes == 64 * MIB  # what was really given back, not what was asked
    assert M.memory_state(vm) is M.MemoryState.FULL  # type: ignore[arg-type]


async def test_guest_without_balloon_stats_is_reported() -> None:
    vm = FakeVM(FakeQMP(256, stats=False))
    with pytest.raises(M.BalloonUnavailable, match="never reported"):
        await M.consolidate_memory(vm, 128, timeout=0.1)  # type: ignore[arg-type]
    assert M.memory_state(vm) is M.MemoryState.FULL  # type: ignore[arg-type]


async def test_concurrent_operations_are_refused() -> None:
    vm = FakeVM(FakeQMP(256, step_mib=1))
    first = asyncio.ensure_future(M.consolidate_memory(vm, 128))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert M.memory_state(vm) is M.MemoryState.CONSOLIDATING  # type: ignore[arg-type]
    with pytest.raises(M.MemoryStateError):
        await M.restore_memory(vm)  # type: ignore[arg-type]
    with pytest.raises(M.MemoryStateError, match="consolidating now"):
        await M.consolidate_memory(vm, 120)  # type: ignore[arg-type]
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert M.memory_state(vm) is M.MemoryState.CONSOLIDATED  # type: ignore[arg-type]


async def test_new_qemu_instance_resets_the_state_from_its_balloon() -> None:
    vm = FakeVM(FakeQMP(256))
    await M.consolidate_memory(vm, 128)  # type: ignore[arg-type]
    vm.qmp = FakeQMP(256)  # restarted: a fresh, empty balloon
    vm.generation += 1
    with pytest.raises(M.MemoryStateError, match="not consolidated"):
        await M.restore_memory(vm)  # type: ignore[arg-type]
    assert M.memory_state(vm) is M.MemoryState.FULL  # type: ignore[arg-type]


def test_page_cluster_is_validated() -> None:
    with pytest.raises(SpecError, match="page_cluster"):
        asyncio.run(M.setup_guest_swap(FakeVM(FakeQMP(256)), page_cluster=11))  # type: ignore[arg-type]
