"""Lab scenarios run by `make lab` / `hvsim lab`. Each scenario is a module exposing
``async def run(console: rich.console.Console, out_dir: Path) -> None``."""
from __future__ import annotations

import asyncio
import importlib
import sys
import time
from pathlib import Path

from rich.console import Console

# In order; modules that are absent in this tree are skipped with a note.
SCENARIOS = ["foundation", "migration", "swap_prefetch", "placement"]


async def run_all(only: list[str] | None = None, out_dir: Path = Path("lab-results")) -> int:
    # a pipe or CI log has no width: use one wide enough that the result tables are not truncated
    console = Console() if sys.stdout.isatty() else Console(width=150)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        except Exception:
            failures += 1
            console.print_exception(max_frames=8)
        console.print(f"[dim]{name}: {time.monotonic() - t0:.1f}s[/dim]")
    return failures


def main(only: list[str] | None = None) -> int:
    return asyncio.run(run_all(only))
