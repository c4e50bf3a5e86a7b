"""`hvsim place PROBLEM.json [--explain] [--solver cpsat|greedy] [--json] [--time-limit S] [--seed N] [--workers N]`.

Exit codes: 0 placed; 1 no placement (infeasible, unknown within the time limit, or greedy
failed); 2 bad input: the problem file (one line naming the offending field, ``hvsim --debug
place ...`` lists every problem) or an option. The time limit covers reading, validating,
solving, the independent check and the explanation (docs/placement.md, "Limits").
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import typer

from hvbase.errors import InputError

from ..placement import limits
from ..placement.cpsat import SolverOptions
from ..placement.errors import ProblemError
from ..placement.model import Problem
from ..placement.schema import load_problem
from ..placement.result import PlacementResult
from ..placement.solver import SOLVERS, solve
from .common import cli_command


def _options(solver: str, time_limit: float, seed: int, workers: int) -> SolverOptions:
    if solver not in SOLVERS:
        raise InputError(f"--solver: must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if not math.isfinite(time_limit) or not limits.MIN_TIME_LIMIT_S <= time_limit <= limits.MAX_TIME_LIMIT_S:
        raise InputError(f"--time-limit: must be a number of seconds in {limits.MIN_TIME_LIMIT_S:g}.."
                         f"{limits.MAX_TIME_LIMIT_S:g}, got {time_limit:g}")
    if not 0 <= seed <= limits.MAX_SEED:
        raise InputError(f"--seed: must be an integer in 0..{limits.MAX_SEED}, got {str(seed)[:40]}")
    if not 1 <= workers <= limits.MAX_WORKERS:
        raise InputError(f"--workers: must be an integer in 1..{limits.MAX_WORKERS}, got {str(workers)[:40]}")
    return SolverOptions(time_limit, seed, workers)


@cli_command
def place(problem: Path = typer.Argument(..., help="problem JSON (schema: docs/placement.md)"),
          explain: bool = typer.Option(False, "--explain", help="on refusal, find the minimal conflicting rule "
                                                                "set; when placed, list the preferred rules paid for"),
          solver: str = typer.Option("cpsat", "--solver", help="cpsat (exact) or greedy (one VM at a time)"),
          as_json: bool = typer.Option(False, "--json", help="print the result document as JSON"),
          time_limit: float = typer.Option(10.0, "--time-limit",
                                           help=f"seconds for everything: reading, solving, checking, explaining "
                                                f"({limits.MIN_TIME_LIMIT_S:g}..{limits.MAX_TIME_LIMIT_S:g})"),
          seed: int = typer.Option(0, "--seed", help=f"CP-SAT random seed (0..{limits.MAX_SEED})"),
          workers: int = typer.Option(2, "--workers",
                                      help=f"CP-SAT workers for big models (1..{limits.MAX_WORKERS})")) -> None:
    """Place the groups of PROBLEM.json on its hosts under its rules."""
    started = time.perf_counter()
    opts = _options(solver, time_limit, seed, workers)
    try:
        p = load_problem(problem)
    except ProblemError as exc:
        exc.set_source(str(problem))
        raise
    res = solve(p, solver, explain=explain, options=opts, started=started)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
    else:
        _print(p, res, explain)
    raise typer.Exit(0 if res.ok else 1)


def _print(p: Problem, res: PlacementResult, explain: bool) -> None:
    head = f"{res.status} ({res.solver}, {res.solve_s:.2f} s"
    head += f", gap {res.gap:.2%}" if res.gap is not None else ""
    head += f", stopped at the {res.time_limit_s:g} s limit)" if res.limit_reached else ")"
    typer.echo(head)
    if res.ok:
        by_host: dict[str, list[str]] = {}
        for vm, host in res.assignment.items():
            by_host.setdefault(host, []).append(vm)
        for h in p.hosts:
            if h.name in by_host:
                typer.echo(f"  {h.name}: {' '.join(sorted(by_host[h.name]))}")
        typer.echo("  " + ", ".join(f"{k} {v}" for k, v in res.objective.items()))
        if res.check:
            typer.echo(f"  check: {res.check.required_violations} required violations, "
                       f"preferred penalty {res.check.preferred_penalty}")
            if explain:
                for r in res.check.rules:
                    if r.penalty:
                        typer.echo(f"    {r.name} ({r.kind}): {r.violations} violations x weight = {r.penalty}")
    else:
        if res.message:
            typer.echo(f"  {res.message}")
        if res.explanation:
            for line in res.explanation.text().splitlines():
                typer.echo(f"  {line}")


def register(app: typer.Typer) -> None:
    app.command("place")(place)
