import pytest

from hvsim.migration.errors import MigrationStateError
from hvsim.migration.state import TERMINAL, TRANSITIONS, MigrationState as M, check_transition


def test_happy_paths_are_legal() -> None:
    for path in ([M.NEW, M.PREPARING, M.ACTIVE, M.SWITCHING_OVER, M.COMPLETED],
                 [M.NEW, M.PREPARING, M.ACTIVE, M.POSTCOPY, M.COMPLETED],
                 [M.NEW, M.PREPARING, M.ACTIVE, M.CANCELLED],
                 [M.NEW, M.PREPARING, M.FAILED],
                 [M.NEW, M.PREPARING, M.ACTIVE, M.TIMED_OUT]):
        for a, b in zip(path, path[1:]):
            check_transition("m", a, b)


@pytest.mark.parametrize("old,new", [(M.NEW, M.COMPLETED), (M.POSTCOPY, M.CANCELLED), (M.POSTCOPY, M.ACTIVE),
                                     (M.COMPLETED, M.FAILED), (M.CANCELLED, M.ACTIVE), (M.PREPARING, M.POSTCOPY)])
def test_illegal_transitions_refused_with_clear_error(old: M, new: M) -> None:
    with pytest.raises(MigrationStateError, match=f"{old.value} -> {new.value}"):
        check_transition("m", old, new)


def test_terminal_states_have_no_exit() -> None:
    for s in TERMINAL:
        assert s.terminal and not TRANSITIONS[s]
    assert not M.POSTCOPY.terminal
