"""Moving a VM's user-level drivers (ULDs) with it: the multi-process part of a migration.

A VM is several processes: QEMU (the user-level monitor) and one process per component that backs
a device (the swap shim, a qemu-storage-daemon, ...). This module knows components only through
the core's :class:`~hvsim.core.components.MigratableComponent` protocol, never a driver. For every
migratable component of the VM it

1. starts a *peer* on the destination host (its own process in the destination's namespace, its own
   sockets under the migration's run directory, the backing store shared), before the destination
   QEMU starts, so that QEMU attaches to the peer (:meth:`ComponentMigration.prepare`);
2. (``precopy``) moves a full checkpoint over a :class:`~hvsim.migration.statelink.StateLink` (TCP
   across the shaped underlay) before QEMU's RAM stream starts (:meth:`ComponentMigration.head_start`:
   the same bytes cross the same link either way, and QEMU cannot decide to switch over while the
   bulk of the ULD state is still on its way), then, while QEMU's RAM pre-copy runs, every
   ``precopy_interval`` seconds the delta since the last checkpoint that arrived, restoring each
   into the peer;
3. at QEMU's ``pause-before-switchover`` (the vCPUs are stopped, every drive flushed), quiesces each
   source ULD (writes held, flushed), takes the final checkpoint (the last delta, or the full state
   in ``stop-copy``), moves it, restores it into the peer, and only then lets QEMU continue
   (:meth:`ComponentMigration.switchover`), timing each phase;
4. on success hands the peers to the VM's lease (the source instances are retired); on any failure
   resumes the source ULDs (restarting one that died), retires the peers and closes the link
   (:meth:`ComponentMigration.rollback`).

Modes (``uld=`` of :func:`hvsim.migration.start_migration`): ``shared`` (today's behaviour: the
destination QEMU uses the source's ULDs; nothing of the driver moves), ``cold`` (a peer that starts
empty: no state moves), ``stop-copy`` (the full checkpoint moves inside the pause: the patent's
method, and QEMU 8.2's vhost-user device-state transfer), ``precopy`` (ours, the default).

Per component, one state machine (:class:`UldState`)::

    NEW -> STARTING_PEER -> PEER_READY -> PRECOPY -> QUIESCED -> SWITCHED_OVER -> COMMITTED
      \\___________\\______________\\__________\\__________\\____________\\--> FAILED -> ROLLED_BACK
    (and any state but COMMITTED -> ROLLED_BACK)

Fault hooks (:class:`UldHooks`, for tests): an awaitable called at every phase of every component,
and a filter over each checkpoint's bytes before they cross the link.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hvbase.aio import cancel_and_wait
from hvbase.fsm import StateMachine

from ..core.components import Attachment, Checkpoint, Component, ComponentState, MigratableComponent
from ..core.errors import HvsimError
from ..core.vm import MigrationLease
from .errors import MigrationFailedError, MigrationInputError, MigrationStateError
from .statelink import StateLink, StateLinkError

log = logging.getLogger("hvsim.migration.components")

MIB = 2**20


class UldMode(str, enum.Enum):
    SHARED = "shared"
    COLD = "cold"
    STOP_COPY = "stop-copy"
    PRECOPY = "precopy"

    @classmethod
    def parse(cls, value: Any) -> UldMode:
        try:
            return cls(value)
        except ValueError:
            raise MigrationInputError(f"uld must be one of {[m.value for m in cls]}, got {value!r}") from None


class UldState(enum.Enum):
    NEW = "new"
    STARTING_PEER = "starting-peer"
    PEER_READY = "peer-ready"
    PRECOPY = "precopy"
    QUIESCED = "quiesced"
    SWITCHED_OVER = "switched-over"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


U = UldState
TRANSITIONS: dict[UldState, frozenset[UldState]] = {
    U.NEW: frozenset({U.STARTING_PEER, U.FAILED, U.ROLLED_BACK}),
    U.STARTING_PEER: frozenset({U.PEER_READY, U.FAILED, U.ROLLED_BACK}),
    U.PEER_READY: frozenset({U.PRECOPY, U.QUIESCED, U.FAILED, U.ROLLED_BACK}),
    U.PRECOPY: frozenset({U.QUIESCED, U.FAILED, U.ROLLED_BACK}),
    U.QUIESCED: frozenset({U.SWITCHED_OVER, U.FAILED, U.ROLLED_BACK}),
    U.SWITCHED_OVER: frozenset({U.COMMITTED, U.FAILED, U.ROLLED_BACK}),
    U.FAILED: frozenset({U.ROLLED_BACK}),
    U.COMMITTED: frozenset(),
    U.ROLLED_BACK: frozenset(),
}


class UldStateError(MigrationStateError):
    """An illegal step of one ULD's migration."""


class UldError(MigrationFailedError):
    """A ULD could not be moved (its peer did not start, a checkpoint was refused, the source ULD
    died, the state link failed); the message names the ULD, the phase and the reason."""

    def __init__(self, message: str, component: str = "", phase: str = "") -> None:
        super().__init__(message)
        self.component = component
        self.phase = phase


class UldHooks:
    """Fault-injection points (tests): ``at`` runs at every phase of every ULD (``phase`` one of
    :data:`PHASES`); ``tamper`` may change a checkpoint's bytes before they cross the link."""

    async def at(self, phase: str, uld: str, component: Component) -> None:
        return None

    def tamper(self, uld: str, data: bytes) -> bytes:
        return data


PHASES = ("peer-starting", "peer-ready", "precopy-checkpoint", "precopy-transfer", "precopy-restore",
          "quiesce", "final-checkpoint", "final-transfer", "final-restore")


@dataclass
class UldRound:
    """One checkpoint moved into a peer."""
    component: str
    seq: int
    base_seq: int | None
    bytes: int
    checkpoint_s: float
    transfer_s: float
    restore_s: float
    final: bool
    t: float


@dataclass
class UldBreakdown:
    """The switch-over, as the guest lives it: vCPU stop -> ULD quiesce -> ULD transfer -> ULD
    restore -> resume (ms; from QEMU's STOP/RESUME events and the ULDs' replies)."""
    stop_to_pause_ms: float | None = None    # QEMU: vCPUs stopped, drives flushed, paused before switch-over
    pause_reaction_ms: float | None = None   # QEMU's pre-switchover event -> the ULDs' final step began
    quiesce_ms: float | None = None          # every source ULD quiesced and its final checkpoint taken
    transfer_ms: float | None = None         # final checkpoints across the link
    restore_ms: float | None = None          # restored into the peers
    resume_ms: float | None = None           # migrate-continue -> destination RESUME (device state, last RAM)
    uld_ms: float | None = None              # quiesce + transfer + restore + final step
    final_step_ms: float | None = None       # the stateless ULDs' final step (an ENI's activation)
    total_ms: float | None = None            # STOP -> RESUME
    final_bytes: int = 0


@dataclass
class _Uld:
    source: Component
    fsm: StateMachine[UldState]
    peer: Component | None = None
    delivered: int | None = None      # seq of the last checkpoint restored into the peer
    pending_bytes: int = 0            # bytes of state the peer does not hold yet (estimate)
    final: Checkpoint | None = None
    final_data: bytes | None = None
    rounds: list[UldRound] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.source.id


class ComponentMigration:
    """The ULD side of one migration (see the module docstring)."""

    def __init__(self, migration_id: str, lease: MigrationLease, mode: UldMode | str = UldMode.PRECOPY, *,
                 precopy_interval: float = 0.5, stall_timeout: float = 5.0, final_timeout: float = 120.0,
                 hooks: UldHooks | None = None) -> None:
        self.id = migration_id
        self.lease = lease
        self.mode = UldMode.parse(mode) if not isinstance(mode, UldMode) else mode
        self.precopy_interval = precopy_interval
        self.stall_timeout = stall_timeout
        self.final_timeout = final_timeout
        self.hooks = hooks or UldHooks()
        self.ulds: list[_Uld] = []
        for c in lease.components:
            # a host-bound device (an ENI's port) moves even when the drivers are shared
            if isinstance(c, MigratableComponent) and (self.mode is not UldMode.SHARED or c.host_bound):
                self.ulds.append(_Uld(c, StateMachine(f"ULD {lease.vm_name}/{c.id} migration", U.NEW,
                                                      TRANSITIONS, error=UldStateError, log=log)))
        self.link: StateLink | None = None
        self.error: BaseException | None = None
        self.breakdown = UldBreakdown()
        self.marks: dict[str, float] = {}       # wall-clock marks of the switch-over (time.time())
        self._precopy: asyncio.Task[None] | None = None
        self._stopping = False          # set once: pre-copy and sizing never start again
        self._sizer: asyncio.Task[None] | None = None
        self._costs: list[tuple[int, float]] = []   # (bytes, checkpoint + restore seconds) per round

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def stateful(self) -> list[_Uld]:
        """The ULDs whose device state moves as checkpoints (none when the drivers are shared)."""
        if self.mode is UldMode.SHARED:
            return []
        return [u for u in self.ulds if u.source.migrates_state]

    @property
    def active(self) -> bool:
        """Does this migration move ULDs at all?"""
        return bool(self.ulds)

    @property
    def needs_pause(self) -> bool:
        """Must QEMU pause before the switch-over (pause-before-switchover) for the ULDs' final step?"""
        return self.active

    def states(self) -> dict[str, UldState]:
        return {u.id: u.fsm.state for u in self.ulds}

    def peers(self) -> dict[str, Component]:
        return {u.id: u.peer for u in self.ulds if u.peer is not None}

    def pending(self) -> tuple[int, float]:
        """(bytes of ULD state the peers do not hold yet, estimated fixed cost in ms of quiescing,
        checkpointing and restoring them): what a switch-over now would add to the downtime
        beyond moving those bytes."""
        if not self.active:
            return 0, 0.0
        stateful = self.stateful
        pend = sum(u.pending_bytes for u in stateful) if self.mode is not UldMode.COLD else 0
        big = [(b, s) for b, s in self._costs if b >= MIB]
        per_byte = sum(s for _, s in big) / sum(b for b, _ in big) if big else 15e-3 / MIB
        small = sorted(s for b, s in self._costs if b < MIB)
        fixed = small[len(small) // 2] if small else 0.02
        return pend, (len(stateful) * fixed + pend * per_byte) * 1000.0

    # -- phases ------------------------------------------------------------------------------------
    async def _hook(self, phase: str, u: _Uld, comp: Component) -> None:
        try:
            await self.hooks.at(phase, u.id, comp)
        except HvsimError as exc:
            raise UldError(f"migration {self.id}: ULD {u.id}: {phase}: {exc}", u.id, phase) from exc

    def _fail(self, u: _Uld, phase: str, exc: BaseException) -> UldError:
        if u.fsm.can(U.FAILED):
            u.fsm.set(U.FAILED, f"{phase}: {exc}".splitlines()[0])
        if isinstance(exc, UldError):
            return exc
        err = UldError(f"migration {self.id}: ULD {u.id} ({u.source.kind}) failed at {phase}: {exc}", u.id, phase)
        err.__cause__ = exc
        return err

    async def prepare(self) -> dict[str, Attachment]:
        """Start a peer of every migratable component on the destination; their attachments (for
        the destination QEMU). UldError naming the ULD if one cannot start (nothing is left: the
        caller's rollback retires what did start)."""
        if not self.active:
            return {}
        dest = self.lease.destination
        self.lease.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atts: dict[str, Attachment] = {}
        for u in self.ulds:
            src = u.source
            assert isinstance(src, MigratableComponent)
            if src.state is not ComponentState.READY:
                raise self._fail(u, "peer-starting", UldError(f"the source ULD is {src.state.value}, not ready"))
            u.fsm.set(U.STARTING_PEER, f"on {dest.name}")
            try:
                u.peer = src.migration_peer(self.lease.dir)
                await self._hook("peer-starting", u, u.peer)
                atts[u.id] = await u.peer.prepare(dest)
                await self._hook("peer-ready", u, u.peer)
                u.pending_bytes = await src.state_size(None) \
                    if self.mode is not UldMode.COLD and u in self.stateful else 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise self._fail(u, "peer-starting", exc) from exc
            u.fsm.set(U.PEER_READY, f"peer pid(s) {u.peer.pids()}")
        if self.mode in (UldMode.PRECOPY, UldMode.STOP_COPY) and self.stateful:
            self.link = StateLink(self.id, self.lease.source, dest, track_process=self.lease.track_process,
                                  stall_timeout=self.stall_timeout)
            try:
                await self.link.open()
            except StateLinkError as exc:
                raise self._fail(self.stateful[0], "peer-starting", exc) from exc
        return atts

    async def head_start(self) -> float:
        """``precopy``: move every ULD's full checkpoint into its peer before the RAM stream starts;
        returns the seconds it took (0 in other modes)."""
        if self.mode is not UldMode.PRECOPY or not self.stateful:
            return 0.0
        t0 = time.monotonic()
        for u in self.stateful:
            u.fsm.set(U.PRECOPY, "full checkpoint ahead of the RAM")
            await self._move(u, final=False)
            assert isinstance(u.source, MigratableComponent)
            u.pending_bytes = await u.source.state_size(u.delivered)
        self.marks["head_s"] = time.monotonic() - t0
        return self.marks["head_s"]

    def start(self) -> None:
        """The RAM transfer started: begin ULD pre-copy (``precopy``) or size tracking (``stop-copy``)."""
        if self.mode is UldMode.PRECOPY and self.stateful:
            self._precopy = asyncio.create_task(self._precopy_loop(), name=f"uld-precopy-{self.id}")
        elif self.mode is UldMode.STOP_COPY and self.stateful:
            self._sizer = asyncio.create_task(self._size_loop(), name=f"uld-size-{self.id}")

    async def _size_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(1.0)
            for u in self.stateful:
                with contextlib.suppress(HvsimError):
                    assert isinstance(u.source, MigratableComponent)
                    u.pending_bytes = await u.source.state_size(None)

    async def _move(self, u: _Uld, final: bool) -> None:
        """Take a checkpoint of ``u``'s source (the delta since the last delivered one), carry it,
        restore it into the peer. The restore is never abandoned half-way (a cancel waits for it),
        so ``u.delivered`` always matches what the peer holds."""
        assert self.link is not None and u.peer is not None and isinstance(u.source, MigratableComponent)
        pre = "final" if final else "precopy"
        t0 = time.monotonic()
        await self._hook(f"{pre}-checkpoint", u, u.source)
        try:
            ck = await u.source.checkpoint(u.delivered)
        except HvsimError as exc:
            raise self._fail(u, f"{pre}-checkpoint", exc) from exc
        data = self.hooks.tamper(u.id, ck.encode())
        t1 = time.monotonic()
        await self._hook(f"{pre}-transfer", u, u.source)
        try:
            received, tr = await self.link.send(u.id, data)
        except StateLinkError as exc:
            raise self._fail(u, f"{pre}-transfer", exc) from exc
        t2 = time.monotonic()
        await self._hook(f"{pre}-restore", u, u.peer)
        restore = asyncio.ensure_future(self._restore(u, received, pre))
        try:
            await asyncio.shield(restore)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await restore            # never leave the peer between two checkpoints
            raise
        t3 = time.monotonic()
        u.delivered = ck.seq
        r = UldRound(u.id, ck.seq, ck.base_seq, len(data), t1 - t0, t2 - t1, t3 - t2, final, time.monotonic())
        u.rounds.append(r)
        self._costs.append((len(data), r.checkpoint_s + r.restore_s))
        log.info("migration %s: ULD %s %s checkpoint %d%s: %.1f KiB, checkpoint %.0f ms, transfer %.0f ms, "
                 "restore %.0f ms", self.id, u.id, pre, ck.seq, f" (delta since {ck.base_seq})" if ck.is_delta else "",
                 len(data) / 1024, r.checkpoint_s * 1000, r.transfer_s * 1000, r.restore_s * 1000)

    async def _restore(self, u: _Uld, received: bytes, pre: str) -> None:
        assert u.peer is not None
        try:
            ck = Checkpoint.decode(received, kind=u.peer.kind, versions=type(u.peer).CHECKPOINT_VERSIONS,
                                   component=f"{self.lease.vm_name}/{u.id}")
            await u.peer.restore(ck)
        except HvsimError as exc:
            raise self._fail(u, f"{pre}-restore", exc) from exc

    async def _precopy_loop(self) -> None:
        try:
            stateful = self.stateful
            for u in stateful:
                if u.fsm.state is not U.PRECOPY:
                    u.fsm.set(U.PRECOPY, "pre-copy with the RAM")
            while not self._stopping:
                await asyncio.sleep(self.precopy_interval)
                for u in stateful:
                    if self._stopping:
                        return
                    await self._move(u, final=False)
                    assert isinstance(u.source, MigratableComponent)
                    u.pending_bytes = await u.source.state_size(u.delivered)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # the orchestrator sees .error at its next poll and fails the migration
            self.error = exc if isinstance(exc, UldError) else UldError(f"migration {self.id}: ULD pre-copy: {exc}")
            log.error("%s", self.error)

    async def _stop_tasks(self) -> None:
        """Stop pre-copy and sizing for good: the flag ends the loops at their next turn and the task
        is cancelled until it is done (a cancellation swallowed inside, as asyncio.wait_for of 3.11
        can, once left the pre-copy loop copying while QEMU waited paused: hvbase.aio)."""
        self._stopping = True
        for attr in ("_precopy", "_sizer"):
            task = getattr(self, attr)
            setattr(self, attr, None)
            if task is not None:
                await cancel_and_wait(task)

    async def switchover(self) -> UldBreakdown:
        """QEMU paused before the switch-over: quiesce every source ULD, take its final checkpoint,
        move it and restore it into the peer. UldError (naming the ULD) on any failure: the caller
        cancels the migration and rolls back."""
        mark = self.marks
        mark["paused"] = time.time()
        await self._stop_tasks()
        if self.error is not None:
            raise self.error
        try:
            async with asyncio.timeout(self.final_timeout):
                stateful = self.stateful
                for u in stateful:
                    await self._quiesce(u, "writes held, flushed")
                mark["quiesced"] = time.time()
                if self.mode is not UldMode.COLD:
                    for u in stateful:
                        await self._move(u, final=True)
                mark["restored"] = time.time()
                # stateless ULDs last: their quiesce is the final step itself (an ENI's activation:
                # the destination port opens once every driver's state is on the destination)
                for u in self.ulds:
                    if u not in stateful:
                        await self._quiesce(u, "final step done (no state to move)")
                mark["final_step"] = time.time()
        except TimeoutError as exc:
            raise UldError(f"migration {self.id}: the ULDs' final step took over {self.final_timeout:g} s") from exc
        for u in self.ulds:
            u.fsm.set(U.SWITCHED_OVER, f"peer holds checkpoint {u.delivered}")
        b = self.breakdown
        finals = [r for u in self.ulds for r in u.rounds if r.final]
        b.final_bytes = sum(r.bytes for r in finals)
        b.quiesce_ms = (mark["quiesced"] - mark["paused"] + sum(r.checkpoint_s for r in finals)) * 1000
        b.transfer_ms = sum(r.transfer_s for r in finals) * 1000
        b.restore_ms = sum(r.restore_s for r in finals) * 1000
        b.uld_ms = (mark["final_step"] - mark["paused"]) * 1000
        b.final_step_ms = (mark["final_step"] - mark["restored"]) * 1000
        return b

    async def _quiesce(self, u: _Uld, why: str) -> None:
        await self._hook("quiesce", u, u.source)
        try:
            await u.source.quiesce()
        except HvsimError as exc:
            raise self._fail(u, "quiesce", exc) from exc
        u.fsm.set(U.QUIESCED, why)

    def finish_breakdown(self, stop_ts: float | None, continued_ts: float | None, resume_ts: float | None,
                         pause_ts: float | None = None) -> None:
        """Complete the breakdown with QEMU's STOP (source), pre-switchover and RESUME (destination)
        event times."""
        b = self.breakdown
        paused = self.marks.get("paused")
        if pause_ts is not None and paused is not None:
            b.pause_reaction_ms = (paused - pause_ts) * 1000
        if stop_ts is not None and paused is not None:
            b.stop_to_pause_ms = (paused - stop_ts) * 1000
        if continued_ts is not None and resume_ts is not None:
            b.resume_ms = (resume_ts - continued_ts) * 1000
        if stop_ts is not None and resume_ts is not None:
            b.total_ms = (resume_ts - stop_ts) * 1000

    # -- endings -----------------------------------------------------------------------------------
    async def committed(self) -> None:
        """The lease adopted the peers: close the link."""
        await self._stop_tasks()
        for u in self.ulds:
            if u.fsm.can(U.COMMITTED):
                u.fsm.set(U.COMMITTED, "the peer serves the VM")
        if self.link is not None:
            await self.link.close()

    async def rollback(self) -> None:
        """The migration failed: source ULDs serve again (resumed, or restarted if one died), peers
        retired (their own files deleted, the shared backing store kept), the link closed. Never
        raises; what could not be done is logged."""
        await self._stop_tasks()
        if self.link is not None:
            try:
                await self.link.close()
            except Exception as exc:
                log.error("migration %s: closing the state link failed: %s", self.id, exc)
        for u in self.ulds:
            src = u.source
            try:
                if src.state is ComponentState.QUIESCED:
                    await src.resume()
                elif src.state is ComponentState.FAILED:
                    log.warning("migration %s: source ULD %s died; restarting it", self.id, u.id)
                    await src.prepare(self.lease.source)
                elif src.state is ComponentState.PREPARING:   # its supervision is restarting it
                    for _ in range(100):
                        await asyncio.sleep(0.1)
                        if src.state is not ComponentState.PREPARING:
                            break
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # a rollback reports and goes on: the lease must still be given back
                log.error("migration %s: the source ULD %s could not serve again: %s", self.id, u.id, exc)
            if u.peer is not None:
                try:
                    await u.peer.retire()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("migration %s: retiring the peer of %s failed: %s", self.id, u.id, exc)
            if u.fsm.state is not U.COMMITTED and u.fsm.can(U.ROLLED_BACK):
                u.fsm.set(U.ROLLED_BACK, "migration rolled back")

    def result(self) -> dict[str, Any]:
        rounds = [asdict(r) for u in self.ulds for r in u.rounds]
        pre = sum(r["bytes"] for r in rounds if not r["final"])
        fin = sum(r["bytes"] for r in rounds if r["final"])
        return {"mode": self.mode.value, "components": [u.id for u in self.ulds],
                "states": {k: v.value for k, v in self.states().items()},
                "peer_pids": {u.id: u.peer.pids() for u in self.ulds if u.peer is not None},
                "bytes": pre + fin, "precopy_bytes": pre, "final_bytes": fin,
                "wire_bytes": self.link.wire_bytes if self.link else 0,
                "rounds": rounds, "breakdown": asdict(self.breakdown), "head_s": self.marks.get("head_s"),
                "downtime_ms": self.breakdown.uld_ms}
