"""Real namespaces, veths, bridge and tbf shaping (root). Traffic stays inside the
namespaces these tests create; nothing is ever sent to an address outside them."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from hvsim.network import netns as nsutil
from hvsim.network.errors import CommandError, SetupError, UnknownHostError
from hvsim.network.probe import measure_throughput
from hvsim.network.underlay import Direction, Underlay, UnderlayState

pytestmark = [pytest.mark.hil, pytest.mark.timeout(120)]

# Receiver goodput is TCP payload; tbf counts whole frames (1514 B carrying 1448 B payload).
GOODPUT = 1448 / 1514
BAND = 0.15


def _root_snapshot() -> tuple[set[str], set[str]]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if ln.strip()}
    qd = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
    return names, {ln for ln in qd.splitlines() if ln.startswith("qdisc tbf")}


def _assert_gone(u: Underlay, before: tuple[set[str], set[str]] | None = None) -> None:
    present = [ns for ns in u.namespaces if ns in nsutil.list_netns()]
    assert present == [], f"namespaces left behind: {present}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert u.runid not in listed
    if before is not None:
        names, tbfs = _root_snapshot()
        assert names - before[0] == set(), f"new root-ns links: {names - before[0]}"
        assert tbfs - before[1] == set(), f"new root-ns tbf qdiscs: {tbfs - before[1]}"


def _ping(u: Underlay, src: str, dst: str) -> None:
    if shutil.which("ping"):
        r = subprocess.run(u.argv_in(src, ["ping", "-c1", "-W2", u.host_ip(dst)]), capture_output=True, text=True)
        assert r.returncode == 0, f"ping {src}->{dst} failed: {r.stdout}{r.stderr}"
    else:  # TCP fallback: connect from src to a listener in dst
        _tcp_connect_ok(u, src, dst)


def _listener(u: Underlay, host: str) -> tuple[subprocess.Popen[str], int]:
    code = textwrap.dedent("""
        import socket, sys
        s = socket.socket(); s.bind(("0.0.0.0", 0)); s.listen(8)
        print(s.getsockname()[1], flush=True)
        s.settimeout(20)
        try:
            while True:
                c, _ = s.accept(); c.sendall(b"hi"); c.close()
        except socket.timeout:
            pass
    """)
    p = subprocess.Popen(u.argv_in(host, [sys.executable, "-c", code]), stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())  # type: ignore[union-attr]
    return p, port


def _tcp_connect_ok(u: Underlay, src: str, dst: str, port: int | None = None) -> None:
    proc = None
    if port is None:
        proc, port = _listener(u, dst)
    try:
        code = f"import socket; s=socket.create_connection(({u.host_ip(dst)!r},{port}),timeout=3); print(s.recv(2))"
        r = subprocess.run(u.argv_in(src, [sys.executable, "-c", code]), capture_output=True, text=True)
        assert r.returncode == 0 and "hi" in r.stdout, r.stderr
    finally:
        if proc:
            proc.kill()
            proc.wait()


def _within(measured: float, configured: float) -> bool:
    expect = configured * GOODPUT
    return abs(measured - expect) <= BAND * expect


async def test_topology_up_and_every_pair_pings() -> None:
    before = _root_snapshot()
    async with Underlay(["a", "b", "c"], 100) as u:
        assert u.state is UnderlayState.UP
        for src in u.hosts:
            for dst in u.hosts:
                if src != dst:
                    _ping(u, src, dst)
        _tcp_connect_ok(u, "a", "c")
        for h in u.hosts:
            links = await nsutil.ip_json("link", "show", netns=u.host_ns(h))
            assert sorted(x["ifname"] for x in links) == ["lo", "ul0"]
            assert all("UP" in x["flags"] for x in links)
            routes = await nsutil.ip_json("route", "show", netns=u.host_ns(h))
            assert [r["dst"] for r in routes] == ["198.18.0.0/24"], "host ns must have no default route"
            q = (await u.stats(h))
            assert q.egress_qdisc and q.egress_qdisc.kind == "tbf" and q.egress_qdisc.rate_bit == 100_000_000
            assert q.ingress_qdisc and q.ingress_qdisc.kind == "tbf" and q.ingress_qdisc.rate_bit == 100_000_000
        # the underlay subnet exists nowhere in the root namespace
        root_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert "198.18.0." not in root_addrs
        assert _root_snapshot() == before, "bringing the underlay up touched root-ns links/qdiscs"
    assert u.state is UnderlayState.TORN_DOWN
    _assert_gone(u, before)


async def test_shaped_rate_both_directions_and_live_change() -> None:
    async with Underlay(["a", "b"], 100) as u:
        ab = await measure_throughput(u, "a", "b", seconds=1.8)
        ba = await measure_throughput(u, "b", "a", seconds=1.8)
        print(f"\n100 Mbit/s link: a->b {ab.mbit:.1f}  b->a {ba.mbit:.1f} Mbit/s goodput")
        assert _within(ab.mbit, 100), ab
        assert _within(ba.mbit, 100), ba
        s = await u.stats("a")
        assert s.tx_bytes >= ab.total_bytes and s.rx_bytes >= ba.total_bytes
        assert s.egress_qdisc is not None and s.egress_qdisc.sent_bytes >= ab.total_bytes

        await u.set_bandwidth("b", 30)  # both directions of b's link
        ab2 = await measure_throughput(u, "a", "b", seconds=1.8)
        print(f"b set to 30 Mbit/s: a->b {ab2.mbit:.1f}")
        assert _within(ab2.mbit, 30), ab2
        assert u.shaping("b").ingress.mbit == 30 and (await u.stats("b")).ingress_qdisc.rate_bit == 30_000_000

        await u.set_bandwidth("b", 100, direction=Direction.INGRESS)  # b receives fast, sends slow
        ab3 = await measure_throughput(u, "a", "b", seconds=1.8)
        ba3 = await measure_throughput(u, "b", "a", seconds=1.8)
        print(f"b egress 30 / ingress 100: a->b {ab3.mbit:.1f}  b->a {ba3.mbit:.1f}")
        assert _within(ab3.mbit, 100), ab3
        assert _within(ba3.mbit, 30), ba3


async def test_override_limits_the_slower_end() -> None:
    async with Underlay(["a", "b"], 120, overrides={"b": 40}) as u:
        t = await measure_throughput(u, "a", "b", seconds=1.8)
        print(f"\na(120)->b(40): {t.mbit:.1f}")
        assert _within(t.mbit, 40), t


async def test_listener_in_host_ns_not_reachable_from_root() -> None:
    async with Underlay(["a", "b"], 100) as u:
        proc, port = _listener(u, "a")
        try:
            _tcp_connect_ok(u, "b", "a", port)  # positive control inside the underlay
            # The listener's socket lives in a's namespace: root's loopback does not have it.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            # No root-ns interface carries the underlay subnet, and root's route to a's
            # address does not lead into any underlay device.
            route = (await nsutil.ip_json("route", "get", u.host_ip("a")))[0]
            assert route.get("dev") not in {"ul0", "br0"} and not route.get("dev", "").startswith("p")
            assert route.get("type") != "local"
            # Try a's address from root pinned to loopback: it must not connect. (Not sent via
            # root's default route: that would leave this machine, which we never do.)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
            s.settimeout(1.0)
            with pytest.raises(OSError):
                s.connect((u.host_ip("a"), port))
            s.close()
        finally:
            proc.kill()
            proc.wait()


async def test_preexec_setns_enters_host_namespace() -> None:
    async with Underlay(["a"], 10) as u:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "ul0"], preexec_fn=u.preexec_fn("a"),
                             capture_output=True, text=True, check=True).stdout
        assert u.host_ip("a") + "/24" in out


async def test_exception_inside_block_tears_down() -> None:
    before = _root_snapshot()
    u = Underlay(["a", "b"], 50)
    with pytest.raises(ZeroDivisionError):
        async with u:
            assert all(ns in nsutil.list_netns() for ns in u.namespaces)
            1 / 0  # noqa: B018 (the exception under test)
    assert u.state is UnderlayState.TORN_DOWN
    _assert_gone(u, before)


async def test_cancellation_inside_block_tears_down() -> None:
    u = Underlay(["a", "b"], 50)
    up = asyncio.Event()

    async def body() -> None:
        async with u:
            up.set()
            await asyncio.sleep(60)

    t = asyncio.ensure_future(body())
    await wait_for(up.wait(), 10)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert u.state is UnderlayState.TORN_DOWN
    _assert_gone(u)


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.01, 0.02, 0.1])
async def test_cancellation_during_setup_leaves_nothing(delay: float) -> None:
    u = Underlay(["a", "b", "c"], 50)
    t = asyncio.ensure_future(u.start())
    await asyncio.sleep(delay)
    t.cancel()
    try:
        await t
    except asyncio.CancelledError:
        assert u.state is UnderlayState.FAILED
    else:  # setup won the race
        await u.close()
    _assert_gone(u)


async def test_setup_failure_halfway_is_torn_down(monkeypatch: pytest.MonkeyPatch) -> None:
    import hvsim.network.underlay as mod
    monkeypatch.setattr(mod, "tbf_replace_line", lambda dev, shape: f"qdisc replace dev {dev} root tbf rate bogus")
    u = Underlay(["a", "b"], 50)
    with pytest.raises(SetupError) as ei:
        async with u:
            pytest.fail("body must not run")
    cause = ei.value.__cause__
    while cause is not None and not isinstance(cause, CommandError):
        cause = cause.__cause__ or (cause.exceptions[0] if isinstance(cause, BaseExceptionGroup) else None)
    assert isinstance(cause, CommandError) and cause.argv[0] == "tc" and cause.stderr
    assert u.state is UnderlayState.FAILED
    _assert_gone(u)


async def test_two_underlays_at_once_do_not_collide() -> None:
    u1, u2 = Underlay(["a", "b"], 100), Underlay(["a", "b"], 100)
    await asyncio.gather(u1.start(), u2.start())
    try:
        assert not set(u1.namespaces) & set(u2.namespaces)
        for u in (u1, u2):
            _ping(u, "a", "b")
        # same subnet in both, fully isolated: u1's a cannot see u2's listener on the same IP
        proc, port = _listener(u2, "b")
        try:
            code = (f"import socket\ntry:\n socket.create_connection(({u1.host_ip('b')!r},{port}),timeout=2)\n"
                    f" print('connected')\nexcept OSError as e: print('refused', e)")
            r = subprocess.run(u1.argv_in("a", [sys.executable, "-c", code]), capture_output=True, text=True)
            assert "refused" in r.stdout, r.stdout + r.stderr
        finally:
            proc.kill()
            proc.wait()
    finally:
        await asyncio.gather(u1.close(), u2.close())
    _assert_gone(u1)
    _assert_gone(u2)


async def test_unknown_host_on_live_underlay() -> None:
    async with Underlay(["a"], 10) as u:
        with pytest.raises(UnknownHostError, match="unknown host 'b'; this underlay has: a"):
            u.argv_in("b", ["true"])
        with pytest.raises(UnknownHostError):
            await u.stats("b")


async def test_cleanup_stale_removes_only_dead_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import asyncio, sys
        from hvsim.network.underlay import Underlay
        async def main():
            u = Underlay(["a", "b"], 10, prefix="hvsk-", run_dir={str(run_dir)!r})
            await u.start()
            print(" ".join(u.namespaces), flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        names = child.stdout.readline().split()  # type: ignore[union-attr]
        assert len(names) == 3 and all(n in nsutil.list_netns() for n in names)
        async with Underlay(["x"], 10, prefix="hvsk-", run_dir=run_dir) as live:
            # owner still alive: nothing removed
            assert await Underlay.cleanup_stale("hvsk-", run_dir) == []
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            assert all(n in nsutil.list_netns() for n in names), "killed run leaves namespaces"
            removed = await Underlay.cleanup_stale("hvsk-", run_dir)
            assert sorted(removed) == sorted(names)
            assert not any(n in nsutil.list_netns() for n in names)
            assert all(n in nsutil.list_netns() for n in live.namespaces), "live run must be untouched"
            assert [p.name for p in run_dir.iterdir()] == [f"hvsk-{live.runid}.json"]
        assert list(run_dir.iterdir()) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await Underlay.cleanup_stale("hvsk-", run_dir)
