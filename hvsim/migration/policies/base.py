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
from typing import Any, Callable, ClassVar

from ..errors import MigrationInputError
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

    @property
    def initial_downtime_limit_ms(self) -> float:
        return 300.0

    def setup(self, ctx: MigrationContext) -> tuple[list[str], dict[str, Any]]:
        """Extra source capabilities and parameters to set before ``migrate`` (capabilities cannot
        change once the migration runs). Called before ``start``."""
        return [], {}

    def start(self, ctx: MigrationContext) -> list[Action]:
        self.ctx = ctx
        return []

    @abstractmethod
    def observe(self, obs: Observation) -> list[Action]:
        """Decide on the latest observation; return the actions to execute now (maybe none)."""

    def predicted_downtime_ms(self, obs: Observation) -> float | None:
        """This policy's prediction of the downtime if the source stopped now (None if none)."""
        return None

    def params(self) -> dict[str, Any]:
        return {}


_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_policy(name: str | Policy, **params: Any) -> Policy:
    """A policy instance by registered name (or pass an instance through)."""
    if isinstance(name, Policy):
        if params:
            raise MigrationInputError("policy parameters given with a policy instance")
        return name
    _load_builtin()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise MigrationInputError(f"unknown migration policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)


def _load_builtin() -> None:
    from . import predictive, qemu_default, stepwise  # noqa: F401  (they register themselves)
