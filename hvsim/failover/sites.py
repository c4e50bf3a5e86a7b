"""Two datacenters and a witness site at emulated locations: namespaces, bridges and shaped links.

Topology (one :class:`Sites` = one run; every namespace is ours, the root namespace is untouched)::

                         hvs-<id>-wan  (the WAN: bridge br0)
            t-dc1 --tbf wan--+      +-- t-dc2 (tbf wan)       +-- t-wit (tbf wan)
                             |      |                         |
   hvs-<id>-s-dc1 (br0) <----+      +----> hvs-<id>-s-dc2 (br0)      hvs-<id>-s-wit (br0)
     p0 --tbf lan-- ul0 dc1-m         p0 --tbf lan-- ul0 dc2-h1        p0 -- ul0 wit
     p1 --tbf lan-- ul0 dc1-h1        p1 ... dc2-e                     p1 -- ul0 client
     p2 --tbf lan-- ul0 dc1-e         p2 (slot dc2-r1: plugged when the host is initiated)

Each site has its own switch namespace (a bridge); a site's trunk to the WAN bridge is a veth
shaped on both ends (``wan_mbit``, lower than the hosts' links ``lan_mbit``), so every byte between
datacenters crosses one shaped link per site, and a site can be cut off (its trunk down) or lose
one host (that host's ``ul0`` down). One /24 spans all sites (one L2 domain: no routing, no
default route anywhere), so nothing can leave our namespaces.

Why this shape and not :class:`hvsim.network.Underlay`: the failover controller *initiates* a host
in dc2 when the manager is lost, so hosts are plugged in while the topology runs
(:func:`plug_host`, callable from another process, e.g. the controller, given the slot's
:class:`HostSlot`); an underlay's hosts are fixed when it starts. Slots (reserved hardware positions)
are declared up front with their address and port, so every namespace the run can ever own is in
its record and :func:`hvsim.network.reclaim.reclaim_stale` removes them if this process dies.

State machine::

    NEW -> STARTING -> UP -> CLOSING -> TORN_DOWN
    NEW -> TORN_DOWN;  STARTING -> CLOSING -> FAILED;  CLOSING -> FAILED
"""
from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hvbase.fsm import StateMachine
from hvbase.aio import run_to_completion
from hvsim.network import netns as nsutil
from hvsim.network import records
from hvsim.network.shaping import LinkShape, check_mbit, tbf_replace_line

from .errors import FailoverInputError, TopologyError

log = logging.getLogger("hvsim.failover.sites")

HOST_IFACE = "ul0"
BRIDGE = "br0"
TRUNK = "up0"
SUBNET = "198.18.0.0/24"
PREFIX = "hvs-"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")


class SitesState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    UP = "up"
    CLOSING = "closing"
    TORN_DOWN = "torn_down"
    FAILED = "failed"


TABLE = {
    SitesState.NEW: {SitesState.STARTING, SitesState.TORN_DOWN},
    SitesState.STARTING: {SitesState.UP, SitesState.CLOSING},
    SitesState.UP: {SitesState.CLOSING},
    SitesState.CLOSING: {SitesState.TORN_DOWN, SitesState.FAILED},
    SitesState.TORN_DOWN: set(),
    SitesState.FAILED: set(),
}


@dataclass(frozen=True)
class HostSlot:
    """Where one host sits: its site, namespace, address and switch port (JSON-serialisable, so
    another process can plug it)."""
    name: str
    site: str
    ns: str
    ip: str
    switch_ns: str
    port: str
    prefixlen: int
    lan_mbit: float
    slot: bool = False           # reserved hardware: plugged only when the host is initiated

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HostSlot:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _shape(mbit: float) -> LinkShape:
    return LinkShape(mbit=check_mbit(mbit, "link bandwidth"))


async def plug_host(slot: HostSlot) -> None:
    """Create ``slot``'s namespace and cable it to its site's bridge (shaped both ways)."""
    await nsutil.ip("netns", "add", slot.ns)
    try:
        await nsutil.ip(netns=slot.switch_ns, batch=[
            f"link add {slot.port} type veth peer name {HOST_IFACE} netns {slot.ns}",
            f"link set {slot.port} addrgenmode none",
            f"link set {slot.port} alias host:{slot.name}",
            f"link set {slot.port} master {BRIDGE}",
            f"link set {slot.port} up"])
        await nsutil.ip(netns=slot.ns, batch=[
            "link set lo up", f"link set {HOST_IFACE} addrgenmode none",
            f"addr add {slot.ip}/{slot.prefixlen} dev {HOST_IFACE}", f"link set {HOST_IFACE} up"])
        shape = _shape(slot.lan_mbit)
        await asyncio.gather(nsutil.tc(netns=slot.ns, batch=[tbf_replace_line(HOST_IFACE, shape)]),
                             nsutil.tc(netns=slot.switch_ns, batch=[tbf_replace_line(slot.port, shape)]))
    except BaseException:
        await run_to_completion(unplug_host(slot))
        raise


async def unplug_host(slot: HostSlot) -> None:
    """Remove ``slot``'s cable and namespace (processes still inside are killed first)."""
    if slot.ns in nsutil.list_netns():
        await nsutil.kill_netns_pids(slot.ns)
    await nsutil.ip("link", "del", slot.port, netns=slot.switch_ns, check=False)
    if slot.ns in nsutil.list_netns():
        await nsutil.ip("netns", "del", slot.ns, check=False)


class Sites:
    """Sites (datacenters, a witness, a client site), their hosts and the WAN between them.

    ``sites`` maps a site name to its host names; ``slots`` maps a site to names of reserved host
    positions (plugged later, by :func:`plug_host`).
    """

    def __init__(self, sites: Mapping[str, Sequence[str]], *, slots: Mapping[str, Sequence[str]] | None = None,
                 lan_mbit: float = 1000.0, wan_mbit: float = 100.0, subnet: str = SUBNET,
                 run_dir: Path | None = None) -> None:
        check_mbit(lan_mbit, "lan_mbit")
        check_mbit(wan_mbit, "wan_mbit")
        if wan_mbit >= lan_mbit:
            raise FailoverInputError("wan_mbit", f"the inter-site link ({wan_mbit} Mbit/s) must be slower than "
                                                 f"the links inside a site ({lan_mbit} Mbit/s)")
        net = ipaddress.IPv4Network(subnet)
        addrs = iter(net.hosts())
        self.runid = secrets.token_hex(3)
        self.lan_mbit = lan_mbit
        self.wan_mbit = wan_mbit
        self.wan_ns = f"{PREFIX}{self.runid}-wan"
        self.subnet = net
        self._run_dir = records.run_dir(run_dir)
        self._record: Path | None = None
        self.switch: dict[str, str] = {}
        self.hosts: dict[str, HostSlot] = {}
        seen: set[str] = set()
        all_sites = dict(sites)
        for s in (slots or {}):
            if s not in all_sites:
                raise FailoverInputError("slots", f"slot site {s!r} is not one of the sites {list(all_sites)}")
        for site, names in all_sites.items():
            if not _NAME.match(site) or len(site) > 8:
                raise FailoverInputError("sites", f"site name {site!r}: 1-8 chars of [a-z0-9-]")
            self.switch[site] = f"{PREFIX}{self.runid}-s-{site}"
            pool = [(n, False) for n in names] + [(n, True) for n in (slots or {}).get(site, ())]
            for i, (n, is_slot) in enumerate(pool):
                if not _NAME.match(n) or n in seen:
                    raise FailoverInputError("hosts", f"host name {n!r} is invalid or repeated")
                seen.add(n)
                try:
                    ip = str(next(addrs))
                except StopIteration:
                    raise FailoverInputError("subnet", f"{subnet} has no room for {n}") from None
                self.hosts[n] = HostSlot(n, site, f"{PREFIX}{self.runid}-h-{n}", ip, self.switch[site], f"p{i}",
                                         net.prefixlen, lan_mbit, is_slot)
        self.fsm: StateMachine[SitesState] = StateMachine(f"sites {self.runid}", SitesState.NEW, TABLE,
                                                          error=TopologyError, log=log)

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def state(self) -> SitesState:
        return self.fsm.state

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this run may own (hosts and slots, switches, the WAN)."""
        return [h.ns for h in self.hosts.values()] + list(self.switch.values()) + [self.wan_ns]

    def slot(self, host: str) -> HostSlot:
        try:
            return self.hosts[host]
        except KeyError:
            raise FailoverInputError("host", f"no host {host!r} (hosts: {', '.join(self.hosts)})") from None

    def ns(self, host: str) -> str:
        return self.slot(host).ns

    def ip(self, host: str) -> str:
        return self.slot(host).ip

    def site_hosts(self, site: str, *, slots: bool = False) -> list[str]:
        return [h.name for h in self.hosts.values() if h.site == site and h.slot == slots]

    def argv_in(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace (nsenter: the mount namespace and /sys stay)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(host)}", "--", *argv]

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Sites:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.fsm.set(SitesState.STARTING)
        try:
            self._record = records.write_record(
                self._run_dir, records.Record.for_this_process(self.runid, PREFIX, self.namespaces))
            await nsutil.ip(batch=[f"netns add {ns}" for ns in [self.wan_ns, *self.switch.values()]])
            bridge = [f"link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
                      f"link set {BRIDGE} addrgenmode none", f"link set {BRIDGE} up", "link set lo up"]
            await nsutil.ip(netns=self.wan_ns, batch=bridge)
            wan = _shape(self.wan_mbit)
            for site, sw in self.switch.items():
                await nsutil.ip(netns=sw, batch=bridge)
                await nsutil.ip(netns=self.wan_ns, batch=[
                    f"link add t-{site} type veth peer name {TRUNK} netns {sw}",
                    f"link set t-{site} addrgenmode none", f"link set t-{site} master {BRIDGE}",
                    f"link set t-{site} up"])
                await nsutil.ip(netns=sw, batch=[f"link set {TRUNK} addrgenmode none",
                                                 f"link set {TRUNK} master {BRIDGE}", f"link set {TRUNK} up"])
                await asyncio.gather(nsutil.tc(netns=self.wan_ns, batch=[tbf_replace_line(f"t-{site}", wan)]),
                                     nsutil.tc(netns=sw, batch=[tbf_replace_line(TRUNK, wan)]))
            await asyncio.gather(*(plug_host(h) for h in self.hosts.values() if not h.slot))
        except BaseException as e:
            self.fsm.set(SitesState.CLOSING, str(e) or type(e).__name__)
            try:
                await run_to_completion(self._teardown())
            finally:
                self.fsm.set(SitesState.FAILED)
            raise
        self.fsm.set(SitesState.UP)
        log.info("sites up: %s", ", ".join(f"{h.name}={h.ip}@{h.site}" for h in self.hosts.values()))

    async def close(self) -> None:
        if self.state in (SitesState.TORN_DOWN, SitesState.FAILED):
            return
        if self.state is SitesState.NEW:
            self.fsm.set(SitesState.TORN_DOWN)
            return
        self.fsm.set(SitesState.CLOSING)
        try:
            await run_to_completion(self._teardown())
        except BaseException:
            self.fsm.set(SitesState.FAILED)
            raise
        self.fsm.set(SitesState.TORN_DOWN)

    async def _teardown(self) -> None:
        present = set(nsutil.list_netns())
        for h in self.hosts.values():
            if h.ns in present:
                await unplug_host(h)
        for ns in [*self.switch.values(), self.wan_ns]:
            if ns in present:
                await nsutil.kill_netns_pids(ns)
                await nsutil.ip("netns", "del", ns, check=False)
        left = sorted(set(self.namespaces) & set(nsutil.list_netns()))
        if left:
            raise TopologyError(f"sites {self.runid}: namespaces left after teardown: {left}")
        if self._record is not None:
            self._record.unlink(missing_ok=True)

    # -- faults ----------------------------------------------------------------------------------
    async def set_host_link(self, host: str, up: bool) -> None:
        """Cut (or restore) one host's link: its ``ul0`` administratively down (up)."""
        self.fsm.require("set_host_link", SitesState.UP)
        await nsutil.ip(netns=self.ns(host), batch=[f"link set {HOST_IFACE} {'up' if up else 'down'}"])
        log.warning("link of host %s %s", host, "restored" if up else "cut")

    async def set_site_link(self, site: str, up: bool) -> None:
        """Cut (or restore) a whole site's trunk to the WAN."""
        self.fsm.require("set_site_link", SitesState.UP)
        if site not in self.switch:
            raise FailoverInputError("site", f"no site {site!r}")
        await nsutil.ip(netns=self.wan_ns, batch=[f"link set t-{site} {'up' if up else 'down'}"])

    def describe(self) -> dict[str, Any]:
        return {"runid": self.runid, "lan_mbit": self.lan_mbit, "wan_mbit": self.wan_mbit, "subnet": str(self.subnet),
                "hosts": {n: h.to_json() for n, h in self.hosts.items()}}

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.describe(), indent=1))
