"""Operations: the guarded state machine, and the resolution a restarted manager applies to
in-flight operations, on recorded operation histories (the record as it was when the manager
died, plus what the host agents report), and as a property over every combination: never two
running copies, never a guess while a host that matters is unreachable."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvsim.control.errors import OperationStateError
from hvsim.control.ops import (
    STEP_DEST_STARTED, STEP_POSTCOPY, STEP_SWITCHED_OVER, ActionKind, Operation, OperationRecord, OpKind, OpState,
    Outcome, QemuState, VMFacts, resolve, running_copies,
)
from hvsim.control.state import VMPower, dump, parse

R, P, IN, POST = QemuState.RUNNING, QemuState.PAUSED, QemuState.INMIGRATE, QemuState.POSTMIGRATE


def migration(*steps: str, state: OpState = OpState.RUNNING) -> OperationRecord:
    op = Operation.new(OpKind.MIGRATE, "web", {"source": "a", "destination": "b"}, manager="m1", token=7)
    if state is OpState.PENDING:
        return op.record
    op.start()
    for s in steps:
        op.step(s)
    if state is OpState.ROLLING_BACK:
        op.rollback("cancelled")
    return op.record


def simple(kind: OpKind, state: OpState = OpState.RUNNING) -> OperationRecord:
    op = Operation.new(kind, "web")
    if state is not OpState.PENDING:
        op.start()
    if state is OpState.ROLLING_BACK:
        op.rollback("boom")
    return op.record


def facts(unreachable: tuple[str, ...] = (), **qemus: QemuState) -> VMFacts:
    return VMFacts(vm="web", qemus=qemus, unreachable=frozenset(unreachable))


def test_state_machine_guards_and_history() -> None:
    op = Operation.new(OpKind.START, "web", manager="m1", token=3)
    with pytest.raises(OperationStateError, match="cannot succeed"):
        op.succeed()
    op.start()
    op.step("qemu-started")
    rec = op.succeed()
    assert rec.state is OpState.SUCCEEDED and rec.terminal
    assert [h.state for h in rec.history] == [OpState.PENDING, OpState.RUNNING, OpState.SUCCEEDED]
    assert rec.steps == ("qemu-started",)
    with pytest.raises(OperationStateError):
        op.fail("late")
    with pytest.raises(OperationStateError):
        op.start()
    assert parse(OperationRecord, dump(rec)) == rec          # serialisable, round trip


def test_ids_sort_by_creation() -> None:
    ids = [Operation.new(OpKind.START, "web", now=1000.0 + i).record.id for i in range(50)]
    assert ids == sorted(ids)


@pytest.mark.parametrize("name,op,f,outcome,final,actions,host,power", [
    # --- migration, precopy ---
    ("died before anything", migration(state=OpState.PENDING), facts(a=R), Outcome.ABANDON, OpState.FAILED,
     [], "a", None),
    ("dest starting", migration(STEP_DEST_STARTED), facts(a=R, b=IN), Outcome.ROLLBACK, OpState.FAILED,
     [(ActionKind.DESTROY, "b")], "a", VMPower.RUNNING),
    ("source paused for stop-and-copy", migration(STEP_DEST_STARTED), facts(a=P, b=IN), Outcome.ROLLBACK,
     OpState.FAILED, [(ActionKind.DESTROY, "b"), (ActionKind.RESUME, "a")], "a", VMPower.RUNNING),
    ("completed, switch not recorded", migration(STEP_DEST_STARTED), facts(a=POST, b=R), Outcome.FINISH,
     OpState.SUCCEEDED, [(ActionKind.DESTROY, "a")], "b", VMPower.RUNNING),
    ("switched, source already gone", migration(STEP_DEST_STARTED, STEP_SWITCHED_OVER), facts(b=R),
     Outcome.FINISH, OpState.SUCCEEDED, [], "b", VMPower.RUNNING),
    ("destination paused after completion", migration(STEP_DEST_STARTED), facts(a=POST, b=P), Outcome.FINISH,
     OpState.SUCCEEDED, [(ActionKind.DESTROY, "a"), (ActionKind.RESUME, "b")], "b", VMPower.RUNNING),
    ("destination died before switch", migration(STEP_DEST_STARTED), facts(a=POST), Outcome.ROLLBACK,
     OpState.FAILED, [(ActionKind.RESUME, "a")], "a", VMPower.RUNNING),
    ("both running: not switched, source wins", migration(STEP_DEST_STARTED), facts(a=R, b=R),
     Outcome.ROLLBACK, OpState.FAILED, [(ActionKind.DESTROY, "b")], "a", VMPower.RUNNING),
    ("both running: switched, destination wins", migration(STEP_DEST_STARTED, STEP_SWITCHED_OVER),
     facts(a=R, b=R), Outcome.FINISH, OpState.SUCCEEDED, [(ActionKind.DESTROY, "a")], "b", VMPower.RUNNING),
    ("everything gone", migration(STEP_DEST_STARTED), facts(), Outcome.ROLLBACK, OpState.FAILED, [], "a",
     VMPower.CRASHED),
    ("source gone, destination never completed", migration(STEP_DEST_STARTED), facts(b=IN), Outcome.ROLLBACK,
     OpState.FAILED, [(ActionKind.DESTROY, "b")], "a", VMPower.CRASHED),
    ("destination unreachable", migration(STEP_DEST_STARTED), facts(("b",), a=R), Outcome.DEFER, None, [], "a",
     None),
    ("rolling back when it died", migration(STEP_DEST_STARTED, state=OpState.ROLLING_BACK), facts(a=R, b=IN),
     Outcome.ROLLBACK, OpState.FAILED, [(ActionKind.DESTROY, "b")], "a", VMPower.RUNNING),
    ("stray copy on a third host", migration(STEP_DEST_STARTED), facts(a=R, c=IN), Outcome.ROLLBACK,
     OpState.FAILED, [(ActionKind.DESTROY, "c")], "a", VMPower.RUNNING),
    # --- migration, postcopy: no way back ---
    ("postcopy, destination runs", migration(STEP_DEST_STARTED, STEP_POSTCOPY), facts(a=POST, b=R),
     Outcome.FINISH, OpState.SUCCEEDED, [(ActionKind.DESTROY, "a")], "b", VMPower.RUNNING),
    ("postcopy, destination died", migration(STEP_DEST_STARTED, STEP_POSTCOPY), facts(a=POST), Outcome.ROLLBACK,
     OpState.FAILED, [(ActionKind.DESTROY, "a")], "a", VMPower.CRASHED),
    ("postcopy still pulling pages", migration(STEP_DEST_STARTED, STEP_POSTCOPY), facts(a=POST, b=IN),
     Outcome.DEFER, None, [], "a", None),
    # --- start / stop ---
    ("start recorded, never begun", simple(OpKind.START, OpState.PENDING), facts(), Outcome.ABANDON,
     OpState.FAILED, [], "a", None),
    ("start done, not recorded", simple(OpKind.START), facts(a=R), Outcome.FINISH, OpState.SUCCEEDED, [], "a",
     VMPower.RUNNING),
    ("start died before QEMU", simple(OpKind.START), facts(), Outcome.ROLLBACK, OpState.FAILED, [], "a",
     VMPower.SHUTOFF),
    ("start: a second copy elsewhere", simple(OpKind.START), facts(a=R, b=R), Outcome.FINISH, OpState.SUCCEEDED,
     [(ActionKind.DESTROY, "b")], "a", VMPower.RUNNING),
    ("start: host unreachable", simple(OpKind.START), facts(("a",)), Outcome.DEFER, None, [], "a", None),
    ("stop half done", simple(OpKind.STOP), facts(a=R), Outcome.FINISH, OpState.SUCCEEDED,
     [(ActionKind.DESTROY, "a")], "a", VMPower.SHUTOFF),
    ("stop done", simple(OpKind.STOP), facts(), Outcome.FINISH, OpState.SUCCEEDED, [], "a", VMPower.SHUTOFF),
])
def test_resolution_of_recorded_histories(name: str, op: OperationRecord, f: VMFacts, outcome: Outcome,
                                          final: OpState | None, actions: list[tuple[ActionKind, str]],
                                          host: str, power: VMPower | None) -> None:
    res = resolve(op, f, vm_host="a")
    assert res.outcome is outcome, (name, res.reason)
    assert res.final is final, name
    assert [(a.kind, a.host) for a in res.actions] == actions, (name, res.reason)
    assert res.vm_host == host, name
    assert res.vm_power is power, name
    assert len(running_copies(res, f)) <= 1, name


KINDS = [OpKind.START, OpKind.STOP, OpKind.DESTROY, OpKind.MIGRATE]
STATES = [OpState.PENDING, OpState.RUNNING, OpState.ROLLING_BACK]
STEPS = [(), (STEP_DEST_STARTED,), (STEP_DEST_STARTED, STEP_SWITCHED_OVER), (STEP_DEST_STARTED, STEP_POSTCOPY)]


@given(kind=st.sampled_from(KINDS), state=st.sampled_from(STATES), steps=st.sampled_from(STEPS),
       qemus=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from(list(QemuState)), max_size=3),
       unreachable=st.frozensets(st.sampled_from(["a", "b", "c"]), max_size=2))
def test_resolution_never_leaves_two_copies_and_never_guesses(kind: OpKind, state: OpState, steps: tuple[str, ...],
                                                              qemus: dict[str, QemuState],
                                                              unreachable: frozenset[str]) -> None:
    qemus = {h: s for h, s in qemus.items() if h not in unreachable}
    if kind is OpKind.MIGRATE:
        op = migration(*steps, state=state)
    else:
        op = simple(kind, state)
    f = VMFacts(vm="web", qemus=qemus, unreachable=unreachable)
    res = resolve(op, f, vm_host="a")
    owners = {"a", "b"} if kind is OpKind.MIGRATE and state is not OpState.PENDING else {"a"}
    assert len(running_copies(res, f)) <= 1 or set(running_copies(res, f)) <= owners and res.outcome is Outcome.DEFER
    assert not set(running_copies(res, f)) - owners, "a copy on a host no record names survived"
    if res.outcome is Outcome.DEFER:
        assert res.final is None
        assert all(a.kind is ActionKind.DESTROY and a.host not in owners for a in res.actions)
    else:
        assert res.final in (OpState.SUCCEEDED, OpState.FAILED)
        relevant = {"a", "b"} if kind is OpKind.MIGRATE else {"a"}
        if state is not OpState.PENDING:
            assert not (unreachable & relevant), "decided although a host that matters is unreachable"
        # nothing is resumed that does not exist, nothing destroyed twice
        hosts = [a.host for a in res.actions]
        assert len(hosts) == len(set(hosts))
        assert all(a.host in qemus for a in res.actions)
        if res.vm_power is VMPower.RUNNING:
            assert running_copies(res, f) == [res.vm_host]


def test_resolving_a_finished_operation_changes_nothing() -> None:
    op = Operation.new(OpKind.START, "web")
    op.start()
    rec = op.succeed()
    for qemus in itertools.islice(itertools.product([None, R], repeat=2), 4):
        f = VMFacts(vm="web", qemus={h: s for h, s in zip("ab", qemus, strict=True) if s is not None})
        assert resolve(rec, f, "a").actions == ()
