"""PlacementController: concurrent group creations never break a required rule."""
from __future__ import annotations

import asyncio
import random

import pytest

from hvsim.placement import PlacementController, PlacementRefused, ProblemError, RuleConflictError, check

HOSTS = [{"name": f"h{r}{i}", "vcpus": 16, "memory_mib": 32768, "overcommit": 2.0,
          "domain": {"datacenter": "dc1", "rack": f"r{r}"}} for r in range(4) for i in range(3)]  # 12 hosts


def group(name, n, vcpus=2, mem=2048):
    return {"name": name, "count": n, "demand": {"vcpus": vcpus, "memory_mib": mem}}


async def test_place_commit_release():
    c = PlacementController(HOSTS)
    assert c.hosts[0].effective("vcpus") == 32
    res = await c.place_group(group("web", 3), [{"name": "web-apart", "kind": "anti_affinity", "groups": ["web"],
                                                "level": "rack"}])
    assert res.ok and set(res.assignment) == {"web-0", "web-1", "web-2"}
    assert len({c.host_of(v)[:2] for v in res.assignment}) == 3  # three racks
    assert c.release("web-0") == []
    assert "web-0" not in c.placement
    assert c.release_group("web") == ["web-apart"]
    assert c.placement == {} and c.rules == []


async def test_refusal_explained_and_not_committed():
    c = PlacementController(HOSTS)
    await c.place_group(group("db", 4), [{"name": "db-racks", "kind": "anti_affinity", "groups": ["db"],
                                         "level": "rack"}])
    res = await c.place_group(group("web", 1), [{"name": "web-db", "kind": "anti_affinity", "groups": ["web", "db"],
                                                "level": "rack"}])
    assert res.status == "infeasible"
    assert set(res.explanation.core) == {"web-db", "keep:db"}
    assert res.explanation.hosts[0].text == "0/12 hosts: 12 anti-affinity web-db@rack"
    assert "web-0" not in c.placement and "web" not in c.groups
    with pytest.raises(PlacementRefused):
        await c.place_group(group("web", 1), [{"name": "web-db", "kind": "anti_affinity", "groups": ["web", "db"],
                                              "level": "rack"}], raise_on_refusal=True)


async def test_bad_input_and_contradictions_raise():
    c = PlacementController(HOSTS)
    await c.place_group(group("db", 2))
    with pytest.raises(ProblemError, match="unknown group 'nope'"):
        await c.place_group(group("web", 1), [{"name": "x", "kind": "affinity", "groups": ["web", "nope"]}])
    with pytest.raises(RuleConflictError):
        await c.place_group(group("web", 2), [
            {"name": "a", "kind": "affinity", "groups": ["web", "db"], "level": "rack"},
            {"name": "b", "kind": "anti_affinity", "groups": ["web", "db"], "level": "rack"}])
    with pytest.raises(ProblemError, match="already exists"):
        await c.place_group(group("db", 1))
    kind = "affinity" if c.host_of("db-0") != c.host_of("db-1") else "anti_affinity"
    with pytest.raises(ProblemError, match="breaks it"):
        await c.add_rule({"name": "db-host", "kind": kind, "groups": ["db"], "level": "host"})
    await c.add_rule({"name": "db-dc", "kind": "affinity", "groups": ["db"], "level": "datacenter"})
    assert [r.name for r in c.rules] == ["db-dc"]


async def test_fifty_concurrent_group_creations_never_break_a_required_rule():
    """50 groups at once, each with required rules against the others: placed one after another
    under the lock, each against what the previous committed; some are refused (the cluster
    fills up), none is committed in violation."""
    rng = random.Random(5)
    c = PlacementController(HOSTS, explain_time_s=0.5)

    async def create(i):
        name = f"g{i:02d}"
        rules = [{"name": f"{name}-hosts", "kind": "anti_affinity", "groups": [name], "level": "host"}]
        if i and rng.random() < 0.5:
            other = f"g{rng.randrange(i):02d}"
            rules.append({"name": f"{name}-{other}", "kind": "anti_affinity", "groups": [name, other],
                          "level": "host"})
        rules.append({"name": f"{name}-max", "kind": "max_per_domain", "groups": [name], "level": "rack", "max": 1})
        try:
            return await c.place_group(group(name, rng.randint(2, 4), vcpus=4, mem=4096), rules)
        except ProblemError:
            return None  # named a group that was refused (so it does not exist)

    results = await asyncio.gather(*(create(i) for i in range(50)))
    placed = [r for r in results if r is not None and r.ok]
    assert len(placed) >= 10
    assert any(r is not None and not r.ok for r in results)  # the cluster filled up
    rep = c.check()
    assert rep.required_violations == 0, rep.to_dict()
    # every group's VMs on distinct hosts, at most one per rack, capacity respected
    for vms in c.groups.values():
        hs = [c.host_of(v) for v in vms]
        assert len(set(hs)) == len(hs)
        assert len({h[:2] for h in hs}) == len(hs)


async def test_release_while_solving_is_rechecked():
    c = PlacementController(HOSTS)
    await c.place_group(group("a", 4), [{"name": "a-even", "kind": "spread", "groups": ["a"], "level": "rack",
                                        "max_skew": 1}])
    task = asyncio.create_task(c.place_group(group("b", 3)))
    await asyncio.sleep(0)
    c.release("a-0")
    res = await task
    assert res.ok
    assert check(c.problem(), c.placement, rules=["a-even"]).required_violations == 0
