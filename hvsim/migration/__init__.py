"""Live migration between emulated hosts with pluggable switchover policies (issue 3).

    m = await vm.migrate("h2", policy="hvsim-predictive", timeout=120)   # -> Migration
    print(m.result.summary())

    m = vm.start_migration("h2", policy="stepwise")     # background
    async for p in m: print(p.passes, p.remaining, p.predicted_downtime_ms)
    m.cancel()                                           # the source keeps running
"""
from .api import migrate, start_migration
from .engine import Migration, ProgressSnapshot
from .errors import (DestinationStartError, MigrationAbortedError, MigrationCancelledError, MigrationError,
                     MigrationFailedError, MigrationInputError, MigrationRefusedError, MigrationStateError,
                     MigrationTimeoutError)
from .measure import MigrationResult
from .policies.base import Action, ActionKind, Decision, MigrationContext, Policy, make_policy, policy_names
from .state import MigrationState

__all__ = ["migrate", "start_migration", "Migration", "ProgressSnapshot", "MigrationResult", "MigrationState",
           "MigrationError", "MigrationInputError", "MigrationRefusedError", "MigrationStateError",
           "DestinationStartError", "MigrationFailedError", "MigrationAbortedError", "MigrationTimeoutError",
           "MigrationCancelledError", "Policy", "Action", "ActionKind", "Decision", "MigrationContext",
           "make_policy", "policy_names"]
