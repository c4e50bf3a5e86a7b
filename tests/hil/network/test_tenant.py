"""Tenant networks on real namespaces, bridges, VXLAN and nftables (root).

Endpoints are namespace "guests" (hvsim.network.endpoint): a bridge eth0 with the ENI's MAC/IP,
plugged into a host through a veth the controller creates. Everything lives in namespaces these
tests create; nothing is routed outside them."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import pytest

from hvbase.aio import wait_for
from hvsim.network import netns as nsutil
from hvsim.network.controller import MoveState, NetworkController
from hvsim.network.endpoint import NsEndpoint
from hvsim.network.eni import BindingState, EniSpec, NetworkSpec, PortSpec
from hvsim.network.errors import ProgrammingError
from hvsim.network.prober import EchoServer, Prober
from hvsim.network.underlay import Underlay

pytestmark = [pytest.mark.hil, pytest.mark.timeout(180)]

MODES = ["hvsim", "after-completion", "learning"]
BLUE = NetworkSpec("blue", 100, "10.77.0.0/24")
RED = NetworkSpec("red", 200, "10.77.0.0/24")      # the same addresses: only the VNI separates them


def mac(net: int, i: int) -> str:
    return f"52:54:00:{net:02x}:00:{i:02x}"


def spec(i: int, net: NetworkSpec = BLUE) -> EniSpec:
    return EniSpec(f"{net.name}-{i}", net.name, mac(net.vni // 100, i), (f"10.77.0.{i}",))


def sh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


async def ash(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(sh, argv)


class Fabric:
    def __init__(self, u: Underlay, ctl: NetworkController, stack: contextlib.AsyncExitStack) -> None:
        self.u, self.ctl, self.stack = u, ctl, stack
        self.endpoints: list[NsEndpoint] = []

    @property
    def namespaces(self) -> list[str]:
        return self.u.namespaces + [ep.ns for ep in self.endpoints]

    async def endpoint(self, name: str, eni: EniSpec, host: str, vm: str | None = None) -> NsEndpoint:
        """Define the ENI, create its endpoint, attach it on ``host`` and plug the cable."""
        e = self.ctl.define_eni(eni)
        ep = await self.stack.enter_async_context(NsEndpoint(name, eni, e.network))
        self.endpoints.append(ep)
        await self.ctl.attach(vm or f"vm-{name}", host, [eni.id], ports=ep.port)
        assert e.active is not None
        await ep.plug(e.active.peer_ifname)
        return ep


@contextlib.asynccontextmanager
async def fabric(mode: str = "hvsim", hosts: tuple[str, ...] = ("a", "b", "c"),
                 networks: tuple[NetworkSpec, ...] = (BLUE,)) -> AsyncIterator[Fabric]:
    async with Underlay(list(hosts), mbit=1000) as u:
        ctl = NetworkController(u, mode=mode)
        async with contextlib.AsyncExitStack() as stack:
            await ctl.start()
            stack.push_async_callback(ctl.close)
            for n in networks:
                await ctl.add_network(n)
            yield Fabric(u, ctl, stack)
        assert_host_clean(u)


def assert_host_clean(u: Underlay) -> None:
    """Independent check with ip/bridge/nft: no device, FDB entry or rule of ours in any host."""
    for h in u.hosts:
        ns = u.host_ns(h)
        links = [x["ifname"] for x in json.loads(sh(["ip", "-n", ns, "-j", "link", "show"]).stdout)]
        assert sorted(links) == ["lo", "ul0"], f"{h}: devices left: {links}"
        fdb = sh(["bridge", "-n", ns, "fdb", "show"]).stdout
        assert "52:54:00:" not in fdb, f"{h}: FDB entries left: {fdb}"
        tables = sh(nsutil.argv_in(ns, ["nft", "list", "tables"])).stdout
        assert "hvsim" not in tables, f"{h}: nftables left: {tables}"


def rx_packets(ns: str, dev: str) -> int:
    out = json.loads(sh(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev]).stdout)
    return int(out[0]["stats64"]["rx"]["packets"])


def tx_packets(ns: str, dev: str) -> int:
    out = json.loads(sh(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev]).stdout)
    return int(out[0]["stats64"]["tx"]["packets"])


def ping(ep: NsEndpoint, ip: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return sh(ep.argv(["ping", "-c", str(count), "-i", "0.2", "-W", "2", ip]))


# ---- connectivity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_endpoints_on_two_hosts_reach_each_other_over_vxlan(mode: str) -> None:
    async with fabric(mode) as f:
        e1 = await f.endpoint("one", spec(1), "a")
        await f.endpoint("two", spec(2), "b")
        before = tx_packets(f.u.host_ns("a"), BLUE.vxlan)
        r = ping(e1, "10.77.0.2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert tx_packets(f.u.host_ns("a"), BLUE.vxlan) - before >= 3          # it went through the tunnel
        if mode != "learning":   # the controller programmed the FDB: MAC -> b's tunnel endpoint
            fdb = sh(["bridge", "-n", f.u.host_ns("a"), "fdb", "show", "dev", BLUE.vxlan]).stdout
            assert f"{mac(1, 2)} dst {f.u.host_ip('b')} self permanent" in fdb, fdb
            assert f"{mac(1, 2)} master {BLUE.bridge} static" in fdb, fdb
            vx = sh(["ip", "-n", f.u.host_ns("a"), "-d", "link", "show", BLUE.vxlan]).stdout
            assert "nolearning" in vx


@pytest.mark.parametrize("mode", ["hvsim", "learning"])
async def test_arp_is_answered_locally_in_controller_mode(mode: str) -> None:
    """With ARP suppression no ARP crosses the underlay: host a's VXLAN device sends exactly the
    3 ICMP requests. Without (learning), the ARP broadcast is flooded to the other hosts too."""
    async with fabric(mode) as f:
        e1 = await f.endpoint("one", spec(1), "a")
        e2 = await f.endpoint("two", spec(2), "b")
        for ep in (e1, e2):
            sh(["ip", "-n", ep.ns, "neigh", "flush", "all"])
        before = tx_packets(f.u.host_ns("a"), BLUE.vxlan)
        r = ping(e1, "10.77.0.2", count=3)
        assert r.returncode == 0, r.stdout
        sent = tx_packets(f.u.host_ns("a"), BLUE.vxlan) - before
        neigh = sh(["ip", "-n", e1.ns, "neigh", "show", "10.77.0.2"]).stdout
        assert mac(1, 2) in neigh          # e1 did resolve e2
        if mode == "hvsim":
            assert sent == 3, f"{sent} frames crossed the tunnel, expected the 3 ICMP requests only"
        else:
            assert sent > 3


# ---- anti-spoofing ----------------------------------------------------------------------------------------------
def _ip_checksum(h: bytes) -> int:
    s = sum(struct.unpack("!10H", h))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, port: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                      socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    hdr = hdr[:10] + struct.pack("!H", _ip_checksum(hdr)) + hdr[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + hdr + udp


def arp_reply(src_mac: str, sender_ip: str, dst_mac: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + _mac(src_mac) + socket.inet_aton(sender_ip) + \
        _mac(dst_mac) + socket.inet_aton(target_ip)
    return (_mac(dst_mac) + _mac(src_mac) + b"\x08\x06" + body).ljust(60, b"\0")


RECEIVER = textwrap.dedent("""
    import collections, json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9999)); s.settimeout(10)
    print("READY", flush=True)
    seen = collections.Counter()
    while True:
        try:
            data, _ = s.recvfrom(2048)
        except socket.timeout:
            break
        if data == b"END":
            break
        seen[data.decode(errors="replace")] += 1
    print(json.dumps(seen), flush=True)
""")


async def test_spoofed_frames_are_dropped_counted_and_never_delivered() -> None:
    async with fabric("hvsim") as f:
        e1 = await f.endpoint("one", spec(1), "a")
        e2 = await f.endpoint("two", spec(2), "b")
        proc = await asyncio.create_subprocess_exec(*e2.argv([sys.executable, "-c", RECEIVER]),
                                                    stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert (await wait_for(proc.stdout.readline(), 10)).strip() == b"READY"
            m1, m2, forged = mac(1, 1), mac(1, 2), "52:54:00:66:66:66"
            frames = []
            for _ in range(5):
                frames += [udp_frame(m1, m2, "10.77.0.1", "10.77.0.2", 9999, b"ok"),           # legitimate
                           udp_frame(forged, m2, "10.77.0.1", "10.77.0.2", 9999, b"forged-mac"),
                           udp_frame(m1, m2, "10.77.0.66", "10.77.0.2", 9999, b"forged-ip"),
                           arp_reply(m1, "10.77.0.2", m2, "10.77.0.2"),     # claims e2's address
                           _mac(m2) + _mac(m1) + b"\x86\xdd" + bytes(46)]    # IPv6: not allowed here
            await e1.send_frames(frames)
            await asyncio.sleep(0.5)
            await e1.send_frames([udp_frame(m1, m2, "10.77.0.1", "10.77.0.2", 9999, b"END")])
            out, _ = await wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        seen = json.loads(out.decode().strip().splitlines()[-1])
        assert seen == {"ok": 5}, seen
        c = await f.ctl.counters("blue-1")
        assert (c.spoof, c.other, c.blk_in, c.blk_out) == (15, 5, 0, 0), c
        neigh = sh(["ip", "-n", e2.ns, "neigh", "show", "10.77.0.2"]).stdout
        assert m1 not in neigh


async def test_security_rules_allow_only_what_they_list() -> None:
    from hvsim.network.eni import SecurityRule
    async with fabric("hvsim") as f:
        e1 = await f.endpoint("one", spec(1), "a")
        guarded = EniSpec("blue-2", "blue", mac(1, 2), ("10.77.0.2",), rules=(SecurityRule("udp", (7777, 7777)),))
        e2 = await f.endpoint("two", guarded, "b")
        assert ping(e1, "10.77.0.2", count=2).returncode != 0                  # ICMP is not allowed
        assert (await f.ctl.counters("blue-2")).denied >= 2
        async with EchoServer(e2.ns), Prober(e1.ns, "10.77.0.2", tcp=False) as pr:   # UDP 7777 is
            await asyncio.sleep(0.3)
            report = await pr.stop()
        assert report.received > 0 and report.lost == 0, report.summary()


# ---- isolation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hvsim", "learning"])
async def test_two_tenant_networks_with_the_same_addresses_are_isolated(mode: str) -> None:
    async with fabric(mode, networks=(BLUE, RED)) as f:
        red1 = await f.endpoint("r1", spec(1, RED), "a")
        await f.endpoint("r2", spec(2, RED), "b")
        blue1 = await f.endpoint("b1", spec(1, BLUE), "a")
        blue2 = await f.endpoint("b2", spec(2, BLUE), "b")
        assert ping(blue1, "10.77.0.2").returncode == 0
        blue_rx = {ep.ns: rx_packets(ep.ns, "eth0") for ep in (blue1, blue2)}
        r = ping(red1, "10.77.0.2")
        assert r.returncode == 0, r.stdout
        bcast = "import socket; s=socket.socket(2,2); s.setsockopt(1,6,1)\nfor i in range(20): " \
                "s.sendto(b'x', ('10.77.0.255', 9))"
        assert sh(red1.argv([sys.executable, "-c", bcast])).returncode == 0
        await asyncio.sleep(0.3)
        after = {ep.ns: rx_packets(ep.ns, "eth0") for ep in (blue1, blue2)}
        assert after == blue_rx, "a red frame reached a blue endpoint"


# ---- moves -------------------------------------------------------------------------------------------------------
async def _move_under_probe(f: Fabric, mode: str) -> None:
    target = await f.endpoint("t", spec(1), "a", vm="vm-t")
    peer = await f.endpoint("p", spec(3), "c", vm="vm-p")
    e = f.ctl.eni("blue-1")
    async with EchoServer(target.ns), Prober(peer.ns, target.ip) as pr:
        await asyncio.sleep(0.4)
        move = await f.ctl.stage("vm-t", "b", move_id=f"mig-{mode}")
        assert e.staged is not None and e.active is not None
        old, new = e.active.peer_ifname, e.staged.peer_ifname
        await target.plug(new, active=False)     # the destination QEMU opened its tap, paused
        await asyncio.sleep(0.2)
        await target.unplug(old)                 # the source guest stops
        await f.ctl.activate(move)               # switchover
        await target.set_active(new, True)       # the destination guest runs
        await target.announce(3)                 # announce-self
        t_switched = time.monotonic_ns()
        await asyncio.sleep(0.2)
        await f.ctl.release(move)                # the migration completed, the source is gone
        t_released = time.monotonic_ns()
        await asyncio.sleep(0.5)
        report = await pr.stop()
    done = t_released if mode == "after-completion" else t_switched
    assert report.lost_after(done) == 0, report.summary()
    assert report.duplicates == 0, report.summary()
    assert report.tcp is not None and report.tcp.ok, report.summary()
    assert report.received > 0 and report.lost_after(report.first_send_ns) < report.sent
    assert move.state is MoveState.DONE
    assert [(b.host, b.state) for b in e.bindings] == [("b", BindingState.ACTIVE)]
    inv = await f.ctl.inventory()
    assert e.spec.port_name not in inv["a"].links and e.spec.port_name in inv["b"].links
    assert {j.op_id for j in f.ctl.journal if j.phase in ("stage", "activate", "release")} >= {move.id}


@pytest.mark.parametrize("mode", MODES)
async def test_a_moved_endpoint_stays_reachable_under_probe(mode: str) -> None:
    async with fabric(mode) as f:
        await _move_under_probe(f, mode)


async def test_failed_and_cancelled_moves_leave_the_source_active_and_nothing_on_the_destination() -> None:
    async with fabric("hvsim") as f:
        target = await f.endpoint("t", spec(1), "a", vm="vm-t")
        peer = await f.endpoint("p", spec(3), "c", vm="vm-p")
        e = f.ctl.eni("blue-1")
        port = e.spec.port_name
        async with EchoServer(target.ns), Prober(peer.ns, target.ip) as pr:
            await asyncio.sleep(0.3)
            # 1. a destination that cannot be prepared (its endpoint namespace does not exist)
            with pytest.raises(ProgrammingError):
                await f.ctl.stage("vm-t", "b", move_id="fail-1", ports=PortSpec.veth("hvs-000000-e-missing"))
            assert f.ctl.moves["fail-1"].state is MoveState.ROLLED_BACK
            # 2. a cancelled stage
            task = asyncio.create_task(f.ctl.stage("vm-t", "b", move_id="cancel-1"))
            await asyncio.sleep(0.005)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            m = f.ctl.moves["cancel-1"]
            if m.state is MoveState.STAGED:      # the stage won the race: a cancelled migration rolls back
                await f.ctl.rollback(m)
            assert m.state is MoveState.ROLLED_BACK
            # 3. a migration that fails after staging
            m3 = await f.ctl.stage("vm-t", "b", move_id="fail-2")
            await f.ctl.rollback(m3)
            inv = await f.ctl.inventory()
            assert port not in inv["b"].links
            assert not [x for x in inv["b"].fdb if x.mac == e.spec.mac and not x.dst and x.device != BLUE.vxlan]
            await asyncio.sleep(0.2)
            report = await pr.stop()
        assert [(b.host, b.state) for b in e.bindings] == [("a", BindingState.ACTIVE)]
        assert report.lost == 0 and report.duplicates == 0, report.summary()    # the source was never touched
        assert report.tcp is not None and report.tcp.ok


async def test_a_failed_switchover_is_reverted_to_the_source() -> None:
    async with fabric("hvsim") as f:
        target = await f.endpoint("t", spec(1), "a", vm="vm-t")
        peer = await f.endpoint("p", spec(3), "c", vm="vm-p")
        e = f.ctl.eni("blue-1")
        async with EchoServer(target.ns), Prober(peer.ns, target.ip) as pr:
            m = await f.ctl.stage("vm-t", "b", move_id="revert-1")
            # the destination port disappears behind the controller's back: activation fails on b
            sh(["ip", "-n", f.u.host_ns("b"), "link", "del", e.spec.port_name])
            with pytest.raises(ProgrammingError):
                await f.ctl.activate(m)
            t_reverted = time.monotonic_ns()
            await asyncio.sleep(0.4)
            report = await pr.stop()
        assert m.state is MoveState.ROLLED_BACK
        assert [(b.host, b.state) for b in e.bindings] == [("a", BindingState.ACTIVE)]
        assert report.lost_after(t_reverted) == 0, report.summary()
        fdb = sh(["bridge", "-n", f.u.host_ns("c"), "fdb", "show", "dev", BLUE.vxlan]).stdout
        assert f"{e.spec.mac} dst {f.u.host_ip('a')}" in fdb


# ---- teardown ----------------------------------------------------------------------------------------------------
async def test_teardown_removes_everything_on_every_path() -> None:
    # a network that cannot be created on one host is removed from all of them
    async with fabric("hvsim", networks=()) as f:
        assert sh(["ip", "-n", f.u.host_ns("c"), "link", "add", "hvx300", "type", "bridge"]).returncode == 0
        with pytest.raises(ProgrammingError):
            await f.ctl.add_network(NetworkSpec("green", 300, "10.99.0.0/24"))
        for h in ("a", "b", "c"):
            assert "hvb300" not in sh(["ip", "-n", f.u.host_ns(h), "-o", "link"]).stdout
        # the device that was in the way is not ours: it is still there
        assert sh(["ip", "-n", f.u.host_ns("c"), "link", "del", "hvx300"]).returncode == 0
        await f.ctl.add_network(BLUE)
        await f.endpoint("one", spec(1), "a")
        await f.endpoint("two", spec(2), "b")
        # an attach cancelled half-way leaves nothing behind
        f.ctl.define_eni(spec(5))
        task = asyncio.create_task(f.ctl.attach("vm-5", "c", ["blue-5"]))
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        e5 = f.ctl.eni("blue-5")
        if e5.active is None:
            inv = await f.ctl.inventory()
            assert e5.spec.port_name not in inv["c"].links
            assert not [x for h in inv.values() for x in h.fdb if x.mac == e5.spec.mac]
        ours = set(f.namespaces)
        assert len(ours) == 6 and ours <= set(nsutil.list_netns())       # 3 hosts + switch + 2 endpoints
    # fabric() asserted the hosts clean with ip/bridge/nft before the underlay went away
    assert not (set(nsutil.list_netns()) & ours)
