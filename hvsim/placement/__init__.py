"""Placement: domains, resource groups, rules, an exact CP-SAT solver, a greedy baseline, an
independent checker, explanations of refusals and an async controller. See docs/placement.md.
Limits on problem size and numeric ranges: ``hvsim.placement.limits``; errors:
``hvsim.placement.errors``.

The solver side (``controller``, ``cpsat``, ``solver``) is imported on first use of one of
its names here: importing ``hvsim.placement.schema`` (what the control plane's records need) does not
pull in ortools and pandas, about 1.5 s of every host agent's and manager's start-up."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import limits
from .check import CheckReport, check          # (eager: the name would otherwise be shadowed by the submodule)
from .errors import PlacementError, ProblemError, ProblemTooLargeError, RuleConflictError
from .model import (VM, Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity, Group, Host, MaxPerDomain,
                    MovePolicy, Objective, Problem, ReserveAmount, ReserveHosts, Rule, Spread)
from .result import Explanation, PlacementRefused, PlacementResult
from .schema import dump_problem, dump_result, load_problem, problem_from_dict, problem_to_dict, rule_from_dict

if TYPE_CHECKING:
    from .controller import PlacementController
    from .cpsat import SolverOptions
    from .solver import explain_infeasible, solve, solve_async

#: name -> the submodule that defines it, imported on first access (PEP 562)
_LAZY = {"PlacementController": ".controller",
         "SolverOptions": ".cpsat",
         "explain_infeasible": ".solver", "solve": ".solver", "solve_async": ".solver"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Affinity", "AntiAffinity", "CheckReport", "DomainAffinity", "DomainAntiAffinity", "Explanation", "Group",
    "Host", "MaxPerDomain", "MovePolicy", "Objective", "PlacementController", "PlacementError", "PlacementRefused",
    "PlacementResult", "Problem", "ProblemError", "ProblemTooLargeError", "ReserveAmount", "ReserveHosts", "Rule",
    "RuleConflictError", "SolverOptions", "Spread", "VM", "check", "dump_problem", "dump_result",
    "explain_infeasible", "limits", "load_problem", "problem_from_dict", "problem_to_dict", "rule_from_dict", "solve",
    "solve_async",
]
