"""Launch and supervise a shim process (the user-level block driver) from asyncio code.

The child dies with its parent (``PR_SET_PDEATHSIG`` = SIGKILL, set in ``preexec_fn``); it reports
readiness with one line on stdout once both sockets listen; its log goes to ``log_path``. An exit
while the process should be running is a crash: :attr:`ShimProcess.crashed` is set, ``check()`` and
the waiting calls raise :class:`ShimCrashed` with the exit code and the tail of the log.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from hvbase.aio import wait_for
from hvbase.fsm import StateMachine
from qmp_bridge.process import die_with_parent

from .control import ShimControlClient
from .daemon import DEFAULT_EXPORT, READY_LINE
from .errors import ShimCrashed, ShimProcessError, ShimStateError
from .sockets import MAX_UNIX_PATH

log = logging.getLogger(__name__)


class ProcState(str, Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


P = ProcState
TRANSITIONS: dict[ProcState, frozenset[ProcState]] = {
    P.CREATED: frozenset({P.STARTING, P.STOPPING}),
    P.STARTING: frozenset({P.RUNNING, P.STOPPING, P.STOPPED, P.CRASHED}),
    P.RUNNING: frozenset({P.STOPPING, P.CRASHED}),
    P.STOPPING: frozenset({P.STOPPED}),
    P.STOPPED: frozenset({P.STARTING, P.STOPPING}),
    P.CRASHED: frozenset({P.STARTING, P.STOPPING}),
}


class ShimProcess:
    """One shim process serving ``backing`` on ``socket_path`` (and a control socket)."""

    def __init__(self, socket_path: str | os.PathLike[str], backing: str | os.PathLike[str], *,
                 size: int | None = None, latency_ms: float = 0.0, bandwidth_mib_s: float | None = None,
                 control_path: str | os.PathLike[str] | None = None, export_name: str = DEFAULT_EXPORT,
                 log_path: str | os.PathLike[str] | None = None, prefetch_concurrency: int = 4,
                 verbose: bool = False, python: str = sys.executable, netns: str | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.socket_path = Path(socket_path).absolute()
        self.backing = Path(backing).absolute()
        self.control_path = Path(control_path).absolute() if control_path else Path(f"{self.socket_path}.ctl")
        if len(os.fsencode(self.control_path)) > MAX_UNIX_PATH:
            raise ShimProcessError(f"control socket path too long: {self.control_path}")
        self.log_path = Path(log_path) if log_path else Path(f"{self.socket_path}.log")
        self.export_name = export_name
        self.netns = netns
        self.argv = (["ip", "netns", "exec", netns] if netns else []) + [
                     python, "-m", "hvsim.drivers.shim", "serve", "--socket", str(self.socket_path),
                     "--backing", str(self.backing), "--control", str(self.control_path),
                     "--name", export_name, "--latency-ms", repr(float(latency_ms)),
                     "--prefetch-concurrency", str(prefetch_concurrency)]
        if size is not None:
            self.argv += ["--size", str(size)]
        if bandwidth_mib_s is not None:
            self.argv += ["--bandwidth-mib-s", repr(float(bandwidth_mib_s))]
        if verbose:
            self.argv.append("--verbose")
        self.argv += list(extra_args)
        self.fsm: StateMachine[ProcState] = StateMachine(f"shim process {self.socket_path.name}", P.CREATED,
                                                         TRANSITIONS, error=ShimStateError, log=log)
        self.control = ShimControlClient(self.control_path)
        self.crashed = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None

    # info ------------------------------------------------------------------------------------
    @property
    def state(self) -> ProcState:
        return self.fsm.state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def nbd_uri(self) -> str:
        """URI for libnbd and qemu tools, e.g. ``nbd+unix:///shim?socket=/run/x/swap.sock``."""
        return f"nbd+unix:///{self.export_name}?socket={self.socket_path}"

    def blockdev_options(self, node_name: str, reconnect_delay: int = 10) -> dict[str, Any]:
        """QEMU ``-blockdev`` (or QMP ``blockdev-add``) options attaching this shim."""
        return {"driver": "nbd", "node-name": node_name,
                "server": {"type": "unix", "path": str(self.socket_path)},
                "export": self.export_name, "reconnect-delay": reconnect_delay}

    def blockdev_arg(self, node_name: str, reconnect_delay: int = 10) -> str:
        return (f"driver=nbd,node-name={node_name},server.type=unix,server.path={self.socket_path},"
                f"export={self.export_name},reconnect-delay={reconnect_delay}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # lifecycle -------------------------------------------------------------------------------
    async def start(self, timeout: float = 20.0) -> None:
        self.fsm.require("start", P.CREATED, P.STOPPED, P.CRASHED)
        self.fsm.set(P.STARTING, "start")
        self.crashed.clear()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=logf,
                preexec_fn=die_with_parent(), close_fds=True)
        except OSError as exc:
            self.fsm.set(P.STOPPED, "could not execute")
            raise ShimProcessError(f"cannot execute {self.argv[0]}: {exc}") from exc
        finally:
            logf.close()
        proc = self._proc
        assert proc.stdout is not None
        exited = asyncio.ensure_future(proc.wait())
        ready = asyncio.ensure_future(self._read_ready(proc.stdout))
        try:
            done, _ = await asyncio.wait({exited, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            ready.cancel()
            exited.cancel()
            await self._hard_kill()
            self.fsm.set(P.STOPPED, "start interrupted")
            raise
        if ready in done and ready.result():
            exited.cancel()
            self.fsm.set(P.RUNNING, f"pid {proc.pid} ready")
            self._watch = asyncio.get_running_loop().create_task(self._watch_exit(), name=f"shim-watch-{proc.pid}")
            log.info("shim pid %d serving %s on %s", proc.pid, self.backing, self.socket_path)
            return
        ready.cancel()
        if exited not in done and ready in done:  # stdout closed without the ready line: it is exiting
            done, _ = await asyncio.wait({exited}, timeout=5.0)
        if exited not in done:
            exited.cancel()
            await self._hard_kill()
            self.fsm.set(P.STOPPED, "not ready in time")
            raise ShimProcessError(f"shim did not become ready within {timeout}s; argv={self.argv}\n{self.log_tail()}")
        self.fsm.set(P.CRASHED, f"exit code {proc.returncode} during start")
        raise ShimCrashed(f"shim exited with code {proc.returncode} during start; argv={self.argv}",
                          proc.returncode, self.log_tail())

    @staticmethod
    async def _read_ready(stdout: asyncio.StreamReader) -> bool:
        while line := await stdout.readline():
            if line.decode(errors="replace").startswith(READY_LINE):
                return True
        return False

    async def _watch_exit(self) -> None:
        proc = self._proc
        assert proc is not None
        code = await proc.wait()
        if self.fsm.set_if({P.RUNNING}, P.CRASHED, f"exit code {code}"):
            self.crashed.set()
            log.error("shim pid %d exited unexpectedly with code %s; log tail:\n%s", proc.pid, code, self.log_tail(10))

    def check(self) -> None:
        """Raise :class:`ShimCrashed` if the process exited while it should be running."""
        if self.state is P.CRASHED:
            raise ShimCrashed(f"shim process {self.pid} exited with code {self.returncode}",
                              self.returncode, self.log_tail())

    async def wait_crash(self) -> ShimCrashed:
        """Wait until the process crashes; returns (does not raise) the error describing it."""
        await self.crashed.wait()
        return ShimCrashed(f"shim process {self.pid} exited with code {self.returncode}",
                           self.returncode, self.log_tail())

    async def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish, clients get ESHUTDOWN), then SIGKILL."""
        proc = self._proc
        if proc is None or self.state in (P.CREATED, P.STOPPED):
            return self.returncode
        if self.state is P.CRASHED:
            await self._reap()
            return proc.returncode
        self.fsm.set(P.STOPPING, "SIGTERM")
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await wait_for(asyncio.shield(proc.wait()), timeout)
            except TimeoutError:
                log.warning("shim pid %d ignored SIGTERM for %.1fs; killing it", proc.pid, timeout)
                await self._hard_kill()
        await self._reap()
        self.fsm.set(P.STOPPED, f"exit code {proc.returncode}")
        return proc.returncode

    async def kill(self) -> int | None:
        """SIGKILL now (e.g. to test a crash/restart); the state becomes STOPPED, not CRASHED."""
        if self._proc is None:
            return None
        if self.state not in (P.STOPPED, P.STOPPING):
            self.fsm.set(P.STOPPING, "SIGKILL")
        await self._hard_kill()
        await self._reap()
        if self.state is P.STOPPING:
            self.fsm.set(P.STOPPED, "killed")
        return self._proc.returncode

    async def _hard_kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _reap(self) -> None:
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.cancel()
            await asyncio.wait([watch])  # never swallows a cancellation aimed at us
        if self._proc is not None and self._proc.returncode is None:
            await self._proc.wait()

    async def __aenter__(self) -> ShimProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
