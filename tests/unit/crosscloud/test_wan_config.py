"""The WAN config a host agent is started with (hvsim.crosscloud.network.WanConfig): validated, a
JSON round trip, and each agent's addresses from its own slice of the guest network."""
from __future__ import annotations

from typing import Any

import pytest

from hvsim.crosscloud.errors import CrossCloudInputError
from hvsim.crosscloud.network import WanConfig

NS = {"a1": "ul-a1", "b1": "ul-b1", "client": "ul-client"}
IPS = {"a1": "198.18.0.2", "b1": "198.18.0.3", "client": "198.18.0.4"}


def test_round_trip_and_disjoint_slices() -> None:
    a = WanConfig("a1", NS, IPS, pool="198.19.0.0/20")
    b = WanConfig.from_json(WanConfig("b1", NS, IPS, pool="198.19.16.0/20").to_json())
    assert WanConfig.from_json(a.to_json()) == a
    wa, wb = a.network(), b.network()
    ga, gb = wa.address("app1", "a1"), wb.address("app1", "b1")       # the same name in both clouds
    assert (ga.ip, ga.gateway, gb.ip) == ("198.19.0.6", "198.19.0.5", "198.19.16.6")
    assert wa.address("app1", "a1") == ga                               # stable within the agent
    assert wb.kernel_args("app1", "b1", isolated=True).endswith(",198.19.16.6/30")   # no gateway: isolated


@pytest.mark.parametrize(("d", "why"), [
    ({"host": "a1", "namespaces": NS, "addresses": {"a1": "198.18.0.2"}}, "same hosts"),
    ({"host": "zz", "namespaces": NS, "addresses": IPS}, "not among the WAN hosts"),
    ({"host": "a1", "namespaces": NS, "addresses": IPS, "client": "nobody"}, "not among the WAN hosts"),
    ({"host": "a1", "namespaces": NS, "addresses": {**IPS, "b1": "b1.example"}}, "bad address"),
    ({"host": "a1", "namespaces": NS, "addresses": IPS, "pool": "10.0.0.0/20"}, "inside 198.19.0.0/17"),
    ({"host": "a1", "namespaces": NS, "addresses": IPS, "pool": "198.19.0.0/30"}, "/28 or larger"),
    ({"host": "a1", "namespaces": NS, "addresses": IPS, "pool": "nonsense"}, "bad pool"),
    ({"namespaces": NS, "addresses": IPS}, "want"),
    ([], "want"),
])
def test_bad_configs_are_refused_naming_why(d: Any, why: str) -> None:
    with pytest.raises(CrossCloudInputError, match=why):
        WanConfig.from_json(d)


def test_addresses_are_restored_not_derived_again_and_released_ones_reused() -> None:
    """A restarted host agent's network gets each VM's recorded /30 back before anything new is
    handed out: record order (b, c) differs from assignment order (c took a's released /30)."""
    cfg = WanConfig("a1", NS, IPS, pool="198.19.0.0/20")
    w = cfg.network()
    a, b = w.address("a", "a1"), w.address("b", "a1")
    w.release("a", "a1")
    c = w.address("c", "a1")
    assert c.subnet == a.subnet and b.subnet != c.subnet           # the lowest free /30 again
    again = cfg.network()                                           # the agent restarted
    assert again.restore("b", "a1", str(b.subnet)) == b
    assert again.restore("c", "a1", c.subnet) == c
    assert again.address("b", "a1") == b and again.address("c", "a1") == c
    d = again.address("d", "a1")
    assert d.subnet not in (b.subnet, c.subnet)
    assert again.restore("c", "a1", c.subnet) == c                  # idempotent
    with pytest.raises(CrossCloudInputError, match="is c@a1's already"):
        again.restore("e", "a1", c.subnet)
    with pytest.raises(CrossCloudInputError, match="is b@a1's already"):
        again.restore("c", "a1", b.subnet)
    with pytest.raises(CrossCloudInputError, match="another WAN address"):
        again.restore("c", "a1", "198.19.0.100/30")
    for bad in ("198.19.0.0/30", "198.19.0.4/29", "198.19.16.4/30", "nonsense"):
        with pytest.raises(CrossCloudInputError):
            again.restore("x", "a1", bad)
