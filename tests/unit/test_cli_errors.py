"""Every `hvsim` command reports an expected error as one line on stderr with a documented exit code
(2 bad input, 1 refused or failed), never a traceback, and creates nothing (issue 9).

These run the real command line in-process (``hvsim.cli.run``) with the guest images pointed at a
missing directory, so a command whose options are all valid stops at that check (exit 1) before it
would create a run directory, a namespace or a process."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvsim.cli import run
from hvsim.cli.common import EXIT_BAD_INPUT, EXIT_FAILED
from hvsim.lab import SCENARIOS


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No guest images; a private TMPDIR (so other runs on this machine do not show up here)."""
    monkeypatch.setenv("HVSIM_IMAGES", "/nonexistent/hvsim-images")
    d = tempfile.mkdtemp(prefix="hvs-cli-")
    monkeypatch.setenv("TMPDIR", d)
    tempfile.tempdir = None
    try:
        yield
    finally:
        tempfile.tempdir = None
        shutil.rmtree(d)


@contextlib.contextmanager
def tmp_dirs_unchanged() -> Iterator[None]:
    """Nothing new under $TMPDIR named like an hvsim run dir."""
    base = Path(tempfile.gettempdir())
    before = {p.name for p in base.glob("hvsim-*")}
    yield
    assert {p.name for p in base.glob("hvsim-*")} - before == set(), "a refused command created a run dir"


def hvsim(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_one_line(code: int, err: str, want_code: int, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert code == want_code, (code, err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


CASES = [
    # (argv, exit code, words the line must contain)
    (["vm", "run", "--memory", "0"], EXIT_BAD_INPUT, ["memory_mib must be a number >= 64, got 0"]),
    (["vm", "run", "--memory", "abc"], EXIT_BAD_INPUT, ["--memory"]),
    (["vm", "run", "--vcpus", "0"], EXIT_BAD_INPUT, ["vcpus"]),
    (["vm", "run", "--name", "Bad_Name"], EXIT_BAD_INPUT, ["vm name 'Bad_Name' is invalid"]),
    (["vm", "run", "--timeout", "nan"], EXIT_BAD_INPUT, ["--timeout", "finite"]),
    (["vm", "run", "--timeout", "-1"], EXIT_BAD_INPUT, ["--timeout"]),
    (["vm", "run", "--timeout", "inf"], EXIT_BAD_INPUT, ["--timeout"]),
    (["vm", "run", ""], EXIT_BAD_INPUT, ["command is empty"]),
    (["vm", "run", "--bogus"], EXIT_BAD_INPUT, ["No such option: --bogus"]),
    (["vm", "run", "true"], EXIT_FAILED, ["guest image", "missing"]),
    (["vm", "migrate", "--policy", "bogus"], EXIT_BAD_INPUT, ["unknown policy 'bogus'", "hvsim-predictive"]),
    (["vm", "migrate", "--link-mbit", "0"], EXIT_BAD_INPUT, ["link bandwidth must be > 0"]),
    (["vm", "migrate", "--link-mbit", "nan"], EXIT_BAD_INPUT, ["link bandwidth"]),
    (["vm", "migrate", "--wss", "0"], EXIT_BAD_INPUT, ["--wss"]),
    (["vm", "migrate", "--rate", "-1"], EXIT_BAD_INPUT, ["--rate"]),
    (["vm", "migrate", "--timeout", "0"], EXIT_BAD_INPUT, ["--timeout"]),
    (["vm", "migrate", "--memory", "10"], EXIT_BAD_INPUT, ["memory_mib"]),
    (["vm", "migrate"], EXIT_FAILED, ["guest image", "missing"]),
    (["shim", "stats", "--control", "/missing.ctl"], EXIT_FAILED, ["no shim control socket at /missing.ctl"]),
    (["shim", "stats", "--control", "/etc/hostname"], EXIT_FAILED, ["not a socket"]),
    (["shim", "stats"], EXIT_BAD_INPUT, ["--control"]),
    (["shim", "prefetch", "--control", "/missing.ctl", "--budget-bytes", "-1"], EXIT_BAD_INPUT, ["--budget-bytes"]),
    (["shim", "prefetch", "--control", "/missing.ctl", "--budget-bytes", "4096"], EXIT_FAILED, ["no shim control"]),
    (["shim", "serve", "--socket", "/nonexistent/s.sock", "--backing", "/nonexistent/b", "--size", "1000"],
     EXIT_BAD_INPUT, ["--size must be a positive multiple of 4096"]),
    (["shim", "serve", "--size", "4096"], EXIT_BAD_INPUT, ["--socket"]),
    (["lab", "--only", "nosuch"], EXIT_BAD_INPUT, ["'nosuch'", *SCENARIOS]),
    (["nosuchcommand"], EXIT_BAD_INPUT, ["No such command"]),
]


@pytest.mark.parametrize(("argv", "code", "needles"), CASES, ids=[" ".join(c[0]) or "-" for c in CASES])
def test_expected_error_is_one_line_with_its_exit_code(argv: list[str], code: int, needles: list[str]) -> None:
    with tmp_dirs_unchanged():
        got, _, err = hvsim(*argv)
    assert_one_line(got, err, code, *needles)


def test_images_build_failure_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hvsim images` runs make (whose own messages come first); its failure is one line, exit 1."""
    monkeypatch.setattr("hvsim.cli.core.REPO", Path(tempfile.gettempdir()))   # no images/ there
    got, _, err = hvsim("images")
    assert got == EXIT_FAILED and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "hvsim: error: building the guest images failed (make exited 2)"


def test_debug_shows_the_traceback_of_an_expected_error() -> None:
    code, _, err = hvsim("--debug", "vm", "run", "--memory", "0")
    assert code == EXIT_BAD_INPUT
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("hvsim: error: vm 'guest'")


def test_cleanup_with_nothing_left_reports_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVSIM_NET_RUN_DIR", str(Path(tempfile.gettempdir()) / "net"))
    monkeypatch.setattr("hvsim.network.reclaim.nsutil.list_netns", lambda: [])   # this machine's namespaces
    code, out, err = hvsim("cleanup")
    assert code == 0 and err == "" and "nothing to clean up" in out
    code, out, _ = hvsim("cleanup", "--json")
    assert code == 0 and '"removed": []' in out


def test_control_characters_in_input_are_escaped_in_the_one_line() -> None:
    code, _, err = hvsim("shim", "stats", "--control", "/x\n\x1b[31mred\x85")
    assert_one_line(code, err, EXIT_FAILED, "/x\\n\\x1b[31mred\\x85")


# --- arbitrary option values: never a traceback --------------------------------------------------
_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["0", "-1", "1", "64", "256", "nan", "inf", "-inf", "1e309", "1e-300", str(2**63), str(10**30),
                     "0x10", " 1", "host-a", "", "--", "-x"]),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_COMMANDS: dict[tuple[str, ...], list[str]] = {
    ("vm", "run"): ["--memory", "--vcpus", "--timeout", "--name"],
    ("vm", "migrate"): ["--policy", "--memory", "--wss", "--rate", "--link-mbit", "--timeout"],
    ("shim", "stats"): ["--control", "--export"],
    ("shim", "prefetch"): ["--control", "--budget-bytes", "--skip-recent-pages"],
    ("shim", "serve"): ["--size", "--latency-ms", "--bandwidth-mib-s", "--prefetch-concurrency", "--name"],
}


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    cmd = draw(st.sampled_from(sorted(_COMMANDS)))
    opts = draw(st.lists(st.sampled_from(_COMMANDS[cmd]), min_size=1, max_size=4, unique=True))
    argv = list(cmd)
    for o in opts:
        argv.append(f"{o}={draw(_values)}")
    if cmd == ("shim", "serve"):       # a backing file nobody can create: a valid rest still stops there
        argv += ["--socket", "/nonexistent/hvs/s.sock", "--backing", "/nonexistent/hvs/b.img"]
    if cmd[0] == "shim" and not any(a.startswith("--control=") for a in argv) and cmd != ("shim", "serve"):
        argv.append("--control=/nonexistent/c.sock")
    if cmd == ("shim", "prefetch") and not any(a.startswith("--budget-bytes=") for a in argv):
        argv.append("--budget-bytes=4096")
    return argv


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_arbitrary_option_values_never_give_a_traceback(argv: list[str]) -> None:
    with tmp_dirs_unchanged():
        code, _, err = hvsim(*argv)
    assert "Traceback" not in err, (argv, err)
    assert code in (EXIT_FAILED, EXIT_BAD_INPUT), (argv, code, err)
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, (argv, err)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text(max_size=12).filter(lambda s: s not in SCENARIOS), min_size=1, max_size=3))
def test_lab_with_unknown_scenarios_fails_before_running_anything(names: list[str]) -> None:
    argv = ["lab"]
    for n in names:
        argv.append(f"--only={n}")
    with tmp_dirs_unchanged():
        code, out, err = hvsim(*argv)
    assert_one_line(code, err, EXIT_BAD_INPUT, "the scenarios are: " + ", ".join(SCENARIOS))
    assert out == ""


def test_no_module_writes_to_the_real_stderr_through_logging() -> None:
    """Library logging is silenced below --debug (one line per error is the CLI's job)."""
    code, _, err = hvsim("vm", "migrate", "--policy", "bogus")
    assert code == EXIT_BAD_INPUT and os.linesep.join(err.splitlines()).count("\n") == 0
