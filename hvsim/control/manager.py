"""The manager's logic (the management server of one datacenter): leadership, the host agents it
drives, operations, their resolution after a restart, the host monitor, placement.

**Leadership and fencing.** The manager holds the ``manager`` lease in the store (a TTL lease kept
alive by a task, :data:`LEASE_TTL` by default); the lease key's create-revision is its **fencing
token**. Every store write goes through :class:`Inventory` fenced with it (a manager whose lease
expired changes nothing in the store) and every mutating call to a host agent carries it, with the
wall-clock deadline until which the lease is held for sure (agents refuse older tokens, and calls
arriving after their deadline). On taking the lease it publishes its leader record
(:mod:`.leader`: where clients reach it) and announces its token to every agent before it serves.
It acts only while the lease is held *for sure on its own clock* (:meth:`KeptLease.valid`: the
last acknowledged keep-alive's send time plus the TTL, minus a margin): a manager frozen past its
lease (SIGSTOP) wakes unable to act, before its keep-alive task ran. A manager that loses its lease,
or is told by an agent or the store that a newer token exists, stops its drivers, answers "not
leader" and campaigns again (a newer token).

**Operations.** ``start``, ``stop``, ``destroy`` and ``migrate`` are recorded (``Inventory.begin``:
the VM's operation lock) before anything is sent to an agent, marked running, updated with named
steps, and settled in one transaction with the VM record. When an agent's answer is definite (done,
refused, failed and cleaned up) the operation ends with it; when it is not (the agent became
unreachable mid-call) the operation stays in flight for the resolver. Migrations are driven by the
source agent (:mod:`.remote_transfer`); the manager follows them (progress, steps
``destination-started``, ``postcopy``, ``switched-over``) and settles them.

**Resolution** (on start, after each host comes back, and every few seconds): every in-flight
operation whose VM no agent is busy with is resolved with :func:`hvsim.control.ops.resolve` from
the facts the agents report (which hosts run a QEMU of the VM, in which run state), its actions are
carried out (destroy strays, resume an owner), and it is settled. A migration the source agent still
drives is followed again instead. A host that matters and does not answer defers the decision.

**The host monitor** asks every agent for its state each second: UP/UNREACHABLE in the host record
(only on a change, and a host that never answered stays REGISTERED), and VMs that ended on their
own while no operation held them (crashed, powered off) are recorded as such.

**Placement** (:class:`Placer`): a VM defined without a host is placed by hvsim.placement's filters
and weighers (the greedy scheduler over an incremental state) under the stored rules, so no
required rule is broken; ``check()`` counts violations with the independent checker. Required
reserve rules are admission control: a define (placed or pinned) never consumes reserved capacity.

**HA** (:mod:`.ha`, the "HA hooks" section below): protected VMs of a lost host are restarted on
surviving hosts, in priority order, where only they may use reserved capacity;
:meth:`Manager.reservation_report` sizes the reservation (:mod:`.reservation`).
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import socket
import time
from pathlib import Path
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from hvbase.aio import wait_for
from hvbase.fsm import StateMachine

from .agent_client import AgentClient, ClientTLS
from .agentrpc import (
    ExecBody, ExecOutput, MigrateOut, MigrationInfo, QemuList, StartRequest, StopRequest, guest_spec,
)
from .errors import (
    ApiConflictError, ApiError, ApiInputError, ApiNotFoundError, ApiUnavailableError, ConflictError,
    ControlError, ControlInputError, FencedError, NotFoundError, NotLeaderError, OperationFailedError, StoreError,
)
from .ha import HAController
from .imports import resolve_import
from .inventory import Inventory
from .leader import LEADER_KEY, LeaderInfo, publish_leader
from .ops import (
    STEP_DEST_STARTED, STEP_POSTCOPY, STEP_QEMU_STARTED, STEP_SWITCHED_OVER, ActionKind, Operation, OperationRecord,
    OpKind, OpState, Outcome, QemuState, Resolution, VMFacts, resolve,
)
from .placer import Placer, is_reservation, place_failover
from .reservation import Capacity, Demand, size_reservation
from .schema import ExecRequest, HostCreate, MigrateRequest
from .state import HOSTS, RULES, VMS, GroupRecord, HostRecord, HostStatus, RuleRecord, VMPower, VMRecord
from .store import LEASE_PREFIX, Compare, Delete, Fence, KeptLease, Store

log = logging.getLogger("hvsim.control.manager")
T = TypeVar("T")
LEASE = "manager"
#: The manager lease's default TTL (seconds). Detection of a dead manager is bounded by it: the
#: standby takes the lease at most TTL after the last keep-alive (one every TTL/3), so a failover's
#: RTO is about TTL * (2/3 .. 1) + the standby's takeover (leader record, agents told, ~0.5 s):
#: 3 s gives RTO ~2.5-3.5 s, inside the issue's p50 <= 5 s with room for a loaded machine. Below
#: 3 s a TCG-loaded 2-core host makes false expiries likely (keep-alives every 0.67 s, each an etcd
#: raft round), and etcd 3.4 raises anything under its minimum (1.5 x election timeout) anyway.
LEASE_TTL = 3.0
TERMINAL_MIGRATION = ("completed", "failed", "cancelled", "timed-out")
QEMU_FACT = {"running": QemuState.RUNNING, "paused": QemuState.PAUSED, "suspended": QemuState.PAUSED,
             "debug": QemuState.PAUSED, "io-error": QemuState.PAUSED, "watchdog": QemuState.PAUSED,
             "guest-panicked": QemuState.PAUSED, "internal-error": QemuState.PAUSED, "shutdown": QemuState.PAUSED,
             "inmigrate": QemuState.INMIGRATE, "prelaunch": QemuState.INMIGRATE,
             "postmigrate": QemuState.POSTMIGRATE}


class ManagerState(enum.Enum):
    NEW = "new"
    CAMPAIGNING = "campaigning"     # waiting for the manager lease
    LEADING = "leading"
    STOPPING = "stopping"
    STOPPED = "stopped"


MANAGER_TABLE = {
    ManagerState.NEW: {ManagerState.CAMPAIGNING, ManagerState.STOPPED},
    ManagerState.CAMPAIGNING: {ManagerState.LEADING, ManagerState.STOPPING},
    ManagerState.LEADING: {ManagerState.CAMPAIGNING, ManagerState.STOPPING},
    ManagerState.STOPPING: {ManagerState.STOPPED},
    ManagerState.STOPPED: set(),
}


def default_name() -> str:
    return f"manager@{socket.gethostname()}:{os.getpid()}"


def _definite(e: ApiError) -> bool:
    """Whether an agent's error answer says for sure what happened (it answered: refused, not
    found, failed and cleaned up) rather than leave the outcome unknown (unreachable, 5xx)."""
    return not isinstance(e, ApiUnavailableError)


@dataclass
class Leadership:
    fence: Fence
    kept: KeptLease
    inventory: Inventory
    deposed: asyncio.Event          # an agent or the store said a newer token exists

    def valid(self) -> bool:
        return self.kept.valid() and not self.deposed.is_set()


class Manager:
    def __init__(self, store: Store, *, name: str | None = None, lease_ttl: float = LEASE_TTL,
                 agent_tls: ClientTLS | None = None,
                 agent_networks: Iterable[str] = ("127.0.0.0/8", "::1/128"),
                 monitor_interval: float = 1.0, resolve_interval: float = 2.0,
                 advertise: str | None = None, datacenter: str = "", ha_grace: float = 15.0,
                 ha_off_grace: float = 0.0, ha_retry: float = 30.0, import_dir: Path | None = None) -> None:
        if not 1 <= lease_ttl <= 600:
            raise ControlInputError("lease_ttl", f"must be 1..600 seconds, got {lease_ttl!r}")
        self.store = store
        self.name = name or default_name()
        self.advertise = advertise            # what clients dial (the leader record); None: no record
        self.datacenter = datacenter
        self.leader_info: LeaderInfo | None = None
        self.lease_ttl = lease_ttl
        self.agent_tls = agent_tls
        try:
            self.agent_networks = [ipaddress.ip_network(n, strict=False) for n in agent_networks]
        except ValueError as e:
            raise ControlInputError("agent_networks", str(e)) from e
        self.monitor_interval = monitor_interval
        self.resolve_interval = resolve_interval
        self.import_dir = import_dir              # data disks are imported from images in here only
        self.reader = Inventory(store, manager=self.name)     # reads (no fence needed)
        self.fsm: StateMachine[ManagerState] = StateMachine(f"manager {self.name}", ManagerState.NEW, MANAGER_TABLE,
                                                            log=log)
        self.lead: Leadership | None = None
        self.placer = Placer()
        self._place_lock = asyncio.Lock()
        self._placing: dict[str, VMRecord] = {}               # defines decided, being written
        self.progress: dict[str, MigrationInfo] = {}          # op id -> latest progress of a migration
        self.resolutions: list[dict[str, Any]] = []           # what the resolver decided (for /v1/health, tests)
        self._agents: dict[str, AgentClient] = {}
        self._drivers: set[asyncio.Task[Any]] = set()
        self._followed: dict[str, asyncio.Task[Any]] = {}     # op id -> task following a migration
        self._background: list[asyncio.Task[None]] = []
        self._leader_task: asyncio.Task[None] | None = None
        self._leading = asyncio.Event()
        self._wake_resolver = asyncio.Event()
        try:
            self.ha = HAController(self, grace=ha_grace, off_grace=ha_off_grace, retry=ha_retry,
                                   interval=monitor_interval)
        except ValueError as e:
            raise ControlInputError("ha_grace", str(e)) from e

    # -- leadership ---------------------------------------------------------------------------------
    @property
    def state(self) -> ManagerState:
        return self.fsm.state

    @property
    def held_token(self) -> int:
        """The token of the lease this manager holds or last held (0: none); no check."""
        return self.lead.fence.token if self.lead is not None else 0

    def leading_now(self) -> bool:
        """Whether this manager may act now: it leads and its lease is held for sure (its own clock)."""
        return self.state is ManagerState.LEADING and self.lead is not None and self.lead.valid()

    def _require_lead(self) -> Leadership:
        lead = self.lead
        if lead is None or self.state is not ManagerState.LEADING or not lead.valid():
            raise NotLeaderError(f"manager {self.name} does not hold the manager lease")
        return lead

    @property
    def token(self) -> int:
        """The fencing token to send with a command; raises :class:`NotLeaderError` when this manager
        must not act (evaluated right before each agent call)."""
        return self._require_lead().fence.token

    @property
    def inventory(self) -> Inventory:
        return self._require_lead().inventory

    def _fence_until(self) -> float:
        """The wall-clock deadline sent with a fenced agent call (raises if we must not act)."""
        lead = self.lead
        if lead is None or not lead.valid():
            raise NotLeaderError(f"manager {self.name} does not hold the manager lease")
        return time.time() + lead.kept.remaining()

    def _depose(self, why: str) -> None:
        """An agent or the store refused our token: a newer manager exists. Stop acting now."""
        lead = self.lead
        if lead is not None and not lead.deposed.is_set():
            log.error("manager %s (token %d) deposed: %s", self.name, lead.fence.token, why)
            lead.deposed.set()

    def _on_agent_fenced(self, e: ApiError) -> None:
        self._depose(f"a host agent refused our token: {e.detail}")

    def _on_store_fenced(self, e: FencedError) -> None:
        self._depose(f"the store refused a fenced write: {e}")

    async def start(self, timeout: float | None = None) -> None:
        """Campaign for the manager lease (waits while another manager holds it), then lead."""
        self.fsm.set(ManagerState.CAMPAIGNING, "start")
        self._leader_task = asyncio.create_task(self._leadership(), name="manager-leadership")
        waiter = asyncio.ensure_future(self._leading.wait())
        done, _ = await asyncio.wait({waiter, self._leader_task}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self._leader_task in done:
                self._leader_task.result()
            raise NotLeaderError(f"manager {self.name}: no manager lease within {timeout} s")

    async def _acquire(self) -> Leadership:
        """Take the manager lease: one lease of ours kept alive while we wait, a watch on the lease
        key to try again the moment it is deleted (a poll as well, in case a watch event is missed)."""
        kept: KeptLease | None = None
        waited = False
        try:
            async with self.store.watch(LEASE_PREFIX + LEASE) as w:
                while True:
                    if kept is None or not kept.valid():
                        if kept is not None:
                            await kept.stop()
                        kept = await self.store.keep(self.lease_ttl)
                    fence = await self.store.acquire(LEASE, self.name, kept.lease)
                    if fence is not None:
                        inv = Inventory(self.store, fence, manager=self.name, on_fenced=self._on_store_fenced)
                        lead, kept = Leadership(fence, kept, inv, asyncio.Event()), None
                        return lead
                    if not waited:
                        holder = await self.store.holder(LEASE)
                        log.info("manager lease held by %s; waiting", holder[0] if holder else "?")
                        waited = True
                    with contextlib.suppress(TimeoutError):
                        await w.next(timeout=min(1.0, self.lease_ttl / 3))
        finally:
            if kept is not None:
                await kept.stop()

    async def _take_office(self, lead: Leadership) -> None:
        """(Before serving as leader.) Publish the leader record, tell every agent our token."""
        if self.advertise is not None:
            self.leader_info = await publish_leader(self.store, lead.fence, address=self.advertise,
                                                    datacenter=self.datacenter)
        else:                            # still journal the term (the audit's in-force time)
            await lead.inventory.touch()
        hosts = [h for h in await self.reader.list_all(HostRecord, HOSTS) if h.agent]

        async def tell(h: HostRecord) -> None:
            try:
                await self.agent(h).announce(lead.fence.token, timeout=1)
            except (ApiError, ControlInputError) as e:
                log.warning("could not tell host %s our token %d: %s (the monitor retries)", h.name,
                            lead.fence.token, e)
        await asyncio.gather(*(tell(h) for h in hosts))

    async def _leadership(self) -> None:
        while self.state is ManagerState.CAMPAIGNING:
            try:
                lead = await self._acquire()
            except StoreError as e:
                log.warning("campaign: store error %s; retrying", e)
                await asyncio.sleep(1.0)
                continue
            self.lead = lead
            try:
                await self._take_office(lead)
            except (StoreError, ControlError) as e:
                log.warning("taking office with token %d failed: %s; campaigning again", lead.fence.token, e)
                await self._step_down(lead)
                await asyncio.sleep(0.5)
                continue
            if not lead.valid():
                await self._step_down(lead)
                continue
            self.placer.invalidate()
            self.fsm.set(ManagerState.LEADING, f"token {lead.fence.token}")
            log.info("manager %s leads with fencing token %d", self.name, lead.fence.token)
            self._background = [asyncio.create_task(self._monitor(), name="manager-monitor"),
                                asyncio.create_task(self._resolver(), name="manager-resolver"),
                                asyncio.create_task(self.ha.run(), name="manager-ha")]
            self._leading.set()
            lost = asyncio.ensure_future(lead.kept.lost.wait())
            deposed = asyncio.ensure_future(lead.deposed.wait())
            try:
                await asyncio.wait({lost, deposed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                deposed.cancel()
            if self.state is not ManagerState.LEADING:
                return
            why = "deposed" if lead.deposed.is_set() else "lease lost"
            log.error("manager %s %s (token %d): stopping every driver", self.name, why, lead.fence.token)
            self._leading.clear()
            self.fsm.set(ManagerState.CAMPAIGNING, why)
            await self._stop_tasks()
            await self._step_down(lead)

    async def _step_down(self, lead: Leadership) -> None:
        """Give a lease up: stop keeping it, revoke it (if it still exists, that ends our leader
        record too; a lease already gone is not an error)."""
        self.lead = None
        self.leader_info = None
        await lead.kept.stop(revoke=False)
        with contextlib.suppress(StoreError):
            await self.store.revoke(lead.kept.lease)

    async def _stop_tasks(self) -> None:
        tasks = [*self._background, *self._drivers, *self._followed.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._background = []
        self._drivers.clear()
        self._followed.clear()

    async def close(self) -> None:
        if self.state in (ManagerState.STOPPING, ManagerState.STOPPED):
            return
        if self.state is ManagerState.NEW:
            self.fsm.set(ManagerState.STOPPED)
            return
        self.fsm.set(ManagerState.STOPPING)
        try:
            if self._leader_task is not None:
                self._leader_task.cancel()
                await asyncio.gather(self._leader_task, return_exceptions=True)
            await self._stop_tasks()
            if self.lead is not None:
                f = self.lead.fence
                with contextlib.suppress(StoreError):   # the leader record and the lease key at once
                    await self.store.txn([Compare.create_revision(f.key, f.token)],
                                         [Delete(LEADER_KEY), Delete(f.key)])
                await self.lead.kept.stop()
                self.lead = None
            for c in self._agents.values():
                await c.close()
        finally:
            self.ha.close()
            self.fsm.set(ManagerState.STOPPED)

    def _spawn(self, coro: Awaitable[T], name: str) -> asyncio.Task[T]:
        """A driver task owned by the manager (it outlives the HTTP request that started it)."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._drivers.add(task)
        task.add_done_callback(self._drivers.discard)
        return task

    # -- agents -------------------------------------------------------------------------------------
    def check_agent_address(self, address: str) -> None:
        """An agent address the manager may dial: a unix socket, or https to an IP literal in one of
        the allowed networks (no names: nothing is resolved, nothing outside is dialed)."""
        if address.startswith("unix:/"):
            return
        rest = address[len("https://"):] if address.startswith("https://") else None
        host, _, port = (rest or "").rpartition(":")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            port_n = int(port)
        except ValueError:
            raise ControlInputError("agent", f"{address!r}: give unix:/PATH or https://IP:PORT (an IP literal)") \
                from None
        if not 0 < port_n < 65536:
            raise ControlInputError("agent", f"{address!r}: port out of range")
        if not any(ip in n for n in self.agent_networks):
            raise ControlInputError("agent", f"{ip} is outside the networks this manager may reach agents on "
                                             f"({', '.join(map(str, self.agent_networks))}; see --agent-networks)")
        if self.agent_tls is None:
            raise ControlInputError("agent", f"{address!r}: this manager has no client certificate for https agents "
                                             "(--agent-tls)")

    def agent(self, host: HostRecord) -> AgentClient:
        if host.agent is None:
            raise ConflictError(f"host {host.name!r} has no host agent")
        c = self._agents.get(host.agent)
        if c is None:
            c = self._agents[host.agent] = AgentClient(host.agent, tls=self.agent_tls, timeout=30,
                                                       fence_until=self._fence_until,
                                                       on_fenced=self._on_agent_fenced)
        return c

    async def add_host(self, body: HostCreate) -> HostRecord:
        """Register a host; with an agent, its capacity is what the agent reports (it is the host's
        hardware) and the agent must say it is that host."""
        inv = self.inventory
        fields: dict[str, Any] = {k: getattr(body, k) for k in body.__dataclass_fields__}
        if body.agent is not None:
            self.check_agent_address(body.agent)
            try:
                async with AgentClient(body.agent, tls=self.agent_tls, timeout=5) as c:
                    info = await c.info(timeout=5)
            except (ApiError, ControlInputError) as e:
                raise ConflictError(f"host {body.name!r}: its agent at {body.agent} does not answer: {e} "
                                    "(field agent)") from e
            if info.host != body.name:
                raise ConflictError(f"the agent at {body.agent} is host {info.host!r}, not {body.name!r} (field agent)")
            fields.update(vcpus=info.vcpus, memory_mib=info.memory_mib, cpu_overcommit=max(1.0, info.cpu_overcommit),
                          memory_overcommit=max(1.0, info.memory_overcommit), datacenter=info.datacenter,
                          status=HostStatus.UP, power_domain=info.power_domain)
        rec = await inv.add_host(HostRecord(**fields))
        self.placer.invalidate()
        return rec

    # -- VMs: define (placement) ------------------------------------------------------------------------
    async def define_vm(self, vm: VMRecord) -> tuple[VMRecord, OperationRecord]:
        """Place (unless pinned) and record a VM. Placement decisions are taken one at a time
        (``_place_lock``) and a decided VM is in ``_placing`` until its write ended, so a placement
        state rebuilt meanwhile (another request's reload) still counts it: concurrent defines never
        break a required rule between them."""
        inv = self.inventory
        if vm.data_image is not None:
            resolve_import(self.import_dir, vm.data_image, vm.disk_mib)   # 400 naming the problem
        async with self._place_lock:
            if vm.host is None:
                await self._ensure_placer()
                host = self.placer.place(vm)
                vm = VMRecord(**{**{k: getattr(vm, k) for k in vm.__dataclass_fields__}, "host": host})
            else:
                await self._ensure_placer()
                self.placer.admit(vm)                 # reserved capacity: refused naming the rule
                self.placer.note_defined(vm)
            self._placing[vm.name] = vm
        try:
            out = await inv.define_vm(vm)
        except BaseException:
            self._placing.pop(vm.name, None)
            self.placer.invalidate()
            raise
        self._placing.pop(vm.name, None)
        return out

    async def _ensure_placer(self) -> None:
        """(Under ``_place_lock``.) Build the placement state from the store, plus the VMs whose
        define is being written (taken before the store is read: a write that ends meanwhile is in
        what the store answers)."""
        if self.placer.ready:
            return
        placing = dict(self._placing)
        inv = self.reader
        hosts = await inv.list_all(HostRecord, HOSTS)
        vms = await inv.list_all(VMRecord, VMS)
        rules = await inv.list_all(RuleRecord, RULES)
        known = {v.name for v in vms}
        # a VM being written (a define, or an HA restart placed and not yet settled) counts where it is going
        self.placer.load(hosts, [placing.get(v.name, v) for v in vms] + [v for n, v in placing.items()
                                                                          if n not in known], rules)

    def placement_changed(self) -> None:
        self.placer.invalidate()

    async def check_placement(self) -> dict[str, Any]:
        inv = self.reader
        return Placer.check(await inv.list_all(HostRecord, HOSTS), await inv.list_all(VMRecord, VMS),
                            await inv.list_all(RuleRecord, RULES), await inv.list_all(GroupRecord, "/hvsim/groups/"))

    # -- VMs: lifecycle -------------------------------------------------------------------------------
    async def home(self, name: str, *powers: VMPower) -> tuple[VMRecord, HostRecord]:
        """The VM's record and its host's (ConflictError unless its power is one of ``powers``, it
        has a host with an agent, and that host is not unreachable)."""
        return await self._home(name, *powers)

    async def _home(self, name: str, *powers: VMPower) -> tuple[VMRecord, HostRecord]:
        vm = await self.reader.get_vm(name)
        if powers and vm.power not in powers:
            raise ConflictError(f"vm {name!r} is {vm.power.value} (allowed: {', '.join(p.value for p in powers)})")
        if vm.host is None:
            raise ConflictError(f"vm {name!r} has no host")
        host = await self.reader.get_host(vm.host)
        if host.agent is None:
            raise ConflictError(f"host {host.name!r} of vm {name!r} has no host agent")
        if host.status is HostStatus.UNREACHABLE:
            raise ConflictError(f"host {host.name!r} of vm {name!r} is unreachable")
        return vm, host

    async def _run(self, kind: OpKind, vm: VMRecord, params: dict[str, str],
                   body: Callable[[Operation, int], Awaitable[OperationRecord]]) -> OperationRecord:
        inv = self.inventory
        op, rev = await inv.begin(kind, vm.name, **params)
        task = self._spawn(self._drive(op, rev, body), f"{kind.value}-{vm.name}")
        try:
            return await asyncio.shield(task)
        except (NotLeaderError, FencedError) as e:
            raise self._partly(e, op) from e

    def _partly(self, e: ControlError, op: Operation) -> NotLeaderError:
        """Leadership lost after ``op`` was recorded: not leader, and not retry-safe (the next
        leader resolves the operation)."""
        return NotLeaderError(f"manager {self.name} lost the manager lease during {op.record.kind.value} of "
                              f"{op.record.vm} ({e}); operation {op.record.id} is left to the next leader",
                              operation=op.record.id)

    async def _drive(self, op: Operation, rev: int,
                     body: Callable[[Operation, int], Awaitable[OperationRecord]]) -> OperationRecord:
        inv = self.inventory
        op.start()
        rev = await inv.update(op, rev)
        return await body(op, rev)

    async def _end(self, op: Operation, rev: int, *, ok: bool, vm: VMRecord | None, note: str) -> OperationRecord:
        if ok:
            op.succeed(note)
        else:
            op.fail(note)
        await self.inventory.update(op, rev, vm=vm)
        return op.record

    async def run_op(self, kind: OpKind, vm: VMRecord, params: dict[str, str],
                     body: Callable[[Operation, int], Awaitable[OperationRecord]]) -> OperationRecord:
        """Record an operation on ``vm`` (its lock taken), set it running and run ``body`` to its end
        (shielded from the caller's cancellation), for the operations of :mod:`.diskops`."""
        return await self._run(kind, vm, params, body)

    async def end_op(self, op: Operation, rev: int, *, ok: bool, note: str) -> OperationRecord:
        """Settle ``op`` (succeeded or failed) without changing its VM's record."""
        return await self._end(op, rev, ok=ok, vm=None, note=note)

    @staticmethod
    def _with(vm: VMRecord, **fields: Any) -> VMRecord:
        return VMRecord(**{**{k: getattr(vm, k) for k in vm.__dataclass_fields__}, **fields})

    with_fields = _with

    async def start_vm(self, name: str) -> OperationRecord:
        vm, host = await self._home(name, VMPower.SHUTOFF, VMPower.CRASHED)
        agent = self.agent(host)

        async def body(op: Operation, rev: int) -> OperationRecord:
            try:
                await agent.start(StartRequest(vm=guest_spec(vm)), self.token)
            except ApiError as e:
                if not _definite(e):
                    raise OperationFailedError(f"start of {name}: host {host.name} did not answer ({e.detail}); the "
                                               "operation stays in flight until it does", op.record.id) from e
                rec = await self._end(op, rev, ok=False, vm=self._with(vm, power=VMPower.SHUTOFF), note=e.detail)
                raise self._failure(e, f"start of vm {name!r} on {host.name}", rec) from e
            op.step(STEP_QEMU_STARTED)
            return await self._end(op, rev, ok=True, vm=self._with(vm, power=VMPower.RUNNING), note="running")
        return await self._run(OpKind.START, vm, {"host": host.name}, body)

    def _failure(self, e: ApiError, what: str, rec: OperationRecord) -> ControlError:
        if isinstance(e, ApiInputError | ApiConflictError | ApiNotFoundError):
            return ConflictError(f"{what} refused: {e.detail} (operation {rec.id})")
        return OperationFailedError(f"{what} failed: {e.detail}", rec.id)

    async def stop_vm(self, name: str, *, hard: bool = False, timeout: float = 60.0) -> OperationRecord:
        vm, host = await self._home(name, VMPower.RUNNING, VMPower.PAUSED, VMPower.CRASHED)
        agent = self.agent(host)
        kind = OpKind.DESTROY if hard else OpKind.STOP

        async def body(op: Operation, rev: int) -> OperationRecord:
            try:
                if hard:
                    await agent.destroy(name, self.token)
                else:
                    await agent.stop(name, StopRequest(timeout=timeout), self.token)
            except ApiNotFoundError:
                pass                           # nothing of it runs there: it is stopped
            except ApiError as e:
                if not _definite(e):
                    raise OperationFailedError(f"{kind.value} of {name}: host {host.name} did not answer "
                                               f"({e.detail}); the operation stays in flight", op.record.id) from e
                rec = await self._end(op, rev, ok=False, vm=None, note=e.detail)
                raise self._failure(e, f"{kind.value} of vm {name!r} on {host.name}", rec) from e
            return await self._end(op, rev, ok=True, vm=self._with(vm, power=VMPower.SHUTOFF), note="shut off")
        return await self._run(kind, vm, {"host": host.name}, body)

    async def exec_vm(self, name: str, req: ExecRequest) -> ExecOutput:
        self.inventory      # noqa: B018 (only the leader sends commands)
        vm, host = await self._home(name, VMPower.RUNNING, VMPower.PAUSED, VMPower.MIGRATING)
        try:
            return await self.agent(host).exec(name, ExecBody(command=req.command, timeout=req.timeout), self.token)
        except ApiError as e:
            if isinstance(e, ApiInputError | ApiConflictError | ApiNotFoundError):
                raise ConflictError(f"exec in vm {name!r} refused by {host.name}: {e.detail}") from e
            raise OperationFailedError(f"exec in vm {name!r} on {host.name} failed: {e.detail}") from e

    # -- VMs: migration ---------------------------------------------------------------------------------
    async def migrate_vm(self, name: str, req: MigrateRequest, timeout: float = 300.0) -> OperationRecord:
        inv = self.inventory
        vm, src = await self._home(name, VMPower.RUNNING, VMPower.PAUSED)
        if req.destination == src.name:
            raise ControlInputError("body.destination", f"vm {name!r} is on {src.name} already")
        dst = await self.reader.get_host(req.destination)
        if dst.agent is None or dst.status is not HostStatus.UP:
            raise ConflictError(f"destination host {dst.name!r} is {dst.status.value}"
                                f"{'' if dst.agent else ' and has no agent'}")
        src_agent = self.agent(src)
        op, rev = await inv.begin(OpKind.MIGRATE, name, source=src.name, destination=dst.name, policy=req.policy)
        try:
            op.start()
            rev = await inv.update(op, rev)
            mi = await src_agent.migrate(name, MigrateOut(destination=dst.name, destination_agent=dst.agent,
                                                          policy=req.policy, timeout=timeout), self.token)
        except (NotLeaderError, FencedError) as e:
            raise self._partly(e, op) from e
        except ApiError as e:
            if not _definite(e):
                raise OperationFailedError(f"migration of {name}: host {src.name} did not answer ({e.detail}); the "
                                           "operation stays in flight", op.record.id) from e
            rec = await self._end(op, rev, ok=False, vm=None, note=e.detail)
            raise self._failure(e, f"migration of vm {name!r} from {src.name} to {dst.name}", rec) from e
        self.progress[op.record.id] = mi
        self._follow(op, rev)
        return op.record

    def _follow(self, op: Operation, rev: int) -> None:
        oid = op.record.id
        if oid in self._followed and not self._followed[oid].done():
            return
        task = asyncio.create_task(self._follow_migration(op, rev), name=f"follow-{op.record.vm}")
        self._followed[oid] = task
        task.add_done_callback(lambda _t: self._followed.pop(oid, None))

    async def _follow_migration(self, op: Operation, rev: int) -> None:
        """Follow a migration the source agent drives; record its steps; settle it at the end."""
        rec = op.record
        src, dst = rec.params["source"], rec.params["destination"]
        try:
            agent = self.agent(await self.reader.get_host(src))
        except ControlError as e:
            log.error("migration %s: %s; left to the resolver", rec.id, e)
            return
        misses = 0
        while True:
            try:
                mi = await agent.migration(rec.vm)
                misses = 0
            except ApiError as e:
                misses += 1
                if misses % 20 == 1:
                    log.warning("migration %s: source agent %s: %s", rec.id, src, e)
                if isinstance(e, ApiNotFoundError) or misses > 600:
                    self._wake_resolver.set()
                    return                        # the agent lost it (restarted): the resolver decides
                await asyncio.sleep(0.5)
                continue
            self.progress[rec.id] = mi
            want: list[str] = []
            if mi.destination_started:
                want.append(STEP_DEST_STARTED)
            if mi.state == "postcopy" or (mi.result or {}).get("postcopy"):
                want.append(STEP_POSTCOPY)
            if mi.handed_off:
                want.append(STEP_SWITCHED_OVER)
            for s in want:
                if s not in op.record.steps:
                    op.step(s)
                    rev = await self.inventory.update(op, rev)
            if mi.state in TERMINAL_MIGRATION and (mi.state != "completed" or mi.handed_off):
                break
            await asyncio.sleep(0.5)
        if mi.state == "completed":
            res = Resolution(op=rec.id, outcome=Outcome.FINISH, final=OpState.SUCCEEDED, actions=(), vm_host=dst,
                             vm_power=VMPower.RUNNING, reason=f"migrated to {dst}")
        else:
            res = Resolution(op=rec.id, outcome=Outcome.ROLLBACK, final=OpState.FAILED, actions=(), vm_host=src,
                             vm_power=None, reason=(mi.error or mi.state)[:256])
        await self.inventory.settle(op.record, rev, res)
        self.placer.invalidate()
        log.info("migration %s of %s: %s", rec.id, rec.vm, res.reason)

    def migration_progress(self, op_id: str) -> MigrationInfo | None:
        return self.progress.get(op_id)

    # -- resolution ------------------------------------------------------------------------------------
    async def _facts(self) -> tuple[dict[str, QemuList], set[str]]:
        """What every agent reports (host -> its QEMUs), and the hosts that did not answer."""
        hosts = [h for h in await self.reader.list_all(HostRecord, HOSTS) if h.agent]
        out: dict[str, QemuList] = {}
        unreachable: set[str] = set()

        async def one(h: HostRecord) -> None:
            try:
                out[h.name] = await self.agent(h).qemus(timeout=5)
            except (ApiError, ControlInputError):
                unreachable.add(h.name)
        await asyncio.gather(*(one(h) for h in hosts))
        return out, unreachable

    async def resolve_in_flight(self) -> list[dict[str, Any]]:
        """One pass over the operations in flight that no driver of ours follows."""
        inv = self.inventory
        pending = [(r, v) for r, v in await inv.in_flight()
                   if r.id not in self._followed and not any(t.get_name().endswith(f"-{r.vm}") for t in self._drivers)]
        if not pending:
            return []
        reports, unreachable = await self._facts()
        done = []
        for rec, rev in pending:
            try:
                out = await self._resolve_one(rec, rev, reports, unreachable)
            except (ControlError, ApiError) as e:
                log.warning("resolving %s (%s %s): %s", rec.id, rec.kind.value, rec.vm, e)
                continue
            if out is not None:
                done.append(out)
        return done

    async def _resolve_one(self, rec: OperationRecord, rev: int, reports: dict[str, QemuList],
                           unreachable: set[str]) -> dict[str, Any] | None:
        qemus: dict[str, QemuState] = {}
        unknown = set(unreachable)
        for host, ql in reports.items():
            for q in ql.items:
                if q.vm != rec.vm:
                    continue
                if q.busy_with or q.state in ("starting", "migrating", "shutting-down"):
                    return None                   # an agent is still at it: decide once it is done
                fact = QEMU_FACT.get(q.qemu_status)
                if fact is None:
                    unknown.add(host)            # finish-migrate, unknown: ask again later
                    continue
                qemus[host] = fact
        if rec.kind is OpKind.MIGRATE and rec.params.get("source") in reports:
            # a migration its source agent still drives is followed again, not resolved
            src_host = await self.reader.get_host(rec.params["source"])
            with contextlib.suppress(ApiNotFoundError):
                mi = await self.agent(src_host).migration(rec.vm)
                if mi.state not in TERMINAL_MIGRATION or (mi.state == "completed" and not mi.handed_off):
                    self._follow(Operation(rec), rev)
                    return None
        try:
            vm: VMRecord | None = await self.reader.get_vm(rec.vm)
        except NotFoundError:
            vm = None
        facts = VMFacts(vm=rec.vm, qemus=qemus, unreachable=frozenset(unknown))
        res = resolve(rec, facts, vm.host if vm else None)
        entry = {"op": rec.id, "kind": rec.kind.value, "vm": rec.vm, "outcome": res.outcome.value,
                 "reason": res.reason, "facts": {h: s.value for h, s in qemus.items()},
                 "unreachable": sorted(unknown), "actions": [(a.kind.value, a.host) for a in res.actions]}
        if res.outcome is Outcome.DEFER:
            log.info("operation %s deferred: %s", rec.id, res.reason)
            return None
        for a in res.actions:
            agent = self.agent(await self.reader.get_host(a.host))
            if a.kind is ActionKind.DESTROY:
                with contextlib.suppress(ApiNotFoundError):
                    await agent.destroy(rec.vm, self.token)
            else:
                await agent.resume(rec.vm, self.token)
        if rec.kind is OpKind.MIGRATE and res.final is OpState.SUCCEEDED:
            dst = rec.params.get("destination", "")
            for q in reports.get(dst, QemuList(items=[])).items:
                if q.vm == rec.vm and q.role == "incoming":   # it runs but was never adopted: adopt it now
                    await self.agent(await self.reader.get_host(dst)).incoming_finish(rec.vm, self.token,
                                                                                      paused_ok=True)
        await self.inventory.settle(rec, rev, res)
        self.placer.invalidate()
        log.warning("operation %s (%s %s) resolved: %s -> %s", rec.id, rec.kind.value, rec.vm, res.outcome.value,
                    res.reason)
        self.resolutions.append({**entry, "at": time.time()})
        del self.resolutions[:-100]
        return entry

    async def _resolver(self) -> None:
        while True:
            try:
                await self.resolve_in_flight()
            except (ControlError, ApiError) as e:
                log.warning("resolver: %s", e)
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake_resolver.wait(), self.resolve_interval)
            self._wake_resolver.clear()

    # -- the host monitor -------------------------------------------------------------------------------
    async def _monitor(self) -> None:
        while True:
            try:
                await self.monitor_once()
            except (ControlError, ApiError) as e:
                log.warning("monitor: %s", e)
            await asyncio.sleep(self.monitor_interval)

    async def monitor_once(self) -> None:
        hosts = [h for h in await self.reader.list_all(HostRecord, HOSTS) if h.agent]

        async def one(h: HostRecord) -> None:
            try:
                ql = await self.agent(h).qemus(timeout=max(1.0, self.monitor_interval * 2))
            except (ApiError, ControlInputError):
                if h.status is HostStatus.UP:
                    log.warning("host %s: its agent does not answer: unreachable", h.name)
                    with contextlib.suppress(ConflictError, FencedError):
                        await self.inventory.update_host(h.name, status=HostStatus.UNREACHABLE)
                return
            if ql.token > self.held_token:
                self._depose(f"host {h.name} has seen fencing token {ql.token}, newer than ours")
                return
            if ql.token < self.held_token:
                with contextlib.suppress(ApiError):
                    await self.agent(h).announce(self.token, timeout=2)
            if h.status is not HostStatus.UP and h.status is not HostStatus.MAINTENANCE:
                log.warning("host %s: its agent answers again (%d guests)", h.name, len(ql.items))
                with contextlib.suppress(ConflictError, FencedError):
                    await self.inventory.update_host(h.name, status=HostStatus.UP)
                self._wake_resolver.set()
            running = {q.vm for q in ql.items if q.role == "vm"}
            for name, why in ql.lost.items():
                if name in running:
                    continue
                power = VMPower.SHUTOFF if why == "shutdown" else VMPower.CRASHED
                with contextlib.suppress(ConflictError, FencedError, NotFoundError):
                    if await self.inventory.set_vm_power(name, power, host=h.name):
                        log.warning("vm %s ended on host %s on its own (%s): recorded %s", name, h.name, why,
                                    power.value)
        await asyncio.gather(*(one(h) for h in hosts))

    # -- HA hooks (hvsim.control.ha drives these) -------------------------------------------------------
    def spawn_driver(self, coro: Awaitable[T], name: str) -> asyncio.Task[T]:
        """A driver task owned by the manager (cancelled when it stops leading); while it runs, the
        resolver leaves the operations of the VM its name ends with alone (``restart-<vm>``)."""
        return self._spawn(coro, name)

    async def place_restart(self, vm: VMRecord) -> str:
        """The surviving host an HA restart of ``vm`` goes to (reservation rules lifted, every other
        required rule kept); the decision counts for concurrent defines until :meth:`restart_placed`.
        ConflictError naming why when no host takes it."""
        async with self._place_lock:
            inv = self.reader
            hosts = await inv.list_all(HostRecord, HOSTS)
            vms = {v.name: v for v in await inv.list_all(VMRecord, VMS)}
            vms.update(self._placing)
            target = place_failover(vm, hosts, list(vms.values()), await inv.list_all(RuleRecord, RULES))
            self._placing[vm.name] = self._with(vm, host=target)
            self.placer.invalidate()
            return target

    def restart_placed(self, vm: str) -> None:
        """The restart of ``vm`` settled (or failed): its record in the store says where it is."""
        self._placing.pop(vm, None)
        self.placer.invalidate()

    async def reservation_report(self, datacenter: str | None = None, management_vcpus: int = 0,
                                 management_memory_mib: int = 0) -> dict[str, Any]:
        """Size the failover reservation for the protected VMs (see :mod:`.reservation`): the
        candidate hosts are ``datacenter``'s, else those the current reserve rules name, else the
        hosts no protected VM runs on; the protected set is every protected VM not on a candidate.
        Also what the current reservation rules hold."""
        inv = self.reader
        hosts = await inv.list_all(HostRecord, HOSTS)
        vms = await inv.list_all(VMRecord, VMS)
        rules = await inv.list_all(RuleRecord, RULES)
        placer = Placer()
        placer.load(hosts, vms, rules)
        assert placer.problem is not None
        held = []
        named: set[str] = set()
        for r in placer.problem.rules:
            if not is_reservation(r):
                continue
            spec = next(x.spec for x in rules if x.name == r.name)
            doms = [d.split(":", 1)[-1] for d in spec.get("domains", [])] + list(spec.get("hosts", []))
            named.update(d for d in doms if any(h.name == d for h in hosts))
            held.append({"rule": r.name, "spec": spec})
        if datacenter is not None:
            cands = [h for h in hosts if h.datacenter == datacenter]
            how = f"the hosts of datacenter {datacenter}"
        elif named:
            cands = [h for h in hosts if h.name in named]
            how = "the hosts the reserve rules name"
        else:
            busy = {v.host for v in vms if v.protected}
            cands = [h for h in hosts if h.name not in busy]
            how = "the hosts no protected VM runs on"
        names = {h.name for h in cands}
        protected = [Demand(v.name, v.vcpus, v.memory_mib) for v in vms if v.protected and v.host not in names]
        plan = size_reservation(protected, Demand("management", management_vcpus, management_memory_mib),
                                [Capacity(h.name, int(h.vcpus * h.cpu_overcommit),
                                          int(h.memory_mib * h.memory_overcommit)) for h in cands])
        return {"candidates": sorted(names), "candidates_are": how, "plan": plan.to_dict(), "held": held,
                "ha": self.ha.report()}
