"""`hvsim place PROBLEM.json [--explain] [--solver cpsat|greedy] [--json]`.

Exit codes: 0 placed, 1 no placement (infeasible, unknown within the time limit, or greedy
failed), 2 bad problem file (the message names the offending field).
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from ..placement.cpsat import SolverOptions
from ..placement.model import ProblemError
from ..placement.schema import load_problem
from ..placement.solver import SOLVERS, solve


def place(problem: Path = typer.Argument(..., help="problem JSON (schema: docs/placement.md)"),
          explain: bool = typer.Option(False, "--explain", help="on refusal, find the minimal conflicting rule "
                                                                "set; when placed, list the preferred rules paid for"),
          solver: str = typer.Option("cpsat", "--solver", help="cpsat (exact) or greedy (one VM at a time)"),
          as_json: bool = typer.Option(False, "--json", help="print the result document as JSON"),
          time_limit: float = typer.Option(10.0, "--time-limit", help="solver time limit, seconds"),
          seed: int = typer.Option(0, "--seed"),
          workers: int = typer.Option(2, "--workers", help="CP-SAT workers for big models")) -> None:
    """Place the groups of PROBLEM.json on its hosts under its rules."""
    if solver not in SOLVERS:
        typer.echo(f"error: --solver must be one of {', '.join(SOLVERS)}", err=True)
        raise typer.Exit(2)
    try:
        p = load_problem(problem)
    except ProblemError as exc:
        typer.echo(f"error: {problem}:", err=True)
        for where, msg in exc.errors:
            typer.echo(f"  {where}: {msg}" if where else f"  {msg}", err=True)
        raise typer.Exit(2)
    res = solve(p, solver, explain=explain, options=SolverOptions(time_limit, seed, workers))
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
    else:
        _print(p, res, explain)
    raise typer.Exit(0 if res.ok else 1)


def _print(p, res, explain: bool) -> None:
    head = f"{res.status} ({res.solver}, {res.solve_s:.2f} s"
    head += f", gap {res.gap:.2%})" if res.gap is not None else ")"
    typer.echo(head)
    if res.ok:
        by_host: dict[str, list[str]] = {}
        for vm, h in res.assignment.items():
            by_host.setdefault(h, []).append(vm)
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
