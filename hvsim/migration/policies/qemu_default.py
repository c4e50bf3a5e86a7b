"""``qemu-default``: QEMU decides. downtime-limit 300 ms, nothing else; the engine's timeout
is the only bound (QEMU itself iterates forever on a guest that dirties faster than the link)."""
from __future__ import annotations

from typing import Any

from ..progress import Observation
from .base import Action, ActionKind, MigrationContext, Policy


class QemuDefault(Policy):
    name = "qemu-default"

    def __init__(self, downtime_limit_ms: float = 300.0, **params: Any) -> None:
        super().__init__(**params)
        self.downtime_limit_ms = float(downtime_limit_ms)

    @property
    def initial_downtime_limit_ms(self) -> float:
        return self.downtime_limit_ms

    def start(self, ctx: MigrationContext) -> list[Action]:
        super().start(ctx)
        return [Action(ActionKind.SET_DOWNTIME_LIMIT, self.downtime_limit_ms, "QEMU default: fixed limit",
                       {"downtime_limit_ms": self.downtime_limit_ms})]

    def observe(self, obs: Observation) -> list[Action]:
        return []

    def predicted_downtime_ms(self, obs: Observation) -> float | None:
        return obs.expected_downtime_ms

    def params(self) -> dict[str, Any]:
        return {"downtime_limit_ms": self.downtime_limit_ms}
