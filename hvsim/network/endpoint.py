"""Namespace endpoints: an emulated guest NIC in its own network namespace.

A real guest (QEMU) opens its ENI's tap; a namespace endpoint stands in for a guest where booting
one is not the point (the prober's peer, fast HIL tests of the controller). The endpoint's
namespace ``hvs-<id>-e-<name>`` holds a bridge ``eth0`` that carries the ENI's MAC, IPs and MTU
(the guest's NIC); its "cables" are the veth peers the controller creates with
``PortSpec.veth(endpoint.ns)`` on a host. Moving the endpoint to another host is what a migration
does to a guest: the NIC stays, its backend changes::

    move = await ctl.stage("vm-x", "b", move_id="m1")        # veth on b, peer in the endpoint ns
    await ep.plug(binding_b.peer_ifname, active=False)        # the destination "QEMU" opens its tap
    await ep.unplug(binding_a.peer_ifname)                    # switchover: the source stops,
    await ctl.activate(move)                                  # the controller activates,
    await ep.set_active(binding_b.peer_ifname, True)          # the destination resumes
    # (or ep.switch(old, new) in one transaction, when the activation is done beforehand)
    await ep.announce()                                       # like QMP announce-self (RARP)
    await ctl.release(move)

Namespaces are recorded (like the underlay's) so a killed run's leftovers are reclaimed by
``Underlay.cleanup_stale()``; ``close()`` kills what still runs inside and deletes the namespace.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute

from hvbase.fsm import StateMachine

from hvbase.aio import run_to_completion
from . import netns as nsutil
from . import records
from .eni import EniSpec, NetworkSpec, PortSpec
from .errors import BindingStateError, ProgrammingError, TeardownError, TenantInputError
from .tenant import NO_IPV6, NetnsWorker, netns_exists
from .nft import NftContext

log = logging.getLogger("hvsim.network.endpoint")

NIC = "eth0"
ETH_P_RARP = 0x8035
# Inactive cables pass nothing either way. Bridge *output* is what the NIC itself sends (a bridge
# floods its own broadcasts to every port, whatever the port's flood flags say).
_TABLE = "bridge hvsim_ep"
_NFT_SETUP = f"""add table {_TABLE}
add set {_TABLE} inactive {{ type ifname; }}
add chain {_TABLE} out {{ type filter hook output priority filter; policy accept; }}
add chain {_TABLE} pre {{ type filter hook prerouting priority filter; policy accept; }}
add rule {_TABLE} out oifname @inactive drop
add rule {_TABLE} pre iifname @inactive drop
"""


class EndpointState(enum.Enum):
    NEW = "new"
    UP = "up"
    CLOSED = "closed"


_E = EndpointState
_TRANSITIONS = {_E.NEW: frozenset({_E.UP, _E.CLOSED}), _E.UP: frozenset({_E.CLOSED}), _E.CLOSED: frozenset()}


def rarp_frame(mac: str) -> bytes:
    """The frame QEMU's ``announce-self`` sends: a broadcast RARP request from the guest's MAC."""
    hw = bytes.fromhex(mac.replace(":", ""))
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + hw + b"\0" * 4 + hw + b"\0" * 4
    frame = b"\xff" * 6 + hw + struct.pack("!H", ETH_P_RARP) + body
    return frame.ljust(60, b"\0")


class NsEndpoint:
    """An emulated guest NIC (``eth0``) with an ENI's MAC, IPs and MTU, in its own namespace."""

    def __init__(self, name: str, eni: EniSpec, network: NetworkSpec, *, prefix: str = "hvs-",
                 run_dir: str | os.PathLike[str] | None = None) -> None:
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise TenantInputError(f"endpoint name {name!r}: use up to 20 letters, digits and '-'")
        if eni.network != network.name:
            raise TenantInputError(f"endpoint {name!r}: ENI {eni.id!r} is in network {eni.network!r}, "
                                   f"not {network.name!r}")
        if not prefix.startswith("hvs-"):
            raise TenantInputError(f"endpoint namespaces are named 'hvs-...', got prefix {prefix!r}")
        self.name = name
        self.eni = eni
        self.network = network
        self.runid = secrets.token_hex(3)
        self.prefix = prefix
        self.ns = f"{prefix}{self.runid}-e-{name}"
        self._run_dir = records.run_dir(run_dir)
        self._record: Path | None = None
        self._ipr: AsyncIPRoute | None = None
        self._raw: socket.socket | None = None      # AF_PACKET on eth0 (announce), made at start
        self._worker: NetnsWorker | None = None     # libnftables lives on a thread inside the namespace
        self._nft: NftContext | None = None
        self.cables: dict[str, bool] = {}           # peer ifname -> active
        self.fsm: StateMachine[EndpointState] = StateMachine(f"endpoint {name}", _E.NEW, _TRANSITIONS,
                                                             error=BindingStateError, log=log)

    @property
    def state(self) -> EndpointState:
        return self.fsm.state

    @property
    def port(self) -> PortSpec:
        """What to pass to the controller so the host port's peer lands in this namespace."""
        return PortSpec.veth(self.ns)

    @property
    def ip(self) -> str:
        return self.eni.primary_ip

    def argv(self, argv: Sequence[str]) -> list[str]:
        return nsutil.argv_in(self.ns, argv)

    def preexec_fn(self) -> Callable[[], None]:
        return nsutil.setns_preexec(self.ns)

    async def __aenter__(self) -> NsEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise BindingStateError(self.fsm.obj, self.state, (_E.UP,), action="configure")
        return self._ipr

    async def start(self) -> None:
        self.fsm.require("start", _E.NEW)
        self._record = records.write_record(
            self._run_dir, records.Record.for_this_process(self.runid, self.prefix, [self.ns]))
        try:
            await nsutil.ip("netns", "add", self.ns)
            self._ipr = AsyncIPRoute(netns=self.ns, flags=0)
            ipr = self._ipr
            lo = (await ipr.link_lookup(ifname="lo"))[0]
            await ipr.link("set", index=lo, state="up")
            await ipr.link("add", ifname=NIC, kind="bridge", br_stp_state=0, br_forward_delay=0,
                           br_mcast_snooping=0)
            idx = (await ipr.link_lookup(ifname=NIC))[0]
            await ipr.link("set", index=idx, address=self.eni.mac, mtu=self.network.mtu, IFLA_AF_SPEC=NO_IPV6)
            for ip in self.eni.ips:
                await ipr.addr("add", index=idx, address=ip, prefixlen=self.network.prefixlen)
            await ipr.link("set", index=idx, state="up")
            self._raw = await asyncio.to_thread(self._packet_socket)
            self._worker = NetnsWorker(self.ns)
            self._nft = await self._worker.call(NftContext)
            await self._nftrun(_NFT_SETUP)
        except BaseException as exc:
            await run_to_completion(self._teardown())
            self.fsm.set(_E.CLOSED, "start failed")
            if isinstance(exc, Exception) and not isinstance(exc, ProgrammingError):
                raise ProgrammingError(f"endpoint {self.name}", "create namespace", str(exc)) from exc
            raise
        self.fsm.set(_E.UP, self.ns)

    async def _nftrun(self, commands: str) -> None:
        assert self._worker is not None and self._nft is not None
        ctx = self._nft
        await self._worker.call(lambda: ctx.run(commands))

    async def plug(self, peer_ifname: str, *, active: bool = True) -> None:
        """Attach a cable (a veth peer the controller put here) to the NIC and bring it up; an
        inactive cable passes nothing (a destination whose guest has not resumed yet)."""
        self.fsm.require("plug", _E.UP)
        ipr = self.ipr
        found = await ipr.link_lookup(ifname=peer_ifname)
        if not found:
            raise ProgrammingError(f"endpoint {self.name}", f"plug {peer_ifname}", "no such interface here")
        if not active:     # before it joins the NIC: never two live cables
            await self._nftrun(f'add element {_TABLE} inactive {{ "{peer_ifname}" }}\n')
        nic = (await ipr.link_lookup(ifname=NIC))[0]
        await ipr.link("set", index=found[0], mtu=self.network.mtu, IFLA_AF_SPEC=NO_IPV6)
        await ipr.link("set", index=found[0], master=nic)
        await ipr.brport("set", index=found[0], learning=0)   # what the NIC sends floods to the live cable
        await ipr.link("set", index=found[0], state="up")
        self.cables[peer_ifname] = active

    async def set_active(self, peer_ifname: str, active: bool) -> None:
        self.fsm.require("switch cables", _E.UP)
        await self._set({peer_ifname: active})

    async def _set(self, changes: dict[str, bool]) -> None:
        for name in changes:
            if name not in self.cables:
                raise ProgrammingError(f"endpoint {self.name}", f"switch {name}", "not plugged here")
        lines = [f'{"delete" if on else "add"} element {_TABLE} inactive {{ "{name}" }}'
                 for name, on in changes.items() if self.cables[name] != on]
        if lines:
            await self._nftrun("\n".join(lines) + "\n")     # one transaction
        self.cables.update(changes)

    async def unplug(self, peer_ifname: str) -> None:
        """Deactivate a cable (what a paused source guest looks like to the network)."""
        await self.set_active(peer_ifname, False)

    async def switch(self, old: str, new: str) -> None:
        """The emulated switchover in one nftables transaction: the old cable stops passing frames
        and the new one starts. No link changes state (a carrier change goes through the kernel's
        rate-limited linkwatch and can hold a new port back for up to a second; a migrating
        guest's NIC never loses its link either)."""
        self.fsm.require("switch cables", _E.UP)
        await self._set({old: False, new: True})

    async def announce(self, rounds: int = 1) -> None:
        """Send the RARP announce QEMU's ``announce-self`` would (``rounds`` frames)."""
        self.fsm.require("announce", _E.UP)
        assert self._raw is not None
        frame = rarp_frame(self.eni.mac)
        for _ in range(rounds):
            self._raw.send(frame)     # non-blocking socket; a full queue raises, it never blocks

    def _packet_socket(self) -> socket.socket:
        s = socket_in_netns(self.ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
        s.bind((NIC, 0))
        s.setblocking(False)
        return s

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send raw Ethernet frames out of the NIC as the guest (tests: forged frames)."""
        self.fsm.require("send frames", _E.UP)
        assert self._raw is not None
        for f in frames:
            self._raw.send(f)

    async def close(self) -> None:
        if self.state is _E.CLOSED:
            return
        await run_to_completion(self._teardown())
        self.fsm.set(_E.CLOSED)

    async def _teardown(self) -> None:
        if self._worker is not None:
            ctx, self._nft = self._nft, None
            if ctx is not None:
                await self._worker.call(ctx.close)
            self._worker.close()
            self._worker = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if netns_exists(self.ns):
            await nsutil.kill_netns_pids(self.ns)
            await nsutil.ip("netns", "del", self.ns, check=False)
        if netns_exists(self.ns):
            raise TeardownError(f"endpoint {self.name}", [self.ns])
        if self._record is not None:
            self._record.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"<NsEndpoint {self.name} {self.ns} {self.eni.mac} {self.ip} {self.state.value}>"


def socket_in_netns(netns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside ``netns`` (it stays there; blocking: call it from a thread)."""
    from pyroute2.netns import create_socket
    return create_socket(netns, family, kind, proto, flags=0)
