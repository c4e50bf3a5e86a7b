"""`hvsim crosscloud migrate`: bad input is one line, exit 2, before anything starts."""
from __future__ import annotations

import contextlib
import io

import pytest

from hvsim.cli import run
from hvsim.cli.common import EXIT_BAD_INPUT


@pytest.mark.parametrize(("argv", "needle"), [
    (["--budget", "0"], "--budget must be in"),
    (["--budget", "nan"], "--budget"),
    (["--rate", "-1"], "--rate must be in"),
    (["--wan-mbit", "0"], "--wan-mbit"),
    (["--disk-mib", "8"], "--disk-mib"),
    (["--disk-mib", "64", "--prefill-mib", "60"], "--prefill-mib"),
    (["--writer-kib", "abc"], "--writer-kib"),
])
def test_bad_options_are_refused_in_one_line(argv: list[str], needle: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(["crosscloud", "migrate", *argv])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and needle in lines[0], err.getvalue()
