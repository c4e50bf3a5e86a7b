"""`hvsim cleanup`: reclaim what dead earlier runs left (namespaces, records, run dirs, processes)
and say what was removed. Exit 0, or 1 if something could not be removed."""
from __future__ import annotations

import asyncio
import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from ..network.reclaim import ReclaimReport, reclaim_stale
from .common import EXIT_FAILED, cli_command


def report_table(report: ReclaimReport) -> Table:
    t = Table(title=f"reclaimed: {report.summary()}")
    for col in ("status", "kind", "name", "dead owner pid", "detail"):
        t.add_column(col)
    for status, items in (("removed", report.removed), ("FAILED", report.failed), ("left alone", report.skipped)):
        for r in items:
            t.add_row(status, r.kind, r.name, "-" if r.owner_pid is None else str(r.owner_pid), r.detail)
    return t


@cli_command
def cleanup(as_json: bool = typer.Option(False, "--json", help="print the report as JSON")) -> None:
    """Remove what dead earlier hvsim runs left behind (only if their owner process is really dead)."""
    report = asyncio.run(reclaim_stale())
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif report.removed or report.failed or report.skipped:
        Console(width=None if sys.stdout.isatty() else 150).print(report_table(report))
    else:
        typer.echo("nothing to clean up")
    if report.failed:
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    app.command("cleanup")(cleanup)
