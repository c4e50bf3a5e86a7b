"""What a placement solve returns (:class:`PlacementResult`, :class:`Explanation`) and the refusal
that carries one (:class:`PlacementRefused`). Kept apart from solver.py so that errors, schema and the
checker never need the solver: the package has no import cycle (tests/unit/test_import_cycles.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .check import CheckReport
from .errors import PlacementError
from .greedy import HostReport


@dataclass
class Explanation:
    core: list[str] | None          # rule names; None when the solver could not name one in time
    minimal: bool                    # dropping any one rule of the core makes the problem feasible
    solve_s: float
    hosts: list[HostReport] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)  # core rule -> what it says
    limit_reached: bool = False      # the time limit cut the search for a core (or the replay) short

    def text(self) -> str:
        lines = list(self.messages)
        if self.core:
            lines.append(f"conflicting rules ({'minimal' if self.minimal else 'not proven minimal'}):")
            lines += [f"  - {n}: {self.details.get(n, '')}" for n in self.core]
        for hr in self.hosts:
            lines.append(f"{hr.vm} ({hr.group}): {hr.text}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"core": self.core, "minimal": self.minimal, "solve_s": round(self.solve_s, 4),
                "details": dict(self.details), "hosts": [h.to_dict() for h in self.hosts],
                "messages": list(self.messages), "limit_reached": self.limit_reached}


@dataclass
class PlacementResult:
    status: str                      # optimal | feasible | infeasible | unknown | failed
    solver: str
    assignment: dict[str, str] = field(default_factory=dict)
    solve_s: float = 0.0
    gap: float | None = None
    objective: dict[str, int] = field(default_factory=dict)
    check: CheckReport | None = None
    explanation: Explanation | None = None
    message: str = ""
    gaps: dict[str, float] = field(default_factory=dict)  # per solver stage (see docs/placement.md)
    limit_reached: bool = False      # a stage stopped at the time limit: optimum not proven / nothing found
    time_limit_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("optimal", "feasible")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "solver": self.solver, "solve_s": round(self.solve_s, 4),
                "time_limit_s": self.time_limit_s, "limit_reached": self.limit_reached, "gap": self.gap,
                "gaps": dict(self.gaps),
                "objective": dict(self.objective), "message": self.message,
                "assignment": dict(sorted(self.assignment.items())),
                "check": self.check.to_dict() if self.check else None,
                "explanation": self.explanation.to_dict() if self.explanation else None}


class PlacementRefused(PlacementError):
    """Raised by ``place_group(..., raise_on_refusal=True)``; ``result`` says why."""

    def __init__(self, result: PlacementResult) -> None:
        self.result = result
        super().__init__(result.message or result.status)
