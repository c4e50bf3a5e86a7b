"""Emulated hosts on a shaped underlay network.

Topology (one Underlay = one run)::

    hvs-<id>-h-<host>  (one netns per host)         hvs-<id>-sw  (switch netns)
      lo up                                            br0 (bridge, STP off)
      ul0 198.18.0.N/24 --tbf egress--  veth  --tbf egress-- p<i> (port of br0)

Each host's only interface besides lo is ``ul0``; the /24 exists only inside these
namespaces and no namespace has a default route, so nothing can leave the underlay.
The root namespace is never touched: veths are created inside the switch namespace
with their peer placed straight into the host namespace.

State machine::

    NEW -> STARTING -> UP -> CLOSING -> TORN_DOWN
    NEW -> TORN_DOWN (close before start)
    STARTING -> CLOSING -> FAILED      (setup failed or was cancelled; torn down)
    CLOSING -> FAILED                  (teardown left something behind)
"""
from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable, Mapping, Sequence

from hvbase.fsm import StateMachine

from hvbase.aio import run_to_completion as _complete
from ..core.host import HostNetwork
from . import netns as nsutil
from . import reclaim, records
from .errors import (NetworkError, SetupError, StateError, TeardownError,
                     TopologyError, UnknownHostError)
from .shaping import (DEFAULT_LATENCY_MS, LinkShape, QdiscStats, check_mbit,
                      parse_qdisc_json, tbf_replace_line)

log = logging.getLogger("hvsim.network")

HOST_IFACE = "ul0"
BRIDGE = "br0"
DEFAULT_SUBNET = "198.18.0.0/24"  # RFC 2544 benchmarking range: never routed on the internet
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,15}$")

T = TypeVar("T")


class UnderlayState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    UP = "up"
    CLOSING = "closing"
    TORN_DOWN = "torn_down"
    FAILED = "failed"


_TRANSITIONS: dict[UnderlayState, frozenset[UnderlayState]] = {
    UnderlayState.NEW: frozenset({UnderlayState.STARTING, UnderlayState.TORN_DOWN}),
    UnderlayState.STARTING: frozenset({UnderlayState.UP, UnderlayState.CLOSING}),
    UnderlayState.UP: frozenset({UnderlayState.CLOSING}),
    UnderlayState.CLOSING: frozenset({UnderlayState.TORN_DOWN, UnderlayState.FAILED}),
    UnderlayState.TORN_DOWN: frozenset(),
    UnderlayState.FAILED: frozenset(),
}


class Direction(enum.Enum):
    """Which side of a host link to shape. EGRESS = what the host sends."""
    BOTH = "both"
    EGRESS = "egress"
    INGRESS = "ingress"


@dataclass(frozen=True)
class HostShaping:
    egress: LinkShape   # host -> underlay (tbf on ul0 in the host namespace)
    ingress: LinkShape  # underlay -> host (tbf on the switch port)


@dataclass(frozen=True)
class LinkStats:
    """Counters of a host's link, seen from the host (tx = sent by the host)."""
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int
    egress_qdisc: QdiscStats | None
    ingress_qdisc: QdiscStats | None


@dataclass
class _Host:
    name: str
    index: int
    ns: str
    ip: str
    port: str
    shaping: HostShaping



class Underlay:
    """Hosts, each in its own network namespace, joined by a bridge over tbf-shaped veths.

    ``async with Underlay(["a", "b"], mbit=200) as net: ...`` brings it up and always
    tears it down (also on exceptions and cancellation).
    """

    def __init__(self, hosts: Sequence[str], mbit: float, *,
                 overrides: Mapping[str, float | LinkShape] | None = None,
                 burst_bytes: int | None = None,
                 latency_ms: float = DEFAULT_LATENCY_MS,
                 subnet: str = DEFAULT_SUBNET,
                 prefix: str = "hvs-",
                 run_dir: str | os.PathLike[str] | None = None,
                 kill_stragglers: bool = True) -> None:
        if isinstance(hosts, str) or not isinstance(hosts, Sequence):
            raise TopologyError(f"hosts must be a list of names, got {hosts!r}")
        if len(hosts) < 1:
            raise TopologyError("an underlay needs at least one host")
        seen: set[str] = set()
        for h in hosts:
            if not isinstance(h, str) or not _HOST_RE.match(h):
                raise TopologyError(
                    f"invalid host name {h!r}: use 1-32 chars of [A-Za-z0-9_.-], starting alphanumeric")
            if h in seen:
                raise TopologyError(f"duplicate host name {h!r}")
            seen.add(h)
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise TopologyError(f"invalid namespace prefix {prefix!r}: 1-16 chars of [A-Za-z0-9_.-]")
        try:
            net = ipaddress.IPv4Network(subnet, strict=True)
        except ValueError as exc:
            raise TopologyError(f"invalid subnet {subnet!r}: {exc}") from exc
        if not net.is_private or net.is_loopback or net.is_link_local or net.prefixlen > 30:
            raise TopologyError(f"subnet {subnet} must be a private, non-loopback network of /30 or larger")
        addrs = list(net.hosts())
        if len(hosts) > len(addrs):
            raise TopologyError(f"subnet {subnet} has room for {len(addrs)} hosts, {len(hosts)} requested")
        base = LinkShape(mbit=check_mbit(mbit, "link bandwidth"), burst_bytes=burst_bytes, latency_ms=latency_ms)
        per_host: dict[str, LinkShape] = {}
        for name, value in (overrides or {}).items():
            if name not in seen:
                raise UnknownHostError(name, list(hosts))
            if isinstance(value, LinkShape):
                per_host[name] = value
            else:
                per_host[name] = base.with_mbit(check_mbit(value, f"bandwidth override for {name!r}"))

        self.runid = secrets.token_hex(3)
        self.prefix = prefix
        self.subnet = net
        self.switch_ns = f"{prefix}{self.runid}-sw"
        self._kill_stragglers = kill_stragglers
        self._run_dir = records.run_dir(run_dir)
        self._record_path: Path | None = None
        self._hosts: dict[str, _Host] = {}
        for i, name in enumerate(hosts):
            shape = per_host.get(name, base)
            self._hosts[name] = _Host(name=name, index=i, ns=f"{prefix}{self.runid}-h-{name}",
                                      ip=str(addrs[i]), port=f"p{i}",
                                      shaping=HostShaping(egress=shape, ingress=shape))
        self.fsm: StateMachine[UnderlayState] = StateMachine(f"underlay {self.runid}", UnderlayState.NEW,
                                                             _TRANSITIONS, error=StateError, log=log)
        self._close_task: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.log = log.getChild(self.runid)

    # ---- state -------------------------------------------------------------------
    @property
    def state(self) -> UnderlayState:
        return self.fsm.state

    def _transition(self, new: UnderlayState) -> None:
        self.fsm.set(new)

    def _require(self, what: str, *states: UnderlayState) -> None:
        self.fsm.require(what, *states)

    # ---- lookups -----------------------------------------------------------------
    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self._hosts)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this underlay owns (hosts first, then the switch)."""
        return [h.ns for h in self._hosts.values()] + [self.switch_ns]

    def _host(self, name: str) -> _Host:
        try:
            return self._hosts[name]
        except (KeyError, TypeError):
            raise UnknownHostError(name, list(self._hosts)) from None

    def host_ns(self, host: str) -> str:
        return self._host(host).ns

    def host_ip(self, host: str) -> str:
        return self._host(host).ip

    def host_network(self, host: str) -> HostNetwork:
        """Where ``host`` lives on this underlay, for ``cluster.add_host(spec, network=...)``."""
        h = self._host(host)
        return HostNetwork(netns=h.ns, address=h.ip)

    def host_iface(self, host: str) -> str:
        self._host(host)
        return HOST_IFACE

    def shaping(self, host: str) -> HostShaping:
        return self._host(host).shaping

    def argv_in(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec <host ns>``."""
        h = self._host(host)
        self._require("build argv_in", UnderlayState.UP)
        return nsutil.argv_in(h.ns, argv)

    def preexec_fn(self, host: str) -> Callable[[], None]:
        """A subprocess ``preexec_fn`` that enters the host's network namespace (setns)."""
        h = self._host(host)
        self._require("build preexec_fn", UnderlayState.UP)
        return nsutil.setns_preexec(h.ns)

    # ---- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> Underlay:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        self._transition(UnderlayState.STARTING)
        try:
            await self._setup()
        except BaseException as exc:
            self.error = exc
            self._transition(UnderlayState.CLOSING)
            try:
                await _complete(self._teardown())
            except NetworkError as td_exc:
                self.log.error("teardown after failed setup: %s", td_exc)
            finally:
                self._transition(UnderlayState.FAILED)
            if not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt, ...
                raise
            raise SetupError(f"underlay {self.runid} setup failed (torn down): {exc}") from exc
        self._transition(UnderlayState.UP)
        self.log.info("underlay up: %s", ", ".join(f"{h.name}={h.ip}@{h.ns}" for h in self._hosts.values()))

    async def close(self) -> None:
        """Tear everything down. Idempotent; completes even if the caller is cancelled
        (the cancellation is re-raised afterwards)."""
        if self.state in (UnderlayState.TORN_DOWN, UnderlayState.FAILED):
            return
        if self.state is UnderlayState.NEW:
            self._transition(UnderlayState.TORN_DOWN)
            return
        self.fsm.require("close", UnderlayState.UP, UnderlayState.CLOSING)
        if self._close_task is None:
            self._transition(UnderlayState.CLOSING)
            self._close_task = asyncio.ensure_future(self._close())
        await _complete(self._close_task)

    async def _close(self) -> None:
        try:
            await self._teardown()
        except BaseException as exc:
            self.error = exc
            self._transition(UnderlayState.FAILED)
            raise
        self._transition(UnderlayState.TORN_DOWN)
        self.log.info("underlay torn down")

    async def _setup(self) -> None:
        hosts = list(self._hosts.values())
        self._record_path = records.write_record(
            self._run_dir, records.Record.for_this_process(self.runid, self.prefix, self.namespaces))
        await nsutil.ip(batch=[f"netns add {ns}" for ns in self.namespaces])
        sw: list[str] = [
            "link set lo up",
            f"link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            f"link set {BRIDGE} addrgenmode none",
            f"link set {BRIDGE} up",
        ]
        for h in hosts:
            sw += [f"link add {h.port} type veth peer name {HOST_IFACE} netns {h.ns}",
                   f"link set {h.port} addrgenmode none",
                   f"link set {h.port} alias host:{h.name}",
                   f"link set {h.port} master {BRIDGE}",
                   f"link set {h.port} up"]
        await nsutil.ip(netns=self.switch_ns, batch=sw)
        async with asyncio.TaskGroup() as tg:
            for h in hosts:
                tg.create_task(nsutil.ip(netns=h.ns, batch=[
                    "link set lo up",
                    f"link set {HOST_IFACE} addrgenmode none",
                    f"addr add {h.ip}/{self.subnet.prefixlen} dev {HOST_IFACE}",
                    f"link set {HOST_IFACE} up",
                ]))
                tg.create_task(nsutil.tc(netns=h.ns, batch=[tbf_replace_line(HOST_IFACE, h.shaping.egress)]))
            tg.create_task(nsutil.tc(netns=self.switch_ns,
                                     batch=[tbf_replace_line(h.port, h.shaping.ingress) for h in hosts]))

    async def _teardown(self) -> None:
        ours = [ns for ns in self.namespaces if ns in set(nsutil.list_netns())]
        if self._kill_stragglers:
            for ns in ours:
                await nsutil.kill_netns_pids(ns)
        if self.switch_ns in ours:
            # deleting each veth removes both ends and their qdiscs at once, even if a
            # process still holds a host namespace open
            await nsutil.ip(netns=self.switch_ns, force=True, check=False,
                            batch=[f"link del {h.port}" for h in self._hosts.values()])
        if ours:
            await nsutil.ip(force=True, check=False, batch=[f"netns del {ns}" for ns in ours])
        left = sorted(set(self.namespaces) & set(nsutil.list_netns()))
        if left:
            raise TeardownError(f"underlay {self.runid}: namespaces still present after teardown", left)
        if self._record_path is not None:
            self._record_path.unlink(missing_ok=True)

    # ---- live operations ---------------------------------------------------------
    async def set_bandwidth(self, host: str, mbit: float, *, direction: Direction = Direction.BOTH) -> None:
        """Change a host link's rate live (tc qdisc replace); other shaping params are kept."""
        h = self._host(host)
        rate = check_mbit(mbit, f"bandwidth for {host!r}")
        if not isinstance(direction, Direction):
            raise TopologyError(f"direction must be a Direction, got {direction!r}")
        self._require("set_bandwidth", UnderlayState.UP)
        egress, ingress = h.shaping.egress, h.shaping.ingress
        jobs = []
        if direction in (Direction.BOTH, Direction.EGRESS):
            egress = egress.with_mbit(rate)
            jobs.append(nsutil.tc(netns=h.ns, batch=[tbf_replace_line(HOST_IFACE, egress)]))
        if direction in (Direction.BOTH, Direction.INGRESS):
            ingress = ingress.with_mbit(rate)
            jobs.append(nsutil.tc(netns=self.switch_ns, batch=[tbf_replace_line(h.port, ingress)]))
        await asyncio.gather(*jobs)
        h.shaping = HostShaping(egress=egress, ingress=ingress)
        self.log.info("bandwidth of %s (%s) set to %g Mbit/s", host, direction.value, rate)

    async def set_link(self, host: str, up: bool) -> None:
        """Cut (``up=False``) or restore a host's link: its veth end (``ul0`` in the host's namespace)
        goes administratively down or up. While it is down the host's route to the underlay is gone
        (its connects fail at once, established streams stall); addresses and shaping are kept and
        come back with it."""
        h = self._host(host)
        if not isinstance(up, bool):
            raise TopologyError(f"up must be a bool, got {up!r}")
        self._require("set_link", UnderlayState.UP)
        await nsutil.ip(netns=h.ns, batch=[f"link set {HOST_IFACE} {'up' if up else 'down'}"])
        self.log.warning("link of %s %s", host, "restored" if up else "cut")

    async def stats(self, host: str) -> LinkStats:
        h = self._host(host)
        self._require("read stats", UnderlayState.UP)
        link, q_eg, q_in = await asyncio.gather(
            nsutil.ip_json("-s", "link", "show", "dev", HOST_IFACE, netns=h.ns),
            nsutil.tc_json("-s", "qdisc", "show", "dev", HOST_IFACE, netns=h.ns),
            nsutil.tc_json("-s", "qdisc", "show", "dev", h.port, netns=self.switch_ns))
        s64 = (link[0] if link else {}).get("stats64", {})
        rx, tx = s64.get("rx", {}), s64.get("tx", {})
        return LinkStats(tx_bytes=int(tx.get("bytes", 0)), rx_bytes=int(rx.get("bytes", 0)),
                         tx_packets=int(tx.get("packets", 0)), rx_packets=int(rx.get("packets", 0)),
                         egress_qdisc=parse_qdisc_json(q_eg), ingress_qdisc=parse_qdisc_json(q_in))

    @staticmethod
    async def cleanup_stale(prefix: str = "hvs-", run_dir: str | os.PathLike[str] | None = None) -> list[str]:
        """Remove namespaces left by killed runs (recorded under ``run_dir``, named with
        ``prefix``, owner pid dead). Returns the names removed."""
        return await reclaim.cleanup_stale(prefix, run_dir)

    def __repr__(self) -> str:
        return f"<Underlay {self.runid} {self.state.name} hosts={list(self._hosts)}>"
