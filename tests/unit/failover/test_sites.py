"""The two-datacenter topology: hosts of every site reach each other only inside our namespaces,
the inter-site trunks are shaped lower than the host links, a reserved slot is plugged in while the
topology runs (from another process too: it is all in the slot's description), a host or a whole
site can be cut off, and teardown leaves no namespace."""
from __future__ import annotations

import subprocess

import pytest

from hvsim.failover.errors import FailoverInputError
from hvsim.failover.sites import HostSlot, Sites, plug_host
from hvsim.network import netns as nsutil

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITES = {"dc1": ["a1", "a2"], "dc2": ["b1"], "wit": ["w"]}


def ping(sites: Sites, src: str, dst: str) -> bool:
    """One reply within 3 s (a link that just came up may take a moment to carry)."""
    r = subprocess.run(sites.argv_in(src, ["ping", "-c", "1", "-w", "3", sites.ip(dst)]), capture_output=True,
                       timeout=10)
    return r.returncode == 0


async def test_sites_reach_shape_plug_cut() -> None:
    async with Sites(SITES, slots={"dc2": ["r1"]}, lan_mbit=1000, wan_mbit=50) as s:
        assert ping(s, "a1", "a2") and ping(s, "a1", "b1") and ping(s, "b1", "w")
        # the trunks are shaped at the WAN rate, the host links at the LAN rate
        q = await nsutil.tc_json("qdisc", "show", "dev", "t-dc1", netns=s.wan_ns)
        assert any(e.get("kind") == "tbf" and e["options"]["rate"] == 50_000_000 // 8 for e in q), q
        q = await nsutil.tc_json("qdisc", "show", "dev", "ul0", netns=s.ns("a1"))
        assert any(e.get("kind") == "tbf" and e["options"]["rate"] == 1_000_000_000 // 8 for e in q), q
        # a reserved slot: absent until plugged, then reachable from the other site
        assert s.ns("r1") not in nsutil.list_netns()
        await plug_host(HostSlot.from_json(s.slot("r1").to_json()))
        assert ping(s, "a1", "r1")
        # one host cut off, then a whole site
        await s.set_host_link("a2", False)
        assert not ping(s, "a1", "a2") and ping(s, "a1", "b1")
        await s.set_host_link("a2", True)
        await s.set_site_link("dc1", False)
        assert ping(s, "a1", "a2") and not ping(s, "a1", "b1") and ping(s, "b1", "w")
        await s.set_site_link("dc1", True)
        assert ping(s, "a1", "b1")
        names = s.namespaces
    assert not set(names) & set(nsutil.list_netns())


async def test_wan_must_be_slower() -> None:
    with pytest.raises(FailoverInputError, match="slower"):
        Sites(SITES, lan_mbit=100, wan_mbit=100)
