"""A QEMU process: launch with an owned QMP socketpair, console log, crash watch, stop.

We create the QMP socketpair ourselves and hand one end to QEMU, so there is no connect race
and no socket path to leak. QEMU dies with its parent (PR_SET_PDEATHSIG) and is stopped
gracefully (QMP ``quit``), then with SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import enum
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from hvbase.fsm import StateMachine

from .client import QMPSession
from .errors import LaunchError, ProcessStateError, QEMUBridgeError
from .machine import MachineSpec, build_argv

log = logging.getLogger("qmp_bridge.process")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the thread that started it dies. Call it in the
    parent (it records the parent's pid); the child also exits at once if the parent already died
    before prctl took effect."""
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            os._exit(1)
    return preexec


# QEMU creates its chardev sockets (agent, heartbeat) and logs with this umask: sockets 0600
QEMU_UMASK = 0o177


def _qemu_preexec() -> Callable[[], None]:
    die = die_with_parent()

    def preexec() -> None:
        die()
        os.umask(QEMU_UMASK)
    return preexec


def tail(path: Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class ProcState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


P = ProcState
PROC_TRANSITIONS: dict[ProcState, frozenset[ProcState]] = {
    P.NEW: frozenset({P.STARTING, P.EXITED}),
    P.STARTING: frozenset({P.RUNNING, P.STOPPING, P.EXITED}),
    P.RUNNING: frozenset({P.STOPPING, P.EXITED}),
    P.STOPPING: frozenset({P.EXITED}),
    P.EXITED: frozenset(),
}


class QemuProcess:
    """One QEMU process for ``spec``, with files under ``run_dir``.

    ``netns``: run QEMU inside this network namespace (``ip netns exec``; the pid stays QEMU's).
    """

    def __init__(self, spec: MachineSpec, run_dir: Path, netns: str | None = None,
                 binary: str = "qemu-system-x86_64") -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.netns = netns
        self.binary = binary
        self.fsm: StateMachine[ProcState] = StateMachine(f"QEMU of {spec.name!r}", P.NEW, PROC_TRANSITIONS,
                                                         error=ProcessStateError, log=log)
        self.console_log = Path(spec.console_log)
        self.qemu_log = self.run_dir / "qemu.log"
        self.qmp_log = self.run_dir / "qmp.log"
        self.argv: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPSession | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.expected_exit = False
        self.started_at = 0.0
        self._watch: asyncio.Task[None] | None = None

    @property
    def state(self) -> ProcState:
        return self.fsm.state

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def console_tail(self, lines: int = 40) -> str:
        return tail(self.console_log, lines)

    async def launch(self, timeout: float = 30.0) -> QMPSession:
        """Start QEMU and connect QMP. LaunchError (exit code, argv, output, console tail) if QEMU
        does not come up, or dies before launch() returns."""
        self.fsm.require("launch", P.NEW)
        self.fsm.set(P.STARTING, "launch")
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            spec = dataclasses.replace(self.spec, qmp_fd=theirs.fileno())
            self.argv = build_argv(spec, self.binary)
            full = (["ip", "netns", "exec", self.netns] if self.netns else []) + self.argv
            with open(self.qemu_log, "ab") as out:
                out.write(f"# {time.strftime('%H:%M:%S')} argv: {' '.join(full)}\n".encode())
                out.flush()
                self.proc = await asyncio.create_subprocess_exec(
                    *full, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    pass_fds=(theirs.fileno(),), preexec_fn=_qemu_preexec(), start_new_session=True)
            self.started_at = time.monotonic()
        except BaseException:
            ours.close()
            self.fsm.set(P.EXITED, "could not execute QEMU")
            raise
        finally:
            theirs.close()
        self._watch = asyncio.create_task(self._watch_exit(), name=f"qemu-watch-{self.spec.name}")
        log.info("%s: started QEMU pid %d", self.spec.name, self.proc.pid)
        self.qmp = QMPSession(self.spec.name, self.qmp_log, self.exited, self.console_tail)
        try:
            await self.qmp.connect(ours, timeout=timeout)
        except asyncio.CancelledError:
            await self.kill()
            raise
        except QEMUBridgeError as exc:
            if not self.exited.done():
                await self.kill()
            raise self._launch_error("failed to start") from exc
        # the exit watcher may have seen QEMU die while we awaited the QMP handshake: never
        # overwrite its EXITED with RUNNING (compare-and-set)
        if not self.fsm.set_if({P.STARTING}, P.RUNNING, "QMP connected"):
            await self._close_qmp()
            raise self._launch_error("exited right after it started")
        return self.qmp

    def _launch_error(self, what: str) -> LaunchError:
        return LaunchError(f"QEMU for {self.spec.name!r} {what}", argv=self.argv, exit_code=self.returncode,
                           console_tail=self.console_tail(), log_tail=tail(self.qemu_log, 20))

    async def _watch_exit(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if self.fsm.state is not P.EXITED:
            self.fsm.set(P.EXITED, f"exit code {code}")
        if not self.exited.done():
            self.exited.set_result(code)
        lvl = logging.INFO if self.expected_exit else logging.WARNING
        log.log(lvl, "%s: QEMU pid %d exited with %d", self.spec.name, self.proc.pid, code)

    async def wait_exit(self, timeout: float | None = None) -> int:
        return await asyncio.wait_for(asyncio.shield(self.exited), timeout)

    async def stop(self, quit_timeout: float = 5.0, term_timeout: float = 5.0) -> int:
        """Graceful (QMP quit), then SIGTERM, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            if self.fsm.state is P.NEW:
                self.fsm.set(P.EXITED, "stopped before launch")
            return 0
        self.expected_exit = True
        if not self.exited.done():
            self.fsm.set_if({P.STARTING, P.RUNNING}, P.STOPPING, "stop")
            if self.qmp is not None and self.qmp.connected:
                try:
                    await self.qmp.execute("quit", timeout=quit_timeout)
                except QEMUBridgeError:
                    pass  # it may have died on the way; the escalation below settles it
                try:
                    await self.wait_exit(quit_timeout)
                except TimeoutError:
                    pass
            if not self.exited.done():
                self._signal(signal.SIGTERM)
                try:
                    await self.wait_exit(term_timeout)
                except TimeoutError:
                    pass
            if not self.exited.done():
                await self.kill()
        await self._close_qmp()
        return self.exited.result()

    async def kill(self) -> int:
        """SIGKILL and reap."""
        self.expected_exit = True
        if self.proc is not None and not self.exited.done():
            self._signal(signal.SIGKILL)
            await asyncio.shield(self.exited)
        await self._close_qmp()
        return self.exited.result() if self.exited.done() else 0

    def _signal(self, sig: int) -> None:
        if self.proc is not None and not self.exited.done():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def _close_qmp(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
        if self._watch is not None and self.exited.done():
            await asyncio.gather(self._watch, return_exceptions=True)
