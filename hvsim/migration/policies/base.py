"""The switchover-policy interface: a policy sees observations and returns actions.

A policy is a small named unit with no QEMU inside, so it can be driven by recorded pass
sequences in unit tests. The engine calls ``start(ctx)`` once before ``migrate``, then
``observe(obs)`` for every progress sample (about every 200 ms), and executes the actions
returned. Every action carries the inputs it was decided on; the engine logs them and keeps
them in the result.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..costs import MigrationCosts
from ..errors import MigrationInputError, MigrationStateError
from ..planner import Contract, Plan
from ..progress import Observation


class ActionKind(enum.Enum):
    SET_DOWNTIME_LIMIT = "set-downtime-limit"   # value: ms (QEMU decides when to stop)
    SWITCHOVER = "switchover"                   # value: ms; raise the limit deliberately so QEMU stops now
    START_POSTCOPY = "start-postcopy"           # migrate-start-postcopy; value: background bytes/s cap (optional)
    AUTO_CONVERGE = "auto-converge"             # value: initial throttle %; enables the capability
    FORCE_COMPLETE = "force-complete"           # postcopy if enabled, else pause the guest (Nova semantics)
    ABORT = "abort"                             # migrate_cancel; the source keeps running


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    value: float | None = None
    reason: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        v = "" if self.value is None else f" {self.value:g}"
        return f"{self.kind.value}{v}: {self.reason}"


@dataclass(frozen=True)
class MigrationContext:
    """What a policy knows before the migration starts."""
    vm: str
    guest_ram_bytes: int
    postcopy_available: bool            # the postcopy-ram capability is on, on both sides
    dirty_rate_estimate: float | None = None   # bytes/s sampled before the start (calc-dirty-rate), if any
    link_bandwidth_hint: float | None = None   # bytes/s, only if the caller supplies one
    costs: MigrationCosts = field(default_factory=MigrationCosts)  # what earlier migrations learnt (the cluster's)
    contract: Contract = field(default_factory=Contract)   # the caller's downtime/time budgets
    plan: Plan | None = None            # the plan predicted before the start (policies that ask for one)

    @property
    def guest_mib(self) -> int:
        return self.guest_ram_bytes // 2**20


@dataclass(frozen=True)
class PolicySetup:
    """What a policy needs set before the migration starts (QEMU cannot change capabilities once
    it runs): capabilities on both sides, on the source only, and source parameters."""
    capabilities: tuple[str, ...] = ()
    source_capabilities: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """An executed (or attempted) action, as recorded in the result."""
    t: float
    passes: int
    policy: str
    action: str
    value: float | None
    reason: str
    inputs: dict[str, Any]
    error: str | None = None


class Policy(ABC):
    name: ClassVar[str]
    uses_postcopy: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        if params:
            raise MigrationInputError(
                f"policy {self.name!r} got unknown parameter(s) {sorted(params)}")
        self._ctx: MigrationContext | None = None

    @property
    def ctx(self) -> MigrationContext:
        """The context given to ``start`` (MigrationStateError before it)."""
        if self._ctx is None:
            raise MigrationStateError(f"policy {self.name!r} has not been started")
        return self._ctx

    @property
    def started(self) -> bool:
        return self._ctx is not None

    @property
    def initial_downtime_limit_ms(self) -> float:
        return 300.0

    #: the engine measures the guest and the link and predicts a plan before the start (ctx.plan)
    wants_plan: ClassVar[bool] = False

    def wants_postcopy(self, contract: Contract) -> bool:
        """Whether the postcopy-ram capability must be on for this migration (decided before the
        destination starts)."""
        return self.uses_postcopy

    def setup(self, ctx: MigrationContext) -> PolicySetup:
        """Capabilities and parameters to set before ``migrate``. Called before ``start``."""
        return PolicySetup()

    def start(self, ctx: MigrationContext) -> list[Action]:
        self._ctx = ctx
        return []

    @abstractmethod
    def observe(self, obs: Observation) -> list[Action]:
        """Decide on the latest observation; return the actions to execute now (maybe none)."""

    def predicted_downtime_ms(self, obs: Observation) -> float | None:
        """This policy's prediction of the downtime if the source stopped now (None if none)."""
        return None

    def params(self) -> dict[str, Any]:
        return {}
