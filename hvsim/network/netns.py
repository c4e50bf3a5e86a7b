"""Thin async wrappers over iproute2 (``ip``, ``tc``) and network-namespace helpers.

Every command runs as an asyncio subprocess; a non-zero exit raises CommandError with
the argv, exit code, stderr and (for ``-batch -``) the batch text. If the awaiting task is
cancelled the child is killed and reaped before CancelledError propagates.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import signal
from typing import Any
from collections.abc import Callable, Sequence

from hvbase.aio import wait_for
from .errors import CommandError

log = logging.getLogger("hvsim.network")

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT_S = 30.0


async def run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT_S,
              check: bool = True) -> str:
    """Run ``argv``; return stdout. Raises CommandError on failure or timeout (if check)."""
    argv = [str(a) for a in argv]
    log.debug("run: %s%s", " ".join(argv), f"  <<{stdin!r}" if stdin else "")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise CommandError(argv, None, f"could not start: {exc}", stdin) from exc
    try:
        out, err = await wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout)
    except BaseException as exc:  # timeout or cancellation: never leave the child behind
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        if isinstance(exc, asyncio.TimeoutError):
            raise CommandError(argv, None, f"timed out after {timeout:g}s", stdin) from exc
        raise
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, err.decode(errors="replace"), stdin)
    return out.decode(errors="replace")


async def ip(*args: str, netns: str | None = None, batch: Sequence[str] | None = None,
             force: bool = False, check: bool = True) -> str:
    """``ip [-n NS] [-force] ARGS`` or, with ``batch``, ``ip [-n NS] -batch -`` fed the lines."""
    argv = ["ip"]
    if netns:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    if batch is not None:
        return await run([*argv, "-batch", "-"], stdin="\n".join(batch) + "\n", check=check)
    return await run([*argv, *args], check=check)


async def tc(*args: str, netns: str | None = None, batch: Sequence[str] | None = None,
             check: bool = True) -> str:
    argv = ["tc"]
    if netns:
        argv += ["-n", netns]
    if batch is not None:
        return await run([*argv, "-batch", "-"], stdin="\n".join(batch) + "\n", check=check)
    return await run([*argv, *args], check=check)


async def ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    out = await ip("-j", *args, netns=netns)
    return json.loads(out) if out.strip() else []


async def tc_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    out = await tc("-j", *args, netns=netns)
    return json.loads(out) if out.strip() else []


def list_netns() -> list[str]:
    """Names of all named network namespaces (what ``ip netns list`` shows)."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


async def netns_pids(name: str) -> list[int]:
    out = await ip("netns", "pids", name, check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


async def kill_netns_pids(name: str, grace_s: float = 2.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process still inside namespace ``name``. Returns the pids."""
    pids = await netns_pids(name)
    if not pids:
        return []
    log.warning("netns %s still has processes %s at teardown; terminating them", name, pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline:
            if not await netns_pids(name):
                return pids
            await asyncio.sleep(0.05)
    return pids


def argv_in(netns: str, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` so it runs inside named network namespace ``netns``."""
    return ["ip", "netns", "exec", netns, *[str(a) for a in argv]]


def setns_preexec(netns: str) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the child into ``netns`` (network namespace only, no
    /sys remount, unlike ``ip netns exec``). Python 3.11 has no os.setns, so use libc."""
    path = os.path.join(NETNS_RUN_DIR, netns)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def _enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({path}): {os.strerror(err)}")
        finally:
            os.close(fd)

    return _enter
