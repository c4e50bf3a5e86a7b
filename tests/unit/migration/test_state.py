import pytest

from hvsim.migration.errors import MigrationStateError
from hvsim.migration.state import TERMINAL, TRANSITIONS, MigrationState as M, machine


def walk(path: list[M]) -> None:
    m = machine("m")
    assert m.state is path[0] is M.NEW
    for b in path[1:]:
        m.set(b)
    assert m.state is path[-1]


def test_happy_paths_are_legal() -> None:
    for path in ([M.NEW, M.PREPARING, M.ACTIVE, M.SWITCHING_OVER, M.COMPLETED],
                 [M.NEW, M.PREPARING, M.ACTIVE, M.POSTCOPY, M.COMPLETED],
                 [M.NEW, M.PREPARING, M.ACTIVE, M.CANCELLED],
                 [M.NEW, M.PREPARING, M.FAILED],
                 [M.NEW, M.PREPARING, M.ACTIVE, M.TIMED_OUT]):
        walk(path)


@pytest.mark.parametrize("path", [[M.NEW, M.COMPLETED], [M.NEW, M.PREPARING, M.ACTIVE, M.POSTCOPY, M.CANCELLED],
                                  [M.NEW, M.PREPARING, M.ACTIVE, M.POSTCOPY, M.ACTIVE],
                                  [M.NEW, M.PREPARING, M.ACTIVE, M.COMPLETED, M.FAILED],
                                  [M.NEW, M.CANCELLED, M.ACTIVE], [M.NEW, M.PREPARING, M.POSTCOPY]])
def test_illegal_transitions_refused_with_clear_error(path: list[M]) -> None:
    old, new = path[-2], path[-1]
    with pytest.raises(MigrationStateError, match=f"{old.value} -> {new.value}"):
        walk(path)


def test_terminal_states_have_no_exit() -> None:
    for s in TERMINAL:
        assert s.terminal and not TRANSITIONS[s]
    assert not M.POSTCOPY.terminal
