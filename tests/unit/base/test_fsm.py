"""hvbase.fsm: the one state-machine helper (tables, guards, the one setter, compare-and-set)."""
from __future__ import annotations

import enum

import pytest

from hvbase.errors import HvsimError, StateError
from hvbase.fsm import StateMachine, guarded


class St(enum.Enum):
    A = "a"
    B = "b"
    C = "c"


TABLE = {St.A: {St.B}, St.B: {St.A, St.C}, St.C: set()}


class MyError(StateError):
    pass


def test_table_must_cover_every_state_and_name_known_states() -> None:
    with pytest.raises(ValueError, match="no row for"):
        StateMachine("x", St.A, {St.A: {St.B}, St.B: set()})

    class Other(enum.Enum):
        Z = "z"
    with pytest.raises(ValueError, match="unknown states"):
        StateMachine("x", St.A, {St.A: {Other.Z}, St.B: set(), St.C: set()})  # type: ignore[dict-item]


def test_illegal_change_raises_the_owners_error_with_object_state_and_allowed() -> None:
    seen = []
    m = StateMachine("thing 't'", St.A, TABLE, error=MyError, on_change=seen.append)
    with pytest.raises(MyError) as ei:
        m.set(St.C)
    e = ei.value
    assert isinstance(e, HvsimError) and e.obj == "thing 't'" and e.state is St.A and e.target is St.C
    assert set(e.allowed) == {St.B}
    assert "illegal state change a -> c" in str(e)
    assert m.state is St.A and not seen and not m.history      # nothing changed, nobody told
    m.set(St.B, "go")
    assert m.state is St.B and seen[-1].old is St.A and seen[-1].new is St.B and seen[-1].reason == "go"
    assert list(m.history) == seen


def test_require_names_the_action_and_the_allowed_states() -> None:
    m = StateMachine("vm 'web-1'", St.A, TABLE)
    with pytest.raises(StateError, match=r"cannot pause vm 'web-1': it is a \(allowed from: b, c\)") as ei:
        m.require("pause", St.B, St.C)
    assert ei.value.action == "pause"
    m.require("start", St.A)   # allowed: no error


def test_set_if_is_a_compare_and_set() -> None:
    m = StateMachine("p", St.A, TABLE)
    assert m.set_if({St.A}, St.B) and m.state is St.B
    assert not m.set_if({St.A}, St.B)          # not in the expected state: nothing happens
    m.set(St.C)
    assert not m.set_if({St.C}, St.A)          # expected, but the table forbids it
    assert m.state is St.C


def test_a_failing_hook_does_not_break_the_owner() -> None:
    def boom(_t: object) -> None:
        raise RuntimeError("observer bug")
    m = StateMachine("p", St.A, TABLE, on_change=boom)
    m.set(St.B)
    assert m.state is St.B


class Thing:
    def __init__(self) -> None:
        self.fsm = StateMachine("thing", St.A, TABLE)

    @guarded(St.B)
    def poke(self) -> str:
        return "poked"

    @guarded(St.A, action="go somewhere")
    async def go(self) -> str:
        return "went"


async def test_guarded_methods_check_before_running() -> None:
    t = Thing()
    with pytest.raises(StateError, match="cannot poke thing: it is a"):
        t.poke()
    assert await t.go() == "went"
    t.fsm.set(St.B)
    assert t.poke() == "poked"
    with pytest.raises(StateError, match="cannot go somewhere thing: it is b"):
        await t.go()
