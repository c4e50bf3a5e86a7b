"""The switchover criterion on recorded round sequences (pure logic)."""
from __future__ import annotations

import math

import pytest

from hvsim.crosscloud.criterion import CutoverCosts, RoundRecord, SwitchoverCriterion, Verdict
from hvsim.crosscloud.errors import CrossCloudInputError

MiB = 1 << 20
COSTS = CutoverCosts(quiesce_s=0.2, verify_s=0.5, start_s=0.3)      # fixed part 1.0 s


def rounds(*spec: tuple[int, float, int]) -> list[RoundRecord]:
    return [RoundRecord(i + 1, b, s, d) for i, (b, s, d) in enumerate(spec)]


def test_converging_rounds_cut_over_when_the_prediction_fits() -> None:
    c = SwitchoverCriterion(budget_s=3.0, costs=COSTS)
    # 4 MiB/s link; the writer dirties 0.5 MiB/s: 64 MiB -> 8 MiB -> 1 MiB
    rs = rounds((64 * MiB, 16.0, 8 * MiB), (8 * MiB, 2.0, 1 * MiB))
    d = c.evaluate(rs[:1], pending=8 * MiB, elapsed_s=16)
    assert d.verdict is Verdict.CONTINUE          # 1 + 8/4 = 3.something > 3
    d = c.evaluate(rs, pending=1 * MiB, elapsed_s=18)
    assert d.verdict is Verdict.CUTOVER and d.fits
    assert d.bandwidth == pytest.approx(72 * MiB / 18.0)
    assert d.write_rate == pytest.approx(0.5 * MiB)
    # downtime = fixed 1.0 + (1 MiB + 0.5 MiB/s * 0.2 s) / 4 MiB/s
    assert d.predicted_s == pytest.approx(1.0 + (1 * MiB + 0.1 * MiB) / (4 * MiB))
    assert d.options(3.0) == []


def test_a_writer_faster_than_the_link_is_not_converging_and_never_cut_over() -> None:
    c = SwitchoverCriterion(budget_s=2.0, costs=COSTS, patience=3)
    # the delta stays at ~20 MiB: the writer dirties as fast as the link drains
    rs = rounds((64 * MiB, 16.0, 20 * MiB), (20 * MiB, 5.0, 20 * MiB), (20 * MiB, 5.0, 19 * MiB),
                (19 * MiB, 4.8, 20 * MiB))
    for n in range(1, 4):
        assert c.evaluate(rs[:n], pending=20 * MiB, elapsed_s=5.0 * n).verdict is Verdict.CONTINUE
    d = c.evaluate(rs, pending=20 * MiB, elapsed_s=31)
    assert d.verdict is Verdict.NOT_CONVERGING and not d.fits
    assert d.predicted_s is not None and d.predicted_s > 2.0
    opts = d.options(2.0)
    assert any("accept" in o for o in opts) and any("throttle the writer" in o for o in opts)


def test_deadline_by_rounds_and_by_time() -> None:
    rs = rounds((64 * MiB, 16.0, 32 * MiB), (32 * MiB, 8.0, 16 * MiB))
    assert SwitchoverCriterion(1.0, COSTS, max_rounds=2).evaluate(rs, 16 * MiB, 24).verdict is Verdict.DEADLINE
    assert SwitchoverCriterion(1.0, COSTS, deadline_s=20).evaluate(rs, 16 * MiB, 24).verdict is Verdict.DEADLINE
    assert SwitchoverCriterion(1.0, COSTS).evaluate(rs, 16 * MiB, 24).verdict is Verdict.CONTINUE


def test_achievable_downtime_is_the_smallest_prediction_seen() -> None:
    c = SwitchoverCriterion(budget_s=1.5, costs=COSTS)
    rs = rounds((64 * MiB, 16.0, 8 * MiB))
    d1 = c.evaluate(rs, pending=4 * MiB, elapsed_s=16)
    d2 = c.evaluate(rs, pending=16 * MiB, elapsed_s=17, achievable_s=d1.predicted_s)
    assert d2.achievable_s == pytest.approx(d1.predicted_s) and d2.predicted_s > d1.predicted_s  # type: ignore[operator]
    # accepting now means the current prediction (the delta grew), the best one is only mentioned
    assert d2.options(1.5)[0].startswith(f"accept a downtime of about {d2.predicted_s:.1f} s now")
    assert f"smallest predicted so far was {d1.predicted_s:.1f} s" in d2.options(1.5)[0]


def test_small_rounds_do_not_measure_the_bandwidth() -> None:
    c = SwitchoverCriterion(budget_s=5.0, costs=COSTS)
    rs = rounds((64 * 1024, 0.5, 4096))           # all latency: no bandwidth from it
    d = c.evaluate(rs, pending=4096, elapsed_s=1)
    assert d.verdict is Verdict.CONTINUE and d.bandwidth is None
    d = c.evaluate(rs, pending=4096, elapsed_s=1, bandwidth_hint=4 * MiB)   # the throttle as a hint
    assert d.verdict is Verdict.CUTOVER and d.bandwidth == 4 * MiB


def test_no_round_yet() -> None:
    d = SwitchoverCriterion(5.0).evaluate([], pending=64 * MiB, elapsed_s=0)
    assert d.verdict is Verdict.CONTINUE and d.predicted_s is None


@pytest.mark.parametrize("kw", [{"budget_s": 0}, {"budget_s": -1}, {"budget_s": math.nan}, {"budget_s": True},
                                {"budget_s": 5, "deadline_s": 0}, {"budget_s": 5, "max_rounds": 0}])
def test_bad_criterion_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(CrossCloudInputError):
        SwitchoverCriterion(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("rec", [(0, 1, 1.0, 0), (1, -1, 1.0, 0), (1, 1, math.inf, 0), (1, 1, -0.1, 0),
                                 (1, 1, 1.0, -5)])
def test_bad_round_records_are_refused(rec: tuple[int, int, float, int]) -> None:
    with pytest.raises(CrossCloudInputError):
        RoundRecord(*rec)


def test_a_fit_with_a_long_delta_copy_goes_one_more_round_then_cuts_over() -> None:
    c = SwitchoverCriterion(budget_s=8.0, costs=COSTS)
    # 2 MiB/s link, a 64 KiB/s writer: the first round (96 MiB, 48 s) leaves 3 MiB dirty
    rs = rounds((96 * MiB, 48.0, 3 * MiB))
    d = c.evaluate(rs, pending=3 * MiB, elapsed_s=48)
    assert d.predicted_s is not None and d.predicted_s <= 8.0          # it fits: 1.0 + 1.5 s
    assert d.verdict is Verdict.CONTINUE and "one more round" in d.reason
    after = d.inputs["after_one_more_round_s"]
    assert after < d.predicted_s * 0.75
    # the second round copied the 3 MiB in 1.6 s; 100 KiB piled up meanwhile
    rs = rounds((96 * MiB, 48.0, 3 * MiB), (3 * MiB, 1.6, 100 * 1024))
    d2 = c.evaluate(rs, pending=100 * 1024, elapsed_s=49.6)
    assert d2.verdict is Verdict.CUTOVER
    assert d2.predicted_s is not None and d2.predicted_s < d.predicted_s * 0.75
    assert d2.predicted_s == pytest.approx(after, rel=0.05)


def test_a_fit_never_waits_past_the_round_limit_or_for_a_writer_that_keeps_up() -> None:
    rs = rounds((96 * MiB, 48.0, 3 * MiB))
    # out of rounds: cut over at the fit
    assert SwitchoverCriterion(budget_s=8.0, costs=COSTS, max_rounds=1).evaluate(
        rs, pending=3 * MiB, elapsed_s=48).verdict is Verdict.CUTOVER
    # a writer as fast as the link: another round would not shrink the delta
    fast = rounds((96 * MiB, 48.0, 3 * MiB), (3 * MiB, 1.5, 3 * MiB))
    c = SwitchoverCriterion(budget_s=8.0, costs=COSTS)
    assert c.evaluate(fast, pending=3 * MiB, elapsed_s=49.5).verdict is Verdict.CUTOVER
    # a short copy is not worth a round however the ratio looks
    assert c.evaluate(rounds((96 * MiB, 48.0, 512 * 1024)), pending=512 * 1024,
                      elapsed_s=48).verdict is Verdict.CUTOVER
