"""The component protocol's guards and bookkeeping on a component without a process (pure logic):
illegal steps of a ULD are refused with the state and the allowed ones; retire keeps the shared
backing store; supervision restarts within its rate and reports; MigratableComponent is structural."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hvsim.core.components import (Attachment, Checkpoint, Component, ComponentContext, ComponentState,
                                   MigratableComponent, RestartPolicy)
from hvsim.core.errors import CheckpointError, ComponentStateError
from hvsim.core.events import ClusterEvent, ComponentFailed, ComponentRestarted
from hvsim.core.host import Host
from hvsim.core.model import HostSpec

C = ComponentState


class Toy(Component):
    kind = "toy"

    def __init__(self, ctx: ComponentContext, run_dir: Path, fail_prepare: int = 0) -> None:
        super().__init__("t", ctx)
        self.run_dir = run_dir
        self.own = run_dir / "toy.log"
        self.shared = ctx.vm_dir / "toy.img"
        self.fail_prepare = fail_prepare
        self.restored: list[int] = []

    async def _do_prepare(self, host: Host) -> Attachment:
        if self.fail_prepare:
            self.fail_prepare -= 1
            raise OSError("cannot start")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.own.write_text("log")
        self.shared.write_text("data")
        return Attachment()

    async def _do_stop(self) -> None:
        return None

    async def _do_quiesce(self) -> None:
        return None

    async def _do_resume(self) -> None:
        return None

    async def _do_checkpoint(self, since: int | None) -> Checkpoint:
        return Checkpoint(self.id, self.kind, 1, 1, b"x")

    async def _do_restore(self, checkpoint: Checkpoint) -> None:
        self.restored.append(checkpoint.seq)

    def migration_peer(self, run_dir: Path) -> Toy:
        return Toy(self.ctx, run_dir)

    async def state_size(self, since: int | None = None) -> int:
        return 1

    def files(self) -> list[Path]:
        return [self.shared, self.own]

    async def _do_retire(self) -> None:
        self.own.unlink(missing_ok=True)


@pytest.fixture
def ctx(tmp_path: Path) -> tuple[ComponentContext, list[ClusterEvent]]:
    events: list[ClusterEvent] = []
    return ComponentContext(vm="g", vm_dir=tmp_path, publish=events.append, track_process=lambda p, w: None), events


HOST = Host(HostSpec("h1"))


async def test_steps_out_of_order_are_refused_with_the_state(ctx, tmp_path: Path) -> None:
    c = Toy(ctx[0], tmp_path / "run")
    for step in (c.quiesce(), c.resume(), c.checkpoint(), c.restore(Checkpoint("toy:t", "toy", 1, 1, b"x"))):
        with pytest.raises(ComponentStateError) as ei:
            await step
        assert ei.value.state is C.CREATED
    await c.prepare(HOST)
    with pytest.raises(ComponentStateError):
        await c.resume()                         # not quiesced
    await c.quiesce()
    with pytest.raises(ComponentStateError):
        await c.quiesce()                        # twice
    await c.checkpoint()                         # a final checkpoint: allowed while quiesced
    await c.resume()
    with pytest.raises(CheckpointError, match="cannot restore a 'shim' checkpoint"):
        await c.restore(Checkpoint("shim:swap", "shim", 2, 1, b"x"))
    with pytest.raises(ComponentStateError):
        await c.remove()                         # live
    assert isinstance(c, MigratableComponent)


async def test_retire_deletes_only_what_belongs_to_the_instance(ctx, tmp_path: Path) -> None:
    c = Toy(ctx[0], tmp_path / "run")
    await c.prepare(HOST)
    peer = c.migration_peer(tmp_path / "mig1")
    await peer.prepare(HOST)
    await c.retire()
    assert c.state is C.REMOVED and not c.own.exists()
    assert c.shared.exists() and peer.own.exists()       # the shared backing store and the peer stay
    with pytest.raises(ComponentStateError):
        await c.prepare(HOST)                              # retired for good
    await c.retire()                                        # idempotent


async def test_supervision_restarts_within_its_rate_and_reports_each_attempt(ctx, tmp_path: Path) -> None:
    cx, events = ctx
    c = Toy(cx, tmp_path / "run")
    c.supervise(RestartPolicy(max_restarts=2, window_s=60, delay_s=0))
    await c.prepare(HOST)
    for attempt in (1, 2):
        c.report_failure("died")
        for _ in range(50):
            await asyncio.sleep(0.01)
            if c.state is C.READY:
                break
        assert c.state is C.READY and c.restarts == attempt
    c.report_failure("died again")
    await asyncio.sleep(0.05)
    assert c.state is C.FAILED
    restarted = [e for e in events if isinstance(e, ComponentRestarted)]
    assert [(e.attempt, e.ok) for e in restarted] == [(1, True), (2, True), (3, False)]
    assert "restart limit reached: 2 restart(s) within 60 s" in restarted[-1].error
    assert len([e for e in events if isinstance(e, ComponentFailed)]) == 3


async def test_a_failed_restart_is_reported_not_raised(ctx, tmp_path: Path) -> None:
    cx, events = ctx
    c = Toy(cx, tmp_path / "run")
    await c.prepare(HOST)
    c.fail_prepare = 1
    c.supervise(RestartPolicy(max_restarts=5, window_s=60, delay_s=0))
    c.report_failure("died")
    for _ in range(50):
        await asyncio.sleep(0.01)
        if any(isinstance(e, ComponentRestarted) for e in events):
            break
    r = [e for e in events if isinstance(e, ComponentRestarted)]
    assert r and not r[0].ok and "restart failed: cannot start" in r[0].error
    assert c.state is C.FAILED
    await c.stop()                                # a pending supervision never outlives a stop
    assert c.state is C.STOPPED
