"""The component protocol: everything attached to a VM that has its own process or state.

A *component* backs one device of a VM (a disk served by the swap shim or a storage daemon, later an
ENI). The VM knows components only through this protocol; a *driver* (registered on the cluster with
``cluster.add_driver``) creates the component for each device of its kind when the VM is defined.
Components follow the VM's lifetime: prepared when it starts (they return what QEMU must attach),
stopped when it shuts down, is destroyed or crashes, removed (files deleted) when it is undefined.

Lifecycle (one :class:`~hvbase.fsm.StateMachine`, changes published on the cluster bus as
:class:`~hvsim.core.events.ComponentStateChanged`)::

    CREATED --prepare/reattach--> PREPARING --> READY <--resume-- QUIESCED
       |                     |           |  --quiesce-->    |
       |                     v           v                  v
       |                   FAILED <---(dies on its own)-----+      FAILED --prepare--> PREPARING (restart)
       |                     |           |
       |                     +--stop/detach--> STOPPING --> STOPPED --prepare--> PREPARING
       +--remove--> REMOVED <--remove-- STOPPED / FAILED

Like Cloud Hypervisor's ``Pausable``/``Snapshottable``/``Transportable``, a component can be
quiesced, checkpointed (a versioned, checksummed :class:`Checkpoint`, full or a delta since an
earlier one) and restored; migration code moves checkpoints without knowing what is inside.

Implementing one: subclass :class:`Component`, set ``kind``, implement the ``_do_*`` hooks; the public
methods guard the state and do the bookkeeping. Call :meth:`Component.report_failure` when the
component dies on its own.

Two optional capabilities, both generic (the migration and the VM know no driver):

- :class:`MigratableComponent` (multi-process VM migration): the component can make a *peer* for
  the same device on another host (its own process, sockets and logs in the destination's run
  directory, the backing store shared), report how big its state is, and be retired once the peer
  took over. Its state moves as :class:`Checkpoint` s: a full one, then deltas since the last one
  delivered (``checkpoint(since=seq)``) while the VM runs, the final one after :meth:`Component.quiesce`.
- Supervision (:meth:`Component.supervise` with a :class:`RestartPolicy`): a component that dies on
  its own is restarted through ``prepare`` on the same host (the component restores what it can from
  its backing store and its last saved state), at most ``max_restarts`` times per ``window_s``; each
  attempt is published as :class:`~hvsim.core.events.ComponentRestarted`.
"""
from __future__ import annotations

import abc
import asyncio
import enum
import hashlib
import json
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from hvbase.fsm import StateMachine, Transition
from qmp_bridge import Drive, Nic

from .errors import CheckpointError, ComponentError, ComponentStateError
from .events import ClusterEvent, ComponentFailed, ComponentRestarted, ComponentStateChanged

if TYPE_CHECKING:
    from .host import Host
    from .model import DiskSpec, NicSpec

log = logging.getLogger("hvsim.core.components")


class ComponentState(enum.Enum):
    CREATED = "created"
    PREPARING = "preparing"
    READY = "ready"
    QUIESCED = "quiesced"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    REMOVED = "removed"


C = ComponentState
TRANSITIONS: dict[ComponentState, frozenset[ComponentState]] = {
    C.CREATED: frozenset({C.PREPARING, C.REMOVED}),
    C.PREPARING: frozenset({C.READY, C.FAILED, C.STOPPING}),
    C.READY: frozenset({C.QUIESCED, C.STOPPING, C.FAILED}),
    C.QUIESCED: frozenset({C.READY, C.STOPPING, C.FAILED}),
    C.STOPPING: frozenset({C.STOPPED}),
    C.STOPPED: frozenset({C.PREPARING, C.REMOVED}),
    C.FAILED: frozenset({C.PREPARING, C.STOPPING, C.REMOVED}),
    C.REMOVED: frozenset(),
}
LIVE = frozenset({C.PREPARING, C.READY, C.QUIESCED, C.STOPPING})


@dataclass(frozen=True)
class Attachment:
    """What QEMU needs to attach a component's device."""
    drives: tuple[Drive, ...] = ()
    nics: tuple[Nic, ...] = ()
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Health:
    component: str
    state: ComponentState
    ok: bool
    pid: int | None = None
    restarts: int = 0
    detail: str = ""


@dataclass(frozen=True)
class ComponentContext:
    """What a component may know of its VM: names, its private directory, the host it is on, and
    how to report. Components never hold the VM itself."""
    vm: str
    vm_dir: Path                         # the VM's persistent directory (backing files live here)
    publish: Callable[[ClusterEvent], None]
    track_process: Callable[[int, str], None]   # every process a component starts is recorded


@dataclass(frozen=True)
class RestartPolicy:
    """Bounded automatic restart of a component that died on its own: at most ``max_restarts``
    restarts within any ``window_s`` seconds, each ``delay_s`` after the failure."""
    max_restarts: int = 3
    window_s: float = 60.0
    delay_s: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ComponentError(f"restart policy: max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if not 0 < self.window_s < 1e6 or not 0 <= self.delay_s < 3600:
            raise ComponentError(f"restart policy: need 0 < window_s < 1e6 and 0 <= delay_s < 3600, got "
                                 f"{self.window_s!r}, {self.delay_s!r}")


_MAGIC = b"HVCP"
_HEADER = struct.Struct(">4sI")          # magic, header length
MAX_CHECKPOINT_HEADER = 64 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """A component's device state: versioned and checksummed, full or a delta.

    ``seq`` increases with every checkpoint of a component; ``base_seq`` is ``None`` for a full
    checkpoint, else the ``seq`` of the checkpoint this delta applies on top of. ``payload`` is the
    component's own format (``kind``, ``version``)."""
    component: str
    kind: str
    version: int
    seq: int
    payload: bytes
    base_seq: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_delta(self) -> bool:
        return self.base_seq is not None

    def encode(self) -> bytes:
        header = json.dumps({"component": self.component, "kind": self.kind, "version": self.version,
                             "seq": self.seq, "base_seq": self.base_seq, "meta": self.meta,
                             "length": len(self.payload),
                             "sha256": hashlib.sha256(self.payload).hexdigest()}).encode()
        return _HEADER.pack(_MAGIC, len(header)) + header + self.payload

    @classmethod
    def decode(cls, data: bytes, *, kind: str, versions: Collection[int], component: str = "") -> Checkpoint:
        """Parse and verify ``data``; CheckpointError naming the component and the reason."""
        who = f"checkpoint of {component or kind}"
        if len(data) < _HEADER.size:
            raise CheckpointError(f"{who}: truncated ({len(data)} bytes, no header)")
        magic, hlen = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise CheckpointError(f"{who}: not a checkpoint (bad magic {magic!r})")
        if hlen > MAX_CHECKPOINT_HEADER or _HEADER.size + hlen > len(data):
            raise CheckpointError(f"{who}: truncated or corrupt header (length {hlen})")
        try:
            h = json.loads(data[_HEADER.size:_HEADER.size + hlen])
            if not isinstance(h, dict):
                raise ValueError("header is not an object")
            payload = data[_HEADER.size + hlen:]
            if h["kind"] != kind:
                raise CheckpointError(f"{who}: it is a {h['kind']!r} checkpoint, not {kind!r}")
            if h["version"] not in versions:
                raise CheckpointError(f"{who}: format version {h['version']} is not supported "
                                      f"(supported: {sorted(versions)})")
            if h["length"] != len(payload):
                raise CheckpointError(f"{who}: truncated payload ({len(payload)} of {h['length']} bytes)")
            if hashlib.sha256(payload).hexdigest() != h["sha256"]:
                raise CheckpointError(f"{who}: checksum mismatch (corrupted)")
            return cls(component=str(h["component"]), kind=str(h["kind"]), version=int(h["version"]),
                       seq=int(h["seq"]), payload=payload,
                       base_seq=None if h["base_seq"] is None else int(h["base_seq"]), meta=dict(h["meta"]))
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{who}: corrupt header: {exc}") from exc


class Component(abc.ABC):
    """Base of every component; subclasses implement the ``_do_*`` hooks."""

    kind: ClassVar[str]
    CHECKPOINT_VERSIONS: ClassVar[frozenset[int]] = frozenset({1})
    #: A migratable component whose device has no state to carry (an ENI: its peer is a staged binding
    #: on the destination) sets this False: the migration makes its peer, quiesces the source at the
    #: switch-over (its final step) and retires one of the two, but moves no checkpoint.
    migrates_state: ClassVar[bool] = True
    #: A device tied to the host it is served on (a NIC's port on that host's network) cannot be shared
    #: with a QEMU on another host: it moves with its VM even when the migration shares the user-level
    #: drivers (``uld="shared"``).
    host_bound: ClassVar[bool] = False

    def __init__(self, name: str, ctx: ComponentContext) -> None:
        self.name = name
        self.ctx = ctx
        self.restarts = 0
        self.failures: list[tuple[float, str]] = []
        self._attachment: Attachment | None = None
        self.host: Host | None = None
        self.restart_policy: RestartPolicy | None = None
        self._restart_times: deque[float] = deque()
        self._restart_task: asyncio.Task[None] | None = None
        self.fsm: StateMachine[ComponentState] = StateMachine(
            f"component {ctx.vm}/{self.id}", C.CREATED, TRANSITIONS, error=ComponentStateError,
            on_change=self._published)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def state(self) -> ComponentState:
        return self.fsm.state

    @property
    def attachment(self) -> Attachment:
        if self._attachment is None:
            raise ComponentStateError(self.fsm.obj, self.state, (C.READY, C.QUIESCED), action="attach")
        return self._attachment

    def _published(self, t: Transition[ComponentState]) -> None:
        self.ctx.publish(ComponentStateChanged(vm=self.ctx.vm, component=self.id, old=t.old, new=t.new,
                                               reason=t.reason))

    # -- the protocol ----------------------------------------------------------------------------
    async def prepare(self, host: Host) -> Attachment:
        """Start serving on ``host``; returns what QEMU attaches. From CREATED, STOPPED or FAILED
        (a restart)."""
        self.fsm.require("prepare", C.CREATED, C.STOPPED, C.FAILED)
        restart = self.state is C.FAILED
        self.fsm.set(C.PREPARING, f"on host {host.name}" + (" (restart)" if restart else ""))
        try:
            att = await self._do_prepare(host)
        except BaseException as exc:
            self.fsm.set(C.FAILED, f"prepare failed: {type(exc).__name__}: {exc}".splitlines()[0])
            await self._do_stop()
            raise
        self.host, self._attachment = host, att
        if restart:
            self.restarts += 1
        self.fsm.set(C.READY, "serving")
        return att

    async def reattach(self, host: Host, record: dict[str, Any]) -> Attachment:
        """Take over this component's processes that run already, started by an earlier owner of
        the VM (a host agent before its restart): ``record`` is what :meth:`detach` returned then.
        From CREATED; READY afterwards, with the same attachment QEMU has. A component that cannot
        (the default) raises ComponentError and is FAILED."""
        self.fsm.require("reattach", C.CREATED)
        self.fsm.set(C.PREPARING, f"re-attach on host {host.name}")
        try:
            att = await self._do_reattach(host, record)
        except BaseException as exc:
            self.fsm.set(C.FAILED, f"re-attach failed: {type(exc).__name__}: {exc}".splitlines()[0])
            raise
        self.host, self._attachment = host, att
        self.fsm.set(C.READY, "re-attached")
        return att

    async def detach(self) -> dict[str, Any]:
        """Let go of this component's processes without stopping them (the VM's owner is going
        away); returns the record :meth:`reattach` needs (pids, socket paths). STOPPED afterwards
        (nothing of it is ours any more). A component with nothing running returns ``{}``."""
        if not self.live:
            return {}
        self.fsm.set(C.STOPPING, "detach")
        try:
            return await self._do_detach()
        finally:
            self._attachment = None
            self.fsm.set(C.STOPPED, "detached")

    async def quiesce(self) -> None:
        """Stop accepting new work and finish what is in flight (before a final checkpoint)."""
        self.fsm.require("quiesce", C.READY)
        await self._do_quiesce()
        self.fsm.set(C.QUIESCED, "quiesced")

    async def resume(self) -> None:
        self.fsm.require("resume", C.QUIESCED)
        await self._do_resume()
        self.fsm.set(C.READY, "resumed")

    async def checkpoint(self, since: int | None = None) -> Checkpoint:
        """The device state: full, or the delta since the checkpoint ``since`` (a seq)."""
        self.fsm.require("checkpoint", C.READY, C.QUIESCED)
        return await self._do_checkpoint(since)

    async def restore(self, checkpoint: Checkpoint) -> None:
        """Load ``checkpoint`` (full, or a delta on top of what was restored before)."""
        self.fsm.require("restore", C.READY, C.QUIESCED)
        if checkpoint.kind != self.kind or checkpoint.version not in self.CHECKPOINT_VERSIONS:
            raise CheckpointError(f"{self.fsm.obj}: cannot restore a {checkpoint.kind!r} checkpoint of version "
                                  f"{checkpoint.version} (supported: {self.kind!r} {sorted(self.CHECKPOINT_VERSIONS)})")
        await self._do_restore(checkpoint)

    async def stop(self) -> None:
        """Stop its processes (files stay). Idempotent; a no-op when nothing runs."""
        await self._cancel_restart()
        if self.state in (C.CREATED, C.STOPPED, C.REMOVED):
            return
        self.fsm.set(C.STOPPING, "stop")
        try:
            await self._do_stop()
        finally:
            self._attachment = None
            self.fsm.set(C.STOPPED, "stopped")

    async def remove(self) -> None:
        """Delete the component's files (the VM is undefined). Refused while it runs."""
        self.fsm.require("remove", C.CREATED, C.STOPPED, C.FAILED)
        await self._do_remove()
        self.fsm.set(C.REMOVED, "removed")

    async def retire(self) -> None:
        """This instance is done for good (its peer on another host took over after a migration):
        stop it and delete what belongs to this instance only (sockets, logs, never the shared
        backing store: :meth:`_do_retire`); REMOVED afterwards."""
        await self.stop()
        if self.state is C.REMOVED:
            return
        self.fsm.require("retire", C.CREATED, C.STOPPED, C.FAILED)
        await self._do_retire()
        self.fsm.set(C.REMOVED, "retired (taken over by its peer)")

    def report_failure(self, error: BaseException | str) -> None:
        """The component died on its own: FAILED, recorded, published as ComponentFailed; restarted
        if it is supervised (:meth:`supervise`) and the restart rate allows it."""
        text = str(error)
        self.failures.append((time.time(), text))
        if self.fsm.can(C.FAILED):
            self.fsm.set(C.FAILED, text.splitlines()[0] if text else "failed")
        self.ctx.publish(ComponentFailed(vm=self.ctx.vm, component=self.id, error=text,
                                         exc=error if isinstance(error, BaseException) else None))
        if self.restart_policy is not None and self.state is C.FAILED and self.host is not None:
            self._schedule_restart(self.restart_policy)

    # -- supervision ------------------------------------------------------------------------------
    def supervise(self, policy: RestartPolicy | None = RestartPolicy()) -> None:
        """Restart this component automatically when it dies on its own (None: stop supervising)."""
        if policy is not None and not isinstance(policy, RestartPolicy):
            raise ComponentError(f"{self.fsm.obj}: supervise needs a RestartPolicy, got {type(policy).__name__}")
        self.restart_policy = policy

    def _schedule_restart(self, policy: RestartPolicy) -> None:
        if self._restart_task is not None and not self._restart_task.done():
            return
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > policy.window_s:
            self._restart_times.popleft()
        attempt = len(self._restart_times) + 1
        if len(self._restart_times) >= policy.max_restarts:
            why = (f"restart limit reached: {len(self._restart_times)} restart(s) within {policy.window_s:g} s "
                   f"(max {policy.max_restarts}); left failed")
            log.error("%s: %s", self.fsm.obj, why)
            self.ctx.publish(ComponentRestarted(vm=self.ctx.vm, component=self.id, attempt=attempt, ok=False,
                                                error=why))
            return
        self._restart_times.append(now)
        self._restart_task = asyncio.get_running_loop().create_task(
            self._supervised_restart(policy, attempt), name=f"restart-{self.ctx.vm}-{self.id}")

    async def _supervised_restart(self, policy: RestartPolicy, attempt: int) -> None:
        t0 = time.monotonic()
        await asyncio.sleep(policy.delay_s)
        if self.state is not C.FAILED or self.host is None:
            return
        try:
            await self.prepare(self.host)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported, not raised: nobody awaits a supervision task
            log.error("%s: restart %d failed: %s", self.fsm.obj, attempt, exc)
            self.ctx.publish(ComponentRestarted(vm=self.ctx.vm, component=self.id, attempt=attempt, ok=False,
                                                seconds=time.monotonic() - t0, error=f"restart failed: {exc}"))
            return
        log.warning("%s: restarted (attempt %d) in %.2f s", self.fsm.obj, attempt, time.monotonic() - t0)
        self.ctx.publish(ComponentRestarted(vm=self.ctx.vm, component=self.id, attempt=attempt, ok=True,
                                            seconds=time.monotonic() - t0))

    async def _cancel_restart(self) -> None:
        task, self._restart_task = self._restart_task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])

    def health(self) -> Health:
        pids = self.pids()
        return Health(self.id, self.state, self.state is C.READY, pids[0] if pids else None, self.restarts,
                      self.failures[-1][1].splitlines()[0] if self.failures else "")

    @property
    def live(self) -> bool:
        return self.state in LIVE

    # -- hooks ------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def _do_prepare(self, host: Host) -> Attachment: ...

    @abc.abstractmethod
    async def _do_stop(self) -> None: ...

    async def _do_reattach(self, host: Host, record: dict[str, Any]) -> Attachment:
        raise ComponentError(f"{self.fsm.obj}: {self.kind} components cannot re-attach to running processes")

    async def _do_detach(self) -> dict[str, Any]:
        raise ComponentError(f"{self.fsm.obj}: {self.kind} components cannot let their processes go")

    async def _do_quiesce(self) -> None:
        raise ComponentError(f"{self.fsm.obj}: quiesce is not supported by {self.kind}")

    async def _do_resume(self) -> None:
        raise ComponentError(f"{self.fsm.obj}: resume is not supported by {self.kind}")

    async def _do_checkpoint(self, since: int | None) -> Checkpoint:
        raise ComponentError(f"{self.fsm.obj}: checkpoints are not supported by {self.kind}")

    async def _do_restore(self, checkpoint: Checkpoint) -> None:
        raise ComponentError(f"{self.fsm.obj}: restore is not supported by {self.kind}")

    async def _do_remove(self) -> None:
        for p in self.files():
            p.unlink(missing_ok=True)

    async def _do_retire(self) -> None:
        """Delete this instance's own files (not the shared backing store); default: nothing."""
        return None

    def pids(self) -> list[int]:
        """Processes of this component that are alive now."""
        return []

    def files(self) -> list[Path]:
        """Files this component owns (deleted by remove; a live process must not hold them)."""
        return []

    async def stats(self) -> dict[str, Any]:
        """Counters for reports and test artefacts (may be empty)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "name": self.name, "state": self.state.value,
                "host": self.host.name if self.host else None, "restarts": self.restarts,
                "failures": [f for _, f in self.failures],
                "restart_policy": None if self.restart_policy is None else {
                    "max_restarts": self.restart_policy.max_restarts, "window_s": self.restart_policy.window_s,
                    "delay_s": self.restart_policy.delay_s}}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ctx.vm}/{self.id} {self.state.value}>"


class ComponentDriver(Protocol):
    """Creates the components of one device kind (``DiskSpec.kind``), e.g. ``"shim"``."""
    kind: str

    def create(self, disk: DiskSpec, ctx: ComponentContext) -> Component: ...


NIC_DRIVER = "eni"


@runtime_checkable
class NicDriver(Protocol):
    """Creates the component that attaches a NIC whose network is not "default" (user-mode): a
    tenant network's ENI (hvsim.network.component.EniDriver, registered as kind :data:`NIC_DRIVER`)."""
    kind: str

    def create_nic(self, nic: NicSpec, ctx: ComponentContext) -> Component: ...


@runtime_checkable
class SwapBackend(Protocol):
    """A component that backs guest swap and can fetch what the guest swapped out ahead of time
    (memory consolidation uses it when memory is given back)."""

    async def prefetch(self, budget_bytes: int, skip_recent_pages: int = 0) -> dict[str, Any]: ...


@runtime_checkable
class MigratableComponent(Protocol):
    """A component whose device state moves with its VM to another host (a multi-process VM
    migration): the migration makes a peer on the destination, moves checkpoints into it (full, then
    deltas since the last one delivered while the guest runs, the final one after ``quiesce``), the
    destination QEMU attaches to the peer, and the source instance is retired once the peer took over
    (or resumed if the migration failed). Uses Component's ``quiesce``/``resume``/``checkpoint``/
    ``restore``/``stop``/``remove``/``retire`` besides these two methods. A component without device
    state (``Component.migrates_state`` False) needs only ``quiesce`` (its final step, at the
    switch-over), ``resume`` (undo it) and ``retire``."""

    def migration_peer(self, run_dir: Path) -> Component:
        """A new, unprepared component for the same device (same kind, name and context) whose
        sockets and logs live under ``run_dir`` and which shares this one's backing store (a
        datastore both hosts reach); the migration prepares it on the destination host."""
        ...

    async def state_size(self, since: int | None = None) -> int:
        """About how many bytes ``checkpoint(since)`` would be now (for downtime predictions)."""
        ...
