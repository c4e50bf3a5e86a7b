import pytest

from hvsim.core.errors import IllegalTransitionError
from hvsim.core.lifecycle import ALLOWED, TRANSITIONS, VMState, machine, require


def at(state: VMState):  # type: ignore[no-untyped-def]
    return machine("v", state)


def test_pause_of_shutoff_vm_is_refused_with_a_clear_message():
    with pytest.raises(IllegalTransitionError,
                       match=r"cannot pause vm 'web': it is shutoff \(allowed from: running\)") as ei:
        require(machine("web"), "pause")
    assert ei.value.state is VMState.SHUTOFF and set(ei.value.allowed) == {VMState.RUNNING}


@pytest.mark.parametrize("state,action", [
    (VMState.RUNNING, "start"), (VMState.PAUSED, "pause"), (VMState.RUNNING, "resume"),
    (VMState.SHUTOFF, "shutdown"), (VMState.SHUTOFF, "reset"), (VMState.RUNNING, "undefine"),
    (VMState.SHUTOFF, "migrate"), (VMState.CRASHED, "agent"),
])
def test_illegal_actions(state, action):
    with pytest.raises(IllegalTransitionError):
        require(at(state), action)


@pytest.mark.parametrize("state,action", [
    (VMState.SHUTOFF, "start"), (VMState.CRASHED, "start"), (VMState.RUNNING, "pause"),
    (VMState.PAUSED, "resume"), (VMState.RUNNING, "shutdown"), (VMState.PAUSED, "destroy"),
    (VMState.CRASHED, "destroy"), (VMState.SHUTOFF, "undefine"),
])
def test_legal_actions(state, action):
    require(at(state), action)


def test_unknown_action():
    with pytest.raises(IllegalTransitionError, match="unknown action"):
        require(at(VMState.RUNNING), "explode")


def test_transition_table_is_closed_and_crash_reachable_from_every_live_state():
    for dsts in TRANSITIONS.values():
        assert dsts <= set(VMState)
    for live in (VMState.STARTING, VMState.RUNNING, VMState.PAUSED, VMState.SHUTTING_DOWN, VMState.MIGRATING):
        m = at(live)
        m.set(VMState.CRASHED, "kill -9")
        assert m.state is VMState.CRASHED and m.history[-1].reason == "kill -9"
    m = at(VMState.SHUTOFF)
    with pytest.raises(IllegalTransitionError, match="shutoff -> paused"):
        m.set(VMState.PAUSED)
    assert m.state is VMState.SHUTOFF


def test_every_action_names_known_states():
    for states in ALLOWED.values():
        assert states and states <= set(VMState)
