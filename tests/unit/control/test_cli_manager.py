"""`hvsim --manager ADDR ...` error paths against a real manager process (SQLite, no host agents):
every refusal is one line on stderr, exit 2 for bad input (naming the option or the field), 1 for
a refused operation, a wrong token or an unreachable manager, and none of them changes the store."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvsim.cli import run

from .manager_proc import Manager, manager_process


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    d = tmp_path_factory.mktemp("clim")
    with manager_process(d / "run", f"sqlite://{d / 'state.db'}") as m:
        yield m


def hv(capsys: pytest.CaptureFixture[str], m: Manager | None, *args: str) -> tuple[int, str, list[str]]:
    base = ["--manager", m.address, "--token-file", str(m.token_file)] if m is not None else []
    rc = run([*base, *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 0 or len(lines) == 1, lines              # an error is exactly one line
    return rc, out, lines


def vms(capsys: pytest.CaptureFixture[str], m: Manager) -> list[dict[str, object]]:
    rc, out, _ = hv(capsys, m, "vm", "list", "--json")
    assert rc == 0
    data = json.loads(out)
    assert isinstance(data, list)
    return data


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("HVSIM_MANAGER", "HVSIM_TOKEN", "HVSIM_TOKEN_FILE"):
        monkeypatch.delenv(v, raising=False)


def test_missing_address_or_token_is_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = hv(capsys, None, "host", "list")
    assert rc == 2 and "--manager" in err[0]
    rc, _, err = hv(capsys, None, "--manager", "unix:/x/m.sock", "vm", "list")
    assert rc == 2 and "token" in err[0]
    rc, _, err = hv(capsys, None, "--manager", "unix:/x/m.sock", "--token-file", str(tmp_path / "none"), "vm", "list")
    assert rc == 2 and "--token-file" in err[0] and "none" in err[0]
    tok = tmp_path / "tok"
    tok.write_text("two\nlines\n")
    rc, _, err = hv(capsys, None, "--manager", "unix:/x/m.sock", "--token-file", str(tok), "vm", "list")
    assert rc == 2 and "line breaks" in err[0]
    tok.write_text("t\n")
    rc, _, err = hv(capsys, None, "--manager", "ftp://x", "--token-file", str(tok), "vm", "list")
    assert rc == 2 and "address" in err[0]


def test_unreachable_manager_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVSIM_TOKEN", "t")
    rc, _, err = hv(capsys, None, "--manager", f"unix:{tmp_path / 'gone.sock'}", "op", "list")
    assert rc == 1 and "unreachable" in err[0]


def test_bad_input_names_the_option_and_defines_nothing(capsys: pytest.CaptureFixture[str], manager: Manager) -> None:
    for args, named in ((("vm", "define", "Web"), "NAME"), (("vm", "define", "web", "--memory", "1"), "--memory"),
                        (("vm", "define", "web", "--vcpus", "0"), "--vcpus"),
                        (("vm", "exec", "web", "true", "--timeout", "-1"), "--timeout"),
                        (("vm", "migrate", "web", "--to", "h2", "--policy", "bogus"), "--policy"),
                        (("vm", "migrate", "web", "--to", "H 2"), "--to"),
                        (("vm", "stop", "web", "--timeout", "nan"), "--timeout"),
                        (("host", "add", "h1", "--agent", "tcp://x"), "--agent")):
        rc, _, err = hv(capsys, manager, *args)
        assert rc == 2 and named in err[0], (args, err)
    assert vms(capsys, manager) == []


def test_refusals_are_exit_1_and_change_nothing(capsys: pytest.CaptureFixture[str], manager: Manager,
                                                tmp_path: Path) -> None:
    rc, _, err = hv(capsys, manager, "vm", "define", "web", "--host", "nowhere")
    assert rc in (1, 2) and "nowhere" in err[0], err       # an unknown host
    assert vms(capsys, manager) == []
    for args in (("vm", "start", "ghost"), ("vm", "stop", "ghost"), ("vm", "migrate", "ghost", "--to", "h2"),
                 ("vm", "exec", "ghost", "true"), ("op", "show", "0000000000000000-00000000")):
        rc, _, err = hv(capsys, manager, *args)
        assert rc == 1 and err[0].startswith("hvsim: error:") and ("ghost" in err[0] or "0000" in err[0]), (args, err)
    wrong = tmp_path / "tok"
    wrong.write_text("wrong\n")
    rc = run(["--manager", manager.address, "--token-file", str(wrong), "vm", "list"])
    out = capsys.readouterr().err
    assert rc == 1 and ("401" in out or "token" in out.lower()), out
    assert vms(capsys, manager) == []


def test_tables_and_json_of_an_empty_manager(capsys: pytest.CaptureFixture[str], manager: Manager) -> None:
    rc, out, _ = hv(capsys, manager, "host", "list")
    assert rc == 0 and "hosts" in out and "status" in out
    rc, out, _ = hv(capsys, manager, "op", "list", "--json")
    assert rc == 0 and isinstance(json.loads(out), list)


def test_the_processes_start_from_hvsim(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`hvsim manager ...` and `hvsim host-agent ...` are the processes' own command lines."""
    rc = run(["manager", "--store", "bogus://", "--token-file", str(tmp_path / "t"), "--socket", str(tmp_path / "s")])
    assert rc == 2 and "unknown store URL" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    with pytest.raises(SystemExit) as e:
        run(["host-agent", "--help"])
    assert e.value.code == 0 and "usage: hvsim host-agent" in capsys.readouterr().out
