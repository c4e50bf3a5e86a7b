"""Reserved failover capacity and HA restarts, the pure parts: our sizing against vSphere-HA slot
sizing on hand-made sets (heterogeneous sets are where slots waste a lot), the rules a plan makes
are valid placement rules, admission control naming the rule, failover placement lifting only the
reservation, the verdict table (power evidence, grace), priority order, and the resolution of an
HA restart a manager finds in flight."""
from __future__ import annotations

from pathlib import Path

import pytest

from hvsim.control.errors import ConflictError
from hvsim.control.ha import HostVerdict, PowerEvidence, judge, lost_vms, power_evidence, restart_tiers
from hvsim.control.ops import Operation, OpKind, OpState, Outcome, QemuState, VMFacts, resolve
from hvsim.control.placer import Placer, place_failover
from hvsim.control.reservation import Capacity, Demand, size_reservation, slot_sizing
from hvsim.control.state import HostRecord, HostStatus, RuleRecord, VMPower, VMRecord
from hvsim.placement.schema import rule_from_dict


# -- sizing -----------------------------------------------------------------------------------------
def test_homogeneous_set_slots_and_ours_agree() -> None:
    vms = [Demand(f"v{i}", 1, 512) for i in range(6)]
    plan = size_reservation(vms, None, [Capacity("h3", 4, 2048), Capacity("h4", 4, 2048)])
    assert plan.fits and plan.unplaced == []
    assert (plan.reserved_vcpus, plan.reserved_memory_mib) == (6, 3072)
    assert (plan.slots.slot_vcpus, plan.slots.slot_memory_mib, plan.slots.slots_needed) == (1, 512, 6)
    assert plan.overhead == {"vcpus": 0, "memory_mib": 0}
    assert plan.slots.fits and plan.slots.hosts_needed == 2          # 4 slots per host


def test_heterogeneous_set_slots_waste_a_lot() -> None:
    # one large database and eight small web VMs, plus the management host
    vms = [Demand("db", 4, 8192)] + [Demand(f"web{i}", 1, 256) for i in range(8)]
    hosts = [Capacity(f"r{i}", 16, 32768) for i in range(4)]
    plan = size_reservation(vms, Demand("manager", 2, 2048), hosts)
    assert plan.fits
    assert (plan.reserved_vcpus, plan.reserved_memory_mib) == (4 + 8 + 2, 8192 + 8 * 256 + 2048)
    s = plan.slots
    assert (s.slot_vcpus, s.slot_memory_mib, s.slots_needed) == (4, 8192, 10)
    assert (s.reserved_vcpus, s.reserved_memory_mib) == (40, 81920)
    assert plan.overhead == {"vcpus": 40 - 14, "memory_mib": 81920 - 12288}
    # slots: 4 per 16-vCPU/32-GiB host, 10 slots -> 3 hosts; ours packs into one host
    assert s.hosts_needed == 3 and len(plan.per_host) == 1
    d = plan.to_dict()
    assert d["overhead"]["percent"]["memory_mib"] == round(100 * (81920 - 12288) / 12288, 1)


def test_packing_respects_each_host_and_reports_what_fits_nowhere() -> None:
    vms = [Demand("big", 8, 4096), Demand("a", 2, 1024), Demand("b", 2, 1024), Demand("c", 2, 1024)]
    plan = size_reservation(vms, None, [Capacity("h3", 4, 2048), Capacity("h4", 4, 2048)])
    assert plan.unplaced == ["big"] and not plan.fits
    for h, (v, m) in plan.per_host.items():
        assert v <= 4 and m <= 2048, (h, v, m)
    assert sorted(plan.assignment) == ["a", "b", "c"]
    assert plan.reserved_memory_mib == 3072
    assert "big" in plan.notes[0]


def test_plan_rules_are_valid_host_level_reservations() -> None:
    plan = size_reservation([Demand("a", 1, 256), Demand("b", 2, 512)], Demand("manager", 1, 512),
                            [Capacity("h3", 4, 4096)])
    rules = plan.rules()
    assert [r["name"] for r in rules] == ["ha-reserve-h3"]
    r = rule_from_dict(rules[0])
    assert r.required and rules[0]["amount"] == {"vcpus": 4, "memory_mib": 1280}
    RuleRecord(name=rules[0]["name"], spec={k: v for k, v in rules[0].items() if k != "name"})


def test_slot_sizing_with_no_candidates_does_not_fit() -> None:
    s = slot_sizing([Demand("a", 2, 1024)], [])
    assert not s.fits and s.hosts_needed is None and (s.reserved_vcpus, s.reserved_memory_mib) == (2, 1024)


def test_repeated_names_are_refused() -> None:
    with pytest.raises(ValueError, match="repeat"):
        size_reservation([Demand("a", 1, 1), Demand("a", 1, 1)], None, [])


# -- admission control and failover placement -------------------------------------------------------
def _hosts(*names: str, status: HostStatus = HostStatus.UP) -> list[HostRecord]:
    return [HostRecord(name=n, vcpus=4, memory_mib=2048, agent=f"unix:/run/{n}.sock", status=status) for n in names]


RESERVE = RuleRecord(name="ha-reserve-h3", spec={"kind": "reserve_amount", "level": "host", "domains": ["host:h3"],
                                                 "amount": {"vcpus": 2, "memory_mib": 1536}})


def test_a_pinned_define_into_reserved_capacity_is_refused_naming_the_rule() -> None:
    p = Placer()
    p.load(_hosts("h1", "h2", "h3"), [], [RESERVE])
    p.admit(VMRecord(name="small", memory_mib=256, host="h3"))         # 2048 - 256 >= 1536: allowed
    with pytest.raises(ConflictError, match="ha-reserve-h3"):
        p.admit(VMRecord(name="intruder", memory_mib=1024, host="h3"))
    p.admit(VMRecord(name="elsewhere", memory_mib=1024, host="h1"))    # other hosts are not reserved


def test_a_placed_define_never_takes_reserved_capacity_and_says_why() -> None:
    p = Placer()
    p.load(_hosts("h1", "h3"), [VMRecord(name="full", memory_mib=2048, host="h1")], [RESERVE])
    with pytest.raises(ConflictError, match="reserve ha-reserve-h3"):
        p.place(VMRecord(name="more", memory_mib=1024))


def test_failover_placement_lifts_only_the_reservation() -> None:
    hosts = _hosts("h2", "h3") + _hosts("h1", status=HostStatus.UNREACHABLE)
    vms = [VMRecord(name="db", memory_mib=1024, host="h1", protected=True, group="g"),
           VMRecord(name="other", memory_mib=2048, host="h2")]
    assert place_failover(vms[0], hosts, vms, [RESERVE]) == "h3"         # the reserved host takes it
    # a required anti-affinity with a VM on h3 still holds during failover
    anti = RuleRecord(name="g-anti", spec={"kind": "anti_affinity", "groups": ["g"], "level": "host"})
    peer = VMRecord(name="peer", memory_mib=128, host="h3", group="g")
    with pytest.raises(ConflictError, match="anti-affinity g-anti"):
        place_failover(vms[0], hosts, [*vms, peer], [RESERVE, anti])
    # too big for any host that is up: refused naming the reason, never placed on the lost host
    huge = VMRecord(name="huge", vcpus=8, memory_mib=512, host="h1", protected=True)
    with pytest.raises(ConflictError, match="huge.*vcpu"):
        place_failover(huge, hosts, vms, [RESERVE])


# -- verdicts, evidence, order ----------------------------------------------------------------------
@pytest.mark.parametrize(("after", "evidence", "verdict"), [
    (0.0, PowerEvidence.ON, HostVerdict.ALIVE),
    (999.0, PowerEvidence.ON, HostVerdict.ALIVE),            # powered on: never restarted, however long
    (0.0, PowerEvidence.OFF, HostVerdict.LOST),
    (0.0, PowerEvidence.UNKNOWN, HostVerdict.WAITING),
    (14.9, PowerEvidence.UNKNOWN, HostVerdict.WAITING),
    (15.0, PowerEvidence.UNKNOWN, HostVerdict.PRESUMED_LOST),
])
def test_judge(after: float, evidence: PowerEvidence, verdict: HostVerdict) -> None:
    assert judge(after, evidence, grace=15.0) is verdict


def test_power_evidence_reads_the_domain(tmp_path: Path) -> None:
    root = tmp_path / "hvsim"
    dom = root / "123.456.h1"
    dom.mkdir(parents=True)
    (dom / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert power_evidence(str(dom), root)[0] is PowerEvidence.ON
    (dom / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert power_evidence(str(dom), root)[0] is PowerEvidence.OFF
    assert power_evidence(str(root / "123.456.gone"), root)[0] is PowerEvidence.OFF       # removed
    assert power_evidence(None, root)[0] is PowerEvidence.UNKNOWN
    assert power_evidence(str(tmp_path / "elsewhere" / "1.2.h1"), root)[0] is PowerEvidence.UNKNOWN
    assert power_evidence(str(root / "not a domain"), root)[0] is PowerEvidence.UNKNOWN
    assert power_evidence(str(dom), tmp_path / "absent")[0] is PowerEvidence.UNKNOWN       # cgroup not visible


def test_restart_tiers_go_highest_priority_first() -> None:
    vms = [VMRecord(name=n, priority=p, protected=True) for n, p in (("c", 10), ("a", 100), ("b", 10), ("d", 0))]
    assert [[v.name for v in t] for t in restart_tiers(vms)] == [["a"], ["b", "c"], ["d"]]


def test_lost_vms_sorts_restart_crashed_and_skipped() -> None:
    vms = [VMRecord(name="db", host="h1", protected=True, disk_mib=16, power=VMPower.RUNNING),
           VMRecord(name="nodisk", host="h1", protected=True, power=VMPower.RUNNING),
           VMRecord(name="scratch", host="h1", power=VMPower.RUNNING),
           VMRecord(name="off", host="h1", protected=True, disk_mib=16, power=VMPower.SHUTOFF),
           VMRecord(name="there", host="h2", protected=True, disk_mib=16, power=VMPower.RUNNING)]

    def names(out: tuple[list[VMRecord], ...]) -> list[list[str]]:
        return [[v.name for v in x] for x in out]
    assert names(lost_vms(vms, "h1", HostVerdict.LOST)) == [["db", "nodisk"], ["scratch"], []]
    # no power evidence: a protected VM without a disk has no lock to guard it; unprotected left alone
    assert names(lost_vms(vms, "h1", HostVerdict.PRESUMED_LOST)) == [["db"], [], ["nodisk"]]
    assert names(lost_vms(vms, "h1", HostVerdict.ALIVE)) == [[], [], []]


# -- resolution of an in-flight restart -------------------------------------------------------------
def _restart_op(state: OpState = OpState.RUNNING) -> Operation:
    op = Operation.new(OpKind.RESTART, "db", {"source": "h1", "destination": "h3"})
    if state is not OpState.PENDING:
        op.start()
    return op


def test_restart_that_runs_on_its_destination_is_finished() -> None:
    op = _restart_op()
    res = resolve(op.record, VMFacts(vm="db", qemus={"h3": QemuState.RUNNING}, unreachable=frozenset({"h1"})), "h1")
    assert (res.outcome, res.final, res.vm_host, res.vm_power) == (Outcome.FINISH, OpState.SUCCEEDED, "h3",
                                                                    VMPower.RUNNING)
    assert res.actions == ()


def test_restart_that_never_came_up_is_failed_and_the_vm_stays_on_the_lost_host() -> None:
    op = _restart_op()
    res = resolve(op.record, VMFacts(vm="db", qemus={}, unreachable=frozenset({"h1"})), "h1")
    assert (res.outcome, res.final, res.vm_host, res.vm_power) == (Outcome.ROLLBACK, OpState.FAILED, "h1",
                                                                    VMPower.CRASHED)


def test_restart_with_its_destination_unreachable_is_deferred() -> None:
    res = resolve(_restart_op().record, VMFacts(vm="db", unreachable=frozenset({"h1", "h3"})), "h1")
    assert res.outcome is Outcome.DEFER and res.final is None


def test_restart_never_leaves_two_copies() -> None:
    facts = VMFacts(vm="db", qemus={"h3": QemuState.RUNNING, "h1": QemuState.RUNNING})
    res = resolve(_restart_op().record, facts, "h1")
    assert res.vm_host == "h3" and [(a.kind.value, a.host) for a in res.actions] == [("destroy", "h1")]


def test_restart_recorded_but_never_started_is_abandoned() -> None:
    res = resolve(_restart_op(OpState.PENDING).record, VMFacts(vm="db", unreachable=frozenset({"h1"})), "h1")
    assert (res.outcome, res.final, res.vm_host) == (Outcome.ABANDON, OpState.FAILED, "h1")
