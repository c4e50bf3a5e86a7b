"""`hvsim --manager ADDR ...` against a live manager with two host agents and a real guest: hosts
registered, a VM defined, started, exec'd (the guest command's exit code passed through),
live-migrated with a progress bar, listed, its operations shown, stopped; refusals are one line
and exit 1, bad input exit 2, and neither changes anything."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from .conftest import ControlPlane

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parents[3]
HVSIM = [sys.executable, "-c", "import sys; from hvsim.cli import main; sys.argv[0] = 'hvsim'; main()"]


class Cli:
    def __init__(self, address: str, token_file: Path) -> None:
        self.env = {**os.environ, "HVSIM_MANAGER": "", "HVSIM_TOKEN": ""}
        self.base = ["--manager", address, "--token-file", str(token_file)]

    async def __call__(self, *args: str, raw: bool = False) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(*HVSIM, *([] if raw else self.base), *args, cwd=REPO, env=self.env,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await wait_for(p.communicate(), 600)
        assert p.returncode is not None
        e = err.decode(errors="replace")
        assert "Traceback" not in e, e
        return p.returncode, out.decode(errors="replace"), e

    async def json(self, *args: str) -> object:
        rc, out, err = await self(*args, "--json")
        assert rc == 0, err
        return json.loads(out)


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("hvsim: error:")]


async def test_cli_against_a_live_manager(cp: ControlPlane) -> None:
    for name in ("h1", "h2"):
        await cp.host(name, memory_mib=1024)
    m = await cp.manager()
    cli = Cli(m.address, m.token_file)
    for name, h in cp.hosts.items():
        rc, out, err = await cli("host", "add", name, "--agent", h.address)
        assert rc == 0 and f"host {name}: up, 2 vcpus, 1024 MiB" in out, err
    hosts = await cli.json("host", "list")
    assert isinstance(hosts, list) and [(h["name"], h["status"]) for h in hosts] == [("h1", "up"), ("h2", "up")]
    rc, out, _ = await cli("host", "list")
    assert rc == 0 and "h1" in out and "h2" in out and "up" in out          # the table

    # bad input: exit 2, one line naming the option; nothing is defined
    rc, _, err = await cli("vm", "define", "web", "--memory", "8")
    assert rc == 2 and len(errors(err)) == 1 and "--memory" in errors(err)[0], err
    rc, _, err = await cli("vm", "define", "web", "--host", "nowhere")
    assert rc in (1, 2) and len(errors(err)) == 1 and "nowhere" in errors(err)[0], err
    assert await cli.json("vm", "list") == []

    d = await cli.json("vm", "define", "web", "--memory", "256", "--host", "h1")
    assert isinstance(d, dict) and d["vm"]["host"] == "h1" and d["vm"]["power"] == "shutoff"
    rc, out, err = await cli("vm", "start", "web")
    assert rc == 0 and "start web succeeded" in out, err
    rc, _, err = await cli("vm", "start", "web")                              # refused: one line, exit 1
    assert rc == 1 and len(errors(err)) == 1 and "running" in errors(err)[0], err
    rc, out, err = await cli("vm", "exec", "web", "echo hello from $(hostname); exit 3")
    assert rc == 3 and out.startswith("hello from"), (rc, out, err)            # the guest's exit code

    rc, out, err = await cli("vm", "migrate", "web", "--to", "h2", "--policy", "stepwise")
    assert rc == 0, err
    assert "web h1->h2" in err and "succeeded" in err, err                     # the progress bar (stderr)
    assert "migrate web succeeded" in out
    vms = await cli.json("vm", "list")
    assert isinstance(vms, list) and [(v["name"], v["host"], v["power"]) for v in vms] == [("web", "h2", "running")]
    rc, out, _ = await cli("vm", "exec", "web", "cat /proc/uptime")
    assert rc == 0 and out.strip()

    ops = await cli.json("op", "list")
    assert isinstance(ops, list)
    kinds = [(o["kind"], o["state"]) for o in ops]
    assert ("migrate", "succeeded") in kinds and ("start", "succeeded") in kinds, kinds
    mig = next(o for o in ops if o["kind"] == "migrate")
    rc, out, err = await cli("op", "show", mig["id"])
    assert rc == 0 and f"operation {mig['id']}: migrate web succeeded" in out and "destination: h2" in out, err
    shown = await cli.json("op", "show", mig["id"])
    assert isinstance(shown, dict) and shown["params"]["source"] == "h1"
    rc, _, err = await cli("op", "show", "0000000000000000-00000000")
    assert rc == 1 and len(errors(err)) == 1, err

    # a wrong token is refused (exit 1), the VM untouched
    bad = m.dir / "wrong-token"
    bad.write_text("not-the-token\n")
    rc, _, err = await Cli(m.address, bad)("vm", "stop", "web")
    assert rc == 1 and len(errors(err)) == 1, err
    assert (await cp.agent("h2").vm("web")).pid

    rc, out, err = await cli("vm", "stop", "web")
    assert rc == 0 and "stop web succeeded" in out, err
    vms = await cli.json("vm", "list")
    assert isinstance(vms, list) and vms[0]["power"] == "shutoff"
    rc, _, err = await cli("vm", "exec", "web", "true")
    assert rc == 1 and len(errors(err)) == 1, err
