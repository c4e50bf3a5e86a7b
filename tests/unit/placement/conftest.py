"""Tiny hand-checkable clusters for the placement tests."""
from __future__ import annotations

import pytest

from hvsim.placement import Group, Host, Problem


def hosts(racks: int = 2, per_rack: int = 2, vcpus: int = 8, memory_mib: int = 8192, dcs: int = 1) -> list[Host]:
    out = []
    for d in range(dcs):
        for r in range(racks):
            for i in range(per_rack):
                out.append(Host(f"d{d}r{r}h{i}", {"vcpus": vcpus, "memory_mib": memory_mib}, {},
                                {"datacenter": f"dc{d}", "rack": f"dc{d}r{r}"}))
    return out


def problem(groups: dict[str, int], rules=(), demand=None, **kw) -> Problem:
    """Groups by name -> VM count, each VM 1 vCPU / 1 GiB unless ``demand`` says otherwise."""
    dem = demand or {"vcpus": 1, "memory_mib": 1024}
    hs = kw.pop("hosts", None) or hosts()
    return Problem(hs, [Group.uniform(n, c, dem) for n, c in groups.items()], list(rules),
                   ("datacenter", "rack", "host"), **kw).validate()


@pytest.fixture
def mk():
    return problem


RULE_KINDS = ["aff", "anti", "dom", "notdom", "spread", "max", "resh", "resa"]


def draw_rules(draw, names: list[str], host_names: list[str], domains: list[str], *, max_rules: int,
               max_weight: int, levels: list[str], max_per_domain: int, reserve_levels: list[str],
               reserve_vcpus: int) -> list:
    """Hypothesis helper: up to ``max_rules`` random rules of every kind over groups ``names``
    (required, or preferred with a weight), shared by the property and exactness tests."""
    from hypothesis import strategies as st

    from hvsim.placement import (Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity, MaxPerDomain,
                                 ReserveAmount, ReserveHosts, Spread)
    rules = []
    for i in range(draw(st.integers(0, max_rules))):
        kind = draw(st.sampled_from(RULE_KINDS))
        req = draw(st.booleans())
        kw = {"required": req} if req else {"required": False, "weight": draw(st.integers(1, max_weight))}
        gs = tuple(draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)))
        lv = draw(st.sampled_from(levels))
        name = f"r{i}"
        if kind == "aff":
            rules.append(Affinity(name, groups=gs, level=lv, **kw))
        elif kind == "anti":
            rules.append(AntiAffinity(name, groups=gs, level=lv, **kw))
        elif kind == "dom":
            rules.append(DomainAffinity(name, groups=gs, domains=(draw(st.sampled_from(domains)),), **kw))
        elif kind == "notdom":
            rules.append(DomainAntiAffinity(name, groups=gs, domains=(draw(st.sampled_from(domains)),), **kw))
        elif kind == "spread":
            rules.append(Spread(name, groups=gs, level=lv, max_skew=draw(st.integers(0, 2)),
                                min_domains=draw(st.integers(1, 2)), **kw))
        elif kind == "max":
            rules.append(MaxPerDomain(name, groups=gs, level=lv, max=draw(st.integers(1, max_per_domain)), **kw))
        elif kind == "resh":
            rules.append(ReserveHosts(name, hosts=(draw(st.sampled_from(host_names)),), **kw))
        else:
            rules.append(ReserveAmount(name, level=draw(st.sampled_from(reserve_levels)),
                                       amount={"vcpus": draw(st.integers(1, reserve_vcpus))}, **kw))
    return rules
