"""Events of the emulated inventory, published on the cluster's bus (``cluster.events``).

One mechanism for everything that happens to a VM (:mod:`hvbase.events`): subscribe with a name,
the event classes you want and a filter, as a context manager so nothing leaks::

    with cluster.events.subscribe("watch-web", kinds=(VMStateChanged,), filter=lambda e: e.vm == "web") as sub:
        change = await sub.get(timeout=5)

Subsystems publish their own event classes (derived from :class:`ClusterEvent`) on the same bus,
e.g. migration progress and outcome (:mod:`hvsim.migration.events`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .lifecycle import VMState


@dataclass(frozen=True, kw_only=True)
class ClusterEvent:
    """Base of every event on a cluster's bus."""
    at: float = field(default_factory=time.time)


@dataclass(frozen=True, kw_only=True)
class VMStateChanged(ClusterEvent):
    vm: str
    old: VMState
    new: VMState
    reason: str


@dataclass(frozen=True, kw_only=True)
class VMMoved(ClusterEvent):
    """A VM now runs on another host (a completed migration, or a restart elsewhere)."""
    vm: str
    source: str
    destination: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class VMDefined(ClusterEvent):
    vm: str
    host: str


@dataclass(frozen=True, kw_only=True)
class VMUndefined(ClusterEvent):
    vm: str
    host: str


@dataclass(frozen=True, kw_only=True)
class ComponentStateChanged(ClusterEvent):
    vm: str
    component: str
    old: Any
    new: Any
    reason: str


@dataclass(frozen=True, kw_only=True)
class ComponentFailed(ClusterEvent):
    """A component of a VM failed on its own (e.g. its driver process died)."""
    vm: str
    component: str
    error: str
    exc: BaseException | None = None


@dataclass(frozen=True, kw_only=True)
class ComponentRestarted(ClusterEvent):
    """A component that failed on its own was restarted by its supervision (``ok``), or was not
    (``ok`` False: the restart failed, or the restart rate limit was reached; ``error`` says which)."""
    vm: str
    component: str
    attempt: int
    ok: bool
    seconds: float = 0.0
    error: str = ""
