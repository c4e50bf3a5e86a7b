"""Operations: every change the manager makes to a VM, recorded in the store before it starts,
updated as it progresses, ending in a terminal state; and the pure **resolution** a manager
started later applies to operations it finds in flight.

An :class:`Operation` owns a :class:`~hvbase.fsm.StateMachine` over :class:`OpState`::

    PENDING --start--> RUNNING --succeed--> SUCCEEDED
       |                  |  \\--fail (nothing changed)--> FAILED
       |                  \\--rollback--> ROLLING_BACK --rolled_back--> FAILED
       \\--abandon (never started)--> FAILED

Each change produces a new immutable :class:`OperationRecord` (its ``history`` grows), which the
inventory writes with compare-and-set on the record's revision, under the manager's fence.
Progress is a list of named ``steps``; for a migration the steps that matter are
``destination-started``, ``switched-over`` (the destination owns the VM from here on) and
``postcopy`` (no way back: the source no longer has the whole state).

:func:`resolve` decides, from an in-flight operation's record and the **facts** the host agents
report (which hosts run a QEMU of the VM, and in which QEMU run state), whether to finish the
operation or roll it back, and the actions that do it. It never leaves a VM half-migrated or
running twice: the outcome always has at most one running copy (a QEMU on a host the records do
not name is destroyed), and while a host that matters is unreachable it defers the decision
rather than guess.
"""
from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field
from pydantic.dataclasses import dataclass

from hvbase.fsm import StateMachine, guarded

from .errors import OperationStateError
from .state import CFG, Name, Text, VMPower


class OpKind(enum.Enum):
    DEFINE = "define"
    UNDEFINE = "undefine"
    START = "start"
    STOP = "stop"
    DESTROY = "destroy"
    MIGRATE = "migrate"
    EXEC = "exec"
    RESTART = "restart"      # HA: a protected VM of a lost host started on a surviving one (hvsim.control.ha)


class OpState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    ROLLING_BACK = "rolling-back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL = frozenset({OpState.SUCCEEDED, OpState.FAILED})
IN_FLIGHT = frozenset(OpState) - TERMINAL
OP_TABLE: dict[OpState, set[OpState]] = {
    OpState.PENDING: {OpState.RUNNING, OpState.FAILED},
    OpState.RUNNING: {OpState.SUCCEEDED, OpState.ROLLING_BACK, OpState.FAILED},
    OpState.ROLLING_BACK: {OpState.FAILED},
    OpState.SUCCEEDED: set(),
    OpState.FAILED: set(),
}

STEP_DEST_STARTED = "destination-started"
STEP_SWITCHED_OVER = "switched-over"
STEP_POSTCOPY = "postcopy"
STEP_QEMU_STARTED = "qemu-started"


@dataclass(config=CFG)
class HistoryEntry:
    state: OpState
    at: float
    note: Text = ""


@dataclass(config=CFG)
class OperationRecord:
    id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}-[0-9a-f]{8}$")]
    kind: OpKind
    vm: Name
    state: OpState = OpState.PENDING
    params: dict[str, Annotated[str, Field(max_length=256)]] = Field(default_factory=dict)
    steps: Annotated[tuple[Annotated[str, Field(max_length=64)], ...], Field(max_length=64)] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    error: Text | None = None
    manager: Text = ""
    token: int = 0
    history: tuple[HistoryEntry, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def new_op_id(now: float | None = None) -> str:
    """Ids sort by creation time: 16 hex digits of nanoseconds, then 8 random hex digits."""
    ns = int((now if now is not None else time.time()) * 1e9)
    return f"{ns:016x}-{os.urandom(4).hex()}"


class Operation:
    """One operation and its state machine; every change returns (and keeps) a new record."""

    def __init__(self, record: OperationRecord) -> None:
        self.record = record
        self.fsm = StateMachine(f"operation {record.id} ({record.kind.value} {record.vm})", record.state,
                                OP_TABLE, error=OperationStateError)

    @classmethod
    def new(cls, kind: OpKind, vm: str, params: Mapping[str, str] | None = None, *, manager: str = "",
            token: int = 0, now: float | None = None) -> Operation:
        t = time.time() if now is None else now
        rec = OperationRecord(id=new_op_id(t), kind=kind, vm=vm, params=dict(params or {}), created_at=t,
                              updated_at=t, manager=manager, token=token,
                              history=(HistoryEntry(OpState.PENDING, t, "recorded"),))
        return cls(rec)

    def _to(self, state: OpState, note: str = "", *, steps: tuple[str, ...] | None = None,
            error: str | None = None) -> OperationRecord:
        self.fsm.set(state, note)
        t = time.time()
        r = self.record
        self.record = OperationRecord(
            id=r.id, kind=r.kind, vm=r.vm, state=state, params=r.params,
            steps=r.steps if steps is None else steps, created_at=r.created_at, updated_at=t,
            error=error if error is not None else r.error, manager=r.manager, token=r.token,
            history=(*r.history, HistoryEntry(state, t, note[:256])))
        return self.record

    @guarded(OpState.PENDING)
    def start(self) -> OperationRecord:
        return self._to(OpState.RUNNING, "started")

    @guarded(OpState.RUNNING)
    def step(self, name: str) -> OperationRecord:
        """Record progress (stays RUNNING)."""
        r = self.record
        t = time.time()
        self.record = OperationRecord(
            id=r.id, kind=r.kind, vm=r.vm, state=r.state, params=r.params, steps=(*r.steps, name),
            created_at=r.created_at, updated_at=t, error=r.error, manager=r.manager, token=r.token,
            history=r.history)
        return self.record

    @guarded(OpState.RUNNING)
    def succeed(self, note: str = "done") -> OperationRecord:
        return self._to(OpState.SUCCEEDED, note)

    @guarded(OpState.PENDING, OpState.RUNNING)
    def fail(self, error: str) -> OperationRecord:
        """Failed with nothing left to undo."""
        return self._to(OpState.FAILED, "failed", error=error[:256])

    @guarded(OpState.RUNNING)
    def rollback(self, error: str) -> OperationRecord:
        return self._to(OpState.ROLLING_BACK, "rolling back", error=error[:256])

    @guarded(OpState.ROLLING_BACK)
    def rolled_back(self) -> OperationRecord:
        return self._to(OpState.FAILED, "rolled back")


# -- resolution ---------------------------------------------------------------------------------
class QemuState(enum.Enum):
    """What a host agent reports for one QEMU of the VM (QEMU's runstates, folded)."""
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"        # a destination still waiting for / receiving the state
    POSTMIGRATE = "postmigrate"    # a source whose state was sent (it has stopped)


@dataclass(config=CFG)
class VMFacts:
    """Where the VM's QEMUs are, as reported by the host agents; ``unreachable`` hosts reported
    nothing (their QEMUs may or may not run)."""
    vm: Name
    qemus: dict[Name, QemuState] = Field(default_factory=dict)
    unreachable: frozenset[Name] = frozenset()


class Outcome(enum.Enum):
    FINISH = "finish"
    ROLLBACK = "rollback"
    ABANDON = "abandon"      # never started: nothing to undo
    DEFER = "defer"          # a host that matters is unreachable: decide later


class ActionKind(enum.Enum):
    DESTROY = "destroy"      # hard-stop that QEMU (SIGKILL after quit): it is not the VM's owner
    RESUME = "resume"        # QMP cont: the owner is paused or post-migrate


@dataclass(config=CFG)
class Action:
    kind: ActionKind
    host: Name


@dataclass(config=CFG)
class Resolution:
    op: str
    outcome: Outcome
    final: OpState | None            # the operation's terminal state (None when deferred)
    actions: tuple[Action, ...]
    vm_host: Name | None             # where the VM record says it lives afterwards
    vm_power: VMPower | None
    reason: Text


def _owner_after(actions: tuple[Action, ...], facts: VMFacts) -> dict[str, QemuState]:
    """The QEMUs left after applying ``actions`` (for checking a resolution)."""
    left = dict(facts.qemus)
    for a in actions:
        if a.kind is ActionKind.DESTROY:
            left.pop(a.host, None)
        elif a.host in left:
            left[a.host] = QemuState.RUNNING
    return left


def running_copies(res: Resolution, facts: VMFacts) -> list[str]:
    """Hosts on which the VM runs (or would run when resumed) after ``res`` is applied."""
    return [h for h, s in _owner_after(res.actions, facts).items()
            if s in (QemuState.RUNNING, QemuState.PAUSED)]


def resolve(op: OperationRecord, facts: VMFacts, vm_host: str | None) -> Resolution:
    """What a restarted manager does with the in-flight ``op`` (see the module docstring).
    ``vm_host`` is the host the VM record names (for a migration: the source)."""
    if op.vm != facts.vm:
        raise ValueError(f"facts are about vm {facts.vm!r}, the operation about {op.vm!r}")

    def out(outcome: Outcome, final: OpState | None, actions: list[Action], host: str | None,
            power: VMPower | None, reason: str) -> Resolution:
        return Resolution(op=op.id, outcome=outcome, final=final, actions=tuple(actions), vm_host=host,
                          vm_power=power, reason=reason[:256])

    def power_of(state: QemuState | None) -> VMPower:
        if state is QemuState.RUNNING:
            return VMPower.RUNNING
        if state is QemuState.PAUSED:
            return VMPower.PAUSED
        return VMPower.SHUTOFF

    if op.terminal:
        return out(Outcome.FINISH, op.state, [], vm_host, None, "already terminal")

    if op.kind is OpKind.MIGRATE:
        return _resolve_migrate(op, facts, vm_host, out)
    if op.kind is OpKind.RESTART:
        return _resolve_restart(op, facts, vm_host, out)

    if op.state is OpState.PENDING:
        return _abandon(op, facts, vm_host, out)

    home = vm_host
    # a QEMU of the VM on a host its record does not name is never its owner
    strays = [Action(kind=ActionKind.DESTROY, host=h) for h in sorted(facts.qemus) if h != home]
    if (home in facts.unreachable) or (home is None and facts.unreachable):
        return out(Outcome.DEFER, None, strays, vm_host, None,
                   f"host(s) {sorted(facts.unreachable)} unreachable: decided when it answers")
    at_home = facts.qemus.get(home) if home else None

    if op.kind is OpKind.START:
        if op.state is OpState.ROLLING_BACK or at_home is None or at_home in (QemuState.INMIGRATE,
                                                                                QemuState.POSTMIGRATE):
            acts = strays + ([Action(kind=ActionKind.DESTROY, host=home)] if home and at_home else [])
            return out(Outcome.ROLLBACK, OpState.FAILED, acts, home, VMPower.SHUTOFF,
                       "start did not complete: the VM stays shut off")
        return out(Outcome.FINISH, OpState.SUCCEEDED, strays, home, power_of(at_home),
                   f"the VM runs on {home}: start completed")
    if op.kind in (OpKind.STOP, OpKind.DESTROY):
        acts = strays + ([Action(kind=ActionKind.DESTROY, host=home)] if home and at_home else [])
        return out(Outcome.FINISH, OpState.SUCCEEDED, acts, home, VMPower.SHUTOFF,
                   f"{op.kind.value} finished: no QEMU of the VM is left")
    # define/undefine are single store transactions and exec changes no placement: nothing to redo
    if op.state is OpState.ROLLING_BACK:
        return out(Outcome.ROLLBACK, OpState.FAILED, strays, home, power_of(at_home), "rollback completed")
    return out(Outcome.ROLLBACK, OpState.FAILED, strays, home, power_of(at_home),
               f"{op.kind.value} interrupted: marked failed, VM left as found")


def _abandon(op: OperationRecord, facts: VMFacts, home: str | None, out: Any) -> Resolution:
    """A PENDING operation did nothing (it is set RUNNING before its first effect): mark it
    failed. Any QEMU of the VM on a host other than the one its record names is not its owner."""
    strays = [Action(kind=ActionKind.DESTROY, host=h) for h in sorted(facts.qemus) if h != home]
    return out(Outcome.ABANDON, OpState.FAILED, strays, home, None, "recorded but never started")


def _resolve_migrate(op: OperationRecord, facts: VMFacts, vm_host: str | None, out: Any) -> Resolution:
    src = op.params.get("source") or vm_host
    dst = op.params.get("destination")
    if not src or not dst:
        return out(Outcome.ROLLBACK, OpState.FAILED, [], vm_host, None, "migration record names no source/destination")
    if op.state is OpState.PENDING:
        return _abandon(op, facts, src, out)
    strays = [Action(kind=ActionKind.DESTROY, host=h) for h in sorted(facts.qemus) if h not in (src, dst)]
    if facts.unreachable & {src, dst}:
        return out(Outcome.DEFER, None, strays, vm_host, None,
                   f"host(s) {sorted(facts.unreachable & {src, dst})} unreachable: decided when it answers")
    s, d = facts.qemus.get(src), facts.qemus.get(dst)
    destroy_src = [Action(kind=ActionKind.DESTROY, host=src)] if s is not None else []
    destroy_dst = [Action(kind=ActionKind.DESTROY, host=dst)] if d is not None else []
    switched = STEP_SWITCHED_OVER in op.steps or STEP_POSTCOPY in op.steps
    dst_live = d in (QemuState.RUNNING, QemuState.PAUSED)
    src_live = s in (QemuState.RUNNING, QemuState.PAUSED)

    def finish() -> Resolution:
        acts = strays + destroy_src + ([Action(kind=ActionKind.RESUME, host=dst)] if d is QemuState.PAUSED else [])
        return out(Outcome.FINISH, OpState.SUCCEEDED, acts, dst, VMPower.RUNNING,
                   f"the destination {dst} owns the VM: migration finished, source stopped")

    def rollback(why: str) -> Resolution:
        acts = strays + destroy_dst + ([Action(kind=ActionKind.RESUME, host=src)]
                                       if s in (QemuState.PAUSED, QemuState.POSTMIGRATE) else [])
        return out(Outcome.ROLLBACK, OpState.FAILED, acts, src, VMPower.RUNNING, why)

    if STEP_POSTCOPY in op.steps:
        # no way back: the source no longer has the whole state
        if dst_live or d is QemuState.INMIGRATE:
            res: Resolution = finish()
            if d is QemuState.INMIGRATE:   # postcopy resumes the destination once it has the state
                res = out(Outcome.DEFER, None, strays, vm_host, None, "postcopy still running on the destination")
            return res
        return out(Outcome.ROLLBACK, OpState.FAILED, strays + destroy_src, src, VMPower.CRASHED,
                   "the destination died during postcopy: the VM is lost (crashed), not restarted twice")
    if dst_live and not src_live:
        return finish()                       # it switched over (recorded or not)
    if src_live and not dst_live:
        return rollback("the source still runs the VM: migration rolled back, destination removed")
    if dst_live and src_live:                # never two copies: the recorded owner wins
        return finish() if switched else rollback("both copies ran: the source (owner before switch-over) kept")
    # neither copy live
    if s is QemuState.POSTMIGRATE:           # precopy: the stopped source still has the whole state
        return rollback("the destination did not take over: the source is resumed")
    return out(Outcome.ROLLBACK, OpState.FAILED, strays + destroy_dst, src, VMPower.CRASHED,
               "no live QEMU of the VM on source or destination: marked crashed, not restarted")


def _resolve_restart(op: OperationRecord, facts: VMFacts, vm_host: str | None, out: Any) -> Resolution:
    """An HA restart (params ``source``: the lost host, ``destination``: the surviving host it was
    started on). Only the destination matters (the source was judged lost): if it runs the VM the
    restart finished (any other copy is destroyed: never two); if it does not, the restart is
    marked failed and the VM stays recorded on the lost host (the HA controller tries again)."""
    src = op.params.get("source") or vm_host
    dst = op.params.get("destination")
    if op.state is OpState.PENDING or not dst:
        strays = [Action(kind=ActionKind.DESTROY, host=h) for h in sorted(facts.qemus) if h != vm_host]
        return out(Outcome.ABANDON, OpState.FAILED, strays, vm_host, None, "restart recorded but never started")
    if dst in facts.unreachable:
        return out(Outcome.DEFER, None, [], vm_host, None, f"restart destination {dst} unreachable: decided when "
                                                            "it answers")
    d = facts.qemus.get(dst)
    others = [Action(kind=ActionKind.DESTROY, host=h) for h in sorted(facts.qemus) if h != dst]
    if d in (QemuState.RUNNING, QemuState.PAUSED):
        acts = others + ([Action(kind=ActionKind.RESUME, host=dst)] if d is QemuState.PAUSED else [])
        return out(Outcome.FINISH, OpState.SUCCEEDED, acts, dst, VMPower.RUNNING,
                   f"the VM runs on {dst}: restart (from lost host {src}) completed")
    acts = [Action(kind=ActionKind.DESTROY, host=dst)] if d is not None else []
    src_live = src is not None and facts.qemus.get(src) in (QemuState.RUNNING, QemuState.PAUSED)
    return out(Outcome.ROLLBACK, OpState.FAILED, acts, src, VMPower.RUNNING if src_live else VMPower.CRASHED,
               f"restart on {dst} did not complete: the VM stays recorded on {src}")
