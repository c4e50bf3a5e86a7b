"""`hvsim shim ...`: run the block-device shim standalone, and talk to a running one.

Exit codes: ``serve``: 0 after a clean stop, 2 for a bad option (nothing created), 1 when serving
failed; ``stats``/``prefetch``: 0, 1 when the shim is unreachable or refuses, 2 for a bad option."""
from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any, Optional

import typer

from .common import cli_command, fail, one_line

shim_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                       help="NBD block-device shim (swap tracking + prefetch cache)")

MAX_BUDGET_BYTES = 1 << 50


@shim_app.command("serve", add_help_option=False,
                  context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@cli_command
def serve(ctx: typer.Context) -> None:
    """Serve BACKING over NBD on SOCKET until SIGTERM (options: hvsim shim serve --help)."""
    from ..drivers.shim.entry import run_cli

    raise typer.Exit(run_cli(["serve", *ctx.args], prog="hvsim shim"))


def _control_client(control: Path) -> Any:
    """A client for the control socket at ``control`` (a refused operation, exit 1, if nothing is there)."""
    from ..drivers.shim.control import ShimControlClient

    where = one_line(str(control))
    try:
        mode = control.stat().st_mode
    except (OSError, ValueError) as exc:       # ValueError: a NUL in the path
        raise fail(f"no shim control socket at {where}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise fail(f"{where} is not a socket (expected a shim's --control socket)")
    return ShimControlClient(control)


@shim_app.command("stats")
@cli_command
def stats(control: Path = typer.Option(..., "--control", help="the shim's control socket"),
          export: Optional[str] = typer.Option(None, "--export")) -> None:
    """Print the stats of a running shim as JSON."""
    client = _control_client(control)
    typer.echo(json.dumps(asyncio.run(client.stats(export)), indent=2))


@shim_app.command("prefetch")
@cli_command
def prefetch(control: Path = typer.Option(..., "--control", help="the shim's control socket"),
             budget_bytes: int = typer.Option(..., "--budget-bytes", help="bytes of host memory the cache may use"),
             wait: bool = typer.Option(False, "--wait"),
             skip_recent_pages: int = typer.Option(0, "--skip-recent-pages",
                                                   help="most recent writes the guest still holds (not fetched)")) \
        -> None:
    """Ask a running shim to prefetch recorded swap pages within a byte budget."""
    if not 0 <= budget_bytes <= MAX_BUDGET_BYTES:
        raise typer.BadParameter(f"must be 0..{MAX_BUDGET_BYTES}, got {budget_bytes}", param_hint="--budget-bytes")
    if not 0 <= skip_recent_pages <= MAX_BUDGET_BYTES // 4096:
        raise typer.BadParameter(f"must be 0..{MAX_BUDGET_BYTES // 4096}, got {skip_recent_pages}",
                                 param_hint="--skip-recent-pages")
    client = _control_client(control)
    answer = asyncio.run(client.prefetch(budget_bytes, wait=wait, skip_recent_pages=skip_recent_pages))
    typer.echo(json.dumps(answer, indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(shim_app, name="shim")
