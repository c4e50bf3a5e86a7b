"""`hvsim shim ...`: run the block-device shim standalone."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

shim_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        help="NBD block-device shim (swap tracking + prefetch cache)")


@shim_app.command("serve")
def serve(
    socket: Path = typer.Option(..., "--socket", help="unix socket to serve NBD on (its directory must be 0700)"),
    backing: Path = typer.Option(..., "--backing", help="backing file (created with --size if missing)"),
    size: Optional[int] = typer.Option(None, "--size", help="export size in bytes (default: backing file size)"),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="emulated datastore latency per request"),
    bandwidth_mib_s: Optional[float] = typer.Option(None, "--bandwidth-mib-s", help="emulated datastore bandwidth"),
    control: Optional[Path] = typer.Option(None, "--control", help="JSON control socket"),
    name: str = typer.Option("shim", "--name", help="export name (also served as the default export)"),
    prefetch_concurrency: int = typer.Option(4, "--prefetch-concurrency", help="parallel prefetch reads"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve BACKING over NBD on SOCKET until SIGTERM."""
    from .daemon import ShimConfig, main
    from .errors import ShimConfigError

    cfg = ShimConfig(socket=socket, backing=backing, size=size, latency_ms=latency_ms,
                     bandwidth_mib_s=bandwidth_mib_s, control=control, export_name=name,
                     prefetch_concurrency=prefetch_concurrency)
    try:
        code = main(cfg, verbose)
    except ShimConfigError as exc:
        typer.echo(f"hvsim shim: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


@shim_app.command("stats")
def stats(control: Path = typer.Option(..., "--control"), export: Optional[str] = typer.Option(None, "--export")) -> None:
    """Print the stats of a running shim as JSON."""
    import asyncio
    import json

    from .control import ShimControlClient

    typer.echo(json.dumps(asyncio.run(ShimControlClient(control).stats(export)), indent=2))


@shim_app.command("prefetch")
def prefetch(control: Path = typer.Option(..., "--control"), budget_bytes: int = typer.Option(..., "--budget-bytes"),
             wait: bool = typer.Option(False, "--wait"),
             skip_recent_pages: int = typer.Option(0, "--skip-recent-pages",
                                                   help="most recent writes the guest still holds (not fetched)")) -> None:
    """Ask a running shim to prefetch recorded swap pages within a byte budget."""
    import asyncio
    import json

    from .control import ShimControlClient

    typer.echo(json.dumps(asyncio.run(ShimControlClient(control).prefetch(budget_bytes, wait=wait,
                                                                              skip_recent_pages=skip_recent_pages)), indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(shim_app, name="shim")
