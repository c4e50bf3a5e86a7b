"""``stepwise``: OpenStack Nova's libvirt downtime stepping, exactly.

Nova (nova/virt/libvirt/migration.py ``downtime_steps`` and ``update_downtime``;
driver ``_live_migration_monitor``):

- data_gb = max(guest RAM GiB, 2) + disk GiB  (Nova floors RAM at 2 GB; ``data_gb_floor``)
- delay = int(downtime_delay x data_gb); base = downtime / steps; offset = (downtime - base) / steps
- step i (i = 0..steps) is (int(delay * i), int(base + offset * i)); the monitor applies the last
  step whose time is strictly below the elapsed time (``elapsed > step[0]``), only when it changes
- completion timeout = int(completion_timeout x data_gb) (0 disables); when ``elapsed >`` it and the
  migration is not already in postcopy: action ``abort`` (Nova's default) cancels the migration,
  ``force_complete`` switches to postcopy if permitted, else pauses the guest.

Nova's defaults are downtime 500 ms, 10 steps, delay 75 s/GiB, completion timeout 800 s/GiB,
timeout action abort, postcopy not permitted. Every number is a parameter so a benchmark can scale
the schedule to a small guest on a slow link (the benchmark says which values it uses).
"""
from __future__ import annotations

from typing import Any
from collections.abc import Iterator

from ..errors import MigrationInputError
from ..progress import Observation
from .base import Action, ActionKind, MigrationContext, Policy

GIB = 1024 ** 3


def downtime_steps(data_gb: float, downtime_ms: int = 500, steps: int = 10,
                   delay_s: float = 75) -> Iterator[tuple[int, int]]:
    """Nova's schedule: (time marker in s, downtime limit in ms) for step 0..steps."""
    delay = int(delay_s * data_gb)
    base = downtime_ms / steps
    offset = (downtime_ms - base) / steps
    for i in range(steps + 1):
        yield (int(delay * i), int(base + offset * i))


def nova_data_gb(ram_bytes: int, disk_gb: float = 0.0, floor_gb: float = 2.0) -> float:
    ram_gb = ram_bytes / GIB
    if ram_gb < floor_gb:
        ram_gb = floor_gb
    return ram_gb + disk_gb


def step_for(elapsed: float, schedule: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The step in force at ``elapsed`` (Nova: the last step with ``elapsed > step[0]``)."""
    this = None
    for step in schedule:
        if elapsed > step[0]:
            this = step
    return this


class Stepwise(Policy):
    name = "stepwise"

    def __init__(self, downtime_ms: int = 500, steps: int = 10, downtime_delay_s: float = 75,
                 completion_timeout_s: float = 800, timeout_action: str = "abort",
                 permit_post_copy: bool = False, data_gb_floor: float = 2.0, disk_gb: float = 0.0,
                 **params: Any) -> None:
        super().__init__(**params)
        if steps < 1 or downtime_ms <= 0 or downtime_delay_s < 0 or completion_timeout_s < 0:
            raise MigrationInputError("stepwise: steps >= 1, downtime_ms > 0, delays/timeouts >= 0 required")
        if timeout_action not in ("abort", "force_complete"):
            raise MigrationInputError(f"stepwise: timeout_action must be 'abort' or 'force_complete', "
                                      f"got {timeout_action!r}")
        self.downtime_ms, self.steps, self.delay_s = int(downtime_ms), int(steps), float(downtime_delay_s)
        self.completion_timeout_s, self.timeout_action = float(completion_timeout_s), timeout_action
        self.permit_post_copy, self.floor, self.disk_gb = bool(permit_post_copy), float(data_gb_floor), disk_gb
        self.uses_postcopy = self.permit_post_copy  # type: ignore[misc]
        self.schedule: list[tuple[int, int]] = []
        self.data_gb = 0.0
        self.completion_timeout = 0
        self.current: int | None = None
        self.timeout_fired = False

    @property
    def initial_downtime_limit_ms(self) -> float:
        return 300.0  # QEMU's own default until the monitor's first update (as under libvirt)

    def start(self, ctx: MigrationContext) -> list[Action]:
        super().start(ctx)
        self.data_gb = nova_data_gb(ctx.guest_ram_bytes, self.disk_gb, self.floor)
        self.schedule = list(downtime_steps(self.data_gb, self.downtime_ms, self.steps, self.delay_s))
        self.completion_timeout = int(self.completion_timeout_s * self.data_gb)
        return []

    def observe(self, obs: Observation) -> list[Action]:
        acts: list[Action] = []
        postcopy = obs.status.startswith("postcopy")
        if (self.completion_timeout and not postcopy and not self.timeout_fired
                and obs.t > self.completion_timeout):
            self.timeout_fired = True
            inputs = {"elapsed_s": round(obs.t, 2), "completion_timeout_s": self.completion_timeout,
                      "data_gb": self.data_gb}
            if self.timeout_action == "abort":
                return [Action(ActionKind.ABORT, None, "completion timeout: abort (Nova default)", inputs)]
            kind = ActionKind.START_POSTCOPY if (self.permit_post_copy and self.ctx.postcopy_available) \
                else ActionKind.FORCE_COMPLETE
            return [Action(kind, None, "completion timeout: force complete", inputs)]
        step = step_for(obs.t, self.schedule)
        if step is not None and step[1] != self.current:
            self.current = step[1]
            acts.append(Action(ActionKind.SET_DOWNTIME_LIMIT, float(step[1]),
                               f"Nova step at {step[0]} s",
                               {"elapsed_s": round(obs.t, 2), "step_s": step[0], "data_gb": self.data_gb}))
        return acts

    def predicted_downtime_ms(self, obs: Observation) -> float | None:
        return obs.expected_downtime_ms

    def params(self) -> dict[str, Any]:
        return {"downtime_ms": self.downtime_ms, "steps": self.steps, "downtime_delay_s": self.delay_s,
                "completion_timeout_s": self.completion_timeout_s, "timeout_action": self.timeout_action,
                "permit_post_copy": self.permit_post_copy, "data_gb_floor": self.floor}
