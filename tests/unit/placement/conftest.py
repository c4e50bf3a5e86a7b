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
