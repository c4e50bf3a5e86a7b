"""What a VM needs from the inventory that owns it (implemented by :class:`~hvsim.core.cluster.Cluster`),
as a protocol, so the VM does not depend on the cluster module."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from hvbase.events import EventBus

from .components import ComponentDriver
from .events import ClusterEvent

if TYPE_CHECKING:
    from .host import Host

T = TypeVar("T")


class VMEnvironment(Protocol):
    name: str
    run_dir: Path
    kernel: Path
    initrd: Path
    events: EventBus[ClusterEvent]

    def accel(self) -> str: ...

    def driver(self, kind: str) -> ComponentDriver: ...

    def track_process(self, pid: int, what: str) -> None: ...

    def host(self, name: str) -> Host: ...

    @property
    def hosts(self) -> dict[str, Host]: ...

    def extension(self, key: str, factory: Callable[[Any], T]) -> T: ...
