"""hvsim-predictive on pass sequences recorded from real migrations (qemu-default driving QEMU,
so the sequences are QEMU's natural progress): data/converging.json (16 MiB rewritten at 4 MiB/s),
data/stalling.json (128 MiB working set at ~0.7 of the link), data/diverging.json (64 MiB
rewritten flat out, several times the link)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from hvsim.migration.errors import MigrationInputError
from hvsim.migration.policies import ActionKind, make_policy
from hvsim.migration.progress import Observation

from ._replay import ctx, load, replay


def first_decision(name: str, **params):  # type: ignore[no-untyped-def]
    rec, samples = load(name)
    p = make_policy("hvsim-predictive", fixed_cost_ms=60, **params)
    acts = replay(p, ctx(rec, postcopy=params.pop("_postcopy", True)), samples)
    return p, acts


def test_converging_guest_switches_over_when_the_prediction_meets_the_budget() -> None:
    p, acts = first_decision("converging", budget_ms=500)
    assert acts, "no decision on a converging sequence"
    obs, act = acts[-1]
    assert act.kind is ActionKind.SWITCHOVER and "meets the 500 ms budget" in act.reason
    assert obs.passes >= 2                                  # never during the bulk pass
    assert act.inputs["predicted_ms"] * 1.0 <= 500
    # deliberate: QEMU's threshold (its bandwidth x limit) admits the pending bytes x margin only
    admit = act.inputs["pending_est"] * 1.2
    assert act.inputs["admit_bytes"] == pytest.approx(admit, rel=1e-6)
    assert act.value == pytest.approx(admit / act.inputs["qemu_bw_Bps"] * 1000, rel=0.01, abs=1.0)
    assert not any(a.kind is ActionKind.START_POSTCOPY for _, a in acts)


def test_converging_guest_whose_floor_is_over_budget_accepts_the_smallest_downtime() -> None:
    # recorded: the dirty set stops shrinking at ~7 MB (~300 ms of link): 300 ms + fixed cost
    # cannot be met, so by pass 4 it accepts the smallest achievable downtime (under the hard max)
    p, acts = first_decision("converging")
    obs, act = acts[-1]
    assert act.kind is ActionKind.SWITCHOVER and "accept the smallest achievable" in act.reason
    assert obs.passes <= 4 and act.inputs["predicted_ms"] <= 1000
    assert not any(a.kind is ActionKind.START_POSTCOPY for _, a in acts)


def test_stalling_guest_escalates_to_postcopy_within_three_passes() -> None:
    p, acts = first_decision("stalling")
    obs, act = acts[-1]
    assert act.kind is ActionKind.START_POSTCOPY
    assert obs.passes <= 3
    assert act.inputs["passes_to_budget"] > 5 or math.isinf(act.inputs["passes_to_budget"])


def test_a_converging_guest_gets_more_passes_with_a_larger_converge_within() -> None:
    # recorded stalling sequence: ~10 passes projected; allowed 12, the policy keeps precopying
    p, acts = first_decision("stalling", converge_within=12, max_passes=20)
    assert not any(a.kind in (ActionKind.START_POSTCOPY, ActionKind.SWITCHOVER) for _, a in acts)
    assert not any(a.kind is ActionKind.SWITCHOVER for _, a in acts)   # 5 s of downtime is never accepted


def test_diverging_guest_is_detected_within_three_passes() -> None:
    p, acts = first_decision("diverging")
    obs, act = acts[-1]
    assert act.kind is ActionKind.START_POSTCOPY and obs.passes <= 3
    assert "will not converge" in act.reason or "more passes" in act.reason


def test_without_postcopy_the_ladder_goes_on_to_auto_converge() -> None:
    rec, samples = load("diverging")
    p = make_policy("hvsim-predictive", fixed_cost_ms=60)
    acts = replay(p, ctx(rec, postcopy=False), samples)
    kinds = [a.kind for _, a in acts]
    assert ActionKind.AUTO_CONVERGE in kinds and ActionKind.START_POSTCOPY not in kinds


def test_accept_rung_takes_a_downtime_under_the_hard_max() -> None:
    rec, samples = load("stalling")
    p = make_policy("hvsim-predictive", fixed_cost_ms=60, hard_max_ms=20000)
    acts = replay(p, ctx(rec), samples)
    obs, act = acts[-1]
    assert act.kind is ActionKind.SWITCHOVER and "accept the smallest achievable" in act.reason


def synthetic_stall(passes: int) -> list[Observation]:
    """A guest whose dirty set never shrinks (64 MiB at every sync), 25 MB/s link."""
    out, t, sent = [], 0.0, 0
    for n in range(1, passes + 1):
        for k in range(5):
            t += 0.2
            sent += 5_000_000
            rem = 64 * 2**20 - k * 5_000_000 if n > 1 else 200 * 2**20 - k * 5_000_000
            out.append(Observation(t=t, status="active", passes=n, transferred=sent, remaining=rem,
                                   total=256 * 2**20, dirty_rate=30e6 if n > 1 else 0.0, mbps=200.0,
                                   expected_downtime_ms=None, bandwidth=25e6))
    return out


def test_never_iterates_forever_even_with_an_empty_ladder() -> None:
    p = make_policy("hvsim-predictive", fixed_cost_ms=60, ladder=(), max_passes=12)
    acts = replay(p, ctx({"guest_mib": 256}, postcopy=False), synthetic_stall(40), until_first=False)
    forced = [(o, a) for o, a in acts if a.inputs.get("forced")]
    assert len(forced) == 1 and forced[0][0].passes == 12
    assert acts[-1][1] is forced[0][1]                    # nothing decided after the forced switch


def test_every_decision_carries_its_inputs() -> None:
    for name in ("converging", "stalling", "diverging"):
        _, acts = first_decision(name)
        for _, a in acts:
            for key in ("pass", "remaining", "bandwidth_Bps", "dirty_rate_Bps", "wss_est", "predicted_ms"):
                assert key in a.inputs, (name, a)


def test_prediction_formula() -> None:
    p = make_policy("hvsim-predictive", fixed_cost_ms=50, device_state_bytes=1_000_000)
    p.start(ctx({"guest_mib": 256}))
    o = Observation(t=1.0, status="active", passes=1, transferred=0, remaining=10_000_000, total=1,
                    dirty_rate=0.0, mbps=0.0, expected_downtime_ms=None, bandwidth=10_000_000)
    # (10 MB + 1 MB) / 10 MB/s = 1.1 s + 50 ms
    assert p.predicted_downtime_ms(o) == pytest.approx(1150.0)
    assert p.predicted_downtime_ms(replace(o, bandwidth=None)) is None


@pytest.mark.parametrize("kw", [{"budget_ms": 0}, {"budget_ms": 500, "hard_max_ms": 400}, {"ladder": ("pray",)},
                                {"converge_within": 0}, {"margin_factor": 0.5}, {"xbzrle": "maybe"},
                                {"nonsense": True}])
def test_bad_parameters_are_refused(kw: dict) -> None:
    with pytest.raises(MigrationInputError):
        make_policy("hvsim-predictive", **kw)


def test_unknown_policy_is_refused_with_the_known_names() -> None:
    with pytest.raises(MigrationInputError, match="hvsim-predictive.*qemu-default.*stepwise"):
        make_policy("yolo")


def test_qemu_default_only_sets_its_limit() -> None:
    rec, samples = load("diverging")
    p = make_policy("qemu-default")
    assert [a.kind for a in p.start(ctx(rec))] == [ActionKind.SET_DOWNTIME_LIMIT]
    assert all(not p.observe(o) for o in samples)


def _planned(name: str, contract, **params):  # type: ignore[no-untyped-def]
    """hvsim-predictive following a plan made from the recorded sequence's own measurements."""
    from dataclasses import replace as dc_replace

    from hvsim.migration.planner import plan as make_plan

    from .test_planner import measured_from
    rec, samples = load(name)
    m, _ = measured_from(name, 64 if name == "diverging" else None)
    pl = make_plan(m, contract)
    p = make_policy("hvsim-predictive", fixed_cost_ms=60, **params)
    c = dc_replace(ctx(rec, postcopy=p.wants_postcopy(contract)), contract=contract, plan=pl)
    return p, pl, replay(p, c, samples)


def test_without_a_postcopy_window_the_planned_policy_never_asks_for_postcopy() -> None:
    from hvsim.migration.planner import Contract
    p, pl, acts = _planned("diverging", Contract(time_budget_s=60))
    assert not p.wants_postcopy(Contract())
    assert all(a.kind is not ActionKind.START_POSTCOPY for _, a in acts)


def test_a_plan_of_postcopy_after_pass_one_starts_it_at_the_first_sync() -> None:
    from hvsim.migration.planner import Contract
    c = Contract(time_budget_s=60, postcopy_window_s=30, downtime_budget_ms=1000)
    p, pl, acts = _planned("diverging", c)
    assert pl.chosen.strategy == "postcopy" and pl.chosen.postcopy_after_pass == 1
    obs, act = acts[-1]
    assert act.kind is ActionKind.START_POSTCOPY and obs.passes == 2 and "the plan" in act.reason


def test_a_planned_precopy_takes_the_planned_passes_before_escalating() -> None:
    from hvsim.migration.planner import Contract
    # stalling: ~0.7 per pass, about ten passes to 300 ms; the ladder alone escalated at pass 3
    p, pl, acts = _planned("stalling", Contract(time_budget_s=60))
    assert pl.chosen.strategy == "precopy" and pl.chosen.passes >= 8
    assert not any(a.kind in (ActionKind.START_POSTCOPY, ActionKind.SWITCHOVER) for _, a in acts)
    assert p.converge_within >= pl.chosen.passes
