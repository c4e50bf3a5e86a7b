import pytest

from hvsim.core.errors import IllegalTransitionError
from hvsim.core.lifecycle import ALLOWED, TRANSITIONS, VMState, check_action, check_transition


def test_pause_of_shutoff_vm_is_refused_with_a_clear_message():
    with pytest.raises(IllegalTransitionError, match=r"cannot pause vm 'web': it is shutoff \(allowed from: running\)"):
        check_action("web", VMState.SHUTOFF, "pause")


@pytest.mark.parametrize("state,action", [
    (VMState.RUNNING, "start"), (VMState.PAUSED, "pause"), (VMState.RUNNING, "resume"),
    (VMState.SHUTOFF, "shutdown"), (VMState.SHUTOFF, "reset"), (VMState.RUNNING, "undefine"),
    (VMState.SHUTOFF, "migrate"), (VMState.CRASHED, "agent"),
])
def test_illegal_actions(state, action):
    with pytest.raises(IllegalTransitionError):
        check_action("v", state, action)


@pytest.mark.parametrize("state,action", [
    (VMState.SHUTOFF, "start"), (VMState.CRASHED, "start"), (VMState.RUNNING, "pause"),
    (VMState.PAUSED, "resume"), (VMState.RUNNING, "shutdown"), (VMState.PAUSED, "destroy"),
    (VMState.CRASHED, "destroy"), (VMState.SHUTOFF, "undefine"),
])
def test_legal_actions(state, action):
    check_action("v", state, action)


def test_unknown_action():
    with pytest.raises(IllegalTransitionError, match="unknown action"):
        check_action("v", VMState.RUNNING, "explode")


def test_transition_table_is_closed_and_crash_reachable_from_every_live_state():
    for src, dsts in TRANSITIONS.items():
        assert dsts <= set(VMState)
    for live in (VMState.STARTING, VMState.RUNNING, VMState.PAUSED, VMState.SHUTTING_DOWN, VMState.MIGRATING):
        check_transition("v", live, VMState.CRASHED)
    with pytest.raises(IllegalTransitionError, match="shutoff -> paused"):
        check_transition("v", VMState.SHUTOFF, VMState.PAUSED)


def test_every_action_names_known_states():
    for states in ALLOWED.values():
        assert states and states <= set(VMState)
