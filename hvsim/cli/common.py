"""How every ``hvsim`` command reports an expected error: one line naming the problem on stderr and a
documented exit code; only a bug prints a traceback (and ``hvsim --debug ...`` prints it for any error).

Exit codes (documented in the README):

====  ===========================================================================================
0     success
1     a refused or failed operation (any ``HvsimError``: capacity, timeout, unreachable daemon, ...)
2     bad input (``InputError``: a field, option or argument; also typer/click usage errors)
130   interrupted (Ctrl-C)
====  ===========================================================================================

Wrap every command function with :func:`cli_command`.
"""
from __future__ import annotations

import functools
import importlib
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from hvbase.errors import HvsimError, InputError

# The click that typer runs on: recent typer vendors its own copy (``typer._click``), older typer uses
# the ``click`` package. Found through a public typer class, so either works.
_click_exceptions: Any = importlib.import_module(typer.BadParameter.__module__)
_click_globals: Any = importlib.import_module(typer.BadParameter.__module__.rsplit(".", 1)[0] + ".globals")
UsageError: type[Exception] = _click_exceptions.UsageError
ClickException: type[Exception] = _click_exceptions.ClickException
NoArgsIsHelpError: type[Exception] | None = getattr(_click_exceptions, "NoArgsIsHelpError", None)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    ctx = _click_globals.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def one_line(text: str) -> str:
    """``text`` as one printable line: control characters (line breaks, terminal escapes) that came
    with user input are shown escaped instead of acting on the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print ``hvsim: error: MESSAGE`` (its first line) on stderr; return the Exit to raise."""
    first, _, rest = message.strip().partition("\n")
    print(f"hvsim: error: {one_line(first)}", file=sys.stderr)
    if rest and debug_enabled():
        print(rest, file=sys.stderr)
    return typer.Exit(code)


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, InputError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def cli_command(fn: F) -> F:
    """Turn expected errors of ``fn`` into one line + exit code (see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, UsageError):
            raise
        except KeyboardInterrupt:
            print("hvsim: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except HvsimError as exc:
            if debug_enabled():
                traceback.print_exc()
            raise fail(str(exc), exit_code_for(exc)) from exc
    return wrapper  # type: ignore[return-value]
