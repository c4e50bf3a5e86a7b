"""`hvsim place` on the example problems."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from hvsim.cli import place as cli

EX = Path(__file__).resolve().parents[3] / "examples" / "placement"


def run(*args):
    app = typer.Typer()
    cli.register(app)

    @app.callback()
    def _root() -> None:  # keep `place` a sub-command
        pass

    return CliRunner().invoke(app, ["place", *map(str, args)])


def test_place_json():
    r = run(EX / "web-db.json", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["status"] == "optimal" and doc["check"]["required_violations"] == 0
    assert set(doc["assignment"]) == {"web-0", "web-1", "web-2", "db-0", "db-1"}


def test_place_infeasible_explain():
    r = run(EX / "infeasible.json", "--explain")
    assert r.exit_code == 1
    assert "conflicting rules (minimal)" in r.output and "web-db" in r.output and "keep:web" in r.output
    assert "0/4 hosts: 2 anti-affinity web-db@rack, 2 memory" in r.output


def test_place_greedy_and_bad_file(tmp_path):
    assert run(EX / "web-db.json", "--solver", "greedy").exit_code == 0
    bad = tmp_path / "bad.json"
    doc = json.loads((EX / "web-db.json").read_text())
    doc["hosts"][0]["capacity"]["vcpus"] = -4
    bad.write_text(json.dumps(doc))
    r = run(bad)
    assert r.exit_code == 2 and "hosts[0].capacity.vcpus: negative capacity -4" in r.output
