"""The reported objective is what the placement costs (issue 9): preferred rules broken by VMs
that cannot move are a constant part of the penalty, reported (and in the gap), not dropped."""
from __future__ import annotations

from hvsim.placement import Affinity, AntiAffinity, Group, MaxPerDomain, Problem, Spread, check, solve

from .conftest import hosts, problem

HOSTS = hosts(racks=2, per_rack=2, dcs=2)  # 8 hosts, 4 racks, 2 datacenters


def agrees(p: Problem):
    res = solve(p)
    assert res.status == "optimal", res.to_dict()
    rep = check(p, res.assignment)
    assert rep.required_violations == 0
    assert res.objective["preferred_penalty"] == rep.preferred_penalty == res.check.preferred_penalty
    assert res.gap == 0.0
    return res, rep


def test_fixed_group_under_preferred_host_affinity():
    """The issue's first example: two VMs fixed on different hosts, preferred host affinity of
    weight 1: reported 0, checked 1 before."""
    p = problem({"web": 2}, [Affinity("together", groups=("web",), level="host", required=False, weight=1)],
                current={"web-0": "d0r0h0", "web-1": "d0r0h1"})
    res, rep = agrees(p)
    assert res.objective["preferred_penalty"] == 1


def test_six_fixed_vms_under_preferred_datacenter_anti_affinity_and_rack_max():
    """The issue's second example: six fixed VMs, preferred datacenter anti-affinity and a rack
    max_per_domain (reported 0 before)."""
    names = [h.name for h in HOSTS]
    cur = {f"g-{i}": names[i % 4] for i in range(6)}  # all in dc0, racks dc0r0 / dc0r1
    p = problem({"g": 6}, [AntiAffinity("apart", groups=("g",), level="datacenter", required=False, weight=5),
                           MaxPerDomain("per-rack", groups=("g",), level="rack", max=1, required=False, weight=3)],
                hosts=HOSTS, current=cur)
    res, rep = agrees(p)
    assert res.objective["preferred_penalty"] == 5 * 5 + 3 * 4


def test_constant_part_next_to_variables():
    """A fixed group breaking preferred rules, and a new group placed in the same solve: the
    constant is added to what the solver optimises, and the optimum is still proven."""
    fixed = Group.uniform("old", 2, {"vcpus": 1, "memory_mib": 1024})
    new = Group.uniform("new", 3, {"vcpus": 1, "memory_mib": 1024})
    p = Problem(HOSTS, [fixed, new],
                [Affinity("old-one-rack", groups=("old",), level="rack", required=False, weight=7),
                 Spread("new-even", groups=("new",), level="datacenter", max_skew=0, required=False, weight=2)],
                ("datacenter", "rack", "host"), current={"old-0": "d0r0h0", "old-1": "d1r1h1"}).validate()
    res, rep = agrees(p)
    assert res.objective["preferred_penalty"] == 7 + 2  # old spans two racks; 3 VMs over 2 datacenters: skew 1


async def test_controller_reports_the_constant_and_follows_releases():
    """The controller keeps the constant part between placements; after a release changes it,
    the reported penalty follows (it is what the checker counts on the whole cluster)."""
    from hvsim.placement import PlacementController

    hs = [{"name": h.name, "capacity": dict(h.capacity), "domain": dict(h.domain)} for h in HOSTS]
    c = PlacementController(hs, levels=["datacenter", "rack", "host"])

    async def place(name, n, rules=()):
        res = await c.place_group({"name": name, "count": n, "demand": {"vcpus": 1, "memory_mib": 1024}}, rules)
        assert res.ok
        return res

    # "old" is placed first under a required host anti-affinity, then a preferred rack affinity
    # on it is added: 3 VMs on 3 hosts in at least 2 racks break it
    await place("old", 3, [{"name": "old-hosts", "kind": "anti_affinity", "groups": ["old"], "level": "host"},
                           {"name": "old-spread", "kind": "spread", "groups": ["old"], "level": "datacenter",
                            "min_domains": 2}])
    await c.add_rule({"name": "old-rack", "kind": "affinity", "groups": ["old"], "level": "rack",
                      "required": False, "weight": 4})
    before = c.check().preferred_penalty
    assert before > 0
    res = await place("a", 1)
    assert res.objective["preferred_penalty"] == before
    res = await place("b", 1)
    assert res.objective["preferred_penalty"] == before  # (from the kept constants)
    c.release("old-0")
    c.release("old-1")  # one VM left: one rack, no violation
    assert c.check().preferred_penalty == 0
    res = await place("d", 1)
    assert res.objective["preferred_penalty"] == 0
