"""Tenant networks, ENIs and their bindings: validated, serialisable definitions (pure logic).

Nothing here touches a host; :mod:`hvsim.network.controller` programs what these describe.

* A :class:`NetworkSpec` is one tenant network: a VXLAN segment (``vni``) with an IPv4 ``cidr``,
  an optional ``gateway`` and the ``mtu`` its guests use (the underlay's 1500 minus the 50 bytes
  of VXLAN over IPv4).
* An :class:`EniSpec` is an elastic network interface: ``id``, ``mac``, ``ips`` inside its
  ``network`` and ingress ``rules`` (a stateless allow-list; empty = everything allowed).
  :func:`validate_eni` refuses, before anything is programmed, a bad MAC (malformed, multicast,
  all-zero), an IP outside its network (or the network/broadcast/gateway address), a MAC or IP
  that another ENI of the network already has, and an unknown network.
* A :class:`Binding` ties an ENI to a (VM, host) pair through a port on that host. Its state
  machine (:data:`BINDING_TRANSITIONS`)::

      DETACHED --stage--> STAGED --activate--> ACTIVE --release--> RELEASING --> DETACHED
                            |                                          ^   |
                            +----------------rollback------------------+   +--revert--> ACTIVE

  ``RELEASING -> ACTIVE`` is the source binding of a move whose switchover is reverted.
"""
from __future__ import annotations

import enum
import hashlib
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hvbase.fsm import StateMachine

from .errors import (AddressConflictError, BindingStateError, TenantInputError, UnknownNetworkError)

log = logging.getLogger("hvsim.network.eni")

VXLAN_OVERHEAD = 50          # outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14)
UNDERLAY_MTU = 1500
DEFAULT_MTU = UNDERLAY_MTU - VXLAN_OVERHEAD
MIN_MTU = 576
MAX_VNI = 2 ** 24 - 1

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
_ENI_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$|^[a-z0-9]$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TenantInputError(f"{kind} name {name!r} is invalid: use 1-32 lowercase letters, digits and '-', "
                               "starting with a letter and not ending with '-'")
    return name


def parse_mac(value: object, what: str = "MAC") -> str:
    """A unicast, non-zero Ethernet address in canonical lowercase ``aa:bb:cc:dd:ee:ff`` form."""
    if not isinstance(value, str):
        raise TenantInputError(f"{what} must be a string like '52:54:00:12:34:56', got {value!r}")
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        raise TenantInputError(f"{what} {value!r} is malformed: want six hex octets like 52:54:00:12:34:56")
    first = int(mac[:2], 16)
    if first & 1:
        raise TenantInputError(f"{what} {value!r} is a multicast/broadcast address (low bit of the first octet set)")
    if mac == "00:00:00:00:00:00":
        raise TenantInputError(f"{what} {value!r} is the all-zero address")
    return mac


def _ipv4(value: object, what: str) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise TenantInputError(f"{what} must be an IPv4 address string, got {value!r}")
    try:
        return ipaddress.IPv4Address(value.strip())
    except ValueError as exc:
        raise TenantInputError(f"{what} {value!r} is not an IPv4 address") from exc


# ---- tenant networks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkSpec:
    """One tenant network: an isolated L2 segment carried between hosts as VXLAN ``vni``."""
    name: str
    vni: int
    cidr: str
    gateway: str = ""
    mtu: int = DEFAULT_MTU

    def __post_init__(self) -> None:
        _check_name("network", self.name)
        if isinstance(self.vni, bool) or not isinstance(self.vni, int) or not 1 <= self.vni <= MAX_VNI:
            raise TenantInputError(f"network {self.name!r}: vni must be an integer 1..{MAX_VNI}, got {self.vni!r}")
        if not isinstance(self.cidr, str):
            raise TenantInputError(f"network {self.name!r}: cidr must be a string like '10.77.0.0/24'")
        try:
            net = ipaddress.IPv4Network(self.cidr.strip(), strict=True)
        except ValueError as exc:
            raise TenantInputError(f"network {self.name!r}: cidr {self.cidr!r} is not an IPv4 network "
                                   f"({exc})") from exc
        if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
            raise TenantInputError(f"network {self.name!r}: cidr {net} must be a private, non-loopback, "
                                   "non-link-local range (tenant networks are never routed outside)")
        if net.prefixlen > 30:
            raise TenantInputError(f"network {self.name!r}: cidr {net} is too small (at most /30)")
        object.__setattr__(self, "cidr", str(net))
        if self.gateway:
            gw = _ipv4(self.gateway, f"network {self.name!r}: gateway")
            if gw not in net or gw in (net.network_address, net.broadcast_address):
                raise TenantInputError(f"network {self.name!r}: gateway {gw} is not a host address of {net}")
            object.__setattr__(self, "gateway", str(gw))
        if isinstance(self.mtu, bool) or not isinstance(self.mtu, int) or not MIN_MTU <= self.mtu <= DEFAULT_MTU:
            raise TenantInputError(f"network {self.name!r}: mtu must be an integer {MIN_MTU}..{DEFAULT_MTU} "
                                   f"(the underlay's {UNDERLAY_MTU} minus {VXLAN_OVERHEAD} of VXLAN), "
                                   f"got {self.mtu!r}")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    @property
    def bridge(self) -> str:
        """The Linux bridge of this network on every host."""
        return f"hvb{self.vni}"

    @property
    def vxlan(self) -> str:
        """The VXLAN device of this network on every host."""
        return f"hvx{self.vni}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vni": self.vni, "cidr": self.cidr, "gateway": self.gateway, "mtu": self.mtu}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        return cls(**_known(cls, data))


def check_networks(networks: Iterable[NetworkSpec], new: NetworkSpec) -> None:
    """Refuse ``new`` if its name or VNI is already taken (CIDRs may overlap: networks are isolated)."""
    for n in networks:
        if n.name == new.name:
            raise TenantInputError(f"network {new.name!r} is already defined")
        if n.vni == new.vni:
            raise TenantInputError(f"network {new.name!r}: vni {new.vni} is already used by network {n.name!r}")


# ---- security rules ------------------------------------------------------------------------------------
Proto = Literal["any", "tcp", "udp", "icmp"]


@dataclass(frozen=True)
class SecurityRule:
    """Allow ingress to the ENI from ``source`` for ``proto`` (and, for tcp/udp, destination ports
    ``ports`` = (first, last) inclusive). Rules are a stateless allow-list: an ENI with rules
    receives only IPv4 traffic some rule allows (ARP always passes); an ENI without rules
    receives everything of its network."""
    proto: Proto = "any"
    ports: tuple[int, int] | None = None
    source: str = "0.0.0.0/0"

    def __post_init__(self) -> None:
        if self.proto not in ("any", "tcp", "udp", "icmp"):
            raise TenantInputError(f"security rule: proto must be any, tcp, udp or icmp, got {self.proto!r}")
        if self.ports is not None:
            if self.proto not in ("tcp", "udp"):
                raise TenantInputError(f"security rule: ports only apply to tcp/udp, not {self.proto!r}")
            ports = tuple(self.ports)
            if (len(ports) != 2 or any(isinstance(p, bool) or not isinstance(p, int) for p in ports)
                    or not 1 <= ports[0] <= ports[1] <= 65535):
                raise TenantInputError(f"security rule: ports must be (first, last) with "
                                       f"1 <= first <= last <= 65535, got {self.ports!r}")
            object.__setattr__(self, "ports", (int(ports[0]), int(ports[1])))
        if not isinstance(self.source, str):
            raise TenantInputError(f"security rule: source must be an IPv4 CIDR string, got {self.source!r}")
        try:
            object.__setattr__(self, "source", str(ipaddress.IPv4Network(self.source.strip(), strict=True)))
        except ValueError as exc:
            raise TenantInputError(f"security rule: source {self.source!r} is not an IPv4 network ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"proto": self.proto, "ports": list(self.ports) if self.ports else None, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SecurityRule:
        d = _known(cls, data)
        if d.get("ports") is not None:
            d["ports"] = tuple(d["ports"])
        return cls(**d)


# ---- ENIs ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EniSpec:
    """An elastic network interface. ``ips`` are host addresses of the network (the first one is
    the guest's primary address)."""
    id: str
    network: str
    mac: str
    ips: tuple[str, ...]
    rules: tuple[SecurityRule, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ENI_RE.match(self.id):
            raise TenantInputError(f"ENI id {self.id!r} is invalid: use 1-40 lowercase letters, digits and '-'")
        _check_name(f"ENI {self.id!r}: network", self.network)
        object.__setattr__(self, "mac", parse_mac(self.mac, f"ENI {self.id!r}: MAC"))
        if isinstance(self.ips, str) or not isinstance(self.ips, Iterable):
            raise TenantInputError(f"ENI {self.id!r}: ips must be a list of IPv4 addresses, got {self.ips!r}")
        ips = [str(_ipv4(ip, f"ENI {self.id!r}: IP")) for ip in self.ips]
        if not ips:
            raise TenantInputError(f"ENI {self.id!r}: needs at least one IP")
        if len(set(ips)) != len(ips):
            raise TenantInputError(f"ENI {self.id!r}: IP listed twice in {ips}")
        object.__setattr__(self, "ips", tuple(ips))
        rules = tuple(r if isinstance(r, SecurityRule) else SecurityRule.from_dict(r) for r in self.rules)
        object.__setattr__(self, "rules", rules)

    @property
    def primary_ip(self) -> str:
        return self.ips[0]

    @property
    def port_name(self) -> str:
        """The host-side port (tap or veth) of this ENI; the same name on every host, so a
        migrating QEMU opens ``-netdev tap,ifname=...`` on either end."""
        return "hvp" + hashlib.sha256(self.id.encode()).hexdigest()[:10]

    def peer_name(self, host: str) -> str:
        """The guest-side end of a veth port on ``host`` (namespace endpoints only)."""
        return "hvq" + hashlib.sha256(f"{self.id}@{host}".encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "network": self.network, "mac": self.mac, "ips": list(self.ips),
                "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EniSpec:
        d = _known(cls, data)
        d["ips"] = tuple(d.get("ips", ()))
        d["rules"] = tuple(d.get("rules", ()))
        return cls(**d)


def validate_eni(spec: EniSpec, networks: Mapping[str, NetworkSpec], existing: Iterable[EniSpec]) -> NetworkSpec:
    """Check ``spec`` against the defined networks and ENIs; return its network.

    :raise UnknownNetworkError: the network is not defined
    :raise TenantInputError: an IP outside the network (or its network/broadcast/gateway address)
    :raise AddressConflictError: the id, or the MAC or an IP within the network, is already taken
    """
    net = networks.get(spec.network)
    if net is None:
        raise UnknownNetworkError(spec.network, sorted(networks))
    cidr = net.network
    for ip in spec.ips:
        addr = ipaddress.IPv4Address(ip)
        if addr not in cidr:
            raise TenantInputError(f"ENI {spec.id!r}: IP {ip} is outside network {net.name!r} ({cidr})")
        if addr in (cidr.network_address, cidr.broadcast_address):
            raise TenantInputError(f"ENI {spec.id!r}: IP {ip} is the network or broadcast address of {cidr}")
        if net.gateway and ip == net.gateway:
            raise TenantInputError(f"ENI {spec.id!r}: IP {ip} is the gateway of network {net.name!r}")
    port = spec.port_name
    for other in existing:
        if other.id == spec.id:
            raise AddressConflictError(f"ENI {spec.id!r} is already defined")
        if other.port_name == port:   # 44 bits of a hash: practically never; refused if it happens
            raise AddressConflictError(f"ENI {spec.id!r}: port name {port} collides with ENI {other.id!r}")
        if other.network != spec.network:
            continue
        if other.mac == spec.mac:
            raise AddressConflictError(f"ENI {spec.id!r}: MAC {spec.mac} is already used by ENI {other.id!r} "
                                       f"in network {net.name!r}")
        taken = set(other.ips) & set(spec.ips)
        if taken:
            raise AddressConflictError(f"ENI {spec.id!r}: IP {', '.join(sorted(taken))} already used by ENI "
                                       f"{other.id!r} in network {net.name!r}")
    return net


def guest_nic_arg(spec: EniSpec, net: NetworkSpec) -> str:
    """The kernel command-line argument that configures this ENI in an hvsim guest (images/init.sh):
    ``hvsim.nic=MAC,IP/PREFIX[,GATEWAY],mtu=MTU`` (the interface is found by its MAC)."""
    parts = [spec.mac, f"{spec.primary_ip}/{net.prefixlen}"]
    if net.gateway:
        parts.append(f"gw={net.gateway}")
    parts.append(f"mtu={net.mtu}")
    return "hvsim.nic=" + ",".join(parts)


# ---- ports and bindings --------------------------------------------------------------------------------------
class PortKind(enum.Enum):
    TAP = "tap"     # a persistent tap that QEMU opens (-netdev tap,ifname=...,script=no)
    VETH = "veth"   # a veth whose peer lives in an endpoint namespace (an emulated guest NIC)


@dataclass(frozen=True)
class PortSpec:
    """How an ENI's port on a host is made. For VETH, ``peer_netns`` is the namespace that gets
    the other end (it must be one the caller created, named ``hvs-...``)."""
    kind: PortKind = PortKind.TAP
    peer_netns: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, PortKind):
            raise TenantInputError(f"port kind must be a PortKind, got {self.kind!r}")
        if self.kind is PortKind.VETH:
            if not isinstance(self.peer_netns, str) or not self.peer_netns.startswith("hvs-") \
                    or "/" in self.peer_netns or len(self.peer_netns) > 64:
                raise TenantInputError(f"veth port: peer_netns must be a test/lab namespace named 'hvs-...', "
                                       f"got {self.peer_netns!r}")
        elif self.peer_netns:
            raise TenantInputError("tap port: peer_netns only applies to veth ports")

    @classmethod
    def tap(cls) -> PortSpec:
        return cls(PortKind.TAP)

    @classmethod
    def veth(cls, peer_netns: str) -> PortSpec:
        return cls(PortKind.VETH, peer_netns)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "peer_netns": self.peer_netns}


class BindingState(enum.Enum):
    DETACHED = "detached"
    STAGED = "staged"
    ACTIVE = "active"
    RELEASING = "releasing"


B = BindingState
BINDING_TRANSITIONS: dict[BindingState, frozenset[BindingState]] = {
    B.DETACHED: frozenset({B.STAGED}),
    B.STAGED: frozenset({B.ACTIVE, B.RELEASING}),
    B.ACTIVE: frozenset({B.RELEASING}),
    B.RELEASING: frozenset({B.DETACHED, B.ACTIVE}),
}


@dataclass
class Binding:
    """An ENI bound to a VM on a host through a port. Changes state only through its methods."""
    eni: str
    vm: str
    host: str
    port: PortSpec
    ifname: str
    peer_ifname: str = ""
    fsm: StateMachine[BindingState] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not _IFNAME_RE.match(self.ifname):
            raise TenantInputError(f"binding of ENI {self.eni!r}: bad interface name {self.ifname!r}")
        self.fsm = StateMachine(f"binding {self.eni}@{self.host}", B.DETACHED, BINDING_TRANSITIONS,
                                error=BindingStateError, log=log)

    @property
    def state(self) -> BindingState:
        return self.fsm.state

    def staged(self, reason: str = "") -> None:
        self.fsm.set(B.STAGED, reason)

    def activated(self, reason: str = "") -> None:
        self.fsm.set(B.ACTIVE, reason)

    def releasing(self, reason: str = "") -> None:
        self.fsm.set(B.RELEASING, reason)

    def detached(self, reason: str = "") -> None:
        self.fsm.set(B.DETACHED, reason)

    def to_dict(self) -> dict[str, Any]:
        return {"eni": self.eni, "vm": self.vm, "host": self.host, "port": self.port.to_dict(),
                "ifname": self.ifname, "peer_ifname": self.peer_ifname, "state": self.state.value}


class Eni:
    """An ENI as the controller owns it: its definition and its live bindings (at most one
    ACTIVE and one STAGED; during a move the source binding is ACTIVE, then RELEASING)."""

    def __init__(self, spec: EniSpec, network: NetworkSpec) -> None:
        self.spec = spec
        self.network = network
        self.bindings: list[Binding] = []

    @property
    def id(self) -> str:
        return self.spec.id

    def _in(self, state: BindingState) -> Binding | None:
        found = [b for b in self.bindings if b.state is state]
        return found[0] if found else None

    @property
    def active(self) -> Binding | None:
        return self._in(B.ACTIVE)

    @property
    def staged(self) -> Binding | None:
        return self._in(B.STAGED)

    @property
    def vm(self) -> str | None:
        b = self.active or self._in(B.RELEASING) or self.staged
        return b.vm if b else None

    def binding_on(self, host: str) -> Binding | None:
        for b in self.bindings:
            if b.host == host:
                return b
        return None

    def new_binding(self, vm: str, host: str, port: PortSpec) -> Binding:
        """A DETACHED binding on ``host`` (the caller stages it). Refused if the ENI already has a
        binding on that host, or a staged one, or is bound to another VM."""
        if self.binding_on(host) is not None:
            b = self.binding_on(host)
            assert b is not None
            raise BindingStateError(f"ENI {self.id!r}", b.state, (), action=f"bind on host {host!r}",
                                    message=f"ENI {self.id!r} already has a {b.state.value} binding on "
                                            f"host {host!r}")
        if self.staged is not None:
            raise BindingStateError(f"ENI {self.id!r}", B.STAGED, (), action="stage",
                                    message=f"ENI {self.id!r} already has a staged binding on host "
                                            f"{self.staged.host!r}")
        if self.vm is not None and self.vm != vm:
            raise BindingStateError(f"ENI {self.id!r}", B.ACTIVE, (), action=f"bind to vm {vm!r}",
                                    message=f"ENI {self.id!r} is bound to vm {self.vm!r}, not {vm!r}")
        peer = self.spec.peer_name(host) if port.kind is PortKind.VETH else ""
        b = Binding(self.id, vm, host, port, self.spec.port_name, peer)
        self.bindings.append(b)
        return b

    def forget(self, binding: Binding) -> None:
        """Drop a DETACHED binding."""
        if binding.state is not B.DETACHED:
            raise BindingStateError(binding.fsm.obj, binding.state, (B.DETACHED,), action="forget")
        self.bindings.remove(binding)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "bindings": [b.to_dict() for b in self.bindings]}


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    import dataclasses
    if not isinstance(data, Mapping):
        raise TenantInputError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise TenantInputError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    return dict(data)
