"""The inter-cloud WAN and the guests' addresses on it.

The clouds' hosts share one :class:`~hvsim.network.underlay.Underlay` (one namespace per host, a
bridge between them) whose per-host tbf shaping is the WAN link: every byte a cloud's host sends to
the other cloud crosses its shaped ``ul0``. A third underlay host, ``client``, stands for the users
who reach the service address. Guests get a routed /30 each (198.19.0.0/16, inside our namespaces
only: no namespace has a default route)::

    guest eth0 198.19.0.(4k+2) --- tap hvt<id> 198.19.0.(4k+1) [host ns: forwarding] --- ul0 --- WAN ---

Every other host routes the guest's /30 via the guest's host. A clone for a test cutover is
plugged *isolated*: its tap has no address and no route, so it reaches nobody and nobody reaches it.
The service address (:attr:`WanNetwork.service_ip`) is a /32 the client routes to the host of the
active copy, which routes it to the guest; moving it is two route replacements.

The same network serves the library mode (one process: a :class:`WanNetwork` over the
:class:`~hvsim.network.underlay.Underlay` itself, addresses from all of ``GUEST_NET``) and the host
agents of hvsim managers (one process per host: each agent's :class:`WanNetwork` is built from a
:class:`WanConfig` naming the WAN's hosts, its namespaces and addresses, the client host and the
agent's own slice of ``GUEST_NET``, so two agents never hand out the same /30).
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qmp_bridge import Nic

from ..core.components import NIC_DRIVER, Attachment, Component, ComponentContext
from ..core.errors import SpecError
from ..core.host import Host
from ..core.model import DiskSpec, NicSpec, derive_mac
from ..network import netns as nsutil
from ..network.underlay import Underlay
from .errors import CrossCloudInputError

log = logging.getLogger("hvsim.crosscloud.network")

GUEST_NET = ipaddress.IPv4Network("198.19.0.0/17")
SERVICE_IP = "198.19.255.10"
WAN = "wan"
ISOLATED = "isolated"


@dataclass(frozen=True)
class GuestAddress:
    vm: str
    host: str
    subnet: ipaddress.IPv4Network
    tap: str
    isolated: bool

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ip(self) -> str:
        return str(self.subnet.network_address + 2)


class WanTopology(Protocol):
    """The WAN's hosts as :class:`WanNetwork` needs them (an Underlay is one; :class:`WanConfig` too)."""

    @property
    def hosts(self) -> tuple[str, ...]: ...
    def host_ns(self, host: str) -> str: ...
    def host_ip(self, host: str) -> str: ...


@dataclass(frozen=True)
class WanConfig:
    """What a host agent is told of the WAN at start (``--wan FILE``, JSON): every WAN host's
    namespace and address, the client host, this host's name and its slice of ``GUEST_NET``."""
    host: str
    namespaces: Mapping[str, str]
    addresses: Mapping[str, str]
    client: str = "client"
    pool: str = str(GUEST_NET)

    def __post_init__(self) -> None:
        if set(self.namespaces) != set(self.addresses):
            raise CrossCloudInputError("WAN config: namespaces and addresses must name the same hosts")
        for h in (self.host, self.client):
            if h not in self.namespaces:
                raise CrossCloudInputError(f"WAN config: host {h!r} is not among the WAN hosts "
                                           f"{sorted(self.namespaces)}")
        for h, ip in self.addresses.items():
            try:
                ipaddress.IPv4Address(ip)
            except ValueError as e:
                raise CrossCloudInputError(f"WAN config: host {h!r}: bad address {ip!r}") from e
        try:
            pool = ipaddress.IPv4Network(self.pool)
        except ValueError as e:
            raise CrossCloudInputError(f"WAN config: bad pool {self.pool!r}") from e
        if not pool.subnet_of(GUEST_NET) or pool.prefixlen > 28:
            raise CrossCloudInputError(f"WAN config: pool {self.pool} must be a /28 or larger inside {GUEST_NET}")

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self.namespaces)

    def host_ns(self, host: str) -> str:
        return self.namespaces[host]

    def host_ip(self, host: str) -> str:
        return self.addresses[host]

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "namespaces": dict(self.namespaces), "addresses": dict(self.addresses),
                "client": self.client, "pool": self.pool}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WanConfig:
        if not isinstance(d, Mapping) or not isinstance(d.get("namespaces"), Mapping) or \
                not isinstance(d.get("addresses"), Mapping) or not isinstance(d.get("host"), str):
            raise CrossCloudInputError("WAN config: want {host, namespaces: {host: ns}, addresses: {host: ip}, "
                                       "client?, pool?}")
        return cls(host=d["host"], namespaces={str(k): str(v) for k, v in d["namespaces"].items()},
                   addresses={str(k): str(v) for k, v in d["addresses"].items()},
                   client=str(d.get("client", "client")), pool=str(d.get("pool", GUEST_NET)))

    @classmethod
    def of_underlay(cls, underlay: Underlay, host: str, pool: str, client: str = "client") -> WanConfig:
        return cls(host=host, namespaces={h: underlay.host_ns(h) for h in underlay.hosts},
                   addresses={h: underlay.host_ip(h) for h in underlay.hosts}, client=client, pool=pool)

    def network(self) -> WanNetwork:
        return WanNetwork(self, self.client, pool=ipaddress.IPv4Network(self.pool))


class WanNetwork:
    """Guest /30s and routes across the hosts of ``underlay`` (which must have a ``client`` host);
    addresses come from ``pool`` (default: all of ``GUEST_NET``)."""

    def __init__(self, underlay: WanTopology, client_host: str = "client",
                 pool: ipaddress.IPv4Network = GUEST_NET) -> None:
        if client_host not in underlay.hosts:
            raise CrossCloudInputError(f"the WAN underlay needs a host {client_host!r} for the clients; "
                                       f"it has {list(underlay.hosts)}")
        self.underlay = underlay
        self.client = client_host
        self.pool = pool
        self.service_ip = SERVICE_IP
        self._index: dict[str, int] = {}
        self._plugged: dict[str, GuestAddress] = {}
        self._service_at: GuestAddress | None = None
        self._ready = False

    async def setup(self, hosts: Sequence[str] | None = None) -> None:
        """IPv4 forwarding in the host namespaces (``hosts``; default every one; only there: the
        root namespace is untouched)."""
        await asyncio.gather(*(nsutil.run(nsutil.argv_in(self.underlay.host_ns(h),
                                                         ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
                               for h in (self.underlay.hosts if hosts is None else hosts)))
        self._ready = True

    def address(self, vm: str, host: str, isolated: bool = False) -> GuestAddress:
        """``vm``'s address on ``host``: the /30 it was given (or got back by :meth:`restore`),
        else the lowest one free now (an index given back by :meth:`release` is handed out again)."""
        if host not in self.underlay.hosts:
            raise CrossCloudInputError(f"host {host!r} is not on the WAN underlay ({list(self.underlay.hosts)})")
        key = f"{vm}@{host}"           # two clouds may each have an instance of the same name
        i = self._index.get(key)
        if i is None:
            used = set(self._index.values())
            i = next((k for k in range(self.capacity) if k not in used), None)
            if i is None:
                raise CrossCloudInputError(f"the WAN guest network {self.pool} is full")
            self._index[key] = i
        subnet = ipaddress.IPv4Network((int(self.pool.network_address) + 4 * (i + 1), 30))
        tap = "hvt" + hashlib.sha256(key.encode()).hexdigest()[:8]
        return GuestAddress(vm, host, subnet, tap, isolated)

    @property
    def capacity(self) -> int:
        """How many guest /30s the pool holds (its first /30 is never handed out)."""
        return self.pool.num_addresses // 4 - 1

    def restore(self, vm: str, host: str, subnet: ipaddress.IPv4Network | str) -> GuestAddress:
        """Give ``vm`` on ``host`` exactly ``subnet`` again (what it had before its owner
        restarted: its guest was configured with it), before any new address is handed out.
        CrossCloudInputError: not a /30 of the pool, or another VM holds it."""
        try:
            net = ipaddress.IPv4Network(subnet)
        except ValueError as e:
            raise CrossCloudInputError(f"vm {vm!r}: recorded WAN subnet {subnet!r} is not a network") from e
        off = int(net.network_address) - int(self.pool.network_address)
        if net.prefixlen != 30 or not net.subnet_of(self.pool) or off < 4:
            raise CrossCloudInputError(f"vm {vm!r}: recorded WAN subnet {net} is not a guest /30 of the pool "
                                       f"{self.pool}")
        key = f"{vm}@{host}"
        i = off // 4 - 1
        holder = next((k for k, v in self._index.items() if v == i and k != key), None)
        if holder is not None:
            raise CrossCloudInputError(f"vm {vm!r}: recorded WAN subnet {net} is {holder}'s already")
        if self._index.get(key, i) != i:
            raise CrossCloudInputError(f"vm {vm!r} has another WAN address already")
        self._index[key] = i
        return self.address(vm, host)

    def release(self, vm: str, host: str) -> None:
        """Forget ``vm``'s address on ``host`` (it is gone from there): the /30 may be handed out
        again. Its tap must be unplugged already."""
        key = f"{vm}@{host}"
        if any(p.vm == vm and p.host == host for p in self._plugged.values()):
            raise CrossCloudInputError(f"vm {vm!r} on {host!r} is still plugged: its address stays")
        self._index.pop(key, None)

    def kernel_args(self, vm: str, host: str, nic: str = "wan0", isolated: bool = False) -> str:
        a = self.address(vm, host, isolated)
        mac = derive_mac(vm, nic)
        return f"hvsim.nic={mac},{a.ip}/30" + ("" if isolated else f",gw={a.gateway}")

    async def plug(self, a: GuestAddress) -> None:
        ns = self.underlay.host_ns(a.host)
        cmds = [f"tuntap add dev {a.tap} mode tap", f"link set {a.tap} up"]
        if not a.isolated:
            cmds.insert(1, f"addr add {a.gateway}/30 dev {a.tap}")
        await nsutil.ip(netns=ns, batch=cmds)
        if not a.isolated:
            via = self.underlay.host_ip(a.host)
            await asyncio.gather(*(nsutil.ip("route", "replace", str(a.subnet), "via", via,
                                             netns=self.underlay.host_ns(h))
                                   for h in self.underlay.hosts if h != a.host))
        self._plugged[a.tap] = a

    async def adopt(self, a: GuestAddress) -> None:
        """Take over ``a``'s tap, plugged by an earlier owner (a host agent before its restart) and
        held by a running QEMU: it must exist; its gateway address and the other hosts' routes to
        the guest's /30 are put back if they went missing (each step idempotent)."""
        ns = self.underlay.host_ns(a.host)
        if not await nsutil.ip("-o", "link", "show", "dev", a.tap, netns=ns, check=False):
            raise CrossCloudInputError(f"vm {a.vm!r}: its tap {a.tap} is not in {a.host}'s namespace any more")
        if not a.isolated:
            await nsutil.ip("addr", "replace", f"{a.gateway}/30", "dev", a.tap, netns=ns)
            via = self.underlay.host_ip(a.host)
            await asyncio.gather(*(nsutil.ip("route", "replace", str(a.subnet), "via", via,
                                             netns=self.underlay.host_ns(h))
                                   for h in self.underlay.hosts if h != a.host))
        self._plugged[a.tap] = a

    def let_go(self, a: GuestAddress) -> None:
        """Stop managing ``a``'s tap without removing it (its owner goes away and the guest keeps
        running: the next owner takes it over with :meth:`adopt`); its routes, the service route too, stay."""
        self._plugged.pop(a.tap, None)
        if self._service_at is not None and self._service_at.tap == a.tap:
            self._service_at = None

    async def unplug(self, a: GuestAddress) -> None:
        if self._service_at is not None and self._service_at.tap == a.tap:
            await self._drop_service()
        await nsutil.ip("link", "del", a.tap, netns=self.underlay.host_ns(a.host), check=False)
        if not a.isolated:
            await asyncio.gather(*(nsutil.ip("route", "del", str(a.subnet), netns=self.underlay.host_ns(h), check=False)
                                   for h in self.underlay.hosts if h != a.host))
        self._plugged.pop(a.tap, None)

    # -- the service address ---------------------------------------------------------------------------
    async def move_service(self, vm: str, host: str) -> None:
        """Route the service address to ``vm`` on ``host`` (plugged, not isolated): the client's
        route first, so there is never a moment with two routes to two copies."""
        a = next((p for p in self._plugged.values() if p.vm == vm and p.host == host), None)
        if a is None or a.isolated:
            raise CrossCloudInputError(f"vm {vm!r} has no WAN address to carry the service address")
        old = self._service_at
        await nsutil.ip("route", "replace", f"{self.service_ip}/32", "via", a.ip, "dev", a.tap,
                        netns=self.underlay.host_ns(a.host))
        await nsutil.ip("route", "replace", f"{self.service_ip}/32", "via", self.underlay.host_ip(a.host),
                        netns=self.underlay.host_ns(self.client))
        if old is not None and old.host != a.host:
            await nsutil.ip("route", "del", f"{self.service_ip}/32", netns=self.underlay.host_ns(old.host), check=False)
        self._service_at = a
        log.info("service address %s -> vm %s on %s", self.service_ip, vm, a.host)

    async def readopt_service(self, vm: str, host: str) -> bool:
        """After a restart of ``host``'s owner, route the service address to ``vm`` again (it held
        it before), unless the client's route now points to another host (someone moved the service
        address meanwhile: then only our stale host-side route goes). True: routed to ``vm``."""
        client_ns = self.underlay.host_ns(self.client)
        cur = (await nsutil.ip("route", "show", f"{self.service_ip}/32", netns=client_ns, check=False)).split()
        via = self.underlay.host_ip(host)
        if "via" in cur and cur[cur.index("via") + 1:cur.index("via") + 2] != [via]:
            log.warning("service address %s: routed to another host meanwhile (%s); not taken back for vm %s",
                        self.service_ip, " ".join(cur), vm)
            await self.drop_service_routes(host)
            return False
        await self.move_service(vm, host)
        return True

    async def drop_service_routes(self, host: str) -> None:
        """Remove the service routes that lead to ``host`` (its own, and the client's if it points
        there), whoever set them (a previous owner that did not clean up)."""
        await nsutil.ip("route", "del", f"{self.service_ip}/32", netns=self.underlay.host_ns(host), check=False)
        await nsutil.ip("route", "del", f"{self.service_ip}/32", "via", self.underlay.host_ip(host),
                        netns=self.underlay.host_ns(self.client), check=False)
        if self._service_at is not None and self._service_at.host == host:
            self._service_at = None

    async def _drop_service(self) -> None:
        a = self._service_at
        if a is None:
            return
        await nsutil.ip("route", "del", f"{self.service_ip}/32", netns=self.underlay.host_ns(a.host), check=False)
        # the client's route only if it still points here (another host agent may have moved it since)
        await nsutil.ip("route", "del", f"{self.service_ip}/32", "via", self.underlay.host_ip(a.host),
                        netns=self.underlay.host_ns(self.client), check=False)
        self._service_at = None

    async def set_wan_link(self, host: str, up: bool) -> None:
        """Cut or restore ``host``'s link to the WAN (fault injection). A link that goes down loses
        its routes (the kernel flushes them), so restoring it puts back the routes from ``host`` to
        every guest elsewhere and, if it is the client's, the service route. (Library mode: needs the
        Underlay itself.)"""
        if not isinstance(self.underlay, Underlay):
            raise CrossCloudInputError("cutting a WAN link needs the underlay itself (library mode)")
        await self.underlay.set_link(host, up)
        if not up:
            return
        ns = self.underlay.host_ns(host)
        for a in list(self._plugged.values()):
            if not a.isolated and a.host != host:
                await nsutil.ip("route", "replace", str(a.subnet), "via", self.underlay.host_ip(a.host), netns=ns)
        at = self._service_at
        if at is not None and host == self.client:
            await nsutil.ip("route", "replace", f"{self.service_ip}/32", "via", self.underlay.host_ip(at.host),
                            netns=ns)

    @property
    def plugged(self) -> tuple[GuestAddress, ...]:
        """The taps this network manages now."""
        return tuple(self._plugged.values())

    @property
    def service_at(self) -> tuple[str, str] | None:
        """(vm, host) the service address is routed to."""
        return (self._service_at.vm, self._service_at.host) if self._service_at else None

    async def probe_service(self, port: int, timeout: float = 3.0) -> str:
        """Connect to the service address from the client host; the first line it sends ('' if none)."""
        code = ("import socket,sys\n"
                f"s=socket.create_connection(('{self.service_ip}',{int(port)}),timeout={float(timeout)})\n"
                "sys.stdout.write(s.makefile().readline())\n")
        argv = nsutil.argv_in(self.underlay.host_ns(self.client), [sys.executable, "-c", code])
        try:
            return (await nsutil.run(argv, timeout=timeout + 5)).strip()
        except Exception as exc:  # unreachable: an answer in itself
            log.info("service probe failed: %s", str(exc).splitlines()[0])
            return ""


class WanNicComponent(Component):
    """A VM's NIC on the WAN (or isolated): the tap in its host's namespace."""

    kind = NIC_DRIVER

    def __init__(self, nic: NicSpec, ctx: ComponentContext, wan: WanNetwork) -> None:
        super().__init__(nic.name, ctx)
        self.nic = nic
        self.wan = wan
        self.addr: GuestAddress | None = None

    async def _do_prepare(self, host: Host) -> Attachment:
        a = self.wan.address(self.ctx.vm, host.name, isolated=self.nic.network == ISOLATED)
        await self.wan.plug(a)
        self.addr = a
        mac = self.nic.mac or derive_mac(self.ctx.vm, self.nic.name)
        return Attachment(nics=(Nic(id=f"nic-{self.nic.name}", mac=mac,
                                    backend="tap", ifname=a.tap, model=self.nic.model),))  # type: ignore[arg-type]

    async def _do_reattach(self, host: Host, record: dict[str, Any]) -> Attachment:
        """The tap of a running QEMU (its owner restarted): the same address as before, which the
        owner restored into the network first (:meth:`WanNetwork.restore`)."""
        a = self.wan.address(self.ctx.vm, host.name, isolated=self.nic.network == ISOLATED)
        if record.get("tap") not in (None, a.tap) or record.get("subnet") not in (None, str(a.subnet)):
            raise CrossCloudInputError(f"vm {self.ctx.vm!r}: nic {self.nic.name!r} was {record}, now {a}")
        await self.wan.adopt(a)
        self.addr = a
        mac = self.nic.mac or derive_mac(self.ctx.vm, self.nic.name)
        return Attachment(nics=(Nic(id=f"nic-{self.nic.name}", mac=mac,
                                    backend="tap", ifname=a.tap, model=self.nic.model),))  # type: ignore[arg-type]

    async def _do_detach(self) -> dict[str, Any]:
        if self.addr is None:
            return {}
        a, self.addr = self.addr, None
        self.wan.let_go(a)
        return {"tap": a.tap, "subnet": str(a.subnet)}

    async def _do_stop(self) -> None:
        if self.addr is not None:
            await self.wan.unplug(self.addr)
            self.addr = None


class WanNicDriver:
    """NIC driver (kind ``"eni"``) of a cloud's cluster: NICs on network ``wan`` or ``isolated``."""

    kind = NIC_DRIVER

    def __init__(self, wan: WanNetwork) -> None:
        self.wan = wan

    def create_nic(self, nic: NicSpec, ctx: ComponentContext) -> Component:
        if nic.network not in (WAN, ISOLATED):
            raise SpecError(f"vm {ctx.vm!r}: nic {nic.name!r}: network must be {WAN!r} or {ISOLATED!r}, "
                            f"got {nic.network!r}")
        return WanNicComponent(nic, ctx, self.wan)

    def create(self, disk: DiskSpec, ctx: ComponentContext) -> Component:
        raise SpecError(f"vm {ctx.vm!r}: disk {disk.name!r}: the WAN NIC driver serves NICs, not disks")
