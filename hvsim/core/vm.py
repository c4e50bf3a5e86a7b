"""A VM: libvirt-like lifecycle over one QEMU process (qmp_bridge), its components, the guest agent,
the crash watch; and the guarded lease through which a migration borrows it.

The VM's state changes only through its own methods (one :class:`~hvbase.fsm.StateMachine`), each
published on the cluster's bus as :class:`~hvsim.core.events.VMStateChanged`. One operation at a time
holds the VM's :class:`~hvsim.core.oplock.OpLock` (start, pause, resume, reset, shutdown, destroy, or a
migration for its whole duration). Components (user-level drivers such as the swap shim) are created
by the cluster's drivers when the VM is defined and follow its lifetime: prepared at start, stopped at
shutdown, destroy and crash, removed at undefine.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from hvbase.aio import wait_for
from hvbase.events import Subscription
from hvbase.fsm import StateMachine, Transition
from qmp_bridge import (Drive, LaunchError, MachineSpec, Nic, ProcState, QEMUBridgeError, QEMUExitedError,
                        QemuProcess, QMPSession, SerialPort)

from . import procfs
from .agent import ExecResult, GuestAgent
from .components import NIC_DRIVER, Attachment, Component, ComponentContext, ComponentState, NicDriver
from .env import VMEnvironment
from .errors import (AgentError, BusyError, ComponentError, GuestNotReadyError, IllegalTransitionError, SpecError,
                     StateError, TeardownError, VMError)
from .events import ClusterEvent, ComponentFailed, VMMoved, VMStateChanged
from .host import Host, check_machine_memory
from .lifecycle import VMState, machine, require
from .model import DiskSpec, VMSpec, derive_mac
from .oplock import OpLock

log = logging.getLogger("hvsim.core.vm")

AGENT_PORT = "org.hvsim.agent"
HEARTBEAT_PORT = "org.hvsim.heartbeat"
T = TypeVar("T")


class VM:
    def __init__(self, spec: VMSpec, host: Host, env: VMEnvironment) -> None:
        self.spec = spec
        self.host = host
        self.env = env
        self.fsm: StateMachine[VMState] = machine(spec.name, on_change=self._published)
        self.reason = "defined"
        self.process: QemuProcess | None = None
        self.instance_dir = self.run_dir       # where the current QEMU's sockets and logs live
        self.agent = GuestAgent(spec.name, self.agent_socket, self._guard)
        self.boot_time_s: float | None = None
        self.started_at: float | None = None
        self.generation = 0                    # bumps with every new QEMU process (start, migration)
        self.extensions: dict[str, Any] = {}   # per-VM state of subsystems (e.g. memory), see extension()
        self.component_failures: list[ComponentFailed] = []
        self._watch: asyncio.Task[None] | None = None
        self._guest_shutdown = False
        self._expect_exit: QemuProcess | None = None
        self._lock = OpLock()
        self._lease: MigrationLease | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.components: dict[str, Component] = {}
        ctx = ComponentContext(vm=spec.name, vm_dir=self.run_dir, publish=env.events.publish,
                               track_process=env.track_process)
        for d in spec.disks:
            if d.kind != "file":
                c = env.driver(d.kind).create(d, ctx)
                self.components[c.id] = c
        for n in spec.nics:
            if n.network != "default":       # a tenant network: a component attaches it (tap + ENI)
                drv = env.driver(NIC_DRIVER)
                if not isinstance(drv, NicDriver):
                    raise SpecError(f"vm {spec.name!r}: nic {n.name!r} is on network {n.network!r}, but the "
                                    f"{NIC_DRIVER!r} driver cannot create NIC components")
                c = drv.create_nic(n, ctx)
                self.components[c.id] = c
        self._failures: Subscription[ClusterEvent] = env.events.subscribe(
            f"vm {spec.name} component failures", kinds=(ComponentFailed,),
            filter=lambda e: getattr(e, "vm", None) == spec.name, callback=self._component_failed)

    # -- identity and files -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> VMState:
        return self.fsm.state

    @property
    def history(self) -> list[Transition[VMState]]:
        return list(self.fsm.history)

    @property
    def run_dir(self) -> Path:
        return self.env.run_dir / self.spec.name

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
        if self.process is None or self.process.qmp is None or not self.has_process:
            raise IllegalTransitionError(f"vm {self.name!r}", self.state, (), action="use QMP",
                                         message=f"vm {self.name!r} has no running QEMU (state {self.state.value})")
        return self.process.qmp

    @property
    def has_process(self) -> bool:
        return self.state in (VMState.STARTING, VMState.RUNNING, VMState.PAUSED,
                              VMState.SHUTTING_DOWN, VMState.MIGRATING)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.has_process else None

    @property
    def busy_with(self) -> str | None:
        """The operation holding the VM now (e.g. "migration to b"), or None."""
        return self._lock.holder

    def console_tail(self, lines: int = 40) -> str:
        return self.process.console_tail(lines) if self.process else ""

    def disk_path(self, disk: DiskSpec) -> Path:
        if disk.path:
            return Path(disk.path)
        return self.run_dir / f"{disk.name}.{'img' if disk.format == 'raw' else 'qcow2'}"

    def component(self, cid: str) -> Component:
        try:
            return self.components[cid]
        except KeyError:
            from .errors import NotFoundError
            raise NotFoundError(f"vm {self.name!r} has no component {cid!r}; "
                                f"it has {sorted(self.components)}") from None

    def components_with(self, protocol: type[T]) -> list[T]:
        """Components implementing ``protocol`` (a runtime-checkable Protocol or a class)."""
        return [c for c in self.components.values() if isinstance(c, protocol)]

    def extension(self, key: str, factory: Callable[[VM], T]) -> T:
        """Per-VM state of a subsystem, created on first use and owned by this VM (serialised by
        :meth:`to_dict` if it has a ``to_dict``)."""
        if key not in self.extensions:
            self.extensions[key] = factory(self)
        return self.extensions[key]

    # -- state and events ------------------------------------------------------------------------
    def _published(self, t: Transition[VMState]) -> None:
        self.reason = t.reason
        self.env.events.publish(VMStateChanged(vm=self.name, old=t.old, new=t.new, reason=t.reason))

    def _component_failed(self, event: ClusterEvent) -> None:
        assert isinstance(event, ComponentFailed)
        self.component_failures.append(event)
        log.error("vm %s: component %s failed: %s", self.name, event.component, event.error.splitlines()[0])

    def close_subscriptions(self) -> None:
        """Stop listening on the cluster's bus (the VM is being forgotten: undefined or detached)."""
        self._failures.close()

    def subscribe(self, name: str, kinds: Iterable[type] = (VMStateChanged,),
                  callback: Callable[[ClusterEvent], None] | None = None) -> Subscription[ClusterEvent]:
        """Events about this VM (default: its state changes) as a subscription; use ``with``."""
        return self.env.events.subscribe(f"vm {self.name}: {name}", kinds=tuple(kinds),
                                         filter=lambda e: getattr(e, "vm", None) == self.name, callback=callback)

    async def wait_state(self, *states: VMState, timeout: float = 30.0) -> VMState:
        with self.subscribe("wait_state") as sub:
            try:
                async with asyncio.timeout(timeout):
                    while self.state not in states:
                        await sub.get()
            except TimeoutError:
                raise VMError(f"vm {self.name!r}: still {self.state.value} after {timeout}s, "
                              f"expected {[s.value for s in states]}") from None
        return self.state

    # -- machine description ----------------------------------------------------------------------
    def _machine_spec(self, attachments: Iterable[Attachment], run_dir: Path, incoming: str | None = None,
                      extra_args: tuple[str, ...] = ()) -> MachineSpec:
        atts = list(attachments)
        drives = [Drive(id=f"disk-{d.name}", path=str(self.disk_path(d)), fmt=d.format,
                        bus=d.bus)  # type: ignore[arg-type]
                  for d in self.spec.disks if d.kind == "file"] + [d for a in atts for d in a.drives]
        nics = [Nic(id=f"nic-{n.name}", mac=n.mac or derive_mac(self.name, n.name), backend="user",
                    model=n.model)  # type: ignore[arg-type]
                for n in self.spec.nics if n.network == "default"] + [n for a in atts for n in a.nics]
        ip_args = " ".join(f"hvsim.ip={n.ip}" for n in self.spec.nics[:1] if n.ip)
        accel = self.env.accel()
        assert accel in ("tcg", "kvm")
        return MachineSpec(
            name=self.name, memory_mib=self.spec.memory_mib, vcpus=self.spec.vcpus,
            kernel=str(self.env.kernel), initrd=str(self.env.initrd), console_log=str(run_dir / "console.log"),
            append=" ".join(filter(None, [ip_args, self.spec.kernel_args])),
            drives=tuple(drives), nics=tuple(nics),
            serial_ports=(SerialPort("agent0", AGENT_PORT, str(run_dir / "agent.sock")),
                          SerialPort("hb0", HEARTBEAT_PORT, str(run_dir / "hb.sock"))),
            balloon=self.spec.balloon, accel=accel,  # type: ignore[arg-type]
            machine_type=self.spec.machine, cpu_model=self.spec.cpu_model,
            incoming=incoming,
            extra_args=tuple(a for att in atts for a in att.extra_args) + self.spec.qemu_args + extra_args)

    def machine_spec(self, run_dir: Path, *, incoming: str | None = None) -> MachineSpec:
        """This VM's QEMU machine with its files in ``run_dir`` (e.g. the destination of a migration
        that another process drives), its live components attached as they are now."""
        return self._machine_spec([c.attachment for c in self.components.values() if c.live], run_dir,
                                  incoming=incoming)

    def _create_file_disks(self) -> None:
        for d in self.spec.disks:
            if d.kind != "file":
                continue
            if d.path:
                if not Path(d.path).exists():
                    raise SpecError(f"vm {self.name!r}: disk {d.name!r} has path {d.path!r}, which does not exist "
                                    "(hvsim creates only disks without an explicit path)")
                continue
            make_raw_disk(self.disk_path(d), d.size_mib, d.format)

    async def _prepare_components(self) -> list[Attachment]:
        return [await c.prepare(self.host) for c in self.components.values()]

    async def _stop_components(self) -> None:
        errors = []
        for c in self.components.values():
            try:
                await c.stop()
            except ComponentError as exc:
                errors.append(f"{c.id}: {exc}")
        if errors:
            log.error("vm %s: stopping components: %s", self.name, "; ".join(errors))

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self, wait_ready: bool = False, ready_timeout: float = 90.0) -> None:
        """Start QEMU (libvirt: virDomainCreate). Capacity (the emulated host's, and the machine's real
        memory) is checked before any process starts; components are prepared first."""
        async with self._op("start"):
            check_machine_memory(self.spec)
            self.host.reserve(self.spec)      # CapacityError before anything is started
            try:
                self.fsm.set(VMState.STARTING, "booting")
                self._create_file_disks()
                attachments = await self._prepare_components()
                proc = self.host.qemu_process(self._machine_spec(attachments, self.instance_dir), self.instance_dir)
                self.started_at = time.monotonic()
                try:
                    await proc.launch()
                finally:
                    if proc.pid is not None:
                        self.env.track_process(proc.pid, f"QEMU of vm {self.name}")
            except BaseException as exc:
                await self._stop_components()
                self.host.release(self.name)
                if self.state is VMState.STARTING:
                    self.fsm.set(VMState.SHUTOFF, "failed")
                if isinstance(exc, LaunchError):
                    raise VMError(f"vm {self.name!r} failed to start: {exc}") from exc
                raise
            self._adopt(proc)
            self.fsm.set(VMState.RUNNING, "booted")
        if wait_ready:
            await self.wait_ready(ready_timeout)

    async def attach_running(self, process: QemuProcess, *, instance_dir: Path | None = None, paused: bool = False,
                             generation: int | None = None,
                             components: dict[str, dict[str, Any]] | None = None) -> None:
        """Adopt a QEMU of this VM that runs already, without restarting the guest: one an earlier
        owner started detached (a host agent before its restart) and that was re-attached
        (:meth:`QemuProcess.reattach`), or the destination of a migration driven by another process.
        ``instance_dir`` holds its sockets and logs; ``components`` the records their
        :meth:`Component.detach` returned (each component re-attaches to its running processes).
        SHUTOFF -> STARTING -> RUNNING (or PAUSED), reasons "re-attaching"/"re-attached"; capacity is
        reserved first (CapacityError, and nothing is adopted, if the host cannot take it)."""
        async with self._op("attach"):
            if process.state is not ProcState.RUNNING or process.qmp is None:
                raise VMError(f"vm {self.name!r}: cannot adopt QEMU pid {process.pid}: it is {process.state.value}")
            self.host.reserve(self.spec)
            try:
                self.fsm.set(VMState.STARTING, "re-attaching")
                if instance_dir is not None:
                    self.instance_dir = Path(instance_dir)
                    self.agent = GuestAgent(self.name, self.agent_socket, self._guard)
                records = components or {}
                for cid, c in self.components.items():
                    await c.reattach(self.host, records.get(cid, {}))
            except BaseException:
                await self._stop_components()
                self.host.release(self.name)
                if self.state is VMState.STARTING:
                    self.fsm.set(VMState.SHUTOFF, "re-attach failed")
                raise
            if process.pid is not None:
                self.env.track_process(process.pid, f"QEMU of vm {self.name} (re-attached)")
            self._adopt(process)
            if generation is not None:
                self.generation = generation
            self.fsm.set(VMState.PAUSED if paused else VMState.RUNNING, "re-attached")

    async def detach(self) -> dict[str, dict[str, Any]]:
        """Let go of this VM's QEMU and components without stopping them (the process managing
        them is going away; a later one adopts them with :meth:`attach_running`). Waits for the
        operation in progress. The VM is SHUTOFF ("detached") afterwards; its owner drops it
        (:meth:`Cluster.detach_vm`). Returns the components' records for re-attaching."""
        async with self._lock.hold("detach"):
            proc = self.process
            if not self.has_process or proc is None:
                raise IllegalTransitionError(
                    f"vm {self.name!r}", self.state, (), action="detach",
                    message=f"vm {self.name!r} has no QEMU to let go (it is {self.state.value})")
            if not proc.detached:
                raise VMError(f"vm {self.name!r}: its QEMU dies with this process (no power domain): it cannot be "
                              "let go")
            self._expect_exit = proc
            await self.agent.close()
            if self._watch is not None:
                self._watch.cancel()
                await asyncio.gather(self._watch, return_exceptions=True)
            await proc.detach()
            records = {cid: await c.detach() for cid, c in self.components.items()}
            self.host.release(self.name)
            self.process = None
            self._expect_exit = None
            self.fsm.set(VMState.SHUTOFF, "detached")
            return records

    @contextlib.asynccontextmanager
    async def _op(self, action: str) -> AsyncIterator[None]:
        """Hold the VM for ``action``: refused at once if the state does not allow it (e.g. a pause
        while migrating), else wait for the operation in progress, then check again."""
        require(self.fsm, action)
        async with self._lock.hold(action):
            require(self.fsm, action)
            yield

    def _adopt(self, proc: QemuProcess) -> None:
        """Make ``proc`` this VM's QEMU and watch it for exits."""
        self.process = proc
        self.generation += 1
        self._guest_shutdown = False
        assert proc.qmp is not None
        sub = proc.qmp.subscribe("SHUTDOWN")
        self._watch = asyncio.create_task(self._watch_exit(proc, sub), name=f"vm-watch-{self.name}")

    async def _watch_exit(self, proc: QemuProcess, sub: Any) -> None:
        code = await asyncio.shield(proc.exited)
        ev = sub.get_nowait()
        if ev is not None:
            self._guest_shutdown = bool(ev.get("data", {}).get("guest"))
        sub.close()
        if proc is not self.process or proc is self._expect_exit:
            return  # we stopped it ourselves (destroy, shutdown, migration); they set the state
        await self._cleanup_after_exit()
        await self._stop_components()
        if self._guest_shutdown or (self.state is VMState.SHUTTING_DOWN and code == 0):
            self.fsm.set(VMState.SHUTOFF, "shutdown")
        else:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self.fsm.set(VMState.CRASHED, f"qemu exited unexpectedly ({how})")

    async def _cleanup_after_exit(self) -> None:
        self.host.release(self.name)
        await self.agent.close()
        if self.process is not None:
            await self.process.kill()  # closes QMP; reaps (already exited)
        for p in (self.agent_socket, self.heartbeat_socket):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    async def _guard(self, aw: Awaitable[Any], what: str, timeout: float | None) -> Any:
        """Await ``aw`` racing QEMU's death (used by the agent)."""
        if self.process is None or self.process.qmp is None:
            return await wait_for(aw, timeout)
        return await self.process.qmp.race(aw, what, timeout)

    async def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait until the guest agent answers; returns seconds since start (boot time)."""
        if not self.has_process:
            raise IllegalTransitionError(f"vm {self.name!r}", self.state, (), action="wait for readiness",
                                         message=f"cannot wait for vm {self.name!r} to be ready: it is "
                                                 f"{self.state.value}")
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
        require(self.fsm, "agent")
        if not self.agent.connected:
            await self.agent.connect()
        return await self.agent.exec(command, timeout=timeout, check=check)

    async def pause(self) -> None:
        async with self._op("pause"):
            # a pause cancelled after QEMU had stopped (its caller went away) left QEMU stopped:
            # no STOP event would come for a second ``stop``, so ask QEMU first
            if not await self._qemu_running():
                self.fsm.set(VMState.PAUSED, "QEMU was already stopped")
                return
            await self._qmp_then_event("stop", "STOP")
            self.fsm.set(VMState.PAUSED, "user")

    async def resume(self) -> None:
        async with self._op("resume"):
            if await self._qemu_running():
                self.fsm.set(VMState.RUNNING, "QEMU was already running")
                return
            await self._qmp_then_event("cont", "RESUME")
            self.fsm.set(VMState.RUNNING, "unpaused")

    async def _qemu_running(self) -> bool:
        try:
            st = await self.qmp.execute("query-status")
        except QEMUBridgeError as exc:
            raise VMError(f"vm {self.name!r}: query-status failed: {exc}") from exc
        return bool(st.get("running")) if isinstance(st, dict) else False

    async def reset(self) -> None:
        """Hard reset (system_reset); the guest reboots, then wait_ready() again."""
        async with self._op("reset"):
            await self._qmp_then_event("system_reset", "RESET")
            self.boot_time_s = None
            self.started_at = time.monotonic()
            if self.state is VMState.RUNNING:
                self.fsm.set(VMState.RUNNING, "reset")

    async def _qmp_then_event(self, command: str, event: str, timeout: float = 10.0) -> None:
        try:
            await self.qmp.wait_event(event, timeout=timeout, trigger=lambda: self.qmp.execute(command))
        except QEMUBridgeError as exc:
            raise VMError(f"vm {self.name!r}: {command} failed: {exc}") from exc

    async def shutdown(self, timeout: float = 60.0) -> None:
        """ACPI power button; waits until the guest powered off (libvirt: shutdown + wait)."""
        async with self._op("shutdown"):
            self.fsm.set(VMState.SHUTTING_DOWN, "acpi")
            proc = self.process
            assert proc is not None
            self._expect_exit = proc
            proc.expect_exit()
            try:
                await self.qmp.execute("system_powerdown")
                await proc.wait_exit(timeout)
            except TimeoutError as exc:
                if not proc.exited.done():
                    self._expect_exit = None
                    self.fsm.set(VMState.RUNNING, "shutdown-timeout")
                    raise VMError(f"vm {self.name!r}: guest did not power off within {timeout:g}s "
                                  "after the ACPI power button") from exc
            except QEMUExitedError:
                pass  # exited on the way: exactly what we wanted
            await self._watch_done()
            await self._cleanup_after_exit()
            await self._stop_components()
            self._expect_exit = None
            if self.state is not VMState.SHUTOFF:
                self.fsm.set(VMState.SHUTOFF, "shutdown")

    async def destroy(self) -> None:
        """Immediate hard stop (libvirt: virDomainDestroy). A migration holding the VM is asked to
        give up first (it rolls back), then the VM is destroyed. Raises TeardownError if a process
        of the VM survived."""
        lease = self._lease
        if lease is not None:
            lease.preempt("the VM is being destroyed")
        async with self._lock.hold("destroy"):
            if self.state is VMState.SHUTOFF:
                await self._stop_components()
                return
            require(self.fsm, "destroy")
            proc = self.process
            if proc is not None:
                self._expect_exit = proc
                await proc.kill()
            await self._watch_done()
            await self._cleanup_after_exit()
            await self._stop_components()
            self._expect_exit = None
            self.fsm.set(VMState.SHUTOFF, "destroyed")
            survivors = [f"QEMU pid {proc.pid}"] if proc is not None and proc.pid and procfs.alive(proc.pid) else []
            survivors += [f"{c.id} pid {p}" for c in self.components.values() for p in c.pids()]
            if survivors:
                raise TeardownError(f"vm {self.name!r}: processes survived destroy", survivors)

    async def _watch_done(self) -> None:
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)

    def files_in_use(self) -> dict[int, list[str]]:
        """Live processes holding files of this VM's directory open (pid -> paths)."""
        return procfs.holders(self.run_dir) if self.run_dir.exists() else {}

    async def remove(self) -> None:
        """Delete the VM's files and its components' (undefine). Refused while the VM has a QEMU,
        or while any process still holds one of its files (a backing file under a live shim)."""
        async with self._lock.hold("undefine"):
            require(self.fsm, "undefine")
            live = [c.id for c in self.components.values() if c.live]
            held = self.files_in_use()
            if live or held:
                what = [f"component {c} is {self.components[c].state.value}" for c in live] + \
                       [f"pid {pid} holds {', '.join(paths)}" for pid, paths in held.items()]
                raise BusyError(f"cannot undefine vm {self.name!r}: its files are in use: " + "; ".join(what))
            for c in self.components.values():
                if c.state is not ComponentState.REMOVED:
                    await c.remove()
            self.close_subscriptions()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- migration ------------------------------------------------------------------------------------
    def begin_migration(self, dest: Host) -> MigrationLease:
        """Lend this VM to a migration to ``dest``: refused at once (BusyError) if another operation
        holds the VM, IllegalTransitionError if it is not running or paused, CapacityError if ``dest``
        cannot take it (reserved here). The VM is MIGRATING until the lease commits or aborts."""
        holder = f"migration to {dest.name}"
        if not self._lock.try_acquire(holder):
            raise BusyError(f"vm {self.name!r} is busy: {self._lock.holder} in progress")
        try:
            require(self.fsm, "migrate")
            if dest is self.host:
                raise SpecError(f"cannot migrate vm {self.name!r}: source and destination are the same host "
                                f"{dest.name!r}")
            dest.reserve(self.spec)
            lease = MigrationLease(self, dest)
            self.fsm.set(VMState.MIGRATING, f"migrating to {dest.name}")
            self._lease = lease
            return lease
        except BaseException:
            self._lock.release()
            raise

    # -- queries ------------------------------------------------------------------------------------
    async def query_status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.qmp.execute("query-status")
        return result

    def status_row(self) -> dict[str, Any]:
        return {"host": self.host.name, "vm": self.name, "state": self.state.value, "reason": self.reason,
                "memory_mib": self.spec.memory_mib, "vcpus": self.spec.vcpus, "pid": self.pid,
                "boot_s": round(self.boot_time_s, 2) if self.boot_time_s else None}

    def to_dict(self) -> dict[str, Any]:
        """Everything a manager would persist about this VM (components and extensions included)."""
        return {"spec": self.spec.to_dict(), "host": self.host.name, "state": self.state.value, "reason": self.reason,
                "generation": self.generation, "components": [c.to_dict() for c in self.components.values()],
                "extensions": {k: v.to_dict() for k, v in self.extensions.items() if hasattr(v, "to_dict")}}

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.state.value} on {self.host.name}>"


class LeaseState(enum.Enum):
    HELD = "held"
    COMMITTED = "committed"
    ABORTED = "aborted"


_LEASE_TRANSITIONS = {LeaseState.HELD: {LeaseState.COMMITTED, LeaseState.ABORTED},
                      LeaseState.COMMITTED: set(), LeaseState.ABORTED: set()}


class MigrationLease:
    """A VM lent to one migration (:meth:`VM.begin_migration`). While it is HELD the VM is MIGRATING
    and its operation lock is taken; it ends exactly once, by :meth:`commit` (the destination QEMU
    becomes the VM's) or :meth:`abort` (the VM stays where it was). ``destroy`` asks the holder to
    give up through ``on_preempt``."""

    def __init__(self, vm: VM, dest: Host) -> None:
        self._vm = vm
        self.vm_name = vm.name
        self.spec = vm.spec
        self.source = vm.host
        self.destination = dest
        self.prior_state = vm.state
        self.generation = vm.generation
        self.dir = vm.run_dir / f"mig{vm.generation}-{dest.name}-{secrets.token_hex(2)}"
        self.on_preempt: Callable[[str], None] | None = None
        self.fsm: StateMachine[LeaseState] = StateMachine(
            f"migration lease of vm {vm.name!r}", LeaseState.HELD, _LEASE_TRANSITIONS, error=StateError, log=log)

    @property
    def state(self) -> LeaseState:
        return self.fsm.state

    @property
    def source_qmp(self) -> QMPSession:
        return self._vm.qmp

    @property
    def source_alive(self) -> bool:
        p = self._vm.process
        return p is not None and p.qmp is not None and not p.exited.done() and self._vm.has_process

    @property
    def source_pid(self) -> int | None:
        """The source QEMU's pid (a migration reads the guest's memory through it before the start)."""
        return self._vm.pid

    @property
    def source_heartbeat_socket(self) -> Path:
        return self._vm.heartbeat_socket

    @property
    def components(self) -> list[Component]:
        return list(self._vm.components.values())

    def destination_spec(self, extra_args: tuple[str, ...] = (),
                         attachments: Mapping[str, Attachment] | None = None) -> MachineSpec:
        """The destination QEMU's machine: identical devices, files in :attr:`dir`, ``-incoming defer``.
        A component named in ``attachments`` (component id -> attachment of its peer on the
        destination) is attached to that peer; every other component is attached as it is attached
        now (it serves both QEMUs: today's shared-socket behaviour)."""
        given = dict(attachments or {})
        unknown = sorted(set(given) - set(self._vm.components))
        if unknown:
            raise SpecError(f"vm {self.vm_name!r} has no component(s) {unknown}; it has {sorted(self._vm.components)}")
        atts = [given.get(cid) or c.attachment for cid, c in self._vm.components.items()]
        return self._vm._machine_spec(atts, self.dir, incoming="defer", extra_args=extra_args)  # noqa: SLF001

    def track_process(self, pid: int, what: str) -> None:
        self._vm.env.track_process(pid, what)

    def publish(self, event: ClusterEvent) -> None:
        """Publish on the cluster's bus (migration progress, outcome)."""
        self._vm.env.events.publish(event)

    def subscribe(self, name: str, kinds: Iterable[type], filter: Callable[[ClusterEvent], bool]
                  ) -> Subscription[ClusterEvent]:
        return self._vm.env.events.subscribe(name, kinds=tuple(kinds), filter=filter)

    def preempt(self, reason: str) -> None:
        """Ask the holder to give the VM back (it aborts); a no-op once the lease ended."""
        if self.state is LeaseState.HELD and self.on_preempt is not None:
            self.on_preempt(reason)

    async def commit(self, process: QemuProcess, components: Mapping[str, Component] | None = None) -> None:
        """The migration completed: ``process`` (running on the destination, files in :attr:`dir`)
        becomes the VM's QEMU; the source QEMU is stopped, its files removed, the capacity moved, and
        VMMoved published. ``components`` (component id -> its peer on the destination, serving the
        destination QEMU) replace the VM's components of those ids; the source instances are retired
        (stopped, their own files deleted, the shared backing store kept)."""
        self.fsm.require("commit", LeaseState.HELD)
        vm = self._vm
        peers = dict(components or {})
        unknown = sorted(set(peers) - set(vm.components))
        if unknown:
            raise SpecError(f"vm {self.vm_name!r} has no component(s) {unknown}; it has {sorted(vm.components)}")
        old_proc, old_dir, old_host = vm.process, vm.instance_dir, vm.host
        await vm.agent.close()
        vm.host = self.destination
        vm.instance_dir = self.dir
        vm.agent = GuestAgent(vm.name, vm.agent_socket, vm._guard)  # noqa: SLF001 (the lease is the VM's own, same module)
        vm._adopt(process)  # noqa: SLF001 (the lease is the VM's own, same module)
        old_host.release(vm.name)
        retired = [vm.components[cid] for cid in peers]
        vm.components.update(peers)
        try:
            if old_proc is not None:
                await old_proc.stop()
            for c in retired:
                try:
                    await c.retire()
                except ComponentError as exc:
                    log.error("vm %s: retiring the source instance of %s failed: %s", vm.name, c.id, exc)
        finally:
            if old_dir != vm.run_dir and old_dir.name.startswith("mig"):
                shutil.rmtree(old_dir, ignore_errors=True)
            new = VMState.RUNNING if self.prior_state is VMState.RUNNING else VMState.PAUSED
            if vm.state is VMState.MIGRATING:
                vm.fsm.set(new, "migrated")
            self.fsm.set(LeaseState.COMMITTED, f"on {self.destination.name}")
            vm._lease = None  # noqa: SLF001 (the lease is the VM's own, same module)
            vm._lock.release()  # noqa: SLF001 (the lease is the VM's own, same module)
            vm.env.events.publish(VMMoved(vm=vm.name, source=old_host.name, destination=self.destination.name,
                                          reason="migrated"))

    async def hand_off(self) -> None:
        """The migration completed to a host this process does not run (the destination QEMU was
        started and adopted by another process, e.g. the destination's host agent): the source QEMU
        is stopped and its files removed, capacity released, the VM is SHUTOFF ("migrated to DEST")
        and VMMoved is published. The VM no longer runs here: its owner undefines it."""
        self.fsm.require("hand off", LeaseState.HELD)
        vm = self._vm
        old_proc, old_host = vm.process, vm.host
        vm._expect_exit = old_proc  # noqa: SLF001 (the lease is the VM's own, same module)
        try:
            await vm.agent.close()
            if old_proc is not None:
                await old_proc.stop()
            await vm._watch_done()  # noqa: SLF001 (the lease is the VM's own, same module)
            await vm._cleanup_after_exit()  # noqa: SLF001 (the lease is the VM's own, same module)
            await vm._stop_components()  # noqa: SLF001 (the lease is the VM's own, same module)
        finally:
            self.destination.release(vm.name)
            old_host.release(vm.name)
            vm._expect_exit = None  # noqa: SLF001 (the lease is the VM's own, same module)
            vm.process = None
            if vm.state is VMState.MIGRATING:
                vm.fsm.set(VMState.SHUTOFF, f"migrated to {self.destination.name}")
            self.fsm.set(LeaseState.COMMITTED, f"handed off to {self.destination.name}")
            vm._lease = None  # noqa: SLF001 (the lease is the VM's own, same module)
            vm._lock.release()  # noqa: SLF001 (the lease is the VM's own, same module)
            vm.env.events.publish(VMMoved(vm=vm.name, source=old_host.name, destination=self.destination.name,
                                          reason="migrated (handed off)"))

    def abort(self, reason: str) -> None:
        """The migration did not complete: the VM stays on its source in its prior state, the
        destination's reservation is released. Idempotent."""
        if self.state is not LeaseState.HELD:
            return
        vm = self._vm
        self.destination.release(vm.name)
        if vm.state is VMState.MIGRATING:
            vm.fsm.set(self.prior_state, f"migration-{reason}")
        self.fsm.set(LeaseState.ABORTED, reason)
        vm._lease = None  # noqa: SLF001 (the lease is the VM's own, same module)
        vm._lock.release()  # noqa: SLF001 (the lease is the VM's own, same module)

    def __repr__(self) -> str:
        return f"<MigrationLease {self.vm_name} {self.source.name}->{self.destination.name} {self.state.value}>"


def make_raw_disk(path: Path, size_mib: int, fmt: str = "raw") -> None:
    if path.exists():
        return
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        os.chmod(path, 0o600)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), f"{size_mib}M"], check=True)
