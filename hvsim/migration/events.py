"""Migration events on the cluster bus: progress samples and the outcome."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.events import ClusterEvent

if TYPE_CHECKING:
    from .progress import ProgressSnapshot


@dataclass(frozen=True, kw_only=True)
class MigrationProgress(ClusterEvent):
    migration: str          # the migration's id
    vm: str
    snapshot: ProgressSnapshot


@dataclass(frozen=True, kw_only=True)
class MigrationEnded(ClusterEvent):
    migration: str
    vm: str
    outcome: str            # completed | failed | timeout | cancelled
    result: Any             # the MigrationResult
