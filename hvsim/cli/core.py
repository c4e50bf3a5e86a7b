"""Core `hvsim` commands: images, vm run, lab."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Optional

import typer
from rich.console import Console

from ..core.cluster import REPO, Cluster
from ..core.model import HostSpec, VMSpec

vm_app = typer.Typer(no_args_is_help=True, help="Run and manage single guests.")


def images() -> None:
    """Build the guest kernel + initramfs (images/out) with `make -C images`."""
    raise typer.Exit(subprocess.call(["make", "-C", str(REPO / "images")]))


@vm_app.command("run")
def vm_run(command: str = typer.Argument("uname -a", help="shell command to run in the guest"),
           memory_mib: int = typer.Option(256, "--memory", help="guest memory in MiB"),
           vcpus: int = typer.Option(1, "--vcpus"),
           timeout: float = typer.Option(60.0, "--timeout", help="seconds for the command"),
           name: str = typer.Option("guest", "--name")) -> None:
    """Boot a guest, run one command through the agent, print its output, shut it down."""
    async def go() -> int:
        async with Cluster("cli") as cl:
            cl.add_host(HostSpec("host", vcpus=max(2, vcpus), memory_mib=max(1024, memory_mib + 256)))
            vm = await cl.define_vm(VMSpec(name, vcpus=vcpus, memory_mib=memory_mib), "host")
            await vm.start(wait_ready=True)
            res = await vm.exec(command, timeout=timeout)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            Console(stderr=True).print(f"[dim]boot {vm.boot_time_s:.2f}s, exit {res.exit_code}[/dim]")
            await vm.shutdown()
            return res.exit_code
    raise typer.Exit(asyncio.run(go()))


def lab(only: Optional[list[str]] = typer.Option(None, "--only", help="run only these scenarios")) -> None:
    """Run the lab scenarios (what `make lab` runs)."""
    from ..lab import main
    raise typer.Exit(1 if main(only) else 0)


def register(app: typer.Typer) -> None:
    app.command("images")(images)
    app.command("lab")(lab)
    app.add_typer(vm_app, name="vm")
