"""`hvsim shim ...`: run the block-device shim standalone."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

shim_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        help="NBD block-device shim (swap tracking + prefetch cache)")


@shim_app.command("serve", add_help_option=False,
                  context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Serve BACKING over NBD on SOCKET until SIGTERM (options: hvsim shim serve --help)."""
    from ..drivers.shim.entry import run_cli

    raise typer.Exit(run_cli(["serve", *ctx.args], prog="hvsim shim"))


@shim_app.command("stats")
def stats(control: Path = typer.Option(..., "--control"), export: Optional[str] = typer.Option(None, "--export")) -> None:
    """Print the stats of a running shim as JSON."""
    import asyncio
    import json

    from ..drivers.shim.control import ShimControlClient

    typer.echo(json.dumps(asyncio.run(ShimControlClient(control).stats(export)), indent=2))


@shim_app.command("prefetch")
def prefetch(control: Path = typer.Option(..., "--control"), budget_bytes: int = typer.Option(..., "--budget-bytes"),
             wait: bool = typer.Option(False, "--wait"),
             skip_recent_pages: int = typer.Option(0, "--skip-recent-pages",
                                                   help="most recent writes the guest still holds (not fetched)")) -> None:
    """Ask a running shim to prefetch recorded swap pages within a byte budget."""
    import asyncio
    import json

    from ..drivers.shim.control import ShimControlClient

    typer.echo(json.dumps(asyncio.run(ShimControlClient(control).prefetch(budget_bytes, wait=wait,
                                                                              skip_recent_pages=skip_recent_pages)), indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(shim_app, name="shim")
