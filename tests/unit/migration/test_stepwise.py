"""Nova's downtime stepping, checked against hand-computed values."""
import pytest

from hvsim.migration.errors import MigrationInputError
from hvsim.migration.policies import ActionKind, MigrationContext, make_policy
from hvsim.migration.policies.stepwise import downtime_steps, nova_data_gb, step_for
from hvsim.migration.progress import Observation

GIB = 2**30


def obs(t: float, status: str = "active") -> Observation:
    return Observation(t=t, status=status, passes=1, transferred=0, remaining=1, total=GIB, dirty_rate=0.0,
                       mbps=0.0, expected_downtime_ms=None)


def ctx(ram: int, postcopy: bool = False) -> MigrationContext:
    return MigrationContext(vm="g", guest_ram_bytes=ram, postcopy_available=postcopy)


def test_nova_docstring_example() -> None:
    # nova: 10 steps, 30 s delay, 3 GB, 400 ms -> every 90 s: 40, 76, 112, ... 400
    assert list(downtime_steps(3, 400, 10, 30)) == [
        (0, 40), (90, 76), (180, 112), (270, 148), (360, 184), (450, 220),
        (540, 256), (630, 292), (720, 328), (810, 364), (900, 400)]


def test_nova_defaults_on_a_small_guest_use_the_2_gb_floor() -> None:
    # 256 MiB guest -> data_gb floored to 2; delay int(75*2)=150; base 500/10=50; offset (500-50)/10=45
    assert nova_data_gb(256 * 2**20) == 2.0
    assert list(downtime_steps(2.0)) == [(150 * i, 50 + 45 * i) for i in range(11)]
    p = make_policy("stepwise")
    p.start(ctx(256 * 2**20))
    assert p.completion_timeout == 1600      # int(800 * 2)
    assert p.schedule[-1] == (1500, 500)


def test_scaled_schedule_truncates_like_nova() -> None:
    # floor off, 0.25 GiB, delay 10 s/GiB: int(10*0.25)=2 s; downtime 300, 4 steps: base 75, offset 56.25
    assert list(downtime_steps(0.25, 300, 4, 10)) == [(0, 75), (2, 131), (4, 187), (6, 243), (8, 300)]
    # 3 steps of 100 ms, 1 GiB, 7 s: base 33.33 -> int 33; offset 22.22: 55, 77, 100
    assert list(downtime_steps(1.0, 100, 3, 7)) == [(0, 33), (7, 55), (14, 77), (21, 100)]


def test_steps_apply_strictly_after_their_marker_and_only_on_change() -> None:
    p = make_policy("stepwise", downtime_ms=300, steps=4, downtime_delay_s=10, data_gb_floor=0,
                    completion_timeout_s=0)
    p.start(ctx(GIB // 4))
    assert step_for(0.0, p.schedule) is None          # Nova: elapsed > 0 is needed for step 0
    got = []
    for t in (0.5, 1.0, 2.0, 2.01, 3.0, 4.5, 9.0, 20.0):
        for a in p.observe(obs(t)):
            assert a.kind is ActionKind.SET_DOWNTIME_LIMIT
            got.append((t, a.value))
    assert got == [(0.5, 75.0), (2.01, 131.0), (4.5, 187.0), (9.0, 300.0)]


def test_completion_timeout_abort_is_novas_default() -> None:
    p = make_policy("stepwise", downtime_delay_s=10, completion_timeout_s=100, data_gb_floor=0)
    p.start(ctx(GIB // 4))                            # timeout int(100 * 0.25) = 25 s
    assert not any(a.kind is ActionKind.ABORT for a in p.observe(obs(25.0)))
    acts = p.observe(obs(25.2))
    assert [a.kind for a in acts] == [ActionKind.ABORT]
    assert acts[0].inputs["completion_timeout_s"] == 25
    assert p.observe(obs(30.0)) == [] or all(a.kind is not ActionKind.ABORT for a in p.observe(obs(31.0)))


def test_force_complete_uses_postcopy_when_permitted_else_pauses() -> None:
    p = make_policy("stepwise", completion_timeout_s=100, data_gb_floor=0, timeout_action="force_complete",
                    permit_post_copy=True)
    p.start(ctx(GIB // 4, postcopy=True))
    assert [a.kind for a in p.observe(obs(26))] == [ActionKind.START_POSTCOPY]
    q = make_policy("stepwise", completion_timeout_s=100, data_gb_floor=0, timeout_action="force_complete")
    q.start(ctx(GIB // 4))
    assert [a.kind for a in q.observe(obs(26))] == [ActionKind.FORCE_COMPLETE]


def test_no_timeout_action_once_in_postcopy() -> None:
    p = make_policy("stepwise", completion_timeout_s=100, data_gb_floor=0)
    p.start(ctx(GIB // 4))
    assert all(a.kind is not ActionKind.ABORT for a in p.observe(obs(40, "postcopy-active")))


@pytest.mark.parametrize("kw", [{"steps": 0}, {"downtime_ms": 0}, {"timeout_action": "explode"},
                                {"completion_timeout_s": -1}, {"bogus": 1}])
def test_bad_parameters_are_refused(kw: dict) -> None:
    with pytest.raises(MigrationInputError):
        make_policy("stepwise", **kw)
