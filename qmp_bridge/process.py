"""A QEMU process: launch, console log, crash watch, stop; and re-attach to one that runs already.

Two lifetimes:

- *embedded* (default): we create the QMP socketpair ourselves and hand one end to QEMU, so there is
  no connect race and no socket path to leak; QEMU dies with its parent (PR_SET_PDEATHSIG).
- *detached* (``qmp_socket=PATH, detached=True``): QEMU listens for QMP on a unix socket path (0600)
  and outlives the process that started it (a host agent that restarts must not take its guests
  with it); :meth:`QemuProcess.reattach` connects a new owner to it by pid and socket, and watches its
  exit through a pidfd. Such a QEMU dies with its *host*: it joins the host's cgroup (``cgroup=``),
  which the host's power-off kills as a whole.

Stopping is graceful (QMP ``quit``), then SIGTERM, then SIGKILL.
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

from hvbase.aio import wait_for
from hvbase.fsm import StateMachine

from .client import QMPSession
from .errors import AttachError, LaunchError, ProcessStateError, QEMUBridgeError
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


# QEMU creates its chardev sockets (agent, heartbeat, QMP) and logs with this umask: sockets 0600
QEMU_UMASK = 0o177
# the exit status of a QEMU that is not our child (re-attached) cannot be known
UNKNOWN_EXIT = 256


def join_cgroup(cgroup: Path | None) -> None:
    """In a child between fork and exec: move ourselves into ``cgroup`` (cgroup v2 directory)."""
    if cgroup is not None:
        with open(cgroup / "cgroup.procs", "w") as f:
            f.write("0")


def _qemu_preexec(detached: bool, cgroup: Path | None) -> Callable[[], None]:
    die = None if detached else die_with_parent()

    def preexec() -> None:
        if die is not None:
            die()
        join_cgroup(cgroup)
        os.umask(QEMU_UMASK)
    return preexec


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


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
                 binary: str = "qemu-system-x86_64", *, qmp_socket: Path | None = None,
                 detached: bool = False, cgroup: Path | None = None) -> None:
        if detached and qmp_socket is None:
            raise QEMUBridgeError(f"{spec.name}: a detached QEMU needs a qmp_socket path to re-attach to")
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.netns = netns
        self.binary = binary
        self.qmp_socket = Path(qmp_socket) if qmp_socket is not None else None
        self.detached = detached
        self.cgroup = cgroup
        self._pid: int | None = None
        self._pidfd: int | None = None
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
        return self.proc.pid if self.proc else self._pid

    @property
    def is_child(self) -> bool:
        return self.proc is not None

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
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        if self.qmp_socket is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            spec = dataclasses.replace(self.spec, qmp_fd=theirs.fileno())
        else:
            self.qmp_socket.unlink(missing_ok=True)
            spec = dataclasses.replace(self.spec, qmp_socket=str(self.qmp_socket))
        try:
            self.argv = build_argv(spec, self.binary)
            full = (["ip", "netns", "exec", self.netns] if self.netns else []) + self.argv
            with open(self.qemu_log, "ab") as out:
                out.write(f"# {time.strftime('%H:%M:%S')} argv: {' '.join(full)}\n".encode())
                out.flush()
                self.proc = await asyncio.create_subprocess_exec(
                    *full, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    pass_fds=(theirs.fileno(),) if theirs is not None else (),
                    preexec_fn=_qemu_preexec(self.detached, self.cgroup), start_new_session=True)
            self.started_at = time.monotonic()
        except BaseException:
            if ours is not None:
                ours.close()
            self.fsm.set(P.EXITED, "could not execute QEMU")
            raise
        finally:
            if theirs is not None:
                theirs.close()
        self._watch = asyncio.create_task(self._watch_exit(), name=f"qemu-watch-{self.spec.name}")
        log.info("%s: started QEMU pid %d", self.spec.name, self.proc.pid)
        self.qmp = QMPSession(self.spec.name, self.qmp_log, self.exited, self.console_tail)
        try:
            if ours is None:
                ours = await self._connect_path(timeout)
            await self.qmp.connect(ours, timeout=timeout)
        except asyncio.CancelledError:
            await self.kill()
            raise
        except QEMUBridgeError as exc:
            if not self.exited.done():
                await self.kill()
            else:
                await self._close_qmp()     # QEMU exited at once (e.g. an image lock): close its QMP log too
            raise self._launch_error("failed to start") from exc
        # the exit watcher may have seen QEMU die while we awaited the QMP handshake: never
        # overwrite its EXITED with RUNNING (compare-and-set)
        if not self.fsm.set_if({P.STARTING}, P.RUNNING, "QMP connected"):
            await self._close_qmp()
            raise self._launch_error("exited right after it started")
        return self.qmp

    async def _connect_path(self, timeout: float) -> socket.socket:
        """Connect to QEMU's QMP socket path once QEMU listens on it (racing its exit)."""
        assert self.qmp_socket is not None and self.qmp is not None
        path = str(self.qmp_socket)

        async def connect() -> socket.socket:
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    return s
                except (FileNotFoundError, ConnectionRefusedError):
                    s.close()
                    await asyncio.sleep(0.02)
        return await self.qmp.race(connect(), f"QMP socket {path}", timeout)

    @classmethod
    async def reattach(cls, spec: MachineSpec, run_dir: Path, pid: int, qmp_socket: Path,
                       netns: str | None = None, timeout: float = 10.0) -> QemuProcess:
        """Take over a QEMU that runs already (started detached by an earlier owner): check that
        ``pid`` is that QEMU (its command line names ``qmp_socket``), connect QMP, watch its exit."""
        if not any(f"path={qmp_socket}," in arg for arg in cmdline(pid)):
            raise AttachError(f"{spec.name}: pid {pid} is not the QEMU serving QMP on {qmp_socket} "
                              f"(command line: {' '.join(cmdline(pid))[:200] or 'no such process'})")
        p = cls(spec, run_dir, netns, qmp_socket=qmp_socket, detached=True)
        p.fsm.set(P.STARTING, f"re-attach to pid {pid}")
        try:
            p._pidfd = os.pidfd_open(pid)
        except ProcessLookupError as exc:
            p.fsm.set(P.EXITED, "gone before re-attach")
            raise AttachError(f"{spec.name}: QEMU pid {pid} exited before it could be re-attached") from exc
        p._pid = pid
        p.argv = cmdline(pid)
        p._watch = asyncio.create_task(p._watch_exit(), name=f"qemu-watch-{spec.name}")
        p.qmp = QMPSession(spec.name, p.qmp_log, p.exited, p.console_tail)
        try:
            sock = await p._connect_path(timeout)
            await p.qmp.connect(sock, timeout=timeout)
        except QEMUBridgeError as exc:
            await p._close_qmp()
            if p.fsm.state is not P.EXITED:
                p.fsm.set(P.EXITED, "re-attach failed")
            raise AttachError(f"{spec.name}: could not re-attach to QEMU pid {pid}: {exc}") from exc
        if not p.fsm.set_if({P.STARTING}, P.RUNNING, "re-attached"):
            raise AttachError(f"{spec.name}: QEMU pid {pid} exited while being re-attached")
        log.info("%s: re-attached to QEMU pid %d on %s", spec.name, pid, qmp_socket)
        return p

    async def detach(self) -> None:
        """Let go of a detached QEMU without stopping it (its next owner re-attaches)."""
        if not self.detached:
            raise ProcessStateError(self.fsm.obj, self.state, (), action="detach",
                                    message=f"{self.fsm.obj}: only a detached QEMU can be let go")
        await self._close_qmp()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _launch_error(self, what: str) -> LaunchError:
        return LaunchError(f"QEMU for {self.spec.name!r} {what}", argv=self.argv, exit_code=self.returncode,
                           console_tail=self.console_tail(), log_tail=tail(self.qemu_log, 20))

    async def _wait_pidfd(self) -> int:
        assert self._pidfd is not None
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)
        loop.add_reader(self._pidfd, ready)
        try:
            await readable
        finally:
            loop.remove_reader(self._pidfd)
        return UNKNOWN_EXIT

    async def _watch_exit(self) -> None:
        code = await (self.proc.wait() if self.proc is not None else self._wait_pidfd())
        if self.fsm.state is not P.EXITED:
            self.fsm.set(P.EXITED, f"exit code {code}")
        if not self.exited.done():
            self.exited.set_result(code)
        lvl = logging.INFO if self.expected_exit else logging.WARNING
        log.log(lvl, "%s: QEMU pid %s exited with %s", self.spec.name, self.pid,
                "an unknown status (not our child)" if code == UNKNOWN_EXIT else code)

    def expect_exit(self) -> None:
        """The owner asked the guest to power off: its exit is logged as expected, not as a warning."""
        self.expected_exit = True

    async def wait_exit(self, timeout: float | None = None) -> int:
        return await wait_for(asyncio.shield(self.exited), timeout)

    async def stop(self, quit_timeout: float = 5.0, term_timeout: float = 5.0) -> int:
        """Graceful (QMP quit), then SIGTERM, then SIGKILL. Returns the exit code."""
        if self.pid is None:
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
        if self.pid is not None and not self.exited.done():
            self._signal(signal.SIGKILL)
            await asyncio.shield(self.exited)
        await self._close_qmp()
        return self.exited.result() if self.exited.done() else 0

    def _signal(self, sig: int) -> None:
        if self.exited.done():
            return
        try:
            if self.proc is not None:
                self.proc.send_signal(sig)
            elif self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    async def _close_qmp(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
        if self._watch is not None and self.exited.done():
            await asyncio.gather(self._watch, return_exceptions=True)
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
