"""The `hvsim` command. Subsystems register their own sub-commands via `register(app)`."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="hvsim: emulated hypervisor lab on real QEMU")

# Each module listed here exposes `register(app: typer.Typer) -> None`.
_SUBCOMMAND_MODULES = [
    "hvsim.cli_core",
    "hvsim.placement.cli",
    "hvsim.shim.cli",
    "hvsim.migration.cli",
]


def _load() -> None:
    for mod in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # subsystem not present in this tree
                continue
            raise
        module.register(app)


def main() -> None:
    _load()
    app()
