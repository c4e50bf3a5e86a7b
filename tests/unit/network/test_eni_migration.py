"""The ENI moved by the migration's ULD path (hvsim.migration.components) without QEMU: the peer is
the staged binding, the final step at the switch-over is the activation, success releases the source,
failure or cancel rolls back. The host data plane is the recorder of test_controller_logic."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hvsim.core.components import Component, ComponentState
from hvsim.core.host import Host
from hvsim.core.model import HostSpec, NicSpec
from hvsim.migration.components import ComponentMigration, UldState
from hvsim.network.component import EniComponent, EniDriver
from hvsim.network.controller import MoveState, NetworkController
from hvsim.network.eni import BindingState, EniSpec

from .test_controller_logic import Recorder, _ctx, make


@dataclass
class FakeLease:
    """What ComponentMigration uses of a MigrationLease."""
    components: list[Component]
    source: Host
    destination: Host
    dir: Path
    vm_name: str = "vm1"
    tracked: list[int] = field(default_factory=list)

    def track_process(self, pid: int, what: str) -> None:
        self.tracked.append(pid)


@pytest.fixture
def rec() -> Recorder:
    return Recorder([], set(), {})


async def _vm_with_enis(rec: Recorder, tmp_path: Path, n: int = 1) -> tuple[NetworkController, list[EniComponent],
                                                                          FakeLease]:
    ctl = await make(rec)            # eni-1 attached to vm1 on host a
    for i in range(2, n + 1):
        ctl.define_eni(EniSpec(f"eni-{i}", "blue", f"52:54:00:00:00:{i:02x}", (f"10.77.0.{i}",)))
        await ctl.attach("vm1", "a", [f"eni-{i}"])
    drv = EniDriver(ctl)
    a, b = Host(HostSpec("a")), Host(HostSpec("b"))
    comps = []
    for i in range(1, n + 1):
        c = drv.create_nic(NicSpec(f"eni-{i}", network="blue"), _ctx("vm1", tmp_path))
        await c.prepare(a)
        assert isinstance(c, EniComponent)
        comps.append(c)
    rec.calls.clear()
    run = tmp_path / "mig1-b-0000"
    return ctl, comps, FakeLease(list(comps), a, b, run)


def _hosts(ctl: NetworkController, eni: str = "eni-1") -> dict[str, BindingState]:
    return {b.host: b.state for b in ctl.eni(eni).bindings}


@pytest.mark.parametrize("uld", ["precopy", "stop-copy", "cold", "shared"])
async def test_a_migration_stages_activates_at_the_switchover_and_releases_after(
        rec: Recorder, tmp_path: Path, uld: str) -> None:
    ctl, (src,), lease = await _vm_with_enis(rec, tmp_path)
    cm = ComponentMigration("m1", lease, uld)  # type: ignore[arg-type]
    assert cm.active and cm.needs_pause and cm.stateful == []      # moves in every mode, no state to carry
    atts = await cm.prepare()
    assert cm.link is None                                          # nothing to carry: no state link
    peer = cm.peers()[src.id]
    assert [n.ifname for n in atts[src.id].nics] == [ctl.eni("eni-1").spec.port_name]
    assert _hosts(ctl) == {"a": BindingState.ACTIVE, "b": BindingState.STAGED}
    assert [c[:2] for c in rec.calls] == [("b", "create_port")]     # before the destination QEMU starts
    assert await cm.head_start() == 0.0
    cm.start()
    rec.calls.clear()
    b = await cm.switchover()                                       # QEMU paused before the switch-over
    assert _hosts(ctl) == {"a": BindingState.RELEASING, "b": BindingState.ACTIVE}
    assert rec.calls[0][:2] == ("a", "set_blocked")                 # the source stops sending first
    assert b.final_step_ms is not None and b.final_step_ms >= 0
    assert cm.states() == {src.id: UldState.SWITCHED_OVER}
    await cm.committed()
    rec.calls.clear()
    await src.retire()                                              # the lease retires the source instance
    assert _hosts(ctl) == {"b": BindingState.ACTIVE}
    assert {c[0] for c in rec.calls} == {"a"}                       # hvsim mode: only the source's port goes
    assert src.state is ComponentState.REMOVED and peer.state is ComponentState.READY
    journal = [j for j in ctl.journal if j.op_id.startswith("migration:vm1/mig1-b-")]
    assert {j.phase for j in journal} == {"stage", "activate", "release"}
    # and back again: the peer (now the VM's component) migrates like the first one
    lease2 = FakeLease([peer], lease.destination, lease.source, tmp_path / "mig2-a-0000")
    cm2 = ComponentMigration("m2", lease2, uld)  # type: ignore[arg-type]
    await cm2.prepare()
    await cm2.switchover()
    await cm2.committed()
    await peer.retire()
    assert _hosts(ctl) == {"a": BindingState.ACTIVE}


async def test_a_cancel_before_the_switchover_touches_only_the_destination(rec: Recorder, tmp_path: Path) -> None:
    ctl, (src,), lease = await _vm_with_enis(rec, tmp_path)
    cm = ComponentMigration("m1", lease, "precopy")  # type: ignore[arg-type]
    await cm.prepare()
    rec.calls.clear()
    await cm.rollback()
    assert _hosts(ctl) == {"a": BindingState.ACTIVE}
    assert {c[0] for c in rec.calls} == {"b"}
    assert src.state is ComponentState.READY
    assert [m.state for m in ctl.moves.values() if m.id.startswith("migration:")] == [MoveState.ROLLED_BACK]


async def test_a_failure_after_the_switchover_reverts_to_the_source(rec: Recorder, tmp_path: Path) -> None:
    ctl, (src,), lease = await _vm_with_enis(rec, tmp_path)
    cm = ComponentMigration("m1", lease, "precopy")  # type: ignore[arg-type]
    await cm.prepare()
    await cm.switchover()
    assert _hosts(ctl)["b"] is BindingState.ACTIVE
    await cm.rollback()                                      # e.g. the final RAM copy failed
    assert _hosts(ctl) == {"a": BindingState.ACTIVE}
    assert src.state is ComponentState.READY
    blocks = [c[3] for c in rec.calls if c[:2] == ("a", "set_blocked")]
    assert blocks == ["True", "False"]                      # blocked at the switch-over, unblocked again


async def test_a_failed_activation_fails_the_switchover_and_leaves_the_source_active(
        rec: Recorder, tmp_path: Path) -> None:
    from hvsim.migration.components import UldError
    ctl, (src,), lease = await _vm_with_enis(rec, tmp_path)
    cm = ComponentMigration("m1", lease, "precopy")  # type: ignore[arg-type]
    await cm.prepare()
    rec.fail.add(("b", "set_blocked"))
    with pytest.raises(UldError, match="quiesce"):
        await cm.switchover()
    rec.fail.clear()
    await cm.rollback()
    assert _hosts(ctl) == {"a": BindingState.ACTIVE}


async def test_a_failed_stage_fails_the_peer_and_leaves_nothing(rec: Recorder, tmp_path: Path) -> None:
    from hvsim.migration.components import UldError
    ctl, (src,), lease = await _vm_with_enis(rec, tmp_path)
    rec.fail.add(("b", "create_port"))
    cm = ComponentMigration("m1", lease, "precopy")  # type: ignore[arg-type]
    with pytest.raises(UldError, match="peer-starting"):
        await cm.prepare()
    rec.fail.clear()
    await cm.rollback()
    assert _hosts(ctl) == {"a": BindingState.ACTIVE}


async def test_a_vm_with_two_enis_moves_them_in_one_controller_move(rec: Recorder, tmp_path: Path) -> None:
    ctl, comps, lease = await _vm_with_enis(rec, tmp_path, n=2)
    cm = ComponentMigration("m1", lease, "precopy")  # type: ignore[arg-type]
    await cm.prepare()
    await cm.switchover()
    await cm.committed()
    for c in comps:
        await c.retire()
    moves = [m for m in ctl.moves.values() if m.id.startswith("migration:")]
    assert len(moves) == 1 and moves[0].state is MoveState.DONE and set(moves[0].enis) == {"eni-1", "eni-2"}
    assert _hosts(ctl, "eni-1") == _hosts(ctl, "eni-2") == {"b": BindingState.ACTIVE}


async def test_quiesce_without_a_migration_is_refused(rec: Recorder, tmp_path: Path) -> None:
    from hvsim.core.errors import ComponentError
    ctl, (src,), lease = await _vm_with_enis(rec, tmp_path)
    with pytest.raises(ComponentError, match="not being migrated"):
        await src.quiesce()
    assert src.state is ComponentState.READY


