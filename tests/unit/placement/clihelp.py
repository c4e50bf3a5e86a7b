"""Running `hvsim place`: in process (typer's runner, with a root that takes --debug like the real
`hvsim`), or as a real subprocess whose peak RSS is measured."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import typer
from typer.testing import CliRunner

from hvsim.cli import place as cli


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str
    maxrss_mib: float = 0.0

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    cli.register(app)

    @app.callback()
    def _root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug")) -> None:  # like hvsim.cli
        ctx.obj = {"debug": debug}

    return app


def place(*args: object, debug: bool = False) -> Run:
    """`hvsim [--debug] place ARGS...` in this process."""
    argv = (["--debug"] if debug else []) + ["place", *map(str, args)]
    r = CliRunner().invoke(_app(), argv)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback: the test fails with it
    return Run(r.exit_code, r.stdout, r.stderr)


# A small process starts `hvsim` and reports its peak RSS: measured on a child of the big test
# process itself, ru_maxrss would count the test process's pages the child held between fork and exec.
_MEASURE = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:], stdin=subprocess.DEVNULL)
with open(sys.argv[1], "w") as f:
    f.write(f"{rc} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def place_subprocess(*args: object) -> Run:
    """`hvsim place ARGS...` as a child process; ``maxrss_mib`` is that child's peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "rusage"
        with open(Path(d) / "out", "w+b") as out, open(Path(d) / "err", "w+b") as err:
            p = subprocess.Popen([sys.executable, "-c", _MEASURE, str(res), sys.executable, "-c",
                                  "from hvsim.cli import main; main()", "place", *map(str, args)],
                                 stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                p.wait()
            except BaseException:  # (a test timeout): never leave the children behind
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise
            out.seek(0)
            err.seek(0)
            rc, rss_kib = res.read_text().split()
            return Run(int(rc), out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                       int(rss_kib) / 1024)
