"""Live migration between emulated hosts with pluggable switchover policies.

    from hvsim.migration import migrate, start_migration
    m = await migrate(vm, "h2", policy="hvsim-predictive", timeout=120)   # -> Migration
    print(m.result.summary())

    m = start_migration(vm, "h2", policy="stepwise")     # background
    async for p in m: print(p.passes, p.remaining, p.predicted_downtime_ms)
    m.cancel()                                           # the source keeps running

Split by concern: :mod:`.orchestrator` (phases, state, policy loop, rollback), :mod:`.transfer`
(how the bytes move: QEMU live migration today), :mod:`.measure` (results, guest-observed downtime,
cost learning), :mod:`.policies` (switchover policies and their registry), :mod:`.costs` (what the
cluster learnt), :mod:`.events` (progress and outcome on the cluster bus), :mod:`.components` (the
VM's user-level drivers moving with it) over :mod:`.statelink` (their state across the underlay).
"""
from .api import migrate, plan_migration, start_migration
from .components import ComponentMigration, UldBreakdown, UldError, UldHooks, UldMode, UldState, UldStateError
from .costs import LearnedCost, MigrationCosts, costs_of
from .errors import (DestinationStartError, IncompatibleMachinesError, MigrationAbortedError, MigrationCancelledError,
                     MigrationError, MigrationFailedError, MigrationInputError, MigrationPlanError,
                     MigrationRefusedError, MigrationStateError, MigrationTimeoutError, PostcopyPausedError)
from .events import MigrationEnded, MigrationProgress
from .measure import MigrationResult
from .orchestrator import Migration
from .planner import Contract, Measurement, Plan, Prediction
from .policies import (Action, ActionKind, Decision, MigrationContext, Policy, PolicySetup, make_policy,
                       policy_names)
from .progress import ProgressSnapshot
from .state import MigrationState
from .transfer import QemuLiveTransfer, TransferStrategy

__all__ = ["migrate", "start_migration", "plan_migration", "Contract", "Measurement", "Plan", "Prediction",
           "MigrationPlanError", "PostcopyPausedError", "Migration", "ProgressSnapshot", "MigrationResult",
           "MigrationState",
           "IncompatibleMachinesError", "MigrationError", "MigrationInputError", "MigrationRefusedError",
           "MigrationStateError",
           "DestinationStartError", "MigrationFailedError", "MigrationAbortedError", "MigrationTimeoutError",
           "MigrationCancelledError", "Policy", "PolicySetup", "Action", "ActionKind", "Decision",
           "MigrationContext", "make_policy", "policy_names", "MigrationCosts", "LearnedCost", "costs_of",
           "MigrationProgress", "MigrationEnded", "QemuLiveTransfer", "TransferStrategy", "ComponentMigration",
           "UldBreakdown", "UldError", "UldHooks", "UldMode", "UldState", "UldStateError"]
