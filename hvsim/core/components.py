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
"""
from __future__ import annotations

import abc
import enum
import hashlib
import json
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from hvbase.fsm import StateMachine, Transition
from qmp_bridge import Drive, Nic

from .errors import CheckpointError, ComponentError, ComponentStateError
from .events import ClusterEvent, ComponentFailed, ComponentStateChanged

if TYPE_CHECKING:
    from .host import Host
    from .model import DiskSpec, NicSpec


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

    def __init__(self, name: str, ctx: ComponentContext) -> None:
        self.name = name
        self.ctx = ctx
        self.restarts = 0
        self.failures: list[tuple[float, str]] = []
        self._attachment: Attachment | None = None
        self.host: Host | None = None
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

    def report_failure(self, error: BaseException | str) -> None:
        """The component died on its own: FAILED, recorded, published as ComponentFailed."""
        import time as _t
        text = str(error)
        self.failures.append((_t.time(), text))
        if self.fsm.can(C.FAILED):
            self.fsm.set(C.FAILED, text.splitlines()[0] if text else "failed")
        self.ctx.publish(ComponentFailed(vm=self.ctx.vm, component=self.id, error=text,
                                         exc=error if isinstance(error, BaseException) else None))

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
                "failures": [f for _, f in self.failures]}

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
