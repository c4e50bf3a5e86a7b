"""Placement: domains, resource groups, rules, an exact CP-SAT solver, a greedy baseline, an
independent checker, explanations of refusals and an async controller. See docs/placement.md."""
from .check import CheckReport, check
from .controller import PlacementController, PlacementRefused
from .cpsat import SolverOptions
from .model import (Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity, Group, Host, MaxPerDomain,
                    MovePolicy, Objective, Problem, ProblemError, ReserveAmount, ReserveHosts, Rule,
                    RuleConflictError, Spread, VM)
from .schema import dump_problem, dump_result, load_problem, problem_from_dict, problem_to_dict, rule_from_dict
from .solver import Explanation, PlacementResult, explain_infeasible, solve, solve_async

__all__ = [
    "Affinity", "AntiAffinity", "CheckReport", "DomainAffinity", "DomainAntiAffinity", "Explanation", "Group",
    "Host", "MaxPerDomain", "MovePolicy", "Objective", "PlacementController", "PlacementRefused",
    "PlacementResult", "Problem", "ProblemError", "ReserveAmount", "ReserveHosts", "Rule", "RuleConflictError",
    "SolverOptions", "Spread", "VM", "check", "dump_problem", "dump_result", "explain_infeasible",
    "load_problem", "problem_from_dict", "problem_to_dict", "rule_from_dict", "solve", "solve_async",
]
