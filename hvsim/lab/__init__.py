"""Lab scenarios run by `make lab` / `hvsim lab`. Each scenario is a module exposing
``async def run(console: rich.console.Console, out_dir: Path) -> None``."""
from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import time
from pathlib import Path

from rich.console import Console

from hvbase.errors import HvsimError, InputError
from hvsim.network.reclaim import reclaim_stale

log = logging.getLogger("hvsim.lab")

# In order; modules that are absent in this tree are skipped with a note.
SCENARIOS = ["foundation", "migration", "swap_prefetch", "multiprocess", "placement", "network", "control_plane",
             "crosscloud", "failover"]


class UnknownScenarioError(InputError):
    """``--only`` named a scenario that does not exist."""


def check_scenarios(only: list[str] | None) -> None:
    unknown = sorted(set(only or ()) - set(SCENARIOS))
    if unknown:
        raise UnknownScenarioError(f"unknown lab scenario(s) {', '.join(map(repr, unknown))}; the scenarios are: "
                                   f"{', '.join(SCENARIOS)}")


async def run_all(only: list[str] | None = None, out_dir: Path = Path("lab-results")) -> int:
    """Run the scenarios (all, or those in ``only``); returns how many failed. A scenario failing with
    an expected error (an HvsimError) is reported in one line; anything else (a bug) with a traceback.
    What dead earlier runs left behind is reclaimed first."""
    check_scenarios(only)
    # a pipe or CI log has no width: use one wide enough that the result tables are not truncated
    console = Console() if sys.stdout.isatty() else Console(width=150)
    report = await reclaim_stale()
    if report.removed or report.failed:
        console.print(f"[dim]reclaimed leftovers of dead runs: {report.summary()}[/dim]")
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    failures = 0
    for name in SCENARIOS:
        if only and name not in only:
            continue
        try:
            mod = importlib.import_module(f"hvsim.lab.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hvsim.lab.{name}":
                continue
            raise
        console.rule(f"[bold]lab: {name}")
        t0 = time.monotonic()
        try:
            await mod.run(console, out_dir)
        except HvsimError as exc:
            failures += 1
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            console.print(f"[red]lab: {name} failed:[/red] {first}")
            log.debug("lab %s failed", name, exc_info=True)
        except Exception:
            failures += 1
            console.print_exception(max_frames=8)
        console.print(f"[dim]{name}: {time.monotonic() - t0:.1f}s[/dim]")
    return failures


def main(only: list[str] | None = None) -> int:
    return asyncio.run(run_all(only))
