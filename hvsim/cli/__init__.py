"""The `hvsim` command. Each module in ``_SUBCOMMAND_MODULES`` exposes ``register(app)``.

A command line loads only the modules of its top-level command (``_COMMAND_MODULES``): ``hvsim shim
serve`` does not import the placement solver (ortools, pandas) or the cross-cloud orchestrator, which
took it from about 0.8 s to 3.5 s of start-up. ``hvsim``, ``hvsim --help`` and unknown commands load
them all, so the help and the "no such command" error list every command.

Errors and exit codes: see :mod:`hvsim.cli.common` (and the README's CLI section). Usage errors
(an unknown option, a value of the wrong type) are one line too, exit 2.
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from typing import Any, Optional

import typer

from .common import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ClickException, NoArgsIsHelpError,
                     UsageError, one_line)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="hvsim: emulated hypervisor lab on real QEMU")

_SUBCOMMAND_MODULES = [
    "hvsim.cli.core",
    "hvsim.cli.place",
    "hvsim.cli.shim",
    "hvsim.cli.migrate",
    "hvsim.cli.crosscloud",
    "hvsim.cli.failover",
    "hvsim.cli.cleanup",
]
#: top-level command -> the modules that register it (``vm migrate`` comes from hvsim.cli.migrate)
_COMMAND_MODULES = {
    "images": ("hvsim.cli.core",),
    "lab": ("hvsim.cli.core",),
    "vm": ("hvsim.cli.core", "hvsim.cli.migrate"),
    "place": ("hvsim.cli.place",),
    "shim": ("hvsim.cli.shim",),
    "crosscloud": ("hvsim.cli.crosscloud",),
    "cleanup": ("hvsim.cli.cleanup",),
}
_registered: set[str] = set()


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="print tracebacks and full error details"),
          manager: Optional[str] = typer.Option(None, "--manager", metavar="ADDR",
                                                help="run against a manager: `hvsim --manager ADDR --help`")) \
        -> None:
    ctx.obj = {"debug": debug}
    # --debug logs everything; otherwise only hvsim's own errors (one line each), not those of the
    # libraries under it (qemu.qmp logs a failed QEMU start that hvsim reports itself)
    logging.basicConfig(level=logging.DEBUG if debug else logging.CRITICAL, stream=sys.stderr, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s" if debug
                        else "hvsim: %(levelname)s: %(message)s")
    logging.getLogger("hvsim").setLevel(logging.DEBUG if debug else logging.ERROR)


def _command_word(argv: Sequence[str]) -> str | None:
    """The top-level command of ``argv`` (the root's only own option before it is the flag ``--debug``)."""
    for a in argv:
        if not a.startswith("-"):
            return a
        if a != "--debug":
            return None          # --help, or an option the root does not have: load everything
    return None


def _load(argv: Sequence[str] | None = None) -> None:
    """Register the subcommands ``argv`` needs (all of them without ``argv`` or for an unknown command)."""
    word = _command_word(argv) if argv is not None else None
    for mod in _COMMAND_MODULES.get(word or "", _SUBCOMMAND_MODULES):
        if mod not in _registered:
            importlib.import_module(mod).register(app)
            _registered.add(mod)


def _usage_line(exc: Any) -> str:
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "hvsim"
    return f"hvsim: error: {one_line(exc.format_message())} (see '{where} --help')"


#: commands that are whole processes of the control plane (their own argparse: ``hvsim manager --help``)
PROCESSES = {"manager": "hvsim.control.api", "host-agent": "hvsim.control.agent_app",
             "failover-controller": "hvsim.failover.controller"}
#: command groups that exist only against a manager
MANAGER_ONLY = {"host", "op", "reservation", "ha"}


def _wants_manager(argv: Sequence[str]) -> bool:
    """``hvsim [--debug] --manager ADDR ...`` or ``hvsim host|op ...`` run the CLI against a manager
    (:mod:`hvsim.cli.manager`); ``$HVSIM_MANAGER`` alone does not change what ``hvsim vm ...`` means."""
    for a in argv:
        if a == "--manager" or a.startswith("--manager="):
            return True
        if not a.startswith("-"):
            return a in MANAGER_ONLY
    return False


def run(argv: Sequence[str], prog: str = "hvsim") -> int:
    """Run the command line ``argv`` (without the program name); return the exit code."""
    argv = list(argv)
    if argv and argv[0] in PROCESSES:
        rc: int = importlib.import_module(PROCESSES[argv[0]]).main(argv[1:], prog=f"{prog} {argv[0]}")
        return rc
    if _wants_manager(argv):
        from .manager import app as target
    else:
        _load(argv)
        target = app
    return _run(target, argv, prog)


def _run(target: typer.Typer, argv: list[str], prog: str) -> int:
    try:
        rv = target(argv, prog_name=prog, standalone_mode=False)
    except UsageError as exc:
        if NoArgsIsHelpError is not None and isinstance(exc, NoArgsIsHelpError):   # `hvsim vm`: the help
            exc.show()  # type: ignore[attr-defined]
        else:
            print(_usage_line(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ClickException as exc:
        print(f"hvsim: error: {one_line(exc.format_message())}", file=sys.stderr)  # type: ignore[attr-defined]
        return int(exc.exit_code)  # type: ignore[attr-defined]
    except (typer.Abort, KeyboardInterrupt):
        print("hvsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(rv, int) and not isinstance(rv, bool):
        return rv
    return EXIT_OK if rv is None else EXIT_FAILED


def main() -> None:
    sys.exit(run(sys.argv[1:]))
