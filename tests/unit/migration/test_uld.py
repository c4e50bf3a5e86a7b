"""The ULD side of a migration without QEMU: the per-driver state machine, option validation,
hvsim-predictive counting ULD state, and the state link (real relay processes on loopback)."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
from dataclasses import replace

import pytest

from hvbase.aio import wait_for
from hvbase.fsm import StateMachine
from hvsim.core.host import Host
from hvsim.core.model import HostSpec
from hvsim.migration import MigrationInputError, start_migration
from hvsim.migration.components import TRANSITIONS, UldMode, UldState, UldStateError
from hvsim.migration.policies import ActionKind, make_policy
from hvsim.migration.statelink import StateLink, StateLinkError

from ._replay import ctx, load, replay
from .test_api import cl, running_vm  # noqa: F401  (fixture and helper)

U = UldState


def machine() -> StateMachine[UldState]:
    return StateMachine("ULD g/shim:swap migration", U.NEW, TRANSITIONS, error=UldStateError)


def test_the_happy_path_and_the_rollback_path_are_legal() -> None:
    m = machine()
    for s in (U.STARTING_PEER, U.PEER_READY, U.PRECOPY, U.QUIESCED, U.SWITCHED_OVER, U.COMMITTED):
        m.set(s)
    for start in (U.NEW, U.STARTING_PEER, U.PEER_READY, U.PRECOPY, U.QUIESCED, U.SWITCHED_OVER):
        m = machine()
        path = [U.STARTING_PEER, U.PEER_READY, U.PRECOPY, U.QUIESCED, U.SWITCHED_OVER]
        for s in path[:path.index(start) + 1] if start is not U.NEW else []:
            m.set(s)
        m.set(U.FAILED)
        m.set(U.ROLLED_BACK)


@pytest.mark.parametrize("path,bad", [
    ([], U.SWITCHED_OVER),                                   # no final restore without a peer and a quiesce
    ([], U.COMMITTED),
    ([U.STARTING_PEER], U.QUIESCED),                          # quiesce before the peer serves
    ([U.STARTING_PEER, U.PEER_READY, U.PRECOPY], U.COMMITTED),  # commit before the final checkpoint
    ([U.STARTING_PEER, U.PEER_READY, U.PRECOPY, U.QUIESCED], U.PRECOPY),   # no way back into pre-copy
    ([U.STARTING_PEER, U.PEER_READY, U.QUIESCED, U.SWITCHED_OVER, U.COMMITTED], U.ROLLED_BACK),  # done is done
    ([U.ROLLED_BACK], U.STARTING_PEER),
    ([U.FAILED], U.PRECOPY),
])
def test_illegal_transitions_are_refused_with_the_state_and_the_allowed_ones(path: list[UldState],
                                                                             bad: UldState) -> None:
    m = machine()
    for s in path:
        m.set(s)
    with pytest.raises(UldStateError) as ei:
        m.set(bad)
    assert ei.value.state is m.state and m.state is (path[-1] if path else U.NEW)
    assert "ULD g/shim:swap migration" in str(ei.value)


def test_every_state_has_a_row_and_terminal_states_have_no_exit() -> None:
    assert set(TRANSITIONS) == set(UldState)
    assert TRANSITIONS[U.COMMITTED] == TRANSITIONS[U.ROLLED_BACK] == frozenset()
    assert all(U.ROLLED_BACK in v for k, v in TRANSITIONS.items() if k not in (U.COMMITTED, U.ROLLED_BACK))


def test_uld_mode_names() -> None:
    assert UldMode.parse("stop-copy") is UldMode.STOP_COPY
    with pytest.raises(MigrationInputError, match="uld must be one of"):
        UldMode.parse("teleport")


@pytest.mark.parametrize("kwargs,match", [
    ({"uld": "teleport"}, "uld must be one of"),
    ({"uld_hooks": object()}, "uld_hooks must be a UldHooks"),
    ({"uld_precopy_interval": 0}, "uld_precopy_interval must be"),
    ({"uld_stall_timeout": -1}, "uld_stall_timeout must be"),
])
async def test_bad_uld_options_are_refused_before_anything_starts(cl, kwargs: dict, match: str) -> None:  # noqa: F811
    vm = await running_vm(cl)
    with pytest.raises(MigrationInputError, match=match):
        start_migration(vm, "b", **kwargs)
    assert "g" not in cl.hosts["b"].allocations and not list(vm.run_dir.glob("mig*"))


# -- hvsim-predictive counts ULD state -----------------------------------------------------------------
def test_pending_uld_state_is_in_the_prediction_and_holds_the_switch_over() -> None:
    rec, samples = load("converging")
    base = make_policy("hvsim-predictive", fixed_cost_ms=60, budget_ms=500)
    acts = replay(base, ctx(rec), samples)
    switch_obs, switch = acts[-1]
    assert switch.kind is ActionKind.SWITCHOVER
    bw = switch.inputs["bandwidth_Bps"]
    # the same sequence with 8 MiB of ULD state the destination does not hold yet: ~8 MiB / bw more
    # downtime, which does not fit the budget, so the policy must not switch where it did before
    loaded = [replace(o, uld_pending_bytes=8 << 20, uld_fixed_ms=15.0) for o in samples]
    p = make_policy("hvsim-predictive", fixed_cost_ms=60, budget_ms=500)
    acts2 = replay(p, ctx(rec), loaded)
    at = [a for o, a in acts2 if o.t <= switch_obs.t]
    assert not any(a.kind is ActionKind.SWITCHOVER and "meets the 500 ms budget" in a.reason for a in at)
    o = replace(switch_obs, uld_pending_bytes=8 << 20, uld_fixed_ms=15.0)
    extra = p.predicted_downtime_ms(o) - base.predicted_downtime_ms(switch_obs)
    assert extra == pytest.approx((8 << 20) / bw * 1000 + 15.0, rel=0.05)
    decisions = [a for _, a in acts2 if a.inputs]
    assert decisions and all(a.inputs.get("uld_pending_bytes") == 8 << 20 for a in decisions[1:])


def test_a_small_uld_delta_changes_little() -> None:
    rec, samples = load("converging")
    small = [replace(o, uld_pending_bytes=4096, uld_fixed_ms=5.0) for o in samples]
    acts = replay(make_policy("hvsim-predictive", fixed_cost_ms=60, budget_ms=500), ctx(rec), small)
    assert acts[-1][1].kind is ActionKind.SWITCHOVER and "meets the 500 ms budget" in acts[-1][1].reason


# -- the state link -------------------------------------------------------------------------------------
@pytest.fixture
async def link() -> StateLink:
    pids: list[int] = []
    lk = StateLink("t", Host(HostSpec("a")), Host(HostSpec("b")), track_process=lambda p, w: pids.append(p),
                   stall_timeout=1.5)
    await lk.open()
    assert len(pids) == 2 and lk.port
    yield lk
    await lk.close()
    assert lk.pids() == []


async def test_payloads_cross_intact_and_are_counted(link: StateLink) -> None:
    for n in (1, 4096, 256 * 1024, 256 * 1024 + 1, 3 << 20):
        data = os.urandom(n)
        got, tr = await link.send(f"p{n}", data)
        assert got == data and tr.bytes == n and tr.wire_bytes > n and tr.seconds > 0
    assert link.wire_bytes == sum(t.wire_bytes for t in link.transfers)


async def test_a_transfer_given_up_halfway_does_not_disturb_the_next(link: StateLink) -> None:
    sender = link.pids()[1]
    os.kill(sender, signal.SIGSTOP)          # hold the bytes so the transfer is surely half-way
    try:
        t = asyncio.ensure_future(link.send("big", os.urandom(16 << 20)))
        await asyncio.sleep(0.3)
        assert not t.done()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
    finally:
        os.kill(sender, signal.SIGCONT)
    got, _ = await link.send("after", b"next checkpoint")
    assert got == b"next checkpoint"


async def test_a_stalled_link_fails_the_transfer_with_a_clear_error(link: StateLink) -> None:
    sender = link.pids()[1]
    os.kill(sender, signal.SIGSTOP)          # the bytes stop moving, like a link that went down
    try:
        with pytest.raises(StateLinkError, match="no ULD state arrived on b for .* the link is down or stalled"):
            await wait_for(link.send("x", os.urandom(4 << 20)), 20)
    finally:
        os.kill(sender, signal.SIGCONT)


async def test_a_dead_relay_fails_the_link() -> None:
    lk = StateLink("t", Host(HostSpec("a")), Host(HostSpec("b")), track_process=lambda p, w: None)
    await lk.open()
    try:
        os.kill(lk.pids()[0], signal.SIGKILL)      # the receiver
        with pytest.raises(StateLinkError, match="receiver on b stopped|stream broke|unusable"):
            for _ in range(20):
                await wait_for(lk.send("x", b"y" * 1000), 10)
                await asyncio.sleep(0.1)
    finally:
        await lk.close()


async def test_the_receiver_refuses_a_peer_without_the_token() -> None:
    proc = await asyncio.create_subprocess_exec(*StateLink._argv(Host(HostSpec("b")), "recv", "--bind", "127.0.0.1"),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout and proc.stderr
    proc.stdin.write(b"a" * 64 + b"\n")
    await proc.stdin.drain()
    port = int((await proc.stdout.readline()).split()[1])
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"b" * 64 + b"\nmalicious bytes")
    assert await wait_for(proc.wait(), 10) == 3
    assert b"did not present the token" in await proc.stderr.read()
    assert await proc.stdout.read() == b""         # nothing of it reached us
    s.close()
