"""The host agent: one process per emulated host (inside that host's network namespace) that owns
the host's guests, built on the in-process :class:`~hvsim.core.cluster.Cluster` API (one host, its
capacity accounting, the VMs it runs). The manager drives it over its RPC
(:mod:`hvsim.control.agent_app`); this module is the logic.

**A guest outlives its host agent.** The host has a power domain (a cgroup the launcher created,
:class:`~hvsim.core.power.PowerDomain`): QEMUs start detached in it with QMP on a socket path.
Every VM the agent runs has a record on the agent's own disk (:mod:`.agent_records`): written
before its QEMU starts, updated when it runs. A restarted agent re-adopts every recorded QEMU that
still runs (pid, start time and QMP socket checked, :meth:`QemuProcess.reattach`,
:meth:`Cluster.adopt_vm`) without stopping it; a recorded QEMU that is gone is reported as lost. A
graceful stop (SIGTERM) lets every guest go (:meth:`Cluster.detach_vm`); nothing is stopped. A guest
never outlives its host: powering the domain off kills every process in it, the agent included.

**Fencing.** Every mutating call carries the manager's fencing token; the agent keeps the newest it
saw (on disk, before acting) and refuses older ones (:class:`StaleTokenError`), and refuses a call
whose lease deadline (``X-Fencing-Until``) has passed. Every mutating call, accepted or refused, is
appended to the agent's history (:class:`hvsim.control.fencing.HistoryLog`, on its disk, fsynced
before the call is carried out) for :func:`hvsim.control.fencing.audit`.

**Migrations** between agents: the source agent drives them with the migration engine and a
:class:`~hvsim.control.remote_transfer.RemoteTransfer`; the destination agent starts the incoming
QEMU (``incoming_*``) and adopts it once it runs.

States (one :class:`~hvbase.fsm.StateMachine`): new -> opening (re-adopting) -> serving -> closing
-> closed.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvbase.errors import HvsimError
from hvbase.fsm import StateMachine
from qmp_bridge import AttachError, MachineSpec, QEMUBridgeError, QemuProcess
from qmp_bridge.process import cmdline

from hvsim.core import procfs
from hvsim.core.cluster import Cluster
from hvsim.core.errors import NotFoundError as CoreNotFound
from hvsim.core.errors import SpecError
from hvsim.core.events import ClusterEvent, VMStateChanged
from hvsim.core.host import QMP_SOCKET, Host
from hvsim.core.lifecycle import VMState
from hvsim.core.model import DiskSpec, HostSpec, NicSpec, VMSpec
from hvsim.crosscloud.network import ISOLATED, GuestAddress, WanConfig, WanNetwork, WanNicDriver
from hvsim.core.power import PowerDomain
from hvsim.core.vm import VM
from hvsim.migration import Migration, MigrationError, start_migration
from hvsim.migration.transfer import DEFAULT_PORT_RANGE, MANAGED_CAPS, TransferOptions

from .agent_client import AgentClient, ClientTLS
from .agent_records import AgentRecords, LocalIncoming, LocalVM
from .agentrpc import (
    AgentInfo, ExecOutput, GuestSpec, IncomingRequest, MigrateOut, MigrationInfo, QemuInfo, QemuList,
)
from .datastore import clones_of, remove_vm_files, sweep_deleting
from .errors import ConflictError, ControlError, ControlInputError, ImageLockedError, NotFoundError, StaleTokenError
from .fencing import HistoryLog
from .imports import copy_image, resolve_import

log = logging.getLogger("hvsim.control.agent")

class AgentState(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    SERVING = "serving"
    CLOSING = "closing"
    CLOSED = "closed"


AGENT_TABLE = {
    AgentState.NEW: {AgentState.OPENING, AgentState.CLOSED},
    AgentState.OPENING: {AgentState.SERVING, AgentState.CLOSING},
    AgentState.SERVING: {AgentState.CLOSING},
    AgentState.CLOSING: {AgentState.CLOSED},
    AgentState.CLOSED: set(),
}


class AgentNotServingError(ControlError):
    """The agent is starting up or shutting down."""


@dataclass(frozen=True)
class AgentConfig:
    host: HostSpec
    state_dir: Path                       # the agent's own records and the guests' run files
    datastore: Path                       # the declared datastore directory (disks), shared by every host
    address: str = "127.0.0.1"            # this host's address: incoming migrations listen here
    power_domain: Path | None = None      # the host's cgroup (made by whoever powers the host on)
    images: Path | None = None
    accel: str | None = None
    client_tls: ClientTLS | None = None   # to call other agents over https (migrations)
    wan: WanConfig | None = None          # the inter-cloud network this host is on (VMs with ``network``)
    import_dir: Path | None = None        # data disks may be imported from images in here only


@dataclass
class Outgoing:
    """A migration this agent drives (it is the source)."""
    migration: Migration
    destination: str
    peer: AgentClient
    transfer: Any = None
    handed_off: bool = False
    error: str | None = None
    task: asyncio.Task[None] | None = None

    def info(self) -> MigrationInfo:
        m = self.migration
        last = m.last
        res = m.result
        return MigrationInfo(
            id=m.id, vm=m.vm_name, destination=self.destination, state=m.state.value, elapsed_s=round(m.elapsed_s, 3),
            passes=last.passes if last else 0, transferred=last.transferred if last else 0,
            remaining=last.remaining if last else 0, total=last.total if last else 0,
            mbps=round(last.mbps or 0.0, 2) if last else 0.0,
            destination_started=bool(self.transfer is not None and self.transfer.prepared) or self.handed_off,
            handed_off=self.handed_off, error=self.error[:256] if self.error else None,
            result=None if res is None else {
                "outcome": res.outcome, "total_s": res.total_s, "downtime_ms_qemu": res.downtime_ms_qemu,
                "bytes": res.bytes, "passes": res.passes, "postcopy": res.postcopy})


@dataclass
class Incoming:
    """An incoming migration: a QEMU waiting for (or receiving) a guest's state."""
    record: LocalIncoming
    process: QemuProcess
    vm: VM                                # defined here, SHUTOFF until adopted


class HostAgent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.records = AgentRecords(cfg.state_dir)
        self.history = HistoryLog(cfg.state_dir)
        self.fsm: StateMachine[AgentState] = StateMachine(f"host agent {cfg.host.name}", AgentState.NEW, AGENT_TABLE,
                                                          log=log)
        self.cluster: Cluster | None = None
        self._host: Host | None = None
        self.outgoing: dict[str, Outgoing] = {}       # vm -> latest migration driven from here
        self.incoming: dict[str, Incoming] = {}
        self.lost: dict[str, str] = {}                 # vm -> why it is no longer here (crashed, gone)
        self.started_at = time.time()
        self._ending: set[asyncio.Task[None]] = set()
        self._peers: dict[str, AgentClient] = {}
        self._events: Any = None
        self._busy: set[str] = set()                   # VMs the agent is starting, stopping, destroying
        self.wan: WanNetwork | None = None
        self._tops: dict[str, tuple[str, Path, str]] = {}  # vm -> its disk's active node, file, format

    # -- lifetime ---------------------------------------------------------------------------------
    @property
    def state(self) -> AgentState:
        return self.fsm.state

    @property
    def host(self) -> Host:
        assert self._host is not None
        return self._host

    @property
    def cl(self) -> Cluster:
        if self.cluster is None or self.state is not AgentState.SERVING:
            raise AgentNotServingError(f"host agent {self.cfg.host.name} is {self.state.value}")
        return self.cluster

    async def open(self) -> None:
        """Create the host (its power domain, capacity) and re-adopt every recorded guest."""
        self.fsm.require("open", AgentState.NEW)
        self.fsm.set(AgentState.OPENING)
        try:
            self.cfg.datastore.mkdir(mode=0o700, parents=True, exist_ok=True)
            for left in sweep_deleting(self.cfg.datastore):     # an interrupted disk removal's rest
                log.warning("removed %s (left by an interrupted removal of a VM's disks)", left)
            run = self.cfg.state_dir / "run"
            run.mkdir(mode=0o700, exist_ok=True)
            self.cluster = Cluster(self.cfg.host.name, run_dir=run, images=self.cfg.images, keep_run_dir=True,
                                   accel=self.cfg.accel)
            power = PowerDomain(self.cfg.power_domain) if self.cfg.power_domain is not None else None
            self._host = self.cluster.add_host(self.cfg.host, power=power)
            if self.cfg.wan is not None:
                if self.cfg.wan.host != self.cfg.host.name:
                    raise ControlInputError("wan", f"the WAN config is host {self.cfg.wan.host!r}'s, "
                                                   f"not {self.cfg.host.name!r}'s")
                self.wan = self.cfg.wan.network()
                await self.wan.setup([self.cfg.host.name])
                self.cluster.add_driver(WanNicDriver(self.wan))
            self._events = self.cluster.events.subscribe("host agent: VMs that end", kinds=(VMStateChanged,),
                                                         callback=self._vm_changed)
            await self._readopt()
        except BaseException:
            self.fsm.set(AgentState.CLOSING, "open failed")
            await self._close_cluster()
            self.fsm.set(AgentState.CLOSED)
            raise
        self.fsm.set(AgentState.SERVING, f"{len(self.cluster.vms)} guests")

    async def close(self) -> None:
        """Stop serving; every guest keeps running (their records stay on disk for the next agent)."""
        if self.state in (AgentState.CLOSING, AgentState.CLOSED):
            return
        if self.state is AgentState.NEW:
            self.fsm.set(AgentState.CLOSED, "closed before open")
            return
        self.fsm.set(AgentState.CLOSING)
        try:
            for out in list(self.outgoing.values()):
                if out.task is not None and not out.task.done():
                    with contextlib.suppress(MigrationError):
                        out.migration.cancel("the source host agent is shutting down")
                    await asyncio.gather(out.task, return_exceptions=True)
            if self._ending:
                await asyncio.gather(*self._ending, return_exceptions=True)
            assert self.cluster is not None
            for name in list(self.cluster.vms):
                if name in self.incoming:
                    continue
                vm = self.cluster.vms[name]
                if vm.has_process:
                    pid = vm.pid
                    try:
                        comps = await self.cluster.detach_vm(name)
                        self._save(vm, pid=pid, components=comps)
                    except Exception as e:   # keep letting the others go
                        log.error("could not let %s go: %s", name, e)
            for inc in list(self.incoming.values()):
                await inc.process.detach()
                self.cluster.vms.pop(inc.vm.name, None)
                inc.vm.close_subscriptions()
            self.incoming.clear()
        finally:
            await self._close_cluster()
            for p in self._peers.values():
                await p.close()
            self.history.close()
            self.fsm.set(AgentState.CLOSED)

    async def _close_cluster(self) -> None:
        if self._events is not None:
            self._events.close()
        if self.cluster is not None:
            await self.cluster.close()

    # -- fencing ----------------------------------------------------------------------------------
    def fence(self, token: int, *, verb: str = "call", vm: str | None = None, until: float | None = None) -> None:
        """Accept ``token`` (not older than the newest seen, which it may become; ``until``, the
        caller's lease deadline on the wall clock, not passed) or refuse; either way the call is
        in the history before this returns."""
        newest = self.records.token
        reason = None
        if token < newest:
            reason = f"stale fencing token {token}: this host agent has seen {newest} (a newer manager)"
        elif until is not None and (late := time.time() - until) > 0:
            reason = f"fencing token {token}: its lease deadline passed {late:.3f} s before the call arrived"
        if reason is not None:
            self.history.append(verb, vm, token, False, reason)
            log.warning("refused %s %s: %s", verb, vm or "", reason)
            raise StaleTokenError(token, newest, reason)
        if token > newest:
            self.records.set_token(token)
            log.info("fencing token %d is the newest now (was %d)", token, newest)
        self.history.append(verb, vm, token, True)

    # -- records ----------------------------------------------------------------------------------
    def _save(self, vm: VM, *, pid: int | None = None, components: dict[str, dict[str, Any]] | None = None) -> None:
        """Write ``vm``'s record (``pid``: its QEMU's, when the VM no longer holds it: detached)."""
        old = self.records.vms().get(vm.name)
        pid = pid if pid is not None else vm.pid
        g = old.spec if old is not None else guest_of(vm.spec)
        self.records.put_vm(LocalVM(spec=g, instance_dir=str(vm.instance_dir), pid=pid,
                                    start_time=procfs.start_time(pid) if pid else "", generation=vm.generation,
                                    components=components if components is not None else
                                    (old.components if old else {}),
                                    wan_subnet=old.wan_subnet if old is not None and old.wan_subnet else
                                    self._wan_subnet(g)))

    def _wan_subnet(self, g: GuestSpec) -> str | None:
        """``g``'s /30 on the inter-cloud network (handed out now if it has none yet), for its record."""
        if g.network is None or self.wan is None:
            return None
        return str(self.wan.address(g.name, self.cfg.host.name, isolated=g.network == ISOLATED).subnet)

    def _gone(self, name: str) -> None:
        """``name`` has no record here any more: its WAN address may be handed out again, and it
        no longer holds the service address."""
        if self.wan is not None:
            try:
                self.wan.release(name, self.cfg.host.name)
            except HvsimError as e:        # still plugged (its tap was not removed): the address stays taken
                log.warning("vm %s: WAN address kept: %s", name, e)
        if self.records.service() == name:
            self.records.set_service(None)

    def vm_spec(self, g: GuestSpec) -> VMSpec:
        p = g.profile
        bus = p.disk_bus if p is not None else "virtio-blk"
        disks: tuple[DiskSpec, ...] = ()
        if g.disk_mib and g.clone_of is not None:
            disks = (DiskSpec("disk0", g.disk_mib, path=str(self.overlay_path(g.name)), format="qcow2", bus=bus),)
        elif g.disk_mib and (top := self.active_top(g.name)) is not None:
            disks = (DiskSpec("disk0", g.disk_mib, path=str(top), format="qcow2", bus=bus),)
        elif g.disk_mib:
            disks = (DiskSpec("disk0", g.disk_mib, path=str(self.disk_path(g.name)), bus=bus),)
        nics: tuple[NicSpec, ...] = ()
        kernel_args = ""
        if g.network is not None:
            wan = self._wan(g.name)
            isolated = g.network == ISOLATED
            nics = (NicSpec("wan0", network=g.network, model=p.nic_model if p is not None else "virtio-net-pci"),)
            kernel_args = wan.kernel_args(g.name, self.cfg.host.name, isolated=isolated)
        if p is None:
            return VMSpec(g.name, vcpus=g.vcpus, memory_mib=g.memory_mib, disks=disks, nics=nics,
                          kernel_args=kernel_args)
        return VMSpec(g.name, vcpus=g.vcpus, memory_mib=g.memory_mib, disks=disks, nics=nics, machine=p.machine,
                      cpu_model=p.cpu_model, kernel_args=kernel_args)

    def _wan(self, vm: str) -> WanNetwork:
        if self.wan is None:
            raise ControlInputError("network", f"vm {vm!r}: host {self.cfg.host.name} is on no inter-cloud "
                                               "network (its agent was started without --wan)")
        return self.wan

    def disk_path(self, vm: str) -> Path:
        return self.cfg.datastore / vm / "disk0.img"

    def active_top(self, vm: str) -> Path | None:
        """The qcow2 file ``vm`` writes into since its disk was snapshotted for a clone (its chain
        ends in ``disk0.img``), recorded in the datastore beside the disk so that every later start
        of the VM, here or on another host, opens the chain and not the frozen image."""
        ptr = self.cfg.datastore / vm / "disk0.active"
        try:
            name = ptr.read_text().strip()
        except FileNotFoundError:
            return None
        top = ptr.parent / name
        if "/" in name or not name.endswith(".qcow2") or not top.is_file():
            raise ControlError(f"vm {vm!r}: its disk's active-layer record {ptr} names {name!r}, not a qcow2 file "
                               "beside it")
        return top

    def _set_active_top(self, vm: str, top: Path) -> None:
        ptr = self.cfg.datastore / vm / "disk0.active"
        part = ptr.with_name(ptr.name + ".part")
        with open(part, "w") as f:
            f.write(top.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, ptr)

    def overlay_path(self, vm: str) -> Path:
        """A clone's disk: a qcow2 overlay on its origin's frozen image (:meth:`clone_disk`)."""
        return self.cfg.datastore / vm / "disk0-overlay.qcow2"

    async def _create_disk(self, g: GuestSpec) -> None:
        if not g.disk_mib:
            return
        if g.clone_of is not None:
            if not self.overlay_path(g.name).exists():
                raise ConflictError(f"vm {g.name!r} is a clone of {g.clone_of!r} whose disk overlay was not made "
                                    f"on host {self.cfg.host.name} (POST /v1/vms/{g.clone_of}/clone first)")
            return
        p = self.disk_path(g.name)
        if p.exists():
            return
        if g.data_image is not None:
            src = resolve_import(self.cfg.import_dir, g.data_image, g.disk_mib)
            await asyncio.to_thread(copy_image, src, p, g.disk_mib)
            log.info("vm %s: disk imported from %s (%d bytes)", g.name, src, src.stat().st_size)
            return
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(g.disk_mib << 20)
        os.chmod(p, 0o600)

    async def remove_disks(self, name: str) -> list[str]:
        """Delete ``name``'s datastore directory (its disk, qcow2 tops, a clone's overlay: every
        file of it, :func:`hvsim.control.datastore.remove_vm_files`), for an undefine. Refused
        (ConflictError, nothing removed) while a QEMU of it is here (running or arriving) or while
        another VM's overlay stands on its frozen image (a clone: undefine it first). Removing
        nothing (no directory) succeeds: a retried call is harmless."""
        cl = self.cl
        if name in self.incoming or name in cl.vms:
            raise ConflictError(f"vm {name!r} has a QEMU on host {self.host.name}: its disks stay while it exists")
        clones = clones_of(self.cfg.datastore, name)
        if clones:
            raise ConflictError(f"vm {name!r}'s disk is the frozen base of clone(s) {', '.join(clones)}: "
                                "undefine the clone(s) first")
        with self._own(name):
            removed = await asyncio.to_thread(remove_vm_files, self.cfg.datastore, name)
            self._tops.pop(name, None)
        log.info("vm %s: datastore files removed: %s", name, removed)
        return removed

    # -- the inter-cloud network and copy-on-write clones (hvsim.control.wanops) --------------------------
    def _guest(self, name: str) -> GuestSpec:
        rec = self.records.vms().get(name)
        return rec.spec if rec is not None else guest_of(self._vm(name).spec)

    def address(self, name: str) -> GuestAddress:
        """``name``'s address on the inter-cloud network (ConflictError: it has no NIC there)."""
        self._vm(name)
        g = self._guest(name)
        if g.network is None:
            raise ConflictError(f"vm {name!r} has no NIC on the inter-cloud network (defined without 'network')")
        return self._wan(name).address(name, self.cfg.host.name, isolated=g.network == ISOLATED)

    async def route_service(self, name: str) -> str:
        """Route the inter-cloud network's service address to ``name`` (running, NIC on ``wan``)."""
        vm = self._vm(name)
        if vm.state not in (VMState.RUNNING, VMState.PAUSED):
            raise ConflictError(f"vm {name!r} is {vm.state.value}: the service address needs a running guest")
        a = self.address(name)
        if a.isolated:
            raise ConflictError(f"vm {name!r} is on the isolated network: it cannot carry the service address")
        wan = self._wan(name)
        try:
            await wan.move_service(name, self.cfg.host.name)
        except HvsimError as e:
            raise ConflictError(f"vm {name!r}: {e}") from e
        self.records.set_service(name)       # a restarted agent routes it to this VM again
        return wan.service_ip

    async def clone_disk(self, name: str, clone: str) -> Path:
        """A copy-on-write overlay for ``clone`` on ``name``'s disk at this instant: the running
        VM's disk is snapshotted (QMP ``blockdev-snapshot-sync``: the VM writes into a new qcow2 top
        from now on and the image under it stops changing), the clone's qcow2 overlay is made on
        that frozen image (nothing the clone writes reaches the VM). Returns the overlay's path."""
        vm = self._vm(name)
        if not vm.has_process or vm.state not in (VMState.RUNNING, VMState.PAUSED):
            raise ConflictError(f"vm {name!r} is {vm.state.value}: only a running VM's disk can be cloned")
        if not vm.spec.disks:
            raise ConflictError(f"vm {name!r} has no disk to clone")
        if clone in self.cl.vms or clone in self.incoming:
            raise ConflictError(f"vm {clone!r} exists on host {self.cfg.host.name} already")
        with self._own(name):
            d = vm.spec.disks[0]
            node, frozen, fmt = self._tops.get(name, (f"disk-{d.name}", vm.disk_path(d), d.format))
            tag = secrets.token_hex(3)
            top = self.disk_path(name).with_name(f"disk0-top-{tag}.qcow2")
            new_node = f"disk-{d.name}-top-{tag}"
            await vm.qmp.execute("blockdev-snapshot-sync", {"node-name": node, "snapshot-file": str(top),
                                                            "snapshot-node-name": new_node, "format": "qcow2"})
            self._tops[name] = (new_node, top, "qcow2")
            self._set_active_top(name, top)      # a later start opens the chain, not the frozen image
            overlay = self.overlay_path(clone)
            overlay.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            overlay.unlink(missing_ok=True)
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(frozen), "-F", fmt, str(overlay),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise ControlError(f"vm {name!r}: the clone's overlay could not be made: {err.decode()[-500:]}")
            os.chmod(overlay, 0o600)
        log.info("vm %s: disk snapshotted (%s frozen, writes go to %s); clone %s overlays it", name, frozen, top, clone)
        return overlay

    def _machine(self, spec: VMSpec, instance_dir: Path) -> MachineSpec:
        """Enough of the machine to re-attach its QEMU (the QMP socket and pid are what is checked)."""
        cl = self.cluster
        assert cl is not None
        return MachineSpec(name=spec.name, memory_mib=spec.memory_mib, vcpus=spec.vcpus, kernel=str(cl.kernel),
                           initrd=str(cl.initrd), console_log=str(instance_dir / "console.log"))

    # -- re-adoption --------------------------------------------------------------------------------
    def _find_pid(self, recorded: int | None, start: str, qmp_socket: Path) -> int | None:
        """The QEMU serving QMP on ``qmp_socket``: the recorded pid if it is that process, else any
        process of the power domain whose command line names the socket."""
        if recorded and procfs.alive(recorded, start or None) and \
                any(f"path={qmp_socket}," in a for a in cmdline(recorded)):
            return recorded
        pids = PowerDomain(self.cfg.power_domain).pids() if self.cfg.power_domain else []
        for pid in pids:
            if procfs.alive(pid) and any(f"path={qmp_socket}," in a for a in cmdline(pid)):
                return pid
        return None

    async def _reattach(self, name: str, spec: VMSpec, instance_dir: Path, pid: int | None, start: str
                        ) -> tuple[QemuProcess, str] | None:
        sock = instance_dir / QMP_SOCKET
        found = self._find_pid(pid, start, sock)
        if found is None:
            return None
        try:
            proc = await QemuProcess.reattach(self._machine(spec, instance_dir), instance_dir, found, sock)
        except AttachError as e:
            log.error("vm %s: %s", name, e)
            return None
        try:
            status = str((await proc.qmp.execute("query-status", timeout=5)).get("status"))  # type: ignore[union-attr]
        except QEMUBridgeError as e:
            log.error("vm %s: re-attached QEMU pid %d does not answer query-status: %s", name, found, e)
            await proc.detach()
            return None
        return proc, status

    async def _readopt(self) -> None:
        cl = self.cluster
        assert cl is not None
        incoming = self.records.incoming()
        vms = self.records.vms()
        unaddressed = self._restore_addresses(vms, incoming)
        for name, rec in vms.items():
            if name in unaddressed:
                log.error("vm %s: not re-adopted (its QEMU is left running untouched): %s", name, unaddressed[name])
                continue
            spec = self.vm_spec(rec.spec)
            got = await self._reattach(name, spec, Path(rec.instance_dir), rec.pid, rec.start_time)
            if got is None:
                log.warning("vm %s: its QEMU is gone (it crashed, or the host was powered off meanwhile)", name)
                self.lost[name] = "its QEMU was gone when the host agent started"
                self.records.delete_vm(name)
                self._gone(name)
                continue
            proc, status = got
            try:
                vm = await cl.adopt_vm(spec, self.host, proc, instance_dir=Path(rec.instance_dir),
                                       paused=status != "running", generation=rec.generation, components=rec.components)
            except Exception as e:  # capacity, a component: keep the guest running untouched, report it
                log.error("vm %s: could not adopt QEMU pid %s: %s", name, proc.pid, e)
                await proc.detach()
                continue
            self._save(vm)
            incoming.pop(name, None)          # it was adopted after a migration: the VM record wins
            self.records.delete_incoming(name)
            log.info("vm %s: re-adopted QEMU pid %s (%s)", name, proc.pid, status)
        for name, inc in incoming.items():
            if name in unaddressed:
                log.error("incoming %s: not re-attached: %s", name, unaddressed[name])
                continue
            spec = self.vm_spec(inc.spec)
            got = await self._reattach(name, spec, Path(inc.instance_dir), inc.pid, inc.start_time)
            if got is None:
                self.records.delete_incoming(name)
                shutil.rmtree(inc.instance_dir, ignore_errors=True)
                self._gone(name)
                continue
            vm = await cl.define_vm(spec, self.host)
            self.host.reserve(spec)
            self.incoming[name] = Incoming(inc, got[0], vm)
            log.info("incoming migration %s of %s: re-attached QEMU pid %s (%s)", inc.migration_id, name,
                     got[0].pid, got[1])
        await self._restore_service()

    def _restore_addresses(self, vms: dict[str, LocalVM], incoming: dict[str, LocalIncoming]) -> dict[str, str]:
        """Give every recorded VM on the inter-cloud network its recorded /30 again, all of them
        before any address is handed out anew (an address derived in record order would differ from
        the one the guest was configured with). Returns the VMs that cannot have theirs (why)."""
        bad: dict[str, str] = {}
        if self.wan is None:
            return bad
        recs: list[LocalVM | LocalIncoming] = [*vms.values(), *incoming.values()]
        for rec in recs:
            if rec.spec.network is None or not rec.wan_subnet:
                continue
            try:
                self.wan.restore(rec.spec.name, self.cfg.host.name, rec.wan_subnet)
            except HvsimError as e:
                bad[rec.spec.name] = str(e)
        for rec in recs:            # records of an older agent (no subnet recorded): derived, after the rest
            if rec.spec.network is not None and not rec.wan_subnet and rec.spec.name not in bad:
                log.warning("vm %s: no WAN address recorded (an older agent's record); derived anew", rec.spec.name)
        return bad

    async def _restore_service(self) -> None:
        """Route the service address to the VM that held it before the restart (unless another
        host took it meanwhile, or that VM is gone: then the stale routes go)."""
        name = self.records.service()
        if name is None or self.wan is None:
            return
        host = self.cfg.host.name
        vm = self.cluster.vms.get(name) if self.cluster is not None else None
        try:
            if vm is not None and vm.has_process and any(p.vm == name and p.host == host and not p.isolated
                                                          for p in self.wan.plugged):
                if await self.wan.readopt_service(name, host):
                    log.info("service address %s routed to vm %s again", self.wan.service_ip, name)
                    return
            else:
                log.warning("service address: vm %s that held it is not here any more; its routes removed", name)
                await self.wan.drop_service_routes(host)
        except HvsimError as e:
            log.error("service address: not restored to vm %s: %s", name, e)
            return
        self.records.set_service(None)

    # -- events -------------------------------------------------------------------------------------
    def _vm_changed(self, event: ClusterEvent) -> None:
        """A guest that ended on its own (it crashed, or powered itself off) is forgotten here and
        reported as lost; what the agent stops itself is not."""
        assert isinstance(event, VMStateChanged)
        name = event.vm
        if name in self._busy or name in self.incoming:
            return
        if not (event.new is VMState.CRASHED or (event.new is VMState.SHUTOFF and event.reason == "shutdown")):
            return
        self.lost[name] = event.reason
        task = asyncio.get_running_loop().create_task(self._forget(name), name=f"forget-{name}")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    @contextlib.contextmanager
    def _own(self, name: str) -> Iterator[None]:
        """The agent itself is changing ``name`` (its state changes are not the guest's doing)."""
        if name in self._busy:
            raise ConflictError(f"vm {name!r} is busy with another request on host {self.host.name}")
        self._busy.add(name)
        try:
            yield
        finally:
            self._busy.discard(name)

    async def _forget(self, name: str) -> None:
        cl = self.cluster
        if cl is None or name not in cl.vms:
            return
        vm = cl.vms[name]
        try:
            if vm.state is VMState.CRASHED:
                await vm.destroy()
            await cl.undefine_vm(name)
        except Exception as e:   # keep the agent serving; the record goes anyway
            log.error("forgetting vm %s: %s", name, e)
        self.records.delete_vm(name)
        self._gone(name)
        self._tops.pop(name, None)
        log.warning("vm %s ended on its own: %s", name, self.lost.get(name))

    # -- queries ------------------------------------------------------------------------------------
    def info(self) -> AgentInfo:
        h = self.host
        s = h.spec
        return AgentInfo(host=s.name, datacenter=s.datacenter, vcpus=s.vcpus, memory_mib=s.memory_mib,
                         cpu_overcommit=s.cpu_overcommit, memory_overcommit=s.mem_overcommit,
                         used_vcpus=h.used_vcpus, used_memory_mib=h.used_memory_mib, address=self.cfg.address,
                         pid=os.getpid(), started_at=self.started_at, token=self.records.token,
                         vms=len(self.cl.vms) - len(self.incoming),
                         power_domain=str(self.cfg.power_domain) if self.cfg.power_domain else None)

    async def _status(self, proc: QemuProcess | None) -> str:
        if proc is None or proc.qmp is None or proc.exited.done():
            return "unknown"
        try:
            return str((await proc.qmp.execute("query-status", timeout=3)).get("status", "unknown"))
        except QEMUBridgeError:
            return "unknown"

    async def qemu_info(self, name: str) -> QemuInfo:
        cl = self.cl
        if name in self.incoming:
            inc = self.incoming[name]
            return QemuInfo(vm=name, role="incoming", pid=inc.process.pid, qemu_status=await self._status(inc.process),
                            state="incoming", incoming_id=inc.record.migration_id,
                            console_log=str(Path(inc.record.instance_dir) / "console.log"))
        try:
            vm = cl.vm(name)
        except CoreNotFound as e:
            raise NotFoundError(f"host {self.host.name} runs no vm {name!r}") from e
        out = self.outgoing.get(name)
        return QemuInfo(vm=name, role="vm", pid=vm.pid, qemu_status=await self._status(vm.process if vm.has_process
                                                                                         else None),
                        state=vm.state.value, busy_with=vm.busy_with,
                        migration=out.info() if out is not None and not out.migration.state.terminal else None,
                        generation=vm.generation, agent_socket=str(vm.agent_socket),
                        heartbeat_socket=str(vm.heartbeat_socket), console_log=str(vm.console_log),
                        boot_s=vm.boot_time_s)

    async def qemus(self) -> QemuList:
        names = sorted(self.cl.vms)
        items = []
        for n in names:
            with contextlib.suppress(NotFoundError):
                items.append(await self.qemu_info(n))
        return QemuList(items=items, lost=dict(self.lost), token=self.records.token)

    def migration_info(self, name: str) -> MigrationInfo:
        out = self.outgoing.get(name)
        if out is None:
            raise NotFoundError(f"no migration of vm {name!r} was driven from host {self.host.name}")
        return out.info()

    async def stats(self, name: str) -> dict[str, Any]:
        vm = self._vm(name)
        out: dict[str, Any] = {"vm": name, "state": vm.state.value, "pid": vm.pid, "generation": vm.generation,
                               "boot_s": vm.boot_time_s, "host": {"used_vcpus": self.host.used_vcpus,
                                                                  "used_memory_mib": self.host.used_memory_mib}}
        if vm.has_process:
            with contextlib.suppress(QEMUBridgeError):
                out["status"] = await vm.qmp.execute("query-status", timeout=3)
            with contextlib.suppress(QEMUBridgeError):
                out["balloon"] = await vm.qmp.execute("query-balloon", timeout=3)
        out["components"] = {cid: await c.stats() for cid, c in vm.components.items()}
        return out

    def vm(self, name: str) -> VM:
        """The VM this agent runs (NotFoundError otherwise)."""
        return self._vm(name)

    def _vm(self, name: str) -> VM:
        if name in self.incoming:
            raise ConflictError(f"vm {name!r} is arriving on host {self.host.name} (incoming migration)")
        try:
            return self.cl.vm(name)
        except CoreNotFound as e:
            raise NotFoundError(f"host {self.host.name} runs no vm {name!r}") from e

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, g: GuestSpec, *, wait_ready: bool, ready_timeout: float) -> QemuInfo:
        cl = self.cl
        if g.name in self.incoming:
            raise ConflictError(f"vm {g.name!r} is arriving on host {self.host.name} (incoming migration)")
        if g.name in cl.vms:
            have = cl.vms[g.name]
            if have.state in (VMState.RUNNING, VMState.PAUSED) and (guest_of(have.spec) == g or
                                                                  self.vm_spec(g) == have.spec):
                return await self.qemu_info(g.name)      # already running as asked (a retried call)
            raise ConflictError(f"vm {g.name!r} is {have.state.value} on host {self.host.name}")
        spec = self.vm_spec(g)
        try:
            self.host.check_fit(spec)                    # CapacityError before anything is recorded or started
            with self._own(g.name):
                await self._create_disk(g)
        except BaseException:
            if g.name not in self.records.vms():
                self._gone(g.name)                       # the WAN address vm_spec handed out goes back
            raise
        with self._own(g.name):
            self.lost.pop(g.name, None)
            # before the QEMU starts; with the guest's WAN address: a restarted agent gives it that one
            self.records.put_vm(LocalVM(spec=g, instance_dir=str(cl.run_dir / g.name),
                                        wan_subnet=self._wan_subnet(g)))
            vm: VM | None = None
            try:
                vm = await cl.define_vm(spec, self.host)
                await vm.start(wait_ready=wait_ready, ready_timeout=ready_timeout)
            except BaseException as e:
                if vm is not None:
                    with contextlib.suppress(Exception):
                        await vm.destroy()
                    try:
                        await cl.undefine_vm(g.name)
                    except Exception as ue:   # noqa: BLE001 (the start's own error is what is raised)
                        log.warning("vm %s: not undefined after its failed start: %s", g.name, ue)
                self.records.delete_vm(g.name)
                self._gone(g.name)
                if isinstance(e, Exception) and image_locked(e):
                    raise ImageLockedError(f"vm {g.name!r} not started on host {self.host.name}: its disk image "
                                           f"{self.disk_path(g.name)} is locked by another QEMU (the guest runs "
                                           "elsewhere)") from e
                raise
            self._save(vm)
        return await self.qemu_info(g.name)

    async def stop(self, name: str, timeout: float) -> None:
        vm = self._vm(name)
        with self._own(name):
            await vm.shutdown(timeout=timeout)
            await self._undefine(name)

    async def destroy(self, name: str) -> None:
        """Hard-stop the VM's QEMU here, whatever it is (a VM, or an incoming migration's)."""
        if name in self.incoming:
            await self.incoming_discard(name)
            return
        vm = self._vm(name)
        with self._own(name):
            if vm.has_process or vm.state is VMState.CRASHED:
                await vm.destroy()
            await self._undefine(name)

    async def _undefine(self, name: str) -> None:
        with contextlib.suppress(CoreNotFound):
            await self.cl.undefine_vm(name)
        self.records.delete_vm(name)
        self._gone(name)
        self._tops.pop(name, None)          # a next QEMU opens the chain's top as its drive's own node

    async def resume(self, name: str) -> None:
        """QMP cont on a paused (or post-migrate) QEMU: it becomes the running owner of the guest."""
        vm = self._vm(name)
        if vm.state is VMState.PAUSED:
            await vm.resume()
        elif vm.state is VMState.RUNNING and await self._status(vm.process) != "running":
            await vm.qmp.execute("cont")
        elif vm.state is not VMState.RUNNING:
            raise ConflictError(f"vm {name!r} is {vm.state.value}: it cannot be resumed")

    async def exec(self, name: str, command: str, timeout: float) -> ExecOutput:
        vm = self._vm(name)
        r = await vm.exec(command, timeout=timeout)
        return ExecOutput(exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr, signal=r.signal,
                          timed_out=r.timed_out, truncated=r.truncated)

    # -- migrations out (this agent is the source) -----------------------------------------------------
    def _peer(self, address: str) -> AgentClient:
        c = self._peers.get(address)
        if c is None:
            c = self._peers[address] = AgentClient(address, tls=self.cfg.client_tls, timeout=60)
        return c

    def _stub_host(self, name: str) -> Host:
        """The destination as this cluster sees it: a host it runs nothing on (its own agent does the
        accounting; the stub's capacity never refuses)."""
        cl = self.cl
        if name == self.host.name:
            raise ControlInputError("destination", f"vm is on {name} already")
        if name not in cl.hosts:
            cl.add_host(HostSpec(name, vcpus=4096, memory_mib=1 << 30, datacenter=self.host.spec.datacenter))
        return cl.hosts[name]

    async def migrate_out(self, name: str, req: MigrateOut, token: int) -> MigrationInfo:
        vm = self._vm(name)
        prev = self.outgoing.get(name)
        if prev is not None and not prev.migration.state.terminal:
            raise ConflictError(f"vm {name!r} is migrating already ({prev.migration.id})")
        rec = self.records.vms().get(name)
        g = rec.spec if rec is not None else guest_of(vm.spec)
        dest = self._stub_host(req.destination)
        peer = self._peer(req.destination_agent)
        holder: dict[str, Any] = {}

        def factory(mid: str, opts: TransferOptions, uses_postcopy: bool, components: Any = None) -> Any:
            from .remote_transfer import RemoteTransfer
            t = RemoteTransfer(mid, opts, uses_postcopy, peer=peer, token=token, spec=g, source=self.host.name,
                               components=components)
            holder["t"] = t
            return t
        m = start_migration(vm, dest, policy=req.policy, timeout=req.timeout, transfer_factory=factory)
        out = Outgoing(m, req.destination, peer, transfer=holder.get("t"))
        self.outgoing[name] = out
        out.task = asyncio.get_running_loop().create_task(self._follow(name, out), name=f"migrate-out-{name}")
        return out.info()

    async def _follow(self, name: str, out: Outgoing) -> None:
        try:
            await out.migration.wait()
        except MigrationError as e:
            out.error = str(e).splitlines()[0]
            log.warning("migration of %s to %s failed: %s", name, out.destination, out.error)
            if self.cluster is not None and name in self.cluster.vms:
                self._save(self.cluster.vms[name])
            return
        except asyncio.CancelledError:
            raise
        out.handed_off = True
        await self._undefine(name)
        self.lost.pop(name, None)
        log.info("vm %s handed off to %s", name, out.destination)

    async def cancel_migration(self, name: str) -> None:
        out = self.outgoing.get(name)
        if out is None or out.migration.state.terminal:
            raise ConflictError(f"vm {name!r} has no migration in progress on host {self.host.name}")
        try:
            out.migration.cancel("asked by the manager")
        except MigrationError as e:
            raise ConflictError(str(e)) from e

    # -- migrations in (this agent is the destination) -------------------------------------------------
    async def incoming_prepare(self, req: IncomingRequest) -> QemuInfo:
        cl = self.cl
        name = req.vm.name
        if name in self.incoming or name in cl.vms:
            raise ConflictError(f"vm {name!r} is on host {self.host.name} already")
        spec = self.vm_spec(req.vm)
        self.host.check_fit(spec)
        vm = await cl.define_vm(spec, self.host)
        self.host.reserve(spec)
        d = vm.run_dir / f"mig-in-{secrets.token_hex(3)}"
        rec = LocalIncoming(migration_id=req.migration_id, spec=req.vm, source=req.source, instance_dir=str(d),
                            wan_subnet=self._wan_subnet(req.vm))
        self.records.put_incoming(rec)
        proc = self.host.qemu_process(vm.machine_spec(d, incoming="defer"), d)
        try:
            await proc.launch()
        except BaseException:
            await proc.kill()
            await self._drop_incoming_vm(vm, d)
            self.records.delete_incoming(name)
            self._gone(name)
            raise
        rec = LocalIncoming(migration_id=req.migration_id, spec=req.vm, source=req.source, instance_dir=str(d),
                            pid=proc.pid, start_time=procfs.start_time(proc.pid) if proc.pid else "",
                            wan_subnet=rec.wan_subnet)
        self.records.put_incoming(rec)
        self.incoming[name] = Incoming(rec, proc, vm)
        return await self.qemu_info(name)

    async def _drop_incoming_vm(self, vm: VM, d: Path) -> None:
        self.host.release(vm.name)
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(Exception):
            await self.cl.undefine_vm(vm.name)

    def _incoming(self, name: str) -> Incoming:
        inc = self.incoming.get(name)
        if inc is None:
            raise NotFoundError(f"no incoming migration of vm {name!r} on host {self.host.name}")
        return inc

    async def incoming_listen(self, name: str, capabilities: list[str]) -> str:
        inc = self._incoming(name)
        q = inc.process.qmp
        assert q is not None
        caps = list(dict.fromkeys(MANAGED_CAPS + capabilities))
        await q.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": c, "state": c in capabilities} for c in caps]})
        last: Exception | None = None
        for port in random.sample(range(*DEFAULT_PORT_RANGE), 5):
            uri = f"tcp:{self.cfg.address}:{port}"
            try:
                await q.execute("migrate-incoming", {"uri": uri})
                return uri
            except QEMUBridgeError as e:
                last = e
                if "in use" not in str(e).lower():
                    break
        assert last is not None
        raise last

    async def incoming_finish(self, name: str, paused_ok: bool) -> QemuInfo:
        """Wait until the incoming QEMU runs the guest, then adopt it as this host's VM."""
        inc = self._incoming(name)
        q = inc.process.qmp
        assert q is not None
        deadline = time.monotonic() + 60
        while True:
            st = str((await q.execute("query-status")).get("status"))
            if st == "running" or (paused_ok and st == "paused"):
                break
            if time.monotonic() > deadline:
                raise ConflictError(f"vm {name!r}: the incoming QEMU is {st!r} 60 s after the source finished")
            await asyncio.sleep(0.05)
        vm, d = inc.vm, Path(inc.record.instance_dir)
        await vm.attach_running(inc.process, instance_dir=d, paused=st == "paused")
        del self.incoming[name]
        self.records.put_vm(LocalVM(spec=inc.record.spec, instance_dir=str(d), pid=inc.process.pid,
                                    start_time=inc.record.start_time, generation=vm.generation,
                                    wan_subnet=inc.record.wan_subnet))
        self.records.delete_incoming(name)
        log.info("vm %s arrived from %s (migration %s), QEMU pid %s", name, inc.record.source,
                 inc.record.migration_id, inc.process.pid)
        return await self.qemu_info(name)

    async def incoming_discard(self, name: str) -> None:
        inc = self._incoming(name)
        del self.incoming[name]
        try:
            await inc.process.kill()
        finally:
            await self._drop_incoming_vm(inc.vm, Path(inc.record.instance_dir))
            self.records.delete_incoming(name)
            self._gone(name)


LOCK_MESSAGE = 'Failed to get "write" lock'


def image_locked(e: BaseException) -> bool:
    """Whether a QEMU start failed on an image lock (QEMU's message in the error or its causes)."""
    seen: BaseException | None = e
    for _ in range(10):
        if seen is None:
            return False
        if LOCK_MESSAGE in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def guest_of(spec: VMSpec) -> GuestSpec:
    disk = sum(d.size_mib for d in spec.disks)
    return GuestSpec(name=spec.name, vcpus=spec.vcpus, memory_mib=spec.memory_mib, disk_mib=disk)


def host_spec(name: str, *, vcpus: int, memory_mib: int, datacenter: str, cpu_overcommit: float = 1.0,
              memory_overcommit: float = 1.0) -> HostSpec:
    try:
        return HostSpec(name, vcpus=vcpus, memory_mib=memory_mib, cpu_overcommit=cpu_overcommit,
                        mem_overcommit=memory_overcommit, datacenter=datacenter)
    except SpecError as e:
        raise ControlInputError("host", str(e)) from e
