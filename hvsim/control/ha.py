"""High availability: the protected VMs of a lost host restarted on surviving hosts.

**When is a host lost?** Its agent is UNREACHABLE (the host monitor's verdict) *and* there is
evidence its guests no longer run, because a restart while the guest still runs elsewhere would
have two QEMUs writing one disk. Two pieces of evidence, as vSphere HA has network heartbeats plus
datastore heartbeats:

- **power** (:func:`power_evidence`): the host's power domain (the cgroup its launcher created,
  reported by its agent and kept in the host record) read by the manager, the analogue of a BMC's
  power reading. ``off`` (no process left in it, or the domain removed) is conclusive: the host's
  guests died with it. ``on`` (processes in it) means the host runs and only its agent is gone: its
  guests are **never** restarted. ``unknown``: the manager cannot read it (another machine, no
  cgroup visible in its mount namespace, no domain recorded).
- **the datastore lock**: every host shares one filesystem as its datastore and QEMU 7.2 takes OFD
  locks on its disk images (``Failed to get "write" lock`` when another QEMU holds it). A restart
  attempt whose QEMU finds the image locked is refused by the agent (409, field
  ``datastore-lock``) and recorded as *not* a restart. This guards every restart, whatever the
  power evidence said.

Verdicts (:func:`judge`): ``waiting`` (unreachable for less than the grace period), ``alive``
(powered on: nothing is restarted), ``lost`` (powered off: protected VMs restarted, the
unprotected ones marked crashed), ``presumed-lost`` (no power evidence, unreachable past the grace
period: protected VMs with a disk are restarted, each attempt guarded by the lock; a protected VM
without a disk has no lock to guard it and is not restarted; unprotected VMs are left as recorded).

**Grace period.** With power evidence the verdict needs none (``off_grace``, default 0: the host
monitor already took one failed poll of up to 2 s to mark the host unreachable). Without it,
``grace`` defaults to 15 s, vSphere HA's failure detection time: a host agent that restarts
re-adopts its guests within a few seconds, so a restarting agent is never taken for a lost host,
and were it, the lock would refuse the restart.

**Restarts** are durable operations (:data:`~hvsim.control.ops.OpKind.RESTART`, params ``source``:
the lost host, ``destination``): recorded before the agent is asked, settled in one transaction
that moves the VM's record to its new host; a manager restarted mid-way resolves them
(:func:`hvsim.control.ops.resolve`). They go in **priority order**: VMs are placed one at a time,
highest priority first, and each priority tier is started (concurrently within the tier) only
once the tier above it is running or has failed (also when it is a restart a previous manager
began and the resolver settles). Placement lifts the reservation rules and only
them (:func:`hvsim.control.placer.place_failover`): reserved capacity is for these restarts. A VM
that cannot be placed gets a failed restart operation naming why (and an event); it stays defined
and is tried again every ``retry`` seconds.

States of the controller (:class:`HAState`): idle -> watching (while its manager leads) -> idle,
closed.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from hvbase.fsm import StateMachine
from hvsim.core.power import PowerError
from hvsim.core.power import base as power_base

from .agentrpc import StartRequest, guest_spec
from .errors import ApiConflictError, ApiError, ApiUnavailableError, ConflictError, ControlError, FencedError
from .ops import STEP_QEMU_STARTED, OpKind, OpState, Outcome, Resolution
from .state import HOSTS, VMS, HostRecord, HostStatus, VMPower, VMRecord

if TYPE_CHECKING:
    from .agent_client import AgentClient
    from .inventory import Inventory

T = TypeVar("T")


class ManagerPort(Protocol):
    """What the HA loop needs of its manager (:class:`hvsim.control.manager.Manager` is one); a
    protocol, so this module does not import the manager that imports it."""
    reader: Inventory

    @property
    def token(self) -> int: ...
    @property
    def inventory(self) -> Inventory: ...
    def agent(self, host: HostRecord) -> AgentClient: ...
    def spawn_driver(self, coro: Awaitable[T], name: str) -> asyncio.Task[T]: ...
    async def place_restart(self, vm: VMRecord) -> str: ...
    def restart_placed(self, vm: str) -> None: ...
    def with_fields(self, vm: VMRecord, **fields: Any) -> VMRecord: ...

log = logging.getLogger("hvsim.control.ha")
LOCK_FIELD = "datastore-lock"
RESTARTABLE = (VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING, VMPower.CRASHED)
LIVE = (VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING)
_DOMAIN = re.compile(r"^[0-9]+\.[0-9]+\.[a-z0-9][a-z0-9_.-]{0,63}$")


class PowerEvidence(enum.Enum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


class HostVerdict(enum.Enum):
    UP = "up"
    WAITING = "waiting"
    ALIVE = "alive"
    LOST = "lost"
    PRESUMED_LOST = "presumed-lost"


class HAState(enum.Enum):
    IDLE = "idle"
    WATCHING = "watching"
    CLOSED = "closed"


HA_TABLE = {HAState.IDLE: {HAState.WATCHING, HAState.CLOSED},
            HAState.WATCHING: {HAState.IDLE, HAState.CLOSED},
            HAState.CLOSED: set()}


def power_evidence(domain: str | None, root: Path | None = None) -> tuple[PowerEvidence, str]:
    """Read a host's power domain (see the module docstring). ``domain`` comes from the host's agent:
    it must be a direct child of our cgroup base with a power domain's name, else it is not used."""
    if not domain:
        return PowerEvidence.UNKNOWN, "no power domain recorded for the host"
    try:
        base = root if root is not None else power_base()
    except PowerError as e:
        return PowerEvidence.UNKNOWN, f"no cgroup v2 hierarchy visible here ({e})"
    p = Path(domain)
    if p.parent != base or not _DOMAIN.match(p.name) or ".." in p.parts:
        return PowerEvidence.UNKNOWN, f"{domain} is not a power domain under {base}"
    if not base.is_dir():
        return PowerEvidence.UNKNOWN, f"{base} is not visible here"
    try:
        events = (p / "cgroup.events").read_text()
    except FileNotFoundError:
        return PowerEvidence.OFF, f"power domain {p.name} is gone (the host was powered off and removed)"
    except OSError as e:
        return PowerEvidence.UNKNOWN, f"cannot read power domain {p.name}: {e}"
    if "populated 1" in events:
        return PowerEvidence.ON, f"power domain {p.name} has processes: the host is powered on"
    return PowerEvidence.OFF, f"power domain {p.name} has no process left: the host is powered off"


def judge(unreachable_for: float, evidence: PowerEvidence, grace: float, off_grace: float = 0.0) -> HostVerdict:
    """The verdict on a host whose agent has been unreachable for ``unreachable_for`` seconds."""
    if evidence is PowerEvidence.ON:
        return HostVerdict.ALIVE
    if evidence is PowerEvidence.OFF:
        return HostVerdict.LOST if unreachable_for >= off_grace else HostVerdict.WAITING
    return HostVerdict.PRESUMED_LOST if unreachable_for >= grace else HostVerdict.WAITING


def restart_tiers(vms: Iterable[VMRecord]) -> list[list[VMRecord]]:
    """Protected VMs grouped by priority, highest first (names in order within a tier)."""
    tiers: dict[int, list[VMRecord]] = {}
    for v in sorted(vms, key=lambda v: (-v.priority, v.name)):
        tiers.setdefault(v.priority, []).append(v)
    return [tiers[p] for p in sorted(tiers, reverse=True)]


def lost_vms(vms: Iterable[VMRecord], host: str, verdict: HostVerdict) -> tuple[list[VMRecord], list[VMRecord],
                                                                                   list[VMRecord]]:
    """(restart, mark crashed, skipped) among the VMs recorded on a host with ``verdict``."""
    restart: list[VMRecord] = []
    crashed: list[VMRecord] = []
    skipped: list[VMRecord] = []
    if verdict not in (HostVerdict.LOST, HostVerdict.PRESUMED_LOST):
        return restart, crashed, skipped
    for v in vms:
        if v.host != host:
            continue
        if v.protected and v.power in RESTARTABLE:
            if verdict is HostVerdict.PRESUMED_LOST and not v.disk_mib:
                skipped.append(v)             # no disk, no lock: nothing proves it stopped
            else:
                restart.append(v)
        elif not v.protected and v.power in LIVE and verdict is HostVerdict.LOST:
            crashed.append(v)
    return restart, crashed, skipped


@dataclass
class HostWatch:
    since: float
    verdict: HostVerdict = HostVerdict.WAITING
    evidence: PowerEvidence = PowerEvidence.UNKNOWN
    detail: str = ""


@dataclass
class HAEvent:
    at: float
    kind: str                 # host-verdict, host-back, restarted, not-restarted, lost, restart-failed, ...
    host: str
    vm: str | None = None
    detail: str = ""
    operation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "host": self.host, "vm": self.vm, "detail": self.detail[:512],
                "operation": self.operation}


@dataclass
class _Try:
    at: float
    reason: str = ""


@dataclass
class HAController:
    """The manager's HA loop (one per manager; runs while it leads)."""
    manager: ManagerPort
    grace: float = 15.0
    off_grace: float = 0.0
    retry: float = 30.0
    interval: float = 1.0
    watch: dict[str, HostWatch] = field(default_factory=dict)
    events: list[HAEvent] = field(default_factory=list)
    _next: dict[str, _Try] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.grace <= 3600 or not 0 <= self.off_grace <= 3600:
            raise ValueError(f"HA grace periods must be 0..3600 s (got {self.grace}, {self.off_grace})")
        self.fsm: StateMachine[HAState] = StateMachine("ha", HAState.IDLE, HA_TABLE, log=log)

    # -- reporting ----------------------------------------------------------------------------------
    def _event(self, kind: str, host: str, vm: str | None = None, detail: str = "",
               operation: str | None = None) -> None:
        ev = HAEvent(time.time(), kind, host, vm, detail, operation)
        (log.warning if kind in ("not-restarted", "restart-failed", "lost") else log.info)(
            "HA %s: host %s%s: %s", kind, host, f" vm {vm}" if vm else "", detail)
        self.events.append(ev)
        del self.events[:-200]

    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"state": self.fsm.state.value, "grace_s": self.grace, "off_grace_s": self.off_grace,
                "retry_s": self.retry,
                "hosts": {h: {"verdict": w.verdict.value, "power": w.evidence.value, "detail": w.detail,
                              "unreachable_s": round(now - w.since, 1)} for h, w in sorted(self.watch.items())},
                "events": [e.to_dict() for e in self.events]}

    # -- the loop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Watch until cancelled (the manager cancels it when it stops leading)."""
        self.fsm.set(HAState.WATCHING, f"token {self.manager.token}")
        self.watch.clear()           # a new leadership measures the grace period afresh
        try:
            while True:
                try:
                    await self.once()
                except (ControlError, ApiError) as e:
                    log.warning("HA pass: %s", e)
                await asyncio.sleep(self.interval)
        finally:
            if self.fsm.state is HAState.WATCHING:
                self.fsm.set(HAState.IDLE, "leadership ended")

    def close(self) -> None:
        if self.fsm.state is not HAState.CLOSED:
            self.fsm.set(HAState.CLOSED)

    async def once(self) -> list[str]:
        """One pass: judge the unreachable hosts, act on the lost ones. Returns the VMs restarted."""
        mgr = self.manager
        hosts = await mgr.reader.list_all(HostRecord, HOSTS)
        now = time.monotonic()
        down = {h.name: h for h in hosts if h.status is HostStatus.UNREACHABLE}
        for name in list(self.watch):
            if name not in down:
                w = self.watch.pop(name)
                if w.verdict is not HostVerdict.WAITING:
                    self._event("host-back", name, detail=f"its agent answers again (was {w.verdict.value})")
        acting: list[tuple[HostRecord, HostVerdict, PowerEvidence]] = []
        for h in down.values():
            w = self.watch.setdefault(h.name, HostWatch(since=now))
            ev, detail = power_evidence(h.power_domain)
            verdict = judge(now - w.since, ev, self.grace, self.off_grace)
            w.evidence, w.detail = ev, detail
            if verdict is not w.verdict:
                w.verdict = verdict
                self._event("host-verdict", h.name, detail=f"{verdict.value}: {detail}")
            if verdict in (HostVerdict.LOST, HostVerdict.PRESUMED_LOST):
                acting.append((h, verdict, ev))
        if not acting:
            return []
        vms = await mgr.reader.list_all(VMRecord, VMS)
        todo: list[tuple[VMRecord, HostRecord, PowerEvidence]] = []
        for h, verdict, ev in acting:
            restart, crashed, skipped = lost_vms(vms, h.name, verdict)
            for v in crashed:
                try:
                    if await mgr.inventory.set_vm_power(v.name, VMPower.CRASHED, host=h.name):
                        self._event("lost", h.name, v.name, "unprotected: marked crashed, not restarted")
                except (ConflictError, FencedError) as e:
                    log.info("HA: marking %s crashed: %s", v.name, e)
            for v in skipped:
                self._once(v.name, "not-restarted", h.name,
                           "protected but without a disk: with no power evidence nothing proves it stopped")
            for v in restart:
                t = self._next.get(v.name)
                if t is None or time.monotonic() >= t.at:
                    todo.append((v, h, ev))
        done: list[str] = []
        busy = {rec.vm for rec, _ in await mgr.reader.in_flight() if rec.kind is OpKind.RESTART}
        for tier in restart_tiers(v for v, _, _ in todo):
            if any(v.name in busy for v in tier):
                # an operation is in flight on a VM of this tier (a restart a previous manager began,
                # left to the resolver): the lower tiers wait for it, as they wait for a tier we start
                log.info("HA: tier %d waits for operations in flight on %s", tier[0].priority,
                         sorted(v.name for v in tier if v.name in busy))
                break
            where = {v.name: (h, ev) for v, h, ev in todo}
            tasks = []
            for v in tier:
                h, ev = where[v.name]
                placed = asyncio.Event()
                tasks.append(mgr.spawn_driver(self._restart(v, h, ev, placed), f"restart-{v.name}"))
                await placed.wait()          # placed one at a time, in priority order
            for ok in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(ok, str):
                    done.append(ok)
                elif isinstance(ok, BaseException) and not isinstance(ok, ControlError | ApiError):
                    raise ok
        return done

    def _once(self, vm: str, kind: str, host: str, detail: str, op: str | None = None) -> None:
        """An event, unless the same one was the last reported for that VM."""
        t = self._next.get(vm)
        if t is None or t.reason != f"{kind}:{detail}":
            self._event(kind, host, vm, detail, op)
        self._next[vm] = _Try(time.monotonic() + self.retry, f"{kind}:{detail}")

    async def _restart(self, vm: VMRecord, lost: HostRecord, ev: PowerEvidence, placed: asyncio.Event) -> str | None:
        """Restart one protected VM (see the module docstring); its name when it runs again."""
        mgr = self.manager
        inv = mgr.inventory
        try:
            target = await mgr.place_restart(vm)
        except ConflictError as e:
            placed.set()
            try:
                op, rev = await inv.begin(OpKind.RESTART, vm.name, source=lost.name, evidence=ev.value)
            except ConflictError:
                return None                     # an operation is in flight on it: decided later
            op.fail(f"not restarted: {e}")
            crashed = mgr.with_fields(vm, power=VMPower.CRASHED) if ev is PowerEvidence.OFF else None
            await inv.update(op, rev, vm=crashed)
            self._once(vm.name, "not-restarted", lost.name, str(e), op.record.id)
            return None
        except BaseException:
            placed.set()
            raise
        placed.set()
        try:
            try:
                op, rev = await inv.begin(OpKind.RESTART, vm.name, source=lost.name, destination=target,
                                          priority=str(vm.priority), evidence=ev.value)
            except ConflictError:
                return None
            op.start()
            rev = await inv.update(op, rev)
            dst = await mgr.reader.get_host(target)
            g = guest_spec(vm)
            try:
                await mgr.agent(dst).start(StartRequest(vm=g), mgr.token)
            except ApiError as e:
                if isinstance(e, ApiUnavailableError):
                    self._event("restart-failed", lost.name, vm.name, f"{target} did not answer ({e.detail}): the "
                                "operation stays in flight for the resolver", op.record.id)
                    return None
                locked = isinstance(e, ApiConflictError) and e.field == LOCK_FIELD
                why = (f"not a restart: the disk image is locked on the shared datastore, the guest still runs "
                       f"(host {lost.name} is {ev.value}): {e.detail}" if locked
                       else f"restart on {target} failed: {e.detail}")
                op.fail(why)
                await inv.update(op, rev)
                self._once(vm.name, "not-restarted" if locked else "restart-failed", lost.name, why, op.record.id)
                return None
            op.step(STEP_QEMU_STARTED)
            res = Resolution(op=op.record.id, outcome=Outcome.FINISH, final=OpState.SUCCEEDED, actions=(),
                             vm_host=target, vm_power=VMPower.RUNNING,
                             reason=f"HA restart: lost host {lost.name} ({ev.value}) -> {target}")
            await inv.settle(op.record, rev, res)
            self._next.pop(vm.name, None)
            self._event("restarted", lost.name, vm.name, f"on {target} (priority {vm.priority})", op.record.id)
            return vm.name
        finally:
            mgr.restart_placed(vm.name)
