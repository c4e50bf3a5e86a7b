"""Pure-logic tests for hvsim.network: no namespaces are created here."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from hvbase.errors import HvsimError, InputError
from hvbase.errors import StateError as BaseStateError

from hvsim.network import reclaim, records
from hvsim.network.errors import (CommandError, NetworkError, StateError, TopologyError,
                                  UnknownHostError)
from hvsim.network.netns import run
from hvsim.network.shaping import LinkShape, MIN_BURST_BYTES, parse_qdisc_json, tbf_replace_line
from hvsim.network.underlay import Direction, Underlay, UnderlayState, _complete


# ---- shaping -------------------------------------------------------------------------
def test_tbf_line_uses_exact_bit_rate_and_burst_floor() -> None:
    line = tbf_replace_line("ul0", LinkShape(mbit=100))
    assert line == f"qdisc replace dev ul0 root handle 1: tbf rate 100000000bit burst {MIN_BURST_BYTES} latency 50ms"


def test_burst_scales_with_rate_above_floor() -> None:
    assert LinkShape(mbit=1000).effective_burst == 500_000  # 4 ms at 125 MB/s
    assert LinkShape(mbit=10, burst_bytes=4000, latency_ms=20).tbf_args()[-3:] == ["4000", "latency", "20ms"]


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "100", None, True, 1e9])
def test_bad_bandwidth_rejected(bad: object) -> None:
    with pytest.raises(TopologyError, match="bandwidth|Mbit"):
        LinkShape(mbit=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"burst_bytes": 100}, {"burst_bytes": 2.5}, {"latency_ms": 0}, {"latency_ms": -1}])
def test_bad_shape_params_rejected(kw: dict) -> None:
    with pytest.raises(TopologyError):
        LinkShape(mbit=10, **kw)


def test_parse_qdisc_json_converts_bytes_per_second_to_bits() -> None:
    raw = json.loads('[{"kind":"tbf","handle":"1:","root":true,"options":{"rate":25000000,"burst":100000},'
                     '"bytes":140,"packets":2,"drops":1,"overlimits":3,"backlog":0}]')
    q = parse_qdisc_json(raw)
    assert q is not None and q.kind == "tbf" and q.rate_bit == 200_000_000
    assert (q.sent_bytes, q.sent_packets, q.drops, q.overlimits) == (140, 2, 1, 3)
    assert parse_qdisc_json([]) is None


# ---- Underlay input validation (nothing is created by the constructor) --------------
@pytest.mark.parametrize("hosts, msg", [
    (["a", "a"], "duplicate host name 'a'"),
    ([], "at least one host"),
    ("ab", "list of names"),
    (["ok", "bad/name"], "invalid host name 'bad/name'"),
    (["-x"], "invalid host name"),
    (["x" * 33], "invalid host name"),
])
def test_bad_host_lists(hosts: object, msg: str) -> None:
    with pytest.raises(TopologyError, match=msg):
        Underlay(hosts, 100)  # type: ignore[arg-type]


@pytest.mark.parametrize("mbit", [0, -1, float("nan")])
def test_zero_or_negative_bandwidth(mbit: float) -> None:
    with pytest.raises(TopologyError, match="link bandwidth must be > 0"):
        Underlay(["a", "b"], mbit)


def test_override_for_unknown_host_and_bad_override() -> None:
    with pytest.raises(UnknownHostError, match="unknown host 'c'; this underlay has: a, b"):
        Underlay(["a", "b"], 100, overrides={"c": 10})
    with pytest.raises(TopologyError, match="override for 'b'"):
        Underlay(["a", "b"], 100, overrides={"b": 0})


@pytest.mark.parametrize("subnet", ["8.8.8.0/24", "198.18.0.1/24", "10.0.0.0/31", "127.0.0.0/24", "nonsense"])
def test_bad_subnet(subnet: str) -> None:
    with pytest.raises(TopologyError, match="subnet"):
        Underlay(["a"], 10, subnet=subnet)


def test_subnet_too_small_for_hosts() -> None:
    with pytest.raises(TopologyError, match="room for 2 hosts, 3 requested"):
        Underlay(["a", "b", "c"], 10, subnet="10.9.9.0/30")


def test_names_addresses_and_overrides_are_deterministic() -> None:
    u = Underlay(["src", "dst"], 200, overrides={"dst": LinkShape(mbit=50, latency_ms=10)})
    assert u.host_ns("src") == f"hvs-{u.runid}-h-src" and u.switch_ns == f"hvs-{u.runid}-sw"
    assert (u.host_ip("src"), u.host_ip("dst")) == ("198.18.0.1", "198.18.0.2")
    assert u.shaping("src").egress.mbit == 200 and u.shaping("dst").ingress.mbit == 50
    assert u.shaping("dst").egress.latency_ms == 10
    assert Underlay(["a"], 1).runid != Underlay(["a"], 1).runid


def test_errors_share_one_root() -> None:
    for cls in (TopologyError, UnknownHostError, StateError, CommandError):
        assert issubclass(cls, NetworkError) and issubclass(cls, HvsimError)
    assert issubclass(TopologyError, InputError) and issubclass(StateError, BaseStateError)


# ---- state machine -------------------------------------------------------------------
async def test_operations_need_up_state_and_close_of_new_is_clean() -> None:
    u = Underlay(["a", "b"], 10)
    assert u.state is UnderlayState.NEW
    with pytest.raises(StateError,
                       match=r"cannot set_bandwidth underlay [0-9a-f]+: it is new \(allowed from: up\)") as ei:
        await u.set_bandwidth("a", 5)
    assert ei.value.state is UnderlayState.NEW and ei.value.allowed == (UnderlayState.UP,)
    with pytest.raises(StateError):
        u.argv_in("a", ["true"])
    with pytest.raises(StateError):
        await u.stats("a")
    await u.close()
    assert u.state is UnderlayState.TORN_DOWN
    await u.close()  # idempotent
    with pytest.raises(StateError, match="illegal state change torn_down -> starting"):
        await u.start()


async def test_bad_input_checked_before_state() -> None:
    u = Underlay(["a", "b"], 10)
    with pytest.raises(UnknownHostError, match="unknown host 'zz'"):
        await u.set_bandwidth("zz", 5)
    with pytest.raises(TopologyError, match="> 0"):
        await u.set_bandwidth("a", -3)
    with pytest.raises(TopologyError, match="Direction"):
        await u.set_bandwidth("a", 3, direction="up")  # type: ignore[arg-type]
    with pytest.raises(UnknownHostError):
        u.host_ip("nope")
    assert Direction.BOTH.value == "both"


# ---- command runner ------------------------------------------------------------------
async def test_command_error_carries_argv_and_stderr() -> None:
    with pytest.raises(CommandError) as ei:
        await run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    assert ei.value.returncode == 3 and "boom" in ei.value.stderr and "exit 3" in str(ei.value)
    with pytest.raises(CommandError, match="could not start"):
        await run(["/nonexistent/hvsim-tool"])


async def test_cancelled_command_is_killed() -> None:
    t = asyncio.ensure_future(run([sys.executable, "-c", "import time; time.sleep(30)"]))
    await asyncio.sleep(0.3)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t


async def test_complete_finishes_work_then_reraises_cancellation() -> None:
    done: list[bool] = []

    async def work() -> None:
        await asyncio.sleep(0.2)
        done.append(True)

    t = asyncio.ensure_future(_complete(work()))
    await asyncio.sleep(0.05)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert done == [True]


# ---- crash records -------------------------------------------------------------------
def test_record_owner_liveness(tmp_path) -> None:
    live = records.Record.for_this_process("abc123", "hvs-", ["hvs-abc123-sw"])
    assert live.owner_alive()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = records.Record(runid="d", prefix="hvs-", pid=p.pid, pid_start=1.0, created=0, namespaces=[])
    assert not dead.owner_alive()
    recycled = records.Record(runid="r", prefix="hvs-", pid=os.getpid(), pid_start=1.0, created=0, namespaces=[])
    assert not recycled.owner_alive()
    path = records.write_record(tmp_path, live)
    assert records.read_record(path) == live


async def test_cleanup_stale_drops_dead_record_without_namespaces(tmp_path) -> None:
    rec = records.Record(runid="dead01", prefix="hvsu-", pid=2**22 + 7, pid_start=1.0, created=0,
                         namespaces=["hvsu-dead01-sw"])
    path = records.write_record(tmp_path, rec)
    live = records.write_record(tmp_path, records.Record.for_this_process("live01", "hvsu-", ["hvsu-live01-sw"]))
    assert await reclaim.cleanup_stale("hvsu-", tmp_path) == []
    assert not path.exists() and live.exists()
