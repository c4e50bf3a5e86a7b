"""A VM: libvirt-like lifecycle over one QEMU process (qmp_bridge), guest agent, crash watch."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmp_bridge import (Drive, LaunchError, MachineSpec, Nic, QEMUBridgeError, QEMUExitedError,
                        QemuProcess, QMPSession, QMPTimeoutError, SerialPort)

from .agent import ExecResult, GuestAgent
from .errors import AgentError, GuestNotReadyError, IllegalTransitionError, VMError
from .lifecycle import StateChange, VMState, check_action, check_transition
from .model import VMSpec, derive_mac

if TYPE_CHECKING:
    from .cluster import Cluster
    from .host import Host

log = logging.getLogger("hvsim.core.vm")

AGENT_PORT = "org.hvsim.agent"
HEARTBEAT_PORT = "org.hvsim.heartbeat"


class VM:
    def __init__(self, spec: VMSpec, host: "Host", cluster: "Cluster") -> None:
        self.spec = spec
        self.host = host
        self.cluster = cluster
        self.state = VMState.SHUTOFF
        self.reason = "defined"
        self.process: QemuProcess | None = None
        self.instance_dir = self.run_dir       # where the current QEMU's sockets and logs live
        self.agent = GuestAgent(spec.name, self.agent_socket, self._guard)
        self.boot_time_s: float | None = None
        self.started_at: float | None = None
        self.history: list[StateChange] = []
        self._listeners: list[Callable[[StateChange], None]] = []
        self._queues: list[asyncio.Queue[StateChange]] = []
        self._watch: asyncio.Task[None] | None = None
        self._guest_shutdown = False
        self._op_lock = asyncio.Lock()
        self.generation = 0                    # bumps with every new QEMU process (start, migration)
        self.extra_drives: list[Drive] = []    # attached by subsystems (e.g. the swap shim)
        self.extra_nics: list[Nic] = []
        self.shim_drives: dict[str, Drive] = {}  # disk name -> NBD drive of its shim process
        self.shims: dict[str, Any] = {}          # disk name -> the shim process object
        self.helper_failures: list[tuple[float, str, str]] = []   # (time, helper, error)
        self._helper_listeners: list[Callable[[str, BaseException], None]] = []
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- identity and files ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def run_dir(self) -> Path:
        return self.cluster.run_dir / self.spec.name

    @property
    def agent_socket(self) -> Path:
        return self.instance_dir / "agent.sock"

    @property
    def heartbeat_socket(self) -> Path:
        return self.instance_dir / "hb.sock"

    @property
    def console_log(self) -> Path:
        return self.instance_dir / "console.log"

    @property
    def qmp(self) -> QMPSession:
        if self.process is None or self.process.qmp is None or not self.state_has_process:
            raise IllegalTransitionError(f"vm {self.name!r} has no running QEMU (state {self.state.value})")
        return self.process.qmp

    @property
    def state_has_process(self) -> bool:
        return self.state in (VMState.STARTING, VMState.RUNNING, VMState.PAUSED,
                              VMState.SHUTTING_DOWN, VMState.MIGRATING)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.state_has_process else None

    def console_tail(self, lines: int = 40) -> str:
        return self.process.console_tail(lines) if self.process else ""

    # -- state and listeners -----------------------------------------------------------------------
    def add_listener(self, callback: Callable[[StateChange], None]) -> None:
        self._listeners.append(callback)

    def add_helper_listener(self, callback: Callable[[str, BaseException], None]) -> None:
        """``callback(helper, error)`` when a helper process of this VM (e.g. a shim) crashes."""
        self._helper_listeners.append(callback)

    def report_helper_failure(self, helper: str, error: BaseException) -> None:
        """A user-level driver process serving this VM died unexpectedly: log it, keep it, tell."""
        log.error("vm %s: helper %s failed: %s", self.name, helper, error)
        self.helper_failures.append((time.time(), helper, str(error)))
        for cb in list(self._helper_listeners):
            try:
                cb(helper, error)
            except Exception:  # a listener's bug must not hide the failure
                log.exception("vm %s: helper listener failed", self.name)

    def state_changes(self) -> "asyncio.Queue[StateChange]":
        """A queue that receives every later state change of this VM."""
        q: asyncio.Queue[StateChange] = asyncio.Queue()
        self._queues.append(q)
        return q

    def _set_state(self, new: VMState, reason: str) -> None:
        old = self.state
        check_transition(self.name, old, new)
        self.state, self.reason = new, reason
        change = StateChange(self.name, old, new, reason)
        self.history.append(change)
        log.info("vm %s: %s -> %s (%s)", self.name, old.value, new.value, reason)
        for q in self._queues:
            q.put_nowait(change)
        for cb in list(self._listeners):
            try:
                cb(change)
            except Exception:  # a listener's bug must not break the lifecycle
                log.exception("vm %s: state listener failed", self.name)

    async def wait_state(self, *states: VMState, timeout: float = 30.0) -> VMState:
        q = self.state_changes()
        try:
            deadline = time.monotonic() + timeout
            while self.state not in states:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VMError(f"vm {self.name!r}: still {self.state.value} after {timeout}s, "
                                  f"expected {[s.value for s in states]}")
                try:
                    await asyncio.wait_for(q.get(), remaining)
                except asyncio.TimeoutError:
                    continue
            return self.state
        finally:
            self._queues.remove(q)

    # -- machine description -----------------------------------------------------------------------
    def machine_spec(self, incoming: str | None = None, run_dir: Path | None = None,
                     suffix: str = "") -> MachineSpec:
        rd = run_dir or self.instance_dir
        drives = [Drive(id=f"disk-{d.name}", path=str(self.cluster.disk_path(self, d)), fmt=d.format)
                  for d in self.spec.disks if d.kind == "file"] + \
            [self.shim_drives[d.name] for d in self.spec.disks if d.kind == "shim"] + list(self.extra_drives)
        nics = [Nic(id=f"nic-{n.name}", mac=n.mac or derive_mac(self.name, n.name), backend="user")
                for n in self.spec.nics] + list(self.extra_nics)
        ip_args = " ".join(f"hvsim.ip={n.ip}" for n in self.spec.nics[:1] if n.ip)
        return MachineSpec(
            name=self.name + suffix, memory_mib=self.spec.memory_mib, vcpus=self.spec.vcpus,
            kernel=str(self.cluster.kernel), initrd=str(self.cluster.initrd),
            console_log=str(rd / "console.log"),
            append=" ".join(filter(None, [ip_args, self.spec.kernel_args])),
            drives=tuple(drives), nics=tuple(nics),
            serial_ports=(SerialPort("agent0", AGENT_PORT, str(rd / "agent.sock")),
                          SerialPort("hb0", HEARTBEAT_PORT, str(rd / "hb.sock"))),
            balloon=self.spec.balloon, accel=self.cluster.accel(), incoming=incoming)  # type: ignore[arg-type]

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self, wait_ready: bool = False, ready_timeout: float = 90.0) -> None:
        """Start QEMU (libvirt: virDomainCreate). Capacity is reserved before any process starts."""
        async with self._op_lock:
            check_action(self.name, self.state, "start")
            self.host.reserve(self.spec)      # CapacityError before anything is started
            try:
                self._set_state(VMState.STARTING, "booting")
                await self.cluster.prepare_disks(self)
                proc = QemuProcess(self.machine_spec(), self.instance_dir, netns=self.host.netns)
                self.started_at = time.monotonic()
                await proc.launch()
            except BaseException as exc:
                self.host.release(self.name)
                if self.state is VMState.STARTING:
                    self._set_state(VMState.SHUTOFF, "failed")
                if isinstance(exc, LaunchError):
                    raise VMError(f"vm {self.name!r} failed to start: {exc}") from exc
                raise
            self._adopt(proc)
            self._set_state(VMState.RUNNING, "booted")
        if wait_ready:
            await self.wait_ready(ready_timeout)

    def _adopt(self, proc: QemuProcess) -> None:
        """Make ``proc`` this VM's QEMU and watch it for exits."""
        self.process = proc
        self.generation += 1
        self._guest_shutdown = False
        assert proc.qmp is not None
        sub = proc.qmp.subscribe("SHUTDOWN")
        self._watch = asyncio.create_task(self._watch_exit(proc, sub), name=f"vm-watch-{self.name}")

    async def adopt_migrated(self, proc: QemuProcess, host: "Host", instance_dir: Path) -> None:
        """After a successful migration: ``proc`` (on ``host``, files in ``instance_dir``) becomes
        this VM's QEMU. The caller stops the source QEMU (with expected_exit set) and moves the
        capacity reservation; this switches the agent channel and the crash watch."""
        old = self.process
        if old is not None:
            old.expected_exit = True
        await self.agent.close()
        self.host = host
        self.instance_dir = Path(instance_dir)
        self.agent = GuestAgent(self.name, self.agent_socket, self._guard)
        self._adopt(proc)

    async def _watch_exit(self, proc: QemuProcess, sub: Any) -> None:
        code = await asyncio.shield(proc.exited)
        if not sub.queue.empty():
            ev = sub.queue.get_nowait()
            self._guest_shutdown = bool(ev.get("data", {}).get("guest"))
        sub.close()
        if proc is not self.process or proc.expected_exit:
            return  # we stopped it ourselves (destroy, shutdown, migration); they set the state
        await self._cleanup_after_exit()
        if self._guest_shutdown or (self.state is VMState.SHUTTING_DOWN and code == 0):
            self._set_state(VMState.SHUTOFF, "shutdown")
        else:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self._set_state(VMState.CRASHED, f"qemu exited unexpectedly ({how})")

    async def _cleanup_after_exit(self) -> None:
        self.host.release(self.name)
        await self.agent.close()
        if self.process is not None:
            await self.process.kill()  # closes QMP; reaps (already exited)
        for p in (self.agent_socket, self.heartbeat_socket):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def _guard(self, aw: Any, what: str, timeout: float | None) -> Any:
        """Await ``aw`` racing QEMU's death (used by the agent)."""
        if self.process is None or self.process.qmp is None:
            return await asyncio.wait_for(aw, timeout)
        return await self.process.qmp.race(aw, what, timeout)

    async def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait until the guest agent answers; returns seconds since start (boot time)."""
        if not self.state_has_process:
            raise IllegalTransitionError(f"cannot wait for vm {self.name!r} to be ready: it is {self.state.value}")
        deadline = time.monotonic() + timeout
        try:
            await self.agent.connect()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestNotReadyError(f"vm {self.name!r}: guest agent not ready after {timeout:g}s",
                                             self.console_tail())
                try:
                    await self.agent.ping(timeout=min(1.0, remaining))
                    break
                except AgentError as exc:
                    if self.process is not None and self.process.exited.done():
                        raise GuestNotReadyError(
                            f"vm {self.name!r}: QEMU exited (code {self.process.returncode}) before the guest "
                            "was ready", self.console_tail()) from exc
                    if not self.agent.connected:
                        await self.agent.close()
                        await self.agent.connect()
        except OSError as exc:
            raise GuestNotReadyError(f"vm {self.name!r}: cannot reach agent socket: {exc}",
                                     self.console_tail()) from exc
        if self.started_at is not None and self.boot_time_s is None:
            self.boot_time_s = time.monotonic() - self.started_at
        return self.boot_time_s or 0.0

    async def exec(self, command: str, timeout: float = 60.0, check: bool = False) -> ExecResult:
        """Run a command in the guest through the agent."""
        check_action(self.name, self.state, "agent")
        if not self.agent.connected:
            await self.agent.connect()
        return await self.agent.exec(command, timeout=timeout, check=check)

    async def pause(self) -> None:
        async with self._op_lock:
            check_action(self.name, self.state, "pause")
            await self._qmp_then_event("stop", "STOP")
            self._set_state(VMState.PAUSED, "user")

    async def resume(self) -> None:
        async with self._op_lock:
            check_action(self.name, self.state, "resume")
            await self._qmp_then_event("cont", "RESUME")
            self._set_state(VMState.RUNNING, "unpaused")

    async def reset(self) -> None:
        """Hard reset (system_reset); the guest reboots, then wait_ready() again."""
        async with self._op_lock:
            check_action(self.name, self.state, "reset")
            await self._qmp_then_event("system_reset", "RESET")
            self.boot_time_s = None
            self.started_at = time.monotonic()
            if self.state is VMState.RUNNING:
                self._set_state(VMState.RUNNING, "reset")

    async def _qmp_then_event(self, command: str, event: str, timeout: float = 10.0) -> None:
        try:
            await self.qmp.wait_event(event, timeout=timeout, trigger=lambda: self.qmp.execute(command))
        except QEMUBridgeError as exc:
            raise VMError(f"vm {self.name!r}: {command} failed: {exc}") from exc

    async def shutdown(self, timeout: float = 60.0) -> None:
        """ACPI power button; waits until the guest powered off (libvirt: shutdown + wait)."""
        async with self._op_lock:
            check_action(self.name, self.state, "shutdown")
            self._set_state(VMState.SHUTTING_DOWN, "acpi")
            proc = self.process
            assert proc is not None
            proc.expected_exit = True
            try:
                await self.qmp.execute("system_powerdown")
                await proc.wait_exit(timeout)
            except asyncio.TimeoutError as exc:
                if proc.exited.done():
                    pass
                else:
                    proc.expected_exit = False
                    self._set_state(VMState.RUNNING, "shutdown-timeout")
                    raise VMError(f"vm {self.name!r}: guest did not power off within {timeout:g}s "
                                  "after the ACPI power button") from exc
            except QEMUExitedError:
                pass  # exited on the way: exactly what we wanted
            proc.expected_exit = True
            await self._watch_done()
            await self._cleanup_after_exit()
            if self.state is not VMState.SHUTOFF:
                self._set_state(VMState.SHUTOFF, "shutdown")

    async def destroy(self) -> None:
        """Immediate hard stop (libvirt: virDomainDestroy)."""
        async with self._op_lock:
            if self.state in (VMState.SHUTOFF,):
                return
            check_action(self.name, self.state, "destroy")
            if self.process is not None:
                self.process.expected_exit = True
                await self.process.kill()
            await self._watch_done()
            await self._cleanup_after_exit()
            self._set_state(VMState.SHUTOFF, "destroyed")

    async def _watch_done(self) -> None:
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)

    # -- subsystems (implemented in their own packages) ------------------------------------------
    async def migrate(self, dest_host: "Host | str", policy: str = "hvsim-predictive",
                      timeout: float = 300.0, **options: Any) -> Any:
        """Live-migrate to ``dest_host``; returns the finished Migration (see hvsim.migration)."""
        from ..migration.api import migrate
        return await migrate(self, dest_host, policy=policy, timeout=timeout, **options)

    def start_migration(self, dest_host: "Host | str", policy: str = "hvsim-predictive",
                        timeout: float = 300.0, **options: Any) -> Any:
        """Begin a live migration in the background; returns the Migration object at once."""
        from ..migration.api import start_migration
        return start_migration(self, dest_host, policy=policy, timeout=timeout, **options)

    async def consolidate_memory(self, target_mib: int, timeout: float = 120.0) -> Any:
        """Inflate the balloon until the guest has given memory down to ``target_mib``."""
        from ..memory import consolidate_memory
        return await consolidate_memory(self, target_mib, timeout=timeout)

    async def restore_memory(self, timeout: float = 120.0, prefetch: bool = True) -> Any:
        """Deflate the balloon and have the swap shim prefetch what the guest swapped out."""
        from ..memory import restore_memory
        return await restore_memory(self, timeout=timeout, prefetch=prefetch)

    async def query_status(self) -> dict[str, Any]:
        return await self.qmp.execute("query-status")

    def status_row(self) -> dict[str, Any]:
        return {"host": self.host.name, "vm": self.name, "state": self.state.value, "reason": self.reason,
                "memory_mib": self.spec.memory_mib, "vcpus": self.spec.vcpus, "pid": self.pid,
                "boot_s": round(self.boot_time_s, 2) if self.boot_time_s else None}


def make_raw_disk(path: Path, size_mib: int, fmt: str = "raw") -> None:
    if path.exists():
        return
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        os.chmod(path, 0o600)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), f"{size_mib}M"], check=True)
