"""What the network controller changes on which host, in which order (pure logic, unit-tested).

A plan is a list of *phases* (stage, activate, release, rollback, revert); a phase is a sequence of
*waves*; a wave is a tuple of :class:`Action` s. Waves run one after the other; inside a wave the
actions of different hosts run concurrently and the actions of one host run in the listed order.

The three mobility modes (the benchmark's configurations) plan the same calls differently:

``hvsim`` (the controller, staged)
    stage:    destination: create the port, blocked (QEMU can open the tap; nothing passes).
    activate: (switchover) source: block its port; destination: MAC -> local port, unblock;
              every other host and the source: MAC -> the destination's tunnel endpoint.
              The caller then has the guest announce itself (QMP ``announce-self``).
    release:  source: delete its port.
    rollback: destination: delete its port (the source was never touched).
    revert:   undo an activation: destination blocked, source MAC -> local and unblocked, every other
              host MAC -> the source's endpoint, destination port deleted.
``after-completion`` (a naive controller that reprograms once the migration has completed)
    stage creates the destination port unblocked; activate does nothing; release points the FDB of
    every host at the destination, then deletes the source port.
``learning`` (no controller: flood-and-learn VXLAN)
    stage creates the destination port unblocked; activate does nothing; the guest's announce
    (RARP broadcast, flooded to every host) teaches the bridges and VXLAN devices; release deletes
    the source port.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import TenantInputError


class MobilityMode(enum.Enum):
    HVSIM = "hvsim"
    AFTER_COMPLETION = "after-completion"
    LEARNING = "learning"

    @property
    def programs_fdb(self) -> bool:
        """Static, controller-programmed FDB and ARP suppression (no flood-and-learn)."""
        return self is not MobilityMode.LEARNING

    @classmethod
    def parse(cls, value: MobilityMode | str) -> MobilityMode:
        if isinstance(value, MobilityMode):
            return value
        try:
            return cls(value)
        except ValueError:
            raise TenantInputError(f"unknown mobility mode {value!r}; use one of "
                                   f"{', '.join(m.value for m in cls)}") from None


class Op(enum.Enum):
    CREATE_PORT = "create-port"     # the ENI's port on this host, on the network's bridge (blocked or not)
    BLOCK_PORT = "block-port"       # nothing enters or leaves the port (counted)
    UNBLOCK_PORT = "unblock-port"   # anti-spoofing and security rules only
    DELETE_PORT = "delete-port"     # port, its rules and counters, its FDB entries
    FDB_LOCAL = "fdb-local"         # the ENI's MAC -> its port on this host (replaces a remote entry)
    FDB_REMOTE = "fdb-remote"       # the ENI's MAC -> VXLAN, tunnel endpoint of host ``peer``
    FDB_DELETE = "fdb-delete"       # forget the ENI's MAC on this host
    NEIGH_ADD = "neigh-add"         # ARP suppression: the ENI's IPs -> MAC on this host's bridge
    NEIGH_DELETE = "neigh-delete"


@dataclass(frozen=True)
class Action:
    host: str
    op: Op
    eni: str
    peer: str = ""          # FDB_REMOTE: the host whose tunnel endpoint the MAC is behind
    blocked: bool = False   # CREATE_PORT: create it blocked

    def describe(self) -> str:
        extra = f" -> {self.peer}" if self.op is Op.FDB_REMOTE else ""
        extra += " (blocked)" if self.op is Op.CREATE_PORT and self.blocked else ""
        return f"{self.host}: {self.op.value} {self.eni}{extra}"


Wave = tuple[Action, ...]


@dataclass(frozen=True)
class Phase:
    name: str
    waves: tuple[Wave, ...] = ()

    @property
    def actions(self) -> tuple[Action, ...]:
        return tuple(a for w in self.waves for a in w)

    def hosts(self) -> set[str]:
        return {a.host for a in self.actions}

    def describe(self) -> list[str]:
        return [f"{self.name} wave {i + 1}: {a.describe()}" for i, w in enumerate(self.waves) for a in w]


def _phase(name: str, *waves: Iterable[Action]) -> Phase:
    return Phase(name, tuple(tuple(w) for w in (list(w) for w in waves) if w))


@dataclass(frozen=True)
class MovePlan:
    """The plan of moving a VM's ENIs from ``source`` to ``destination``."""
    mode: MobilityMode
    vm: str
    source: str
    destination: str
    enis: tuple[str, ...]
    stage: Phase
    activate: Phase
    release: Phase
    rollback: Phase
    revert: Phase

    def phases(self) -> tuple[Phase, ...]:
        return (self.stage, self.activate, self.release, self.rollback, self.revert)


@dataclass(frozen=True)
class AttachPlan:
    """The plan of binding ENIs on ``host`` with no previous binding (a VM's first start)."""
    mode: MobilityMode
    host: str
    enis: tuple[str, ...]
    stage: Phase
    activate: Phase
    rollback: Phase


def _check(hosts: Sequence[str], enis: Sequence[str], *named: str) -> None:
    if not enis:
        raise TenantInputError("a plan needs at least one ENI")
    if len(set(enis)) != len(enis):
        raise TenantInputError(f"ENI listed twice in {list(enis)}")
    for h in named:
        if h not in hosts:
            raise TenantInputError(f"host {h!r} is not one of the controller's hosts {list(hosts)}")


def _repoint(hosts: Sequence[str], enis: Sequence[str], to: str) -> list[Action]:
    """Every host except ``to``: the ENIs' MACs are behind ``to``'s tunnel endpoint."""
    return [Action(h, Op.FDB_REMOTE, e, peer=to) for h in hosts if h != to for e in enis]


def plan_move(mode: MobilityMode, hosts: Sequence[str], vm: str, enis: Sequence[str],
              source: str, destination: str) -> MovePlan:
    """Plan moving ``vm``'s ENIs (active on ``source``) to ``destination``."""
    _check(hosts, enis, source, destination)
    if source == destination:
        raise TenantInputError(f"vm {vm!r}: source and destination are the same host {source!r}")
    src, dst = source, destination
    delete_dst = _phase("rollback", [Action(dst, Op.DELETE_PORT, e) for e in enis])
    if mode is MobilityMode.HVSIM:
        stage = _phase("stage", [Action(dst, Op.CREATE_PORT, e, blocked=True) for e in enis])
        activate = _phase(
            "activate",
            [Action(src, Op.BLOCK_PORT, e) for e in enis],
            [a for e in enis for a in (Action(dst, Op.FDB_LOCAL, e), Action(dst, Op.UNBLOCK_PORT, e))],
            _repoint(hosts, enis, dst))
        release = _phase("release", [Action(src, Op.DELETE_PORT, e) for e in enis])
        revert = _phase(
            "revert",
            [Action(dst, Op.BLOCK_PORT, e) for e in enis],
            [a for e in enis for a in (Action(src, Op.FDB_LOCAL, e), Action(src, Op.UNBLOCK_PORT, e))],
            _repoint(hosts, enis, src),
            [Action(dst, Op.DELETE_PORT, e) for e in enis])
    elif mode is MobilityMode.AFTER_COMPLETION:
        stage = _phase("stage", [Action(dst, Op.CREATE_PORT, e) for e in enis])
        activate = _phase("activate")
        release = _phase(
            "release",
            [Action(dst, Op.FDB_LOCAL, e) for e in enis],
            _repoint(hosts, enis, dst),
            [Action(src, Op.DELETE_PORT, e) for e in enis])
        revert = Phase("revert", delete_dst.waves)
    elif mode is MobilityMode.LEARNING:
        stage = _phase("stage", [Action(dst, Op.CREATE_PORT, e) for e in enis])
        activate = _phase("activate")
        release = _phase("release", [Action(src, Op.DELETE_PORT, e) for e in enis])
        revert = Phase("revert", delete_dst.waves)
    else:  # pragma: no cover - exhaustive
        raise TenantInputError(f"unknown mobility mode {mode!r}")
    return MovePlan(mode=mode, vm=vm, source=src, destination=dst, enis=tuple(enis), stage=stage,
                    activate=activate, release=release, rollback=delete_dst, revert=revert)


def plan_attach(mode: MobilityMode, hosts: Sequence[str], enis: Sequence[str], host: str) -> AttachPlan:
    """Plan binding ENIs that have no binding yet on ``host``."""
    _check(hosts, enis, host)
    rollback = _phase("rollback", [Action(host, Op.DELETE_PORT, e) for e in enis])
    if mode.programs_fdb:
        stage = _phase("stage", [Action(host, Op.CREATE_PORT, e, blocked=True) for e in enis])
        activate = _phase(
            "activate",
            [a for e in enis for a in (Action(host, Op.NEIGH_ADD, e), Action(host, Op.FDB_LOCAL, e),
                                       Action(host, Op.UNBLOCK_PORT, e))],
            [a for h in hosts if h != host for e in enis
             for a in (Action(h, Op.FDB_REMOTE, e, peer=host), Action(h, Op.NEIGH_ADD, e))])
    else:
        stage = _phase("stage", [Action(host, Op.CREATE_PORT, e) for e in enis])
        activate = _phase("activate")
    return AttachPlan(mode=mode, host=host, enis=tuple(enis), stage=stage, activate=activate, rollback=rollback)


def plan_detach(mode: MobilityMode, hosts: Sequence[str], enis: Sequence[str], host: str) -> Phase:
    """Plan removing ENIs active on ``host`` (VM stopped for good, ENI detached)."""
    _check(hosts, enis, host)
    if not mode.programs_fdb:
        return _phase("detach", [Action(host, Op.DELETE_PORT, e) for e in enis])
    return _phase(
        "detach",
        [Action(host, Op.BLOCK_PORT, e) for e in enis],
        [a for h in hosts if h != host for e in enis
         for a in (Action(h, Op.FDB_DELETE, e), Action(h, Op.NEIGH_DELETE, e))]
        + [Action(host, Op.NEIGH_DELETE, e) for e in enis],
        [Action(host, Op.DELETE_PORT, e) for e in enis])
