"""One host's tenant data plane: bridges, VXLAN devices, ports, FDB, neighbours and port rules.

Everything is programmed inside the host's network namespace, never in the root namespace:
links, FDB and neighbour entries through netlink with pyroute2 (one ``AsyncIPRoute`` socket per
host, opened inside its namespace), port rules through libnftables on a worker thread that entered
the namespace (:class:`NetnsWorker`). Per tenant network and host::

    hvb<vni>  Linux bridge (STP off, no multicast snooping, no IPv6 addresses)
      +-- hvx<vni>  VXLAN <vni> over ul0 (local = the host's underlay address, UDP 4789)
      |             controller modes: nolearning, bridge port neigh_suppress (ARP suppression)
      |             learning mode:    learning, one all-zero FDB entry per other host (flooding)
      +-- hvp<hash> one port per ENI binding: a persistent tap (QEMU opens it) or a veth whose peer
                    is in an endpoint namespace; MTU of the network; bridge learning off (controller)

Every operation is idempotent where a retry or a teardown needs it (deleting something already
gone is not an error) and runs to completion even if the caller is cancelled (a half-applied
netlink change is never left behind by a cancellation).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hvbase.aio import run_to_completion
from . import netns as nsutil
from . import nft
from .eni import EniSpec, NetworkSpec, PortKind, PortSpec
from .errors import NetworkError, ProgrammingError, TeardownError
from .plan import MobilityMode

log = logging.getLogger("hvsim.network.tenant")

T = TypeVar("T")

AF_BRIDGE = 7
NTF_SELF = 0x02
NTF_MASTER = 0x04
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
VXLAN_PORT = 4789
UNDERLAY_IFACE = "ul0"
ZERO_MAC = "00:00:00:00:00:00"
NO_IPV6 = {"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]}   # addrgenmode none
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH)


class NetnsWorker:
    """A single thread that entered a named network namespace; blocking calls run there, in order."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._path = os.path.join(nsutil.NETNS_RUN_DIR, netns)
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{netns}",
                                      initializer=self._enter)

    def _enter(self) -> None:
        nsutil.setns_preexec(self.netns)()
        if os.stat("/proc/thread-self/ns/net").st_ino != os.stat(self._path).st_ino:
            raise OSError(f"worker thread is not in namespace {self.netns}")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._ex, fn, *args)

    def close(self) -> None:
        self._ex.shutdown(wait=True)


@dataclass
class _Port:
    eni: EniSpec
    network: NetworkSpec
    spec: PortSpec
    peer_ifname: str
    blocked: bool


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    device: str
    dst: str = ""          # VXLAN self entries: the remote tunnel endpoint
    master: bool = False   # the bridge's entry (else the device's own, "self")
    state: int = 0


@dataclass(frozen=True)
class HostInventory:
    """What hvsim owns in a host's namespace right now (to check programming and teardown)."""
    host: str
    links: tuple[str, ...]
    fdb: tuple[FdbEntry, ...]
    neighbours: tuple[tuple[str, str, str], ...]      # (device, ip, mac)
    table: nft.TableView | None

    @property
    def empty(self) -> bool:
        return not self.links and not self.fdb and not self.neighbours and self.table is None

    def leftovers(self) -> list[str]:
        out = [f"link {n}" for n in self.links] + [f"fdb {e.mac} dev {e.device}" for e in self.fdb]
        out += [f"neigh {ip} dev {dev}" for dev, ip, _ in self.neighbours]
        if self.table is not None:
            out.append(f"nft table {nft.FAMILY} {nft.TABLE}")
        return out


@dataclass
class OpTimer:
    count: int = 0
    seconds: float = 0.0
    by_op: dict[str, list[float]] = field(default_factory=dict)

    def add(self, op: str, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.by_op.setdefault(op, []).append(seconds)


def bridge_mac(vtep: str, vni: int) -> str:
    """A locally administered, unicast address for a host's bridge of a network."""
    ip = [int(x) for x in vtep.split(".")]
    return ":".join(f"{b:02x}" for b in (0x02, ip[3], ip[2], (vni >> 16) & 0xFF, (vni >> 8) & 0xFF, vni & 0xFF))


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(nsutil.NETNS_RUN_DIR, name))


def _owned(name: str) -> bool:
    return name.startswith("hv")


class HostDataplane:
    """The tenant data plane of one emulated host (one underlay namespace)."""

    def __init__(self, host: str, netns: str, vtep: str, mode: MobilityMode) -> None:
        self.host = host
        self.netns = netns
        self.vtep = vtep
        self.mode = mode
        self.networks: dict[str, NetworkSpec] = {}
        self.ports: dict[str, _Port] = {}
        self.timing = OpTimer()
        self._ipr: AsyncIPRoute | None = None
        self._worker: NetnsWorker | None = None
        self._nft: nft.NftContext | None = None
        self._lock = asyncio.Lock()
        self._index: dict[str, int] = {}

    # ---- plumbing ----------------------------------------------------------------------------------
    @property
    def ns_exists(self) -> bool:
        return netns_exists(self.netns)

    async def _run(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """One operation: serialised per host, never interrupted half-way, errors named."""
        async def body() -> T:
            async with self._lock:
                t0 = time.perf_counter()
                try:
                    return await fn()
                except NetlinkError as exc:
                    raise ProgrammingError(self.host, what, f"netlink: {exc}") from exc
                except nft.NftError as exc:
                    raise ProgrammingError(self.host, what, exc.error.strip().splitlines()[0]) from exc
                except (OSError, FileNotFoundError) as exc:
                    raise ProgrammingError(self.host, what, str(exc)) from exc
                finally:
                    self.timing.add(what.split()[0], time.perf_counter() - t0)
        return await run_to_completion(body())

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise NetworkError(f"host {self.host!r}: data plane is not open")
        return self._ipr

    async def _nftrun(self, commands: str, json_output: bool = False) -> str:
        if self._worker is None or self._nft is None:
            raise NetworkError(f"host {self.host!r}: data plane is not open")
        ctx = self._nft
        return await self._worker.call(lambda: ctx.run(commands, json_output=json_output))

    async def _ifindex(self, name: str) -> int:
        idx = self._index.get(name)
        if idx is None:
            found = await self.ipr.link_lookup(ifname=name)
            if not found:
                raise ProgrammingError(self.host, f"look up {name}", "no such device")
            idx = self._index[name] = int(found[0])
        return idx

    async def _links(self) -> dict[str, int]:
        out: dict[str, int] = {}
        async for msg in await self.ipr.link("dump"):
            out[str(msg.get("ifname"))] = int(msg["index"])
        return out

    async def _del_link(self, name: str) -> None:
        self._index.pop(name, None)
        found = await self.ipr.link_lookup(ifname=name)
        if not found:
            return
        try:
            await self.ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise

    async def _neigh(self, cmd: str, ignore_missing: bool = False, **kw: Any) -> None:
        try:
            await self.ipr.neigh(cmd, **kw)
        except NetlinkError as exc:
            if not (ignore_missing and exc.code in _GONE):
                raise

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def open(self) -> None:
        if not self.ns_exists:
            raise ProgrammingError(self.host, "open data plane", f"namespace {self.netns} does not exist")

        async def go() -> None:
            self._ipr = AsyncIPRoute(netns=self.netns, flags=0)   # flags=0: never create a namespace
            links = await self._links()
            if UNDERLAY_IFACE not in links:
                raise ProgrammingError(self.host, "open data plane",
                                       f"namespace {self.netns} has no {UNDERLAY_IFACE}: not an underlay host")
            self._worker = NetnsWorker(self.netns)
            self._nft = await self._worker.call(nft.NftContext)
            await self._nftrun(nft.base_table())
        await self._run("open", go)

    async def close(self) -> None:
        """Remove everything hvsim made here, then check nothing is left (TeardownError if so)."""
        try:
            if self.ns_exists and self._ipr is not None:
                await self._run("teardown", self._teardown)
                inv = await self.inventory()
                if not inv.empty:
                    raise TeardownError(f"host {self.host!r}: tenant teardown left", inv.leftovers())
        finally:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            if self._worker is not None:
                ctx, self._nft = self._nft, None
                if ctx is not None:
                    try:
                        await self._worker.call(ctx.close)
                    except Exception as exc:  # a broken worker must not hide the teardown
                        log.warning("host %s: closing nftables context: %s", self.host, exc)
                self._worker.close()
                self._worker = None
            self.ports.clear()
            self.networks.clear()
            self._index.clear()

    async def _teardown(self) -> None:
        try:
            await self._nftrun(nft.delete_table())
        except nft.NftError as exc:
            if "No such file" not in exc.error:
                raise
        links = await self._links()
        # ports first (their FDB entries go with them), then VXLAN devices, then bridges
        order = sorted((n for n in links if _owned(n)), key=lambda n: (n.startswith("hvb"), n.startswith("hvx")))
        for name in order:
            await self._del_link(name)

    # ---- networks --------------------------------------------------------------------------------------
    async def add_network(self, net: NetworkSpec, peers: Mapping[str, str]) -> None:
        """Bridge + VXLAN of ``net``; ``peers`` = other host -> its tunnel endpoint (learning mode
        floods to them)."""
        async def go() -> None:
            created: list[str] = []
            try:
                await self._add_network(net, peers, created)
            except BaseException:
                for name in reversed(created):     # only what this call made, never a stranger's device
                    await self._del_link(name)
                raise
            self.networks[net.name] = net
        await self._run(f"add-network {net.name}", go)

    async def _add_network(self, net: NetworkSpec, peers: Mapping[str, str], created: list[str]) -> None:
        learning = not self.mode.programs_fdb
        ipr = self.ipr
        existing = await self._links()
        for name in (net.bridge, net.vxlan):
            if name in existing:
                raise ProgrammingError(self.host, f"add-network {net.name}", f"device {name} already exists")
        # a fixed bridge address: otherwise it follows the lowest port MAC, and every address change
        # flushes the bridge's neighbour table, ARP-suppression entries included
        await ipr.link("add", ifname=net.bridge, kind="bridge", address=bridge_mac(self.vtep, net.vni),
                       br_stp_state=0, br_forward_delay=0, br_mcast_snooping=0)
        created.append(net.bridge)
        br = await self._ifindex(net.bridge)
        await ipr.link("set", index=br, IFLA_AF_SPEC=NO_IPV6)
        ul = await self._ifindex(UNDERLAY_IFACE)
        await ipr.link("add", ifname=net.vxlan, kind="vxlan", vxlan_id=net.vni, vxlan_local=self.vtep,
                       vxlan_link=ul, vxlan_port=VXLAN_PORT, vxlan_learning=1 if learning else 0)
        created.append(net.vxlan)
        vx = await self._ifindex(net.vxlan)
        await ipr.link("set", index=vx, mtu=net.mtu, IFLA_AF_SPEC=NO_IPV6)
        await ipr.link("set", index=vx, master=br)
        await ipr.brport("set", index=vx, learning=1 if learning else 0, neigh_suppress=0 if learning else 1)
        if learning:
            for peer in peers.values():   # head-end replication of broadcast/unknown frames
                await self._neigh("append", family=AF_BRIDGE, ifindex=vx, lladdr=ZERO_MAC, dst=peer,
                                  flags=NTF_SELF, state=NUD_PERMANENT | NUD_NOARP)
        await ipr.link("set", index=vx, state="up")
        await ipr.link("set", index=br, mtu=net.mtu, state="up")

    async def remove_network(self, net: NetworkSpec) -> None:
        async def go() -> None:
            if net.name not in self.networks:
                return          # never created here (its add failed): nothing of ours to remove
            for name, p in list(self.ports.items()):
                if p.network.name == net.name:
                    await self._delete_port(name)
            await self._del_link(net.vxlan)
            await self._del_link(net.bridge)
            self.networks.pop(net.name, None)
        await self._run(f"remove-network {net.name}", go)

    # ---- ports ---------------------------------------------------------------------------------------------
    async def create_port(self, eni: EniSpec, net: NetworkSpec, port: PortSpec, ifname: str,
                          peer_ifname: str, *, blocked: bool) -> None:
        async def go() -> None:
            if ifname in self.ports:
                raise ProgrammingError(self.host, f"create-port {ifname}", "port already exists")
            try:
                await self._create_port(eni, net, port, ifname, peer_ifname, blocked)
            except BaseException:
                await self._delete_port(ifname)
                raise
        await self._run(f"create-port {ifname} ({eni.id})", go)

    async def _create_port(self, eni: EniSpec, net: NetworkSpec, port: PortSpec, ifname: str,
                           peer_ifname: str, blocked: bool) -> None:
        ipr = self.ipr
        # rules first: the port is blocked from the instant it joins the bridge
        self.ports[ifname] = _Port(eni, net, port, peer_ifname, blocked)
        await self._nftrun(nft.add_port(ifname, eni.mac, eni.ips, eni.rules, blocked=blocked))
        if port.kind is PortKind.TAP:
            await ipr.link("add", ifname=ifname, kind="tuntap", mode="tap", ifr={"no_pi": 1, "vnet_hdr": 1})
        else:
            if not netns_exists(port.peer_netns):
                raise ProgrammingError(self.host, f"create-port {ifname}",
                                       f"endpoint namespace {port.peer_netns} does not exist")
            await ipr.link("add", ifname=ifname, kind="veth",
                           peer={"ifname": peer_ifname, "net_ns_fd": port.peer_netns})
        idx = await self._ifindex(ifname)
        await ipr.link("set", index=idx, mtu=net.mtu, IFLA_AF_SPEC=NO_IPV6)
        await ipr.link("set", index=idx, master=await self._ifindex(net.bridge))
        await ipr.brport("set", index=idx, learning=0 if self.mode.programs_fdb else 1)
        await ipr.link("set", index=idx, state="up")

    async def _delete_port(self, ifname: str) -> None:
        view = await self._table()
        if view is not None and (ifname in view.ports or f"in_{ifname}" in view.chains
                                 or any(c.startswith(ifname + "_") for c in view.counters)):
            batch = []
            t = f"{nft.FAMILY} {nft.TABLE}"
            if ifname in view.ports:
                batch += [f'delete element {t} {m} {{ "{ifname}" }}' for m in ("port_in", "port_out")]
            batch += [f"delete chain {t} {c}_{ifname}" for c in ("in", "out") if f"{c}_{ifname}" in view.chains]
            batch += [f"delete counter {t} {nft.counter_name(ifname, k)}" for k in nft.COUNTERS
                      if nft.counter_name(ifname, k) in view.counters]
            await self._nftrun("\n".join(batch) + "\n")
        await self._del_link(ifname)   # its FDB entries go with it; a veth takes its peer along
        self.ports.pop(ifname, None)

    async def delete_port(self, ifname: str) -> None:
        await self._run(f"delete-port {ifname}", lambda: self._delete_port(ifname))

    async def set_blocked(self, ifname: str, blocked: bool) -> None:
        async def go() -> None:
            p = self.ports.get(ifname)
            if p is None:
                raise ProgrammingError(self.host, f"{'block' if blocked else 'unblock'}-port {ifname}", "no such port")
            await self._nftrun(nft.set_port(ifname, p.eni.mac, p.eni.ips, p.eni.rules, blocked=blocked))
            p.blocked = blocked
        await self._run(f"{'block' if blocked else 'unblock'}-port {ifname}", go)

    # ---- FDB and neighbours ---------------------------------------------------------------------------------
    async def fdb_local(self, mac: str, ifname: str, net: NetworkSpec) -> None:
        """``mac`` is behind local port ``ifname``: bridge entry to the port, VXLAN entry removed."""
        async def go() -> None:
            port = await self._ifindex(ifname)
            vx = await self._ifindex(net.vxlan)
            await self._neigh("replace", family=AF_BRIDGE, ifindex=port, lladdr=mac, flags=NTF_MASTER,
                              state=NUD_NOARP)
            await self._neigh("del", ignore_missing=True, family=AF_BRIDGE, ifindex=vx, lladdr=mac, flags=NTF_SELF)
        await self._run(f"fdb-local {mac}", go)

    async def fdb_remote(self, mac: str, vtep: str, net: NetworkSpec) -> None:
        """``mac`` is behind tunnel endpoint ``vtep``: VXLAN entry first, then the bridge entry."""
        async def go() -> None:
            vx = await self._ifindex(net.vxlan)
            await self._neigh("replace", family=AF_BRIDGE, ifindex=vx, lladdr=mac, dst=vtep, flags=NTF_SELF,
                              state=NUD_PERMANENT | NUD_NOARP)
            await self._neigh("replace", family=AF_BRIDGE, ifindex=vx, lladdr=mac, flags=NTF_MASTER,
                              state=NUD_NOARP)
        await self._run(f"fdb-remote {mac}", go)

    async def fdb_delete(self, mac: str, net: NetworkSpec) -> None:
        async def go() -> None:
            vx = await self._ifindex(net.vxlan)
            await self._neigh("del", ignore_missing=True, family=AF_BRIDGE, ifindex=vx, lladdr=mac, flags=NTF_MASTER)
            await self._neigh("del", ignore_missing=True, family=AF_BRIDGE, ifindex=vx, lladdr=mac, flags=NTF_SELF)
        await self._run(f"fdb-delete {mac}", go)

    async def neigh_add(self, ips: Sequence[str], mac: str, net: NetworkSpec) -> None:
        """ARP suppression: the bridge answers ARP requests for ``ips`` from local ports itself."""
        async def go() -> None:
            br = await self._ifindex(net.bridge)
            for ip in ips:
                await self._neigh("replace", ifindex=br, dst=ip, lladdr=mac, state=NUD_PERMANENT)
        await self._run(f"neigh-add {mac}", go)

    async def neigh_delete(self, ips: Sequence[str], net: NetworkSpec) -> None:
        async def go() -> None:
            br = await self._ifindex(net.bridge)
            for ip in ips:
                await self._neigh("del", ignore_missing=True, ifindex=br, dst=ip)
        await self._run(f"neigh-delete {ips[0] if ips else ''}", go)

    # ---- inspection ------------------------------------------------------------------------------------------
    async def _table(self) -> nft.TableView | None:
        try:
            return nft.parse_table(await self._nftrun(f"list table {nft.FAMILY} {nft.TABLE}", json_output=True))
        except nft.NftError as exc:
            if "No such file" in exc.error:
                return None
            raise

    async def counters(self, ifname: str) -> nft.PortCounters:
        view = await self._run("counters", self._table)
        return view.port_counters(ifname) if view is not None else nft.PortCounters()

    async def inventory(self) -> HostInventory:
        """Links, FDB and neighbour entries and the nftables table that hvsim owns here."""
        async def go() -> HostInventory:
            links = await self._links()
            names = {i: n for n, i in links.items()}
            ours = tuple(sorted(n for n in links if _owned(n)))
            fdb: list[FdbEntry] = []
            async for m in await self.ipr.neigh("dump", family=AF_BRIDGE):
                dev = names.get(int(m["ifindex"]), str(m["ifindex"]))
                mac = str(m.get("NDA_LLADDR") or "")
                master = m.get("NDA_MASTER") is not None
                if not _owned(dev) or mac.startswith(("33:33:", "01:00:5e")):
                    continue
                if master and m["state"] & NUD_PERMANENT:
                    continue          # the bridge's own address of a port: goes with the port
                fdb.append(FdbEntry(mac=mac, device=dev, dst=str(m.get("NDA_DST") or ""), master=master,
                                    state=int(m["state"])))
            neigh: list[tuple[str, str, str]] = []
            async for m in await self.ipr.neigh("dump", family=2):
                dev = names.get(int(m["ifindex"]), "")
                if _owned(dev):
                    neigh.append((dev, str(m.get("NDA_DST")), str(m.get("NDA_LLADDR") or "")))
            return HostInventory(host=self.host, links=ours, fdb=tuple(fdb), neighbours=tuple(neigh),
                                 table=await self._table())
        return await self._run("inventory", go)
