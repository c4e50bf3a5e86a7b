"""The `hvsim` command. Each module in ``_SUBCOMMAND_MODULES`` exposes ``register(app)``."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="hvsim: emulated hypervisor lab on real QEMU")

_SUBCOMMAND_MODULES = [
    "hvsim.cli.core",
    "hvsim.cli.place",
    "hvsim.cli.shim",
    "hvsim.cli.migrate",
]


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="print tracebacks and full error details")) -> None:
    ctx.obj = {"debug": debug}


def _load() -> None:
    for mod in _SUBCOMMAND_MODULES:
        importlib.import_module(mod).register(app)


def main() -> None:
    _load()
    app()
