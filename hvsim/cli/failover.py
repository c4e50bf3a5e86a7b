"""`hvsim failover status|failback`: talk to a running failover controller on its unix socket
(0600 in a 0700 directory, the run's bearer token). The controller itself is a process:
``hvsim failover-controller --config FILE`` (``python -m hvsim.failover.controller``)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import typer

from ..control.client import ManagerClient
from ..failover.errors import FailoverInputError
from .common import cli_command

failover_app = typer.Typer(no_args_is_help=True, help="the failover controller: status, fail back (issue 14)")


def _token(token_file: Path) -> str:
    try:
        return token_file.read_text().strip()
    except OSError as e:
        raise FailoverInputError("--token-file", str(e)) from e


async def _call(socket: Path, token: str, method: str, path: str, body: Any = None) -> Any:
    async with ManagerClient(f"unix:{socket}", token, timeout=600) as c:
        return await c.request(method, path, json=body)


@failover_app.command("status")
@cli_command
def status_cmd(socket: Path = typer.Option(..., help="the controller's unix socket"),
               token_file: Path = typer.Option(..., help="the run's bearer token file")) -> None:
    """The controller's state, the leader it sees, and every takeover / fail back timeline."""
    print(json.dumps(asyncio.run(_call(socket, _token(token_file), "GET", "/v1/status")), indent=1))


@failover_app.command("failback")
@cli_command
def failback_cmd(host: str = typer.Argument(..., help="the healthy dc1 host to move the manager back to"),
                 socket: Path = typer.Option(..., help="the controller's unix socket"),
                 token_file: Path = typer.Option(..., help="the run's bearer token file")) -> None:
    """Move the management process back to a dc1 host (fenced: a newer token; guests keep running)."""
    out = asyncio.run(_call(socket, _token(token_file), "POST", "/v1/failback", {"host": host}))
    print(json.dumps(out, indent=1))


def register(app: Any) -> None:
    app.add_typer(failover_app, name="failover")
