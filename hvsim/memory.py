"""Memory consolidation with the virtio-balloon, and restore with swap prefetch.

``await vm.consolidate_memory(target_mib)`` inflates the balloon (QMP ``balloon``) and waits until
the guest has really given the memory up: the balloon's ``actual`` size reached the target *and*
the guest's own statistics (``guest-stats`` of ``balloon0``, polled every second once we turn
polling on) show its total memory down by the same amount. Pages the guest cannot keep go to its
swap disk, which hvsim serves through the NBD shim (``hvsim.shim``), recording where they land.

``await vm.restore_memory()`` tells every shim of the VM the budget (the bytes of memory given
back) so it prefetches the recorded swap pages into its cache, then deflates the balloon and waits
until the guest sees its full memory again.

Per VM, the state is explicit (:class:`MemoryState`)::

    FULL --consolidate--> CONSOLIDATING --> CONSOLIDATED --restore--> RESTORING --> FULL
                               |                 |  ^                     |
                               |                 +--+ consolidate deeper  |
                               +-- failure: CONSOLIDATED (partial) or FULL  +-- failure: CONSOLIDATED

Anything else (restore while FULL, a second operation while one runs) raises
:class:`MemoryStateError`. A new QEMU instance (restart) resets the state from the balloon.

The prefetch goes to every component of the VM that implements the core's
:class:`~hvsim.core.components.SwapBackend` protocol (the swap shim does); this module knows no driver.
The controller is per-VM state owned by the VM (``vm.extension("memory", ...)``), serialisable.

Guest-side helpers (through the agent) live in :mod:`hvsim.guest.swap` and are re-exported here:
:func:`setup_guest_swap` (find the disk by its virtio serial, mkswap, swapon, set ``vm.page-cluster``),
:func:`guest_swap_stats`, :func:`guest_swap_back`.

Errors::

    HvsimError
     +-- IllegalTransitionError
     |    +-- MemoryStateError          illegal memory-state transition
     +-- VMError
          +-- MemoryOpError             a consolidation or restore failed
               +-- BalloonUnavailable   VM without a balloon, or the guest driver is not active
               +-- MemoryTimeoutError   the guest did not get there in time (says how far it got)
          +-- GuestSwapError            guest swap setup or query failed (hvsim.guest.swap)
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from hvbase.errors import HvsimError
from hvbase.fsm import StateMachine
from qmp_bridge.errors import QEMUBridgeError

from .core.components import SwapBackend
from .core.errors import IllegalTransitionError, SpecError, VMError
from .core.lifecycle import VMState
from .core.vm import VM
from .guest.swap import (GuestSwap, GuestSwapError, find_guest_disk, guest_swap_back, guest_swap_stats,
                         setup_guest_swap)

__all__ = ["MemoryState", "MemoryResult", "MemoryController", "MemoryOpError", "BalloonUnavailable",
           "MemoryTimeoutError", "MemoryStateError", "GuestSwapError", "GuestSwap", "memory_controller",
           "memory_state", "consolidate_memory", "restore_memory", "prefetch_swap", "find_guest_disk",
           "setup_guest_swap", "guest_swap_stats", "guest_swap_back"]

log = logging.getLogger("hvsim.memory")

MIB = 1024 * 1024
PAGE = 4096
BALLOON_PATH = "/machine/peripheral/balloon0"
STATS_INTERVAL_S = 1
MIN_TARGET_MIB = 16
SLACK_MIB = 2.0          # guest-stats total may differ from the balloon by rounding
POLL_S = 0.2


class MemoryOpError(VMError):
    """A consolidation or restore failed."""


class BalloonUnavailable(MemoryOpError):
    """The VM has no balloon device, or the guest driver never activated it."""


class MemoryTimeoutError(MemoryOpError):
    """The guest did not give up (or take back) the memory in time."""


class MemoryStateError(IllegalTransitionError):
    """A memory operation that is not legal in the VM's current memory state."""


class MemoryState(enum.Enum):
    FULL = "full"
    CONSOLIDATING = "consolidating"
    CONSOLIDATED = "consolidated"
    RESTORING = "restoring"


M = MemoryState
TRANSITIONS: dict[MemoryState, frozenset[MemoryState]] = {
    M.FULL: frozenset({M.CONSOLIDATING}),
    M.CONSOLIDATING: frozenset({M.CONSOLIDATED, M.FULL}),
    M.CONSOLIDATED: frozenset({M.CONSOLIDATING, M.RESTORING}),
    M.RESTORING: frozenset({M.FULL, M.CONSOLIDATED}),
}


@dataclass(frozen=True)
class MemoryResult:
    """What a consolidation or restore achieved."""

    op: str                       # "consolidate" | "restore"
    vm: str
    full_mib: int
    target_mib: int
    reached_mib: float            # balloon "actual" at the end
    seconds: float
    guest_total_mib: float | None  # guest-stats stat-total-memory at the end
    swapped_bytes: int | None     # guest /proc/swaps "Used" at the end (None without the agent)
    pswpin: int | None            # guest /proc/vmstat counters at the end
    pswpout: int | None
    budget_bytes: int = 0         # restore: prefetch budget given to each shim
    prefetch: dict[str, Any] = field(default_factory=dict)  # restore: disk -> shim's answer

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class MemoryController:
    """Per-VM memory state and the balloon operations (one operation at a time)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.fsm = self._machine(MemoryState.FULL)
        self.generation = vm.generation
        self.target_mib: int | None = None
        self.reached_mib: float = float(vm.spec.memory_mib)
        self.guest_total_full: int | None = None  # guest-stats total (bytes) with the balloon empty

    def _machine(self, initial: MemoryState) -> StateMachine[MemoryState]:
        return StateMachine(f"memory of vm {self.vm.name!r}", initial, TRANSITIONS, error=MemoryStateError, log=log)

    @property
    def state(self) -> MemoryState:
        return self.fsm.state

    @property
    def full_mib(self) -> int:
        return self.vm.spec.memory_mib

    def _set(self, new: MemoryState, why: str) -> None:
        self.fsm.set(new, why)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "generation": self.generation, "target_mib": self.target_mib,
                "reached_mib": self.reached_mib, "guest_total_full": self.guest_total_full}

    # -- QMP helpers -----------------------------------------------------------------------------
    async def _qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.vm.qmp.execute(cmd, args)
        except QEMUBridgeError as exc:
            text = str(exc)
            if "balloon" in text.lower() and ("not" in text.lower() or "activ" in text.lower()):
                raise BalloonUnavailable(f"vm {self.vm.name!r}: {cmd} failed: {text}") from exc
            raise MemoryOpError(f"vm {self.vm.name!r}: QMP {cmd} failed: {text}") from exc

    async def _actual(self) -> int:
        return int((await self._qmp("query-balloon"))["actual"])

    async def _guest_total(self) -> int | None:
        st = await self._qmp("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
        total = (st or {}).get("stats", {}).get("stat-total-memory", -1)
        return int(total) if total is not None and total >= 0 else None

    async def _enable_stats(self) -> None:
        await self._qmp("qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval",
                                    "value": STATS_INTERVAL_S})

    # -- checks ------------------------------------------------------------------------------------
    async def _preflight(self, op: str) -> None:
        vm = self.vm
        if not vm.spec.balloon:
            raise BalloonUnavailable(f"vm {vm.name!r} has no balloon device (VMSpec.balloon=False); "
                                     f"cannot {op} memory")
        if vm.state is not VMState.RUNNING:
            raise MemoryStateError(f"cannot {op} memory of vm {vm.name!r}: it is {vm.state.value}, not running")
        if vm.generation != self.generation:  # a new QEMU instance: its balloon decides where we are
            self.generation = vm.generation
            actual = await self._actual()
            self.fsm = self._machine(MemoryState.FULL if actual >= self.full_mib * MIB else MemoryState.CONSOLIDATED)
            self.reached_mib = actual / MIB
            self.guest_total_full = None

    async def _wait(self, op: str, target_bytes: int, want_total: Any, deadline: float,
                    t0: float, start_mib: float) -> tuple[int, int | None]:
        """Poll until balloon actual == target and ``want_total(guest_total)`` holds."""
        actual, total = await self._actual(), None
        while True:
            reached = actual <= target_bytes if op == "consolidate" else actual >= target_bytes
            if reached:
                total = await self._guest_total()
                if total is not None and want_total(total):
                    return actual, total
            if time.monotonic() >= deadline:
                self.reached_mib = actual / MIB
                tot = f"{total / MIB:.0f} MiB" if total is not None else "not reported yet"
                raise MemoryTimeoutError(
                    f"vm {self.vm.name!r}: {op} to {target_bytes / MIB:.0f} MiB timed out after "
                    f"{time.monotonic() - t0:.1f}s: the balloon went from {start_mib:.0f} to "
                    f"{actual / MIB:.0f} MiB; guest total memory {tot}")
            await asyncio.sleep(POLL_S)
            actual = await self._actual()

    # -- operations --------------------------------------------------------------------------------
    async def consolidate(self, target_mib: int, timeout: float = 120.0) -> MemoryResult:
        vm = self.vm
        if isinstance(target_mib, bool) or not isinstance(target_mib, int):
            raise SpecError(f"vm {vm.name!r}: target_mib must be an integer, got {target_mib!r}")
        if timeout <= 0:
            raise SpecError(f"vm {vm.name!r}: timeout must be > 0 s, got {timeout}")
        await self._preflight("consolidate")
        if self.state in (MemoryState.CONSOLIDATING, MemoryState.RESTORING):
            raise MemoryStateError(f"cannot consolidate memory of vm {vm.name!r}: it is {self.state.value} now")
        if target_mib < MIN_TARGET_MIB:
            raise SpecError(f"vm {vm.name!r}: target {target_mib} MiB is below the minimum of {MIN_TARGET_MIB} MiB")
        if target_mib >= self.reached_mib:
            raise SpecError(f"vm {vm.name!r}: target {target_mib} MiB is not below its current memory of "
                            f"{self.reached_mib:.0f} MiB (full {self.full_mib} MiB); use restore_memory to grow")
        self._set(MemoryState.CONSOLIDATING, f"target {target_mib} MiB")
        t0 = time.monotonic()
        start_mib = self.reached_mib
        try:
            await self._enable_stats()
            if self.guest_total_full is None:
                self.guest_total_full = await self._wait_total_reported(t0 + timeout)
            given = (self.full_mib - target_mib) * MIB
            expect = self.guest_total_full - given
            target = target_mib * MIB
            await self._qmp("balloon", {"value": target})
            actual, total = await self._wait("consolidate", target, lambda t: t <= expect + SLACK_MIB * MIB,
                                             t0 + timeout, t0, start_mib)
        except BaseException as exc:
            await self._settle_after_failure("consolidate", exc)
            raise
        self.target_mib = target_mib
        self.reached_mib = actual / MIB
        self._set(MemoryState.CONSOLIDATED, f"reached {self.reached_mib:.0f} MiB")
        swap = await _swap_stats_or_none(vm)
        return MemoryResult("consolidate", vm.name, self.full_mib, target_mib, self.reached_mib,
                            time.monotonic() - t0, total / MIB if total is not None else None,
                            swap.get("swap_used_bytes"), swap.get("pswpin"), swap.get("pswpout"))

    async def _wait_total_reported(self, deadline: float) -> int:
        """The guest's total memory with the balloon empty (waits for the first stats report)."""
        while True:
            total = await self._guest_total()
            if total is not None:
                return total
            if time.monotonic() >= deadline:
                raise BalloonUnavailable(f"vm {self.vm.name!r}: the guest never reported balloon statistics "
                                         "(is the virtio_balloon driver loaded?)")
            await asyncio.sleep(POLL_S)

    async def _settle_after_failure(self, op: str, exc: BaseException) -> None:
        """After a failed/cancelled operation: CONSOLIDATED if memory is (still) given away, else FULL.

        A cancellation arriving while we ask QEMU still propagates, after the state is settled."""
        try:
            actual = await asyncio.shield(self._actual())
            self.reached_mib = actual / MIB
        except (MemoryOpError, IllegalTransitionError):
            pass  # QEMU is gone or the balloon is unusable: keep the last known size
        finally:
            new = MemoryState.FULL if self.reached_mib >= self.full_mib else MemoryState.CONSOLIDATED
            self._set(new, f"{op} failed: {type(exc).__name__}")

    async def restore(self, timeout: float = 120.0, prefetch: bool = True,
                      swap_cache_hint: bool = True) -> MemoryResult:
        vm = self.vm
        if timeout <= 0:
            raise SpecError(f"vm {vm.name!r}: timeout must be > 0 s, got {timeout}")
        await self._preflight("restore")
        if self.state is not MemoryState.CONSOLIDATED:
            raise MemoryStateError(f"cannot restore memory of vm {vm.name!r}: its memory is "
                                   f"{self.state.value}, not consolidated")
        self._set(MemoryState.RESTORING, "deflate")
        t0 = time.monotonic()
        start_mib = self.reached_mib
        budget = int(max(0.0, self.full_mib - self.reached_mib) * MIB)
        answers: dict[str, Any] = {}
        try:
            if prefetch:  # first: the prefetch overlaps the deflation and the guest's first faults
                skip = 0
                if swap_cache_hint and len(swap_backends(vm)) == 1:
                    # pages written to swap but still in the guest's swap cache are never read back;
                    # they are the last ones written: the shim leaves that many of its newest out
                    skip = (await _swap_stats_or_none(vm)).get("swap_cached_bytes", 0) // PAGE
                answers = await prefetch_swap(vm, budget, skip_recent_pages=skip)
            await self._enable_stats()
            full = self.full_mib * MIB
            await self._qmp("balloon", {"value": full})
            want = self.guest_total_full
            actual, total = await self._wait(
                "restore", full, (lambda t: want is None or t >= want - SLACK_MIB * MIB), t0 + timeout, t0, start_mib)
        except BaseException as exc:
            await self._settle_after_failure("restore", exc)
            raise
        self.reached_mib = actual / MIB
        self.target_mib = None
        self._set(MemoryState.FULL, "deflated")
        swap = await _swap_stats_or_none(vm)
        return MemoryResult("restore", vm.name, self.full_mib, self.full_mib, self.reached_mib,
                            time.monotonic() - t0, total / MIB if total is not None else None,
                            swap.get("swap_used_bytes"), swap.get("pswpin"), swap.get("pswpout"),
                            budget if prefetch else 0, answers)


def memory_controller(vm: VM) -> MemoryController:
    """The VM's memory controller (per-VM state owned by the VM; created on first use)."""
    return vm.extension("memory", MemoryController)


def memory_state(vm: VM) -> MemoryState:
    return memory_controller(vm).state


async def consolidate_memory(vm: VM, target_mib: int, timeout: float = 120.0) -> MemoryResult:
    """Inflate the balloon until the guest has given its memory down to ``target_mib``."""
    return await memory_controller(vm).consolidate(target_mib, timeout=timeout)


async def restore_memory(vm: VM, timeout: float = 120.0, prefetch: bool = True,
                         swap_cache_hint: bool = True) -> MemoryResult:
    """Give the guest its full memory back; with ``prefetch`` the shims prefetch within the budget.

    ``swap_cache_hint``: read the guest's ``SwapCached`` (agent) first and have the shim skip that
    many of its most recently written pages (still resident in the guest; only with one shim)."""
    return await memory_controller(vm).restore(timeout=timeout, prefetch=prefetch, swap_cache_hint=swap_cache_hint)


def swap_backends(vm: VM) -> list[SwapBackend]:
    """The VM's components that back guest swap (the core's SwapBackend protocol)."""
    return [c for c in vm.components.values() if isinstance(c, SwapBackend)]


async def prefetch_swap(vm: VM, budget_bytes: int, skip_recent_pages: int = 0) -> dict[str, Any]:
    """Ask every swap-backing component of ``vm`` to prefetch what the guest swapped out, within
    ``budget_bytes`` each; their answers by component id."""
    answers: dict[str, Any] = {}
    for comp in swap_backends(vm):
        cid = getattr(comp, "id", repr(comp))
        try:
            answers[cid] = await comp.prefetch(budget_bytes, skip_recent_pages=skip_recent_pages)
        except HvsimError as exc:
            raise MemoryOpError(f"vm {vm.name!r}: {cid} refused the prefetch: {exc}") from exc
    return answers


async def _swap_stats_or_none(vm: VM) -> dict[str, int]:
    try:
        return await guest_swap_stats(vm, timeout=15.0)
    except (GuestSwapError, IllegalTransitionError) as exc:
        log.info("vm %s: no guest swap stats: %s", vm.name, exc)
        return {}
