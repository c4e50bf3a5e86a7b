"""Placement: domains, resource groups, rules, an exact CP-SAT solver, a greedy baseline, an
independent checker, explanations of refusals and an async controller. See docs/placement.md.
Limits on problem size and numeric ranges: ``hvsim.placement.limits``; errors:
``hvsim.placement.errors``."""
from . import limits
from .check import CheckReport, check
from .controller import PlacementController
from .cpsat import SolverOptions
from .errors import PlacementError, ProblemError, ProblemTooLargeError, RuleConflictError
from .model import (VM, Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity, Group, Host, MaxPerDomain,
                    MovePolicy, Objective, Problem, ReserveAmount, ReserveHosts, Rule, Spread)
from .schema import dump_problem, dump_result, load_problem, problem_from_dict, problem_to_dict, rule_from_dict
from .result import Explanation, PlacementRefused, PlacementResult
from .solver import explain_infeasible, solve, solve_async

__all__ = [
    "Affinity", "AntiAffinity", "CheckReport", "DomainAffinity", "DomainAntiAffinity", "Explanation", "Group",
    "Host", "MaxPerDomain", "MovePolicy", "Objective", "PlacementController", "PlacementError", "PlacementRefused",
    "PlacementResult", "Problem", "ProblemError", "ProblemTooLargeError", "ReserveAmount", "ReserveHosts", "Rule",
    "RuleConflictError", "SolverOptions", "Spread", "VM", "check", "dump_problem", "dump_result",
    "explain_infeasible", "limits", "load_problem", "problem_from_dict", "problem_to_dict", "rule_from_dict", "solve",
    "solve_async",
]
