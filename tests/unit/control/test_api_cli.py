"""The manager's command line refuses unsafe setups before it creates anything."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvsim.control.api import main as api_main


def test_non_loopback_tcp_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = api_main(["--store", f"sqlite://{tmp_path / 's.db'}", "--token-file", str(tmp_path / "t"),
                   "--tcp", "198.18.0.1:8080"])
    assert rc == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()


def test_token_file_readable_by_others_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = tmp_path / "t"
    tok.write_text("x" * 40)
    os.chmod(tok, 0o644)
    rc = api_main(["--store", f"sqlite://{tmp_path / 's.db'}", "--token-file", str(tok),
                   "--socket", str(tmp_path / "s" / "m.sock")])
    assert rc == 2 and "0600" in capsys.readouterr().err


def test_socket_in_a_shared_directory_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    rc = api_main(["--store", f"sqlite://{tmp_path / 's.db'}", "--token-file", str(tmp_path / "t" / "token"),
                   "--socket", str(shared / "m.sock")])
    assert rc == 2 and "0700" in capsys.readouterr().err
    assert (os.stat(shared).st_mode & 0o7777) == 0o1777 and not (shared / "m.sock").exists()
