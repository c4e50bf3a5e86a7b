"""The controller's plans: which host gets which change, in which order (pure logic)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvsim.network.errors import TenantInputError
from hvsim.network.plan import Action, MobilityMode, Op, plan_attach, plan_detach, plan_move

HOSTS = ("a", "b", "c", "d")
H, AC, L = MobilityMode.HVSIM, MobilityMode.AFTER_COMPLETION, MobilityMode.LEARNING


def waves(phase) -> list[set[tuple[str, str, str, str]]]:  # type: ignore[no-untyped-def]
    return [{(a.host, a.op.value, a.eni, a.peer) for a in w} for w in phase.waves]


def test_hvsim_move_stages_blocked_then_switches_in_order() -> None:
    p = plan_move(H, HOSTS, "vm1", ["e1"], "a", "b")
    assert p.stage.actions == (Action("b", Op.CREATE_PORT, "e1", blocked=True),)
    assert waves(p.activate) == [
        {("a", "block-port", "e1", "")},                                     # the old copy can't send
        {("b", "fdb-local", "e1", ""), ("b", "unblock-port", "e1", "")},     # the new copy is reachable
        {("a", "fdb-remote", "e1", "b"), ("c", "fdb-remote", "e1", "b"), ("d", "fdb-remote", "e1", "b")},
    ]
    # on the destination, the MAC points at the local port before the port opens
    dst = [a.op for a in p.activate.waves[1]]
    assert dst == [Op.FDB_LOCAL, Op.UNBLOCK_PORT]
    assert p.release.actions == (Action("a", Op.DELETE_PORT, "e1"),)
    assert p.rollback.actions == (Action("b", Op.DELETE_PORT, "e1"),)


def test_rollback_never_touches_the_source() -> None:
    for mode in MobilityMode:
        p = plan_move(mode, HOSTS, "vm1", ["e1", "e2"], "a", "b")
        assert p.rollback.hosts() == {"b"}
        assert {a.op for a in p.rollback.actions} == {Op.DELETE_PORT}


def test_hvsim_revert_restores_the_source_and_removes_the_destination_last() -> None:
    p = plan_move(H, HOSTS, "vm1", ["e1"], "a", "b")
    assert waves(p.revert) == [
        {("b", "block-port", "e1", "")},
        {("a", "fdb-local", "e1", ""), ("a", "unblock-port", "e1", "")},
        {("b", "fdb-remote", "e1", "a"), ("c", "fdb-remote", "e1", "a"), ("d", "fdb-remote", "e1", "a")},
        {("b", "delete-port", "e1", "")},
    ]


def test_after_completion_reprograms_only_at_release() -> None:
    p = plan_move(AC, HOSTS, "vm1", ["e1"], "a", "b")
    assert p.stage.actions == (Action("b", Op.CREATE_PORT, "e1", blocked=False),)
    assert p.activate.actions == ()
    assert waves(p.release) == [
        {("b", "fdb-local", "e1", "")},
        {("a", "fdb-remote", "e1", "b"), ("c", "fdb-remote", "e1", "b"), ("d", "fdb-remote", "e1", "b")},
        {("a", "delete-port", "e1", "")},
    ]


def test_learning_programs_no_fdb_at_all() -> None:
    p = plan_move(L, HOSTS, "vm1", ["e1"], "a", "b")
    ops = {a.op for ph in p.phases() for a in ph.actions}
    assert ops == {Op.CREATE_PORT, Op.DELETE_PORT}
    assert p.activate.actions == ()
    att = plan_attach(L, HOSTS, ["e1"], "a")
    assert att.activate.actions == () and att.stage.actions == (Action("a", Op.CREATE_PORT, "e1"),)


def test_attach_blocks_until_every_host_knows_the_mac() -> None:
    p = plan_attach(H, HOSTS, ["e1"], "a")
    assert p.stage.actions == (Action("a", Op.CREATE_PORT, "e1", blocked=True),)
    first, second = p.activate.waves
    assert [a.op for a in first] == [Op.NEIGH_ADD, Op.FDB_LOCAL, Op.UNBLOCK_PORT]
    assert {(a.host, a.op, a.peer) for a in second} == {
        (h, op, "a" if op is Op.FDB_REMOTE else "") for h in "bcd" for op in (Op.FDB_REMOTE, Op.NEIGH_ADD)}
    for h in "bcd":   # per host: the FDB entry before the ARP-suppression entry
        assert [a.op for a in second if a.host == h] == [Op.FDB_REMOTE, Op.NEIGH_ADD]


def test_detach_blocks_then_forgets_everywhere_then_deletes() -> None:
    p = plan_detach(H, HOSTS, ["e1"], "a")
    assert [{a.op for a in w} for w in p.waves] == [
        {Op.BLOCK_PORT}, {Op.FDB_DELETE, Op.NEIGH_DELETE}, {Op.DELETE_PORT}]
    assert {a.host for a in p.waves[1] if a.op is Op.FDB_DELETE} == {"b", "c", "d"}
    assert plan_detach(L, HOSTS, ["e1"], "a").actions == (Action("a", Op.DELETE_PORT, "e1"),)


def test_bad_plans_are_refused() -> None:
    with pytest.raises(TenantInputError, match="same host"):
        plan_move(H, HOSTS, "vm1", ["e1"], "a", "a")
    with pytest.raises(TenantInputError, match="'z' is not one of"):
        plan_move(H, HOSTS, "vm1", ["e1"], "a", "z")
    with pytest.raises(TenantInputError, match="twice"):
        plan_move(H, HOSTS, "vm1", ["e1", "e1"], "a", "b")
    with pytest.raises(TenantInputError, match="unknown mobility mode"):
        MobilityMode.parse("ovn")
    assert MobilityMode.parse("after-completion") is AC


def test_describe_names_host_op_and_peer() -> None:
    p = plan_move(H, ("a", "b"), "vm1", ["e1"], "a", "b")
    assert p.activate.describe() == ["activate wave 1: a: block-port e1", "activate wave 2: b: fdb-local e1",
                                     "activate wave 2: b: unblock-port e1", "activate wave 3: a: fdb-remote e1 -> b"]


@given(st.integers(min_value=2, max_value=8), st.integers(min_value=1, max_value=4), st.data())
def test_move_invariants_for_any_topology(n_hosts: int, n_enis: int, data: st.DataObject) -> None:
    hosts = tuple(f"h{i}" for i in range(n_hosts))
    src, dst = data.draw(st.sampled_from(hosts)), data.draw(st.sampled_from(hosts))
    if src == dst:
        return
    enis = [f"e{i}" for i in range(n_enis)]
    p = plan_move(H, hosts, "vm", enis, src, dst)
    acts = p.activate.actions
    # every host except the destination repoints every ENI to the destination, exactly once
    remote = [(a.host, a.eni) for a in acts if a.op is Op.FDB_REMOTE]
    assert sorted(remote) == sorted((h, e) for h in hosts if h != dst for e in enis)
    assert all(a.peer == dst for a in acts if a.op is Op.FDB_REMOTE)
    # the source is blocked in a wave before the destination opens; the FDB moves after that
    wave_of = {(a.host, a.op, a.eni): i for i, w in enumerate(p.activate.waves) for a in w}
    for e in enis:
        assert wave_of[(src, Op.BLOCK_PORT, e)] < wave_of[(dst, Op.UNBLOCK_PORT, e)]
        assert wave_of[(dst, Op.UNBLOCK_PORT, e)] < wave_of[(src, Op.FDB_REMOTE, e)]
    # the source is removed only at release, the destination only at rollback/revert
    assert {a.host for a in p.release.actions} == {src}
    assert {a.host for a in p.rollback.actions} == {dst}
    # within a wave, one host never appears in two places out of order: per-host lists keep plan order
    for w in p.activate.waves:
        for h in hosts:
            mine = [a.op for a in w if a.host == h]
            if Op.UNBLOCK_PORT in mine:
                assert mine.index(Op.FDB_LOCAL) < mine.index(Op.UNBLOCK_PORT)
