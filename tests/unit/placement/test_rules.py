"""One tiny instance per rule kind, with the answer worked out by hand. Cluster: one datacenter,
racks dc0r0 and dc0r1, two hosts each (d0r0h0, d0r0h1, d0r1h0, d0r1h1), 8 vCPU / 8 GiB."""
from __future__ import annotations

from collections import Counter

import pytest

from hvsim.placement import (Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity, Group, MaxPerDomain,
                             MovePolicy, Objective, ReserveAmount, ReserveHosts, Spread, check, solve)

from .conftest import hosts, problem

RACK = {"d0r0h0": "dc0r0", "d0r0h1": "dc0r0", "d0r1h0": "dc0r1", "d0r1h1": "dc0r1"}


def placed(p, solver="cpsat"):
    res = solve(p, solver)
    assert res.ok, res.message
    rep = check(p, res.assignment)
    assert rep.required_violations == 0, rep.to_dict()
    return res


def racks_of(res, group):
    return Counter(RACK[h] for vm, h in res.assignment.items() if vm.startswith(group + "-"))


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_anti_affinity_one_group_host(solver):
    res = placed(problem({"web": 4}, [AntiAffinity("spread-web", groups=("web",), level="host")]), solver)
    assert len(set(res.assignment.values())) == 4


def test_anti_affinity_five_on_four_hosts_is_infeasible():
    res = solve(problem({"web": 5}, [AntiAffinity("spread-web", groups=("web",), level="host")]))
    assert res.status == "infeasible"
    assert res.explanation.core == ["spread-web"] and res.explanation.minimal
    assert res.explanation.hosts[0].text == "0/4 hosts: 4 anti-affinity spread-web@host"


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_anti_affinity_two_groups_rack(solver):
    res = placed(problem({"web": 2, "db": 2}, [AntiAffinity("web-db", groups=("web", "db"), level="rack")]), solver)
    assert not set(racks_of(res, "web")) & set(racks_of(res, "db"))


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_affinity_rack(solver):
    res = placed(problem({"web": 2, "db": 2}, [Affinity("together", groups=("web", "db"), level="rack")]), solver)
    assert len(set(racks_of(res, "web")) | set(racks_of(res, "db"))) == 1


def test_affinity_too_big_for_a_rack_is_infeasible():
    # 20 vCPUs of VMs, a rack holds 16
    res = solve(problem({"web": 5}, [Affinity("together", groups=("web",), level="rack")],
                        demand={"vcpus": 4, "memory_mib": 1024}))
    assert res.status == "infeasible" and res.explanation.core == ["together"]


def test_preferred_affinity_costs_domains_minus_one():
    p = problem({"web": 5}, [Affinity("together", groups=("web",), level="rack", required=False, weight=7)],
                demand={"vcpus": 4, "memory_mib": 1024})
    res = placed(p)
    assert res.status == "optimal"
    assert res.check.preferred_penalty == 7 and res.objective["preferred_penalty"] == 7


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_domain_affinity_and_anti_affinity(solver):
    p = problem({"web": 2, "db": 2}, [DomainAffinity("web-in-r0", groups=("web",), domains=("rack:dc0r0",)),
                                      DomainAntiAffinity("db-not-h", groups=("db",), domains=("d0r1h0",))])
    res = placed(p, solver)
    assert set(racks_of(res, "web")) == {"dc0r0"}
    assert "d0r1h0" not in {h for vm, h in res.assignment.items() if vm.startswith("db-")}


def test_preferred_domain_affinity_counts_vms_outside():
    # 3 VMs of 6 vCPU, rack dc0r0 holds only 2 of them (one per host)
    p = problem({"big": 3}, [DomainAffinity("prefer-r0", groups=("big",), domains=("dc0r0",), required=False,
                                            weight=4)], demand={"vcpus": 6, "memory_mib": 1024})
    res = placed(p)
    assert res.check.preferred_penalty == 4 and res.objective["preferred_penalty"] == 4


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_spread_max_skew(solver):
    res = placed(problem({"web": 4}, [Spread("even", groups=("web",), level="rack", max_skew=0)]), solver)
    assert sorted(racks_of(res, "web").values()) == [2, 2]


def test_spread_min_domains():
    # affinity preferred pulls into one rack; required min_domains=2 wins
    p = problem({"web": 2}, [Spread("two-racks", groups=("web",), level="rack", max_skew=2, min_domains=2),
                             Affinity("pull", groups=("web",), level="rack", required=False, weight=1)])
    res = placed(p)
    assert len(racks_of(res, "web")) == 2 and res.check.preferred_penalty == 1


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_max_per_domain(solver):
    res = placed(problem({"web": 4}, [MaxPerDomain("two-per-rack", groups=("web",), level="rack", max=2)]), solver)
    assert max(racks_of(res, "web").values()) == 2


def test_max_per_domain_infeasible():
    res = solve(problem({"web": 5}, [MaxPerDomain("two-per-rack", groups=("web",), level="rack", max=2)]))
    assert res.status == "infeasible" and res.explanation.core == ["two-per-rack"]


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_reserve_hosts(solver):
    res = placed(problem({"web": 3}, [ReserveHosts("spare", hosts=("d0r0h0", "d0r1h1"))]), solver)
    assert not {"d0r0h0", "d0r1h1"} & set(res.assignment.values())


@pytest.mark.parametrize("solver", ["cpsat", "greedy"])
def test_reserve_amount_per_rack(solver):
    # each rack has 16 vCPUs; keep 10 free per rack: at most 6 vCPUs (3 VMs of 2) per rack
    p = problem({"web": 6}, [ReserveAmount("failover", level="rack", amount={"vcpus": 10})],
                demand={"vcpus": 2, "memory_mib": 1024})
    res = placed(p, solver)
    assert sorted(racks_of(res, "web").values()) == [3, 3]


def test_reserve_amount_infeasible():
    p = problem({"web": 7}, [ReserveAmount("failover", level="rack", amount={"vcpus": 10})],
                demand={"vcpus": 2, "memory_mib": 1024})
    res = solve(p)
    assert res.status == "infeasible" and res.explanation.core == ["failover"]


def test_capacity_and_overcommit():
    hs = hosts(1, 1, vcpus=4)
    hs[0].overcommit["vcpus"] = 2.0  # 8 schedulable vCPUs
    assert solve(problem({"web": 8}, hosts=hs)).ok
    res = solve(problem({"web": 9}, hosts=hosts(1, 1, vcpus=4)))
    assert res.status == "infeasible" and res.explanation.core == []
    assert any("vcpus: demand 9 > capacity 4" in m for m in res.explanation.messages)


def test_current_placement_stays_without_moves():
    p = problem({"web": 2}, current={"web-0": "d0r0h0", "web-1": "d0r0h0"})
    res = placed(p)
    assert res.assignment == {"web-0": "d0r0h0", "web-1": "d0r0h0"}


def test_moves_fewest_and_limited():
    rules = [AntiAffinity("apart", groups=("web",), level="host")]
    cur = {"web-0": "d0r0h0", "web-1": "d0r0h0", "web-2": "d0r0h0"}
    p = problem({"web": 3}, rules, current=cur, moves=MovePolicy(True, None))
    res = placed(p)
    assert res.objective["moves"] == 2 and res.check.moves == 2
    assert sum(1 for v, h in res.assignment.items() if h == "d0r0h0") == 1
    p = problem({"web": 3}, rules, current=cur, moves=MovePolicy(True, 1))
    res = solve(p)
    assert res.status == "infeasible" and set(res.explanation.core) == {"apart", "move-limit"}
    p = problem({"web": 3}, rules, current=cur, moves=MovePolicy(False))
    res = solve(p)
    assert res.status == "infeasible" and set(res.explanation.core) == {"apart", "keep:web"}


def test_pack_uses_fewest_hosts_balance_spreads():
    p = problem({"web": 4}, objective=Objective("pack"))
    assert len(set(placed(p).assignment.values())) == 1
    p = problem({"web": 4})
    assert len(set(placed(p).assignment.values())) == 4


def test_greedy_misses_what_cpsat_finds():
    from hvsim.placement.generate import hard_instances
    for name, p in hard_instances(3):
        assert solve(p, "greedy").status == "failed", name
        assert placed(p).status == "optimal", name


def test_checker_counts_by_hand():
    p = problem({"web": 3, "db": 1}, [
        AntiAffinity("a1", groups=("web",), level="host", required=False, weight=2),
        AntiAffinity("a2", groups=("web", "db"), level="rack", required=False, weight=3),
        MaxPerDomain("m", groups=("web",), level="rack", max=1, required=False, weight=5),
    ])
    asg = {"web-0": "d0r0h0", "web-1": "d0r0h0", "web-2": "d0r0h1", "db-0": "d0r0h1"}
    rep = check(p, asg)
    by = {r.name: r for r in rep.rules}
    assert by["a1"].violations == 1 and by["a1"].penalty == 2      # one extra VM on d0r0h0
    assert by["a2"].violations == 1 and by["a2"].penalty == 3      # rack dc0r0 holds both
    assert by["m"].violations == 2 and by["m"].penalty == 10       # 3 in a rack, max 1
    assert rep.required_violations == 0 and rep.preferred_penalty == 15
    rep = check(p, {"web-0": "d0r0h0"})
    assert rep.required_violations == 3  # three VMs unplaced


def test_named_resources():
    hs = hosts(1, 2)
    hs[0].capacity["gpu"] = 1
    p = problem({"ml": 1}, hosts=hs, demand={"vcpus": 1, "memory_mib": 1024, "gpu": 1})
    assert placed(p).assignment == {"ml-0": "d0r0h0"}
    assert Group.uniform("x", 2, {"vcpus": 1}).vms[1].name == "x-1"
