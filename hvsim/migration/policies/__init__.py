"""Switchover policies: small named units with no QEMU inside (see :mod:`.base`). The registry is
this package's, fixed at import: the built-in policies by name. A caller's own policy is passed as
an instance (``start_migration(vm, dest, policy=MyPolicy())``)."""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import MigrationInputError
from .base import Action, ActionKind, Decision, MigrationContext, Policy, PolicySetup
from .predictive import Predictive
from .qemu_default import QemuDefault
from .stepwise import Stepwise

POLICIES: Mapping[str, type[Policy]] = MappingProxyType({p.name: p for p in (QemuDefault, Stepwise, Predictive)})


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str | Policy, **params: Any) -> Policy:
    """A policy instance by registered name (or pass an instance through)."""
    if isinstance(name, Policy):
        if params:
            raise MigrationInputError("policy parameters given with a policy instance")
        return name
    if not isinstance(name, str) or name not in POLICIES:
        raise MigrationInputError(f"unknown migration policy {name!r}; known: {', '.join(policy_names())}")
    return POLICIES[name](**params)


__all__ = ["POLICIES", "policy_names", "make_policy", "Action", "ActionKind", "Decision", "MigrationContext",
           "Policy", "PolicySetup", "Predictive", "QemuDefault", "Stepwise"]
