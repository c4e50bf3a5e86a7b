"""Core `hvsim` commands: images, vm run, lab. Every command reports expected errors as one line
with a documented exit code (:mod:`hvsim.cli.common`)."""
from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from typing import Optional

import typer
from rich.console import Console

from ..core.agent import MAX_OUTPUT
from ..core.cluster import INITRD_FILE, KERNEL_FILE, REPO, Cluster, images_dir
from ..core.errors import VMError
from ..core.model import HostSpec, VMSpec
from ..core.vm import VM
from .common import EXIT_FAILED, cli_command, fail

vm_app = typer.Typer(no_args_is_help=True, help="Run and manage single guests.")

MAX_TIMEOUT_S = 7 * 86400.0


def check_timeout(value: float, option: str = "--timeout") -> float:
    """A finite, positive number of seconds (at most a week)."""
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise typer.BadParameter(f"must be a finite number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}",
                                 param_hint=option)
    return value


def check_images() -> None:
    """The guest kernel and initramfs exist (before anything is created)."""
    for f in (KERNEL_FILE, INITRD_FILE):
        if not (images_dir() / f).is_file():
            raise VMError(f"guest image {images_dir() / f} is missing: build it with `hvsim images` "
                          "(or set HVSIM_IMAGES)")


async def reclaim_leftovers(console: Console) -> None:
    """What dead earlier runs left behind (namespaces, records, run dirs, their processes) is reclaimed
    before a command creates its own; one line on stderr says what was removed."""
    from ..network.reclaim import reclaim_stale
    report = await reclaim_stale()
    if report.items:
        console.print(f"[dim]reclaimed leftovers of dead runs: {report.summary()}[/dim]")


@cli_command
def images() -> None:
    """Build the guest kernel + initramfs (images/out) with `make -C images`."""
    try:
        rc = subprocess.call(["make", "-C", str(REPO / "images")])
    except OSError as exc:
        raise fail(f"cannot run make: {exc.strerror}") from exc
    if rc != 0:
        raise fail(f"building the guest images failed (make exited {rc})")


@vm_app.command("run")
@cli_command
def vm_run(command: str = typer.Argument("uname -a", help="shell command to run in the guest"),
           memory_mib: int = typer.Option(256, "--memory", help="guest memory in MiB"),
           vcpus: int = typer.Option(1, "--vcpus"),
           timeout: float = typer.Option(60.0, "--timeout", help="seconds for the command"),
           name: str = typer.Option("guest", "--name"),
           stream: bool = typer.Option(False, "--stream", help="stream the output as it comes (no 8 MiB limit)")) \
        -> None:
    """Boot a guest, run one command through the agent, print its output, shut it down.

    Exits with the command's exit code; 1 if hvsim failed (the guest did not start, the command
    timed out), 2 for a bad option."""
    check_timeout(timeout)
    spec = VMSpec(name, vcpus=vcpus, memory_mib=memory_mib)         # SpecError (exit 2) before anything starts
    if not command.strip():
        raise typer.BadParameter("the command is empty", param_hint="COMMAND")
    check_images()
    err = Console(stderr=True)

    async def go() -> int:
        await reclaim_leftovers(err)
        async with Cluster("cli") as cl:
            cl.add_host(HostSpec("host", vcpus=max(2, vcpus), memory_mib=max(1024, memory_mib + 256)))
            vm = await cl.define_vm(spec, "host")
            await vm.start(wait_ready=True)
            if stream:
                code = await _run_streamed(vm, command, timeout)
            else:
                res = await vm.exec(command, timeout=timeout)
                sys.stdout.write(res.stdout)
                sys.stderr.write(res.stderr)
                sys.stdout.flush()
                for what, cut, total in (("stdout", res.stdout_truncated, res.stdout_bytes),
                                         ("stderr", res.stderr_truncated, res.stderr_bytes)):
                    if cut:
                        print(f"hvsim: note: {what} truncated: the guest agent keeps {MAX_OUTPUT} bytes, the command "
                              f"wrote {total} (use --stream for all of it)", file=sys.stderr)
                code = res.exit_code
            err.print(f"[dim]boot {vm.boot_time_s:.2f}s, exit {code}[/dim]")
            await vm.shutdown()
            return code
    raise typer.Exit(asyncio.run(go()))


async def _run_streamed(vm: VM, command: str, timeout: float) -> int:
    agent = vm.agent
    out, errf = sys.stdout.buffer, sys.stderr.buffer
    async with agent.exec_stream(command, timeout=timeout) as s:
        async for chunk in s:
            f = out if chunk.fd == 1 else errf
            f.write(chunk.data)
            f.flush()
    assert s.result is not None
    return int(s.result.exit_code)


@cli_command
def lab(only: Optional[list[str]] = typer.Option(None, "--only", help="run only these scenarios")) -> None:
    """Run the lab scenarios (what `make lab` runs). Exits 1 if a scenario failed."""
    from ..lab import check_scenarios, main
    check_scenarios(only)                      # exit 2 naming the scenarios, before anything runs
    if main(only):
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    app.command("images")(images)
    app.command("lab")(lab)
    app.add_typer(vm_app, name="vm")
