"""The network controller of one datacenter: tenant networks, ENIs and their moves between hosts.

It owns the definitions (:mod:`hvsim.network.eni`), programs every host of an
:class:`~hvsim.network.underlay.Underlay` (:mod:`hvsim.network.tenant`) and executes the plans of
:mod:`hvsim.network.plan`. The calls a migration (or a restart elsewhere) makes, in order::

    move = await ctl.stage(vm, "host-b", move_id="mig-7")   # before the destination QEMU starts
    await ctl.activate(move)                                 # at switchover (source paused)
    await vm.qmp.execute("announce-self", {...})              # the caller, on the destination
    await ctl.release(move)                                  # after the source QEMU is gone
    # on failure or cancellation instead:  await ctl.rollback(move)

The same calls serve every :class:`~hvsim.network.plan.MobilityMode` (``hvsim``,
``after-completion``, ``learning``): the mode decides what each phase changes, so the benchmark's
three configurations are one parameter. Every action is logged and journaled with the id of the
operation it belongs to (``move_id``, or ``attach:<vm>`` / ``detach:<vm>``).

States: the controller ``NEW -> STARTING -> UP -> CLOSING -> CLOSED`` (``FAILED`` when teardown left
something); a move (:class:`MoveState`)::

    PLANNED -> STAGING -> STAGED -> ACTIVATING -> ACTIVE -> RELEASING -> DONE
                  |          |          |            |
                  +----------+----------+------------+--> ROLLING_BACK -> ROLLED_BACK
    (STAGING/ACTIVATING/RELEASING/ROLLING_BACK -> FAILED when programming failed and could not be undone)
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hvbase.fsm import StateMachine
from qmp_bridge import Nic

from hvbase.aio import run_to_completion
from .eni import (BindingState, Eni, EniSpec, NetworkSpec, PortKind, PortSpec, check_networks, guest_nic_arg,
                  validate_eni)
from .errors import (BindingStateError, NetworkError, ProgrammingError, TeardownError, TenantInputError,
                     UnknownEniError, UnknownHostError)
from .tenant import HostDataplane, HostInventory
from .nft import PortCounters
from .plan import Action, AttachPlan, MobilityMode, MovePlan, Op, Phase, plan_attach, plan_detach, plan_move

log = logging.getLogger("hvsim.network.controller")


class HostsView(Protocol):
    """What the controller needs of an underlay (:class:`~hvsim.network.underlay.Underlay` has it)."""
    @property
    def hosts(self) -> tuple[str, ...]: ...
    def host_ns(self, host: str) -> str: ...
    def host_ip(self, host: str) -> str: ...


DataplaneFactory = Callable[[str, str, str, MobilityMode], HostDataplane]


class ControllerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    UP = "up"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


_C = ControllerState
CONTROLLER_TRANSITIONS: dict[ControllerState, frozenset[ControllerState]] = {
    _C.NEW: frozenset({_C.STARTING, _C.CLOSED}),
    _C.STARTING: frozenset({_C.UP, _C.CLOSING}),
    _C.UP: frozenset({_C.CLOSING}),
    _C.CLOSING: frozenset({_C.CLOSED, _C.FAILED}),
    _C.CLOSED: frozenset(),
    _C.FAILED: frozenset(),
}


class MoveState(enum.Enum):
    PLANNED = "planned"
    STAGING = "staging"
    STAGED = "staged"
    ACTIVATING = "activating"
    ACTIVE = "active"
    RELEASING = "releasing"
    DONE = "done"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


_M = MoveState
MOVE_TRANSITIONS: dict[MoveState, frozenset[MoveState]] = {
    _M.PLANNED: frozenset({_M.STAGING, _M.ROLLED_BACK}),
    _M.STAGING: frozenset({_M.STAGED, _M.ROLLING_BACK, _M.FAILED}),
    _M.STAGED: frozenset({_M.ACTIVATING, _M.ROLLING_BACK}),
    _M.ACTIVATING: frozenset({_M.ACTIVE, _M.ROLLING_BACK, _M.FAILED}),
    _M.ACTIVE: frozenset({_M.RELEASING, _M.ROLLING_BACK}),
    _M.RELEASING: frozenset({_M.DONE, _M.FAILED}),
    _M.ROLLING_BACK: frozenset({_M.ROLLED_BACK, _M.FAILED}),
    _M.DONE: frozenset(),
    _M.ROLLED_BACK: frozenset(),
    _M.FAILED: frozenset(),
}


@dataclass(frozen=True)
class JournalEntry:
    """One action the controller executed (or tried)."""
    op_id: str          # the move id, or attach:<vm> / detach:<vm>
    phase: str
    wave: int
    host: str
    op: str
    eni: str
    detail: str
    ok: bool
    error: str
    at: float           # time.monotonic() when it started (same clock as the prober's)
    ms: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Move:
    """One VM's ENIs moving from ``source`` to ``destination``."""

    def __init__(self, move_id: str, plan: MovePlan) -> None:
        self.id = move_id
        self.plan = plan
        self.fsm: StateMachine[MoveState] = StateMachine(f"move {move_id}", _M.PLANNED, MOVE_TRANSITIONS,
                                                         error=BindingStateError, log=log)
        self.phase_times: dict[str, tuple[float, float]] = {}    # phase -> (monotonic start, end)
        self.error: str = ""

    @property
    def state(self) -> MoveState:
        return self.fsm.state

    @property
    def vm(self) -> str:
        return self.plan.vm

    @property
    def source(self) -> str:
        return self.plan.source

    @property
    def destination(self) -> str:
        return self.plan.destination

    @property
    def enis(self) -> tuple[str, ...]:
        return self.plan.enis

    @property
    def mode(self) -> MobilityMode:
        return self.plan.mode

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "source": self.source, "destination": self.destination,
                "enis": list(self.enis), "mode": self.mode.value, "state": self.state.value, "error": self.error,
                "phase_ms": {k: round((b - a) * 1e3, 3) for k, (a, b) in self.phase_times.items()}}

    def __repr__(self) -> str:
        return f"<Move {self.id} {self.vm} {self.source}->{self.destination} {self.state.value}>"


class NetworkController:
    """Tenant networks and ENIs of one datacenter over an underlay's hosts."""

    def __init__(self, underlay: HostsView, *, mode: MobilityMode | str = MobilityMode.HVSIM,
                 datacenter: str = "dc1", hosts: Sequence[str] | None = None, journal_limit: int = 100_000,
                 dataplane: DataplaneFactory = HostDataplane) -> None:
        self.mode = MobilityMode.parse(mode)
        self.datacenter = datacenter
        self.underlay = underlay
        names = list(hosts) if hosts is not None else list(underlay.hosts)
        for h in names:
            if h not in underlay.hosts:
                raise UnknownHostError(h, list(underlay.hosts))
        if len(set(names)) != len(names) or not names:
            raise TenantInputError(f"controller hosts must be distinct and non-empty, got {names}")
        self.hosts: tuple[str, ...] = tuple(names)
        self.networks: dict[str, NetworkSpec] = {}
        self.enis: dict[str, Eni] = {}
        self.moves: dict[str, Move] = {}
        self.journal: list[JournalEntry] = []
        self._journal_limit = journal_limit
        self._dp: dict[str, HostDataplane] = {}
        self._make_dataplane = dataplane      # (host, netns, vtep, mode) -> data plane; tests pass a fake
        self._vm_locks: dict[str, asyncio.Lock] = {}
        self._net_lock = asyncio.Lock()
        self._seq = itertools.count(1)
        self.fsm: StateMachine[ControllerState] = StateMachine(
            f"network controller {datacenter}", _C.NEW, CONTROLLER_TRANSITIONS, error=BindingStateError, log=log)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    @property
    def state(self) -> ControllerState:
        return self.fsm.state

    async def __aenter__(self) -> NetworkController:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Open every host's data plane (nftables table in each host namespace)."""
        self.fsm.require("start", _C.NEW)
        self.fsm.set(_C.STARTING)
        u = self.underlay
        for h in self.hosts:
            self._dp[h] = self._make_dataplane(h, u.host_ns(h), u.host_ip(h), self.mode)
        try:
            await asyncio.gather(*(dp.open() for dp in self._dp.values()))
        except BaseException:
            self.fsm.set(_C.CLOSING, "start failed")
            await run_to_completion(self._teardown())
            raise
        self.fsm.set(_C.UP, f"{len(self.hosts)} hosts, mode {self.mode.value}")

    async def close(self) -> None:
        """Remove every port, FDB and neighbour entry, rule, bridge and VXLAN device on every host;
        TeardownError (state FAILED) if anything is left. Idempotent; finishes under cancellation."""
        if self.state in (_C.CLOSED, _C.FAILED, _C.CLOSING):
            return
        if self.state is _C.NEW:
            self.fsm.set(_C.CLOSED, "never started")
            return
        self.fsm.set(_C.CLOSING)
        await run_to_completion(self._teardown())

    async def _teardown(self) -> None:
        results = await asyncio.gather(*(dp.close() for dp in self._dp.values()), return_exceptions=True)
        left: list[str] = []
        errors: list[BaseException] = []
        for dp, r in zip(self._dp.values(), results, strict=True):
            if isinstance(r, TeardownError):
                left += [f"{dp.host}: {x}" for x in r.leftovers]
            elif isinstance(r, BaseException):
                errors.append(r)
                left.append(f"{dp.host}: teardown error {r}")
        for e in self.enis.values():
            for b in list(e.bindings):
                if b.state is BindingState.ACTIVE or b.state is BindingState.STAGED:
                    b.releasing("controller closed")
                b.detached("controller closed")
                e.forget(b)
        if left:
            self.fsm.set(_C.FAILED, "; ".join(left))
            raise TeardownError(f"network controller {self.datacenter}: teardown left", left) from (
                errors[0] if errors else None)
        self.fsm.set(_C.CLOSED)

    def _require_up(self, action: str) -> None:
        self.fsm.require(action, _C.UP)

    def _dataplane(self, host: str) -> HostDataplane:
        try:
            return self._dp[host]
        except KeyError:
            raise UnknownHostError(host, list(self.hosts)) from None

    def _vm_lock(self, vm: str) -> asyncio.Lock:
        return self._vm_locks.setdefault(vm, asyncio.Lock())

    # ---- definitions ----------------------------------------------------------------------------------------
    async def add_network(self, spec: NetworkSpec) -> NetworkSpec:
        """Define a tenant network and create its bridge and VXLAN device on every host."""
        self._require_up("add a network")
        if not isinstance(spec, NetworkSpec):
            raise TenantInputError(f"add_network wants a NetworkSpec, got {type(spec).__name__}")
        async with self._net_lock:
            check_networks(self.networks.values(), spec)
            self.networks[spec.name] = spec
            vteps = {h: self.underlay.host_ip(h) for h in self.hosts}
            results = await asyncio.gather(*(
                dp.add_network(spec, {p: ip for p, ip in vteps.items() if p != h}) for h, dp in self._dp.items()),
                return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:    # every host created it or none keeps it
                await run_to_completion(asyncio.gather(
                    *(dp.remove_network(spec) for dp in self._dp.values()), return_exceptions=True))
                del self.networks[spec.name]
                for r in failed:
                    if not isinstance(r, Exception):
                        raise r
                raise failed[0]
        log.info("network %s: vni %d %s on %d hosts (%s)", spec.name, spec.vni, spec.cidr, len(self.hosts),
                 self.mode.value)
        return spec

    async def remove_network(self, name: str) -> None:
        self._require_up("remove a network")
        spec = self.networks.get(name)
        if spec is None:
            raise TenantInputError(f"unknown tenant network {name!r}")
        users = [e.id for e in self.enis.values() if e.spec.network == name]
        if users:
            raise TenantInputError(f"network {name!r} still has ENIs: {', '.join(users)} (remove them first)")
        async with self._net_lock:
            await asyncio.gather(*(dp.remove_network(spec) for dp in self._dp.values()))
            del self.networks[name]

    def define_eni(self, spec: EniSpec) -> Eni:
        """Validate and record an ENI (nothing is programmed until it is attached).

        :raise TenantInputError: bad MAC, IP outside its network, duplicate MAC/IP/id, unknown network
        """
        if not isinstance(spec, EniSpec):
            raise TenantInputError(f"define_eni wants an EniSpec, got {type(spec).__name__}")
        net = validate_eni(spec, self.networks, (e.spec for e in self.enis.values()))
        eni = Eni(spec, net)
        self.enis[spec.id] = eni
        log.info("eni %s: defined in %s (%s, %s)", spec.id, spec.network, spec.mac, ", ".join(spec.ips))
        return eni

    def remove_eni(self, eni_id: str) -> None:
        eni = self.eni(eni_id)
        if eni.bindings:
            raise BindingStateError(f"ENI {eni_id!r}", eni.bindings[0].state, (BindingState.DETACHED,),
                                    action="remove")
        del self.enis[eni_id]

    def eni(self, eni_id: str) -> Eni:
        try:
            return self.enis[eni_id]
        except (KeyError, TypeError):
            raise UnknownEniError(eni_id, sorted(self.enis)) from None

    def enis_of(self, vm: str) -> list[Eni]:
        """The ENIs currently bound (staged, active or releasing) to ``vm``, in definition order."""
        return [e for e in self.enis.values() if e.vm == vm]

    # ---- what QEMU and the guest need -----------------------------------------------------------------------
    def nic(self, eni_id: str) -> Nic:
        """The QEMU NIC of an ENI: a virtio-net on its tap (same name on every host)."""
        e = self.eni(eni_id)
        return Nic(id=f"net-{e.id}", mac=e.spec.mac, backend="tap", ifname=e.spec.port_name)

    def kernel_args(self, eni_ids: Iterable[str]) -> str:
        """Guest kernel command line for these ENIs (``hvsim.nic=...`` each; images/init.sh)."""
        return " ".join(guest_nic_arg(self.eni(i).spec, self.eni(i).network) for i in eni_ids)

    # ---- execution -----------------------------------------------------------------------------------------
    def _record(self, entry: JournalEntry) -> None:
        self.journal.append(entry)
        if len(self.journal) > self._journal_limit:
            del self.journal[: len(self.journal) - self._journal_limit]

    async def _apply(self, op_id: str, phase: str, wave: int, a: Action) -> None:
        eni = self.eni(a.eni)
        spec, net = eni.spec, eni.network
        dp = self._dataplane(a.host)
        b = eni.binding_on(a.host)
        detail = a.describe()
        t0 = time.monotonic()
        err = ""
        try:
            if a.op is Op.CREATE_PORT:
                if b is None:
                    raise ProgrammingError(a.host, detail, "no binding on this host")
                await dp.create_port(spec, net, b.port, b.ifname, b.peer_ifname, blocked=a.blocked)
            elif a.op is Op.BLOCK_PORT:
                await dp.set_blocked(spec.port_name, True)
            elif a.op is Op.UNBLOCK_PORT:
                await dp.set_blocked(spec.port_name, False)
            elif a.op is Op.DELETE_PORT:
                await dp.delete_port(spec.port_name)
            elif a.op is Op.FDB_LOCAL:
                await dp.fdb_local(spec.mac, spec.port_name, net)
            elif a.op is Op.FDB_REMOTE:
                await dp.fdb_remote(spec.mac, self.underlay.host_ip(a.peer), net)
            elif a.op is Op.FDB_DELETE:
                await dp.fdb_delete(spec.mac, net)
            elif a.op is Op.NEIGH_ADD:
                await dp.neigh_add(spec.ips, spec.mac, net)
            elif a.op is Op.NEIGH_DELETE:
                await dp.neigh_delete(spec.ips, net)
            else:  # pragma: no cover - exhaustive
                raise ProgrammingError(a.host, detail, f"unknown op {a.op}")
        except BaseException as exc:
            err = str(exc) or type(exc).__name__
            raise
        finally:
            ms = (time.monotonic() - t0) * 1e3
            self._record(JournalEntry(op_id, phase, wave, a.host, a.op.value, a.eni, detail, not err, err, t0, ms))
            if err:
                log.error("[%s] %s wave %d: %s FAILED after %.1f ms: %s", op_id, phase, wave, detail, ms, err)
            else:
                log.info("[%s] %s wave %d: %s (%.1f ms)", op_id, phase, wave, detail, ms)

    async def _execute(self, op_id: str, phase: Phase, *, best_effort: bool = False) -> list[BaseException]:
        """Run a phase: waves in order; per wave, hosts concurrently, each host's actions in order.
        Stops at the first failing wave (raising), or with ``best_effort`` runs everything and
        returns the errors."""
        failures: list[BaseException] = []
        for i, wave in enumerate(phase.waves, 1):
            by_host: dict[str, list[Action]] = {}
            for a in wave:
                by_host.setdefault(a.host, []).append(a)

            async def run_host(actions: list[Action], wave_no: int = i) -> None:
                for a in actions:
                    try:
                        await self._apply(op_id, phase.name, wave_no, a)
                    except Exception as exc:
                        if not best_effort:
                            raise
                        failures.append(exc)

            results = await asyncio.gather(*(run_host(acts) for acts in by_host.values()), return_exceptions=True)
            errs = [r for r in results if isinstance(r, BaseException)]
            for r in errs:
                if not isinstance(r, Exception):   # CancelledError, KeyboardInterrupt: never swallowed
                    raise r
            if errs:
                raise errs[0]
        return failures

    async def _timed(self, move: Move, phase: Phase, **kw: Any) -> list[BaseException]:
        t0 = time.monotonic()
        try:
            return await self._execute(move.id, phase, **kw)
        finally:
            move.phase_times[phase.name] = (t0, time.monotonic())

    # ---- attach / detach -------------------------------------------------------------------------------------
    async def attach(self, vm: str, host: str, eni_ids: Sequence[str], *,
                     ports: Mapping[str, PortSpec] | PortSpec | None = None) -> None:
        """Bind ENIs (with no binding yet) to ``vm`` on ``host``: ports created blocked, then FDB and
        ARP entries everywhere, then unblocked. On failure or cancellation nothing is left."""
        self._require_up("attach ENIs")
        self._dataplane(host)
        enis = [self.eni(i) for i in eni_ids]
        if len({e.id for e in enis}) != len(enis):
            raise TenantInputError(f"ENI listed twice in {list(eni_ids)}")
        for e in enis:
            if e.bindings:
                raise BindingStateError(f"ENI {e.id!r}", e.bindings[0].state, (BindingState.DETACHED,),
                                        action="attach")
        op_id = f"attach:{vm}#{next(self._seq)}"
        async with self._vm_lock(vm):
            plan = plan_attach(self.mode, self.hosts, [e.id for e in enis], host)
            bindings = [e.new_binding(vm, host, _port_for(ports, e.id)) for e in enis]
            try:
                await self._execute(op_id, plan.stage)
                for b in bindings:
                    b.staged(op_id)
                await self._execute(op_id, plan.activate)
            except BaseException as exc:
                await run_to_completion(self._undo_attach(op_id, plan, enis, bindings))
                if isinstance(exc, ProgrammingError):
                    raise ProgrammingError(host, f"attach {', '.join(eni_ids)} to vm {vm!r}",
                                           f"{exc} (rolled back)") from exc
                raise
            for b in bindings:
                b.activated(op_id)
        log.info("[%s] vm %s: %s active on %s", op_id, vm, ", ".join(eni_ids), host)

    async def _undo_attach(self, op_id: str, plan: AttachPlan, enis: list[Eni], bindings: list[Any]) -> None:
        undo = plan_detach(self.mode, self.hosts, plan.enis, plan.host) if self.mode.programs_fdb else plan.rollback
        errors = await self._execute(op_id, Phase("rollback", undo.waves), best_effort=True)
        for err in errors:   # e.g. blocking a port the failed stage never created
            log.info("[%s] rollback: %s", op_id, err)
        for e, b in zip(enis, bindings, strict=True):
            if b.state is not BindingState.DETACHED:
                b.releasing("attach rolled back")
                b.detached("attach rolled back")
            e.forget(b)

    async def detach(self, vm: str) -> None:
        """Unbind every ENI of ``vm`` (a VM removed for good): FDB/ARP entries everywhere, its ports."""
        self._require_up("detach ENIs")
        async with self._vm_lock(vm):
            enis = self.enis_of(vm)
            if not enis:
                return
            for e in enis:
                if e.staged is not None or e.active is None or len(e.bindings) != 1:
                    raise BindingStateError(f"ENI {e.id!r}", e.bindings[0].state, (BindingState.ACTIVE,),
                                            action="detach", message=f"cannot detach ENI {e.id!r}: a move is "
                                            "in progress (roll it back or release it first)")
            host = enis[0].bindings[0].host
            op_id = f"detach:{vm}#{next(self._seq)}"
            for e in enis:
                e.bindings[0].releasing(op_id)
            errors = await self._execute(op_id, plan_detach(self.mode, self.hosts, [e.id for e in enis], host),
                                         best_effort=True)
            for e in enis:
                b = e.bindings[0]
                b.detached(op_id)
                e.forget(b)
            if errors:
                raise ProgrammingError(host, f"detach vm {vm!r}", f"{len(errors)} action(s) failed: {errors[0]}")

    # ---- moves -----------------------------------------------------------------------------------------------
    async def stage(self, vm: str, destination: str, *, move_id: str,
                    ports: Mapping[str, PortSpec] | PortSpec | None = None) -> Move:
        """Before switchover: an inactive binding of each of ``vm``'s ENIs on ``destination``.
        In ``hvsim`` mode the port is created blocked. On failure or cancellation the destination
        is cleaned and the move is ROLLED_BACK (the error or cancellation is re-raised)."""
        self._require_up("stage a move")
        self._dataplane(destination)
        if not isinstance(move_id, str) or not move_id or len(move_id) > 128:
            raise TenantInputError(f"move_id must be a non-empty string (<= 128 chars), got {move_id!r}")
        if move_id in self.moves:
            raise TenantInputError(f"move id {move_id!r} was already used")
        async with self._vm_lock(vm):
            enis = self.enis_of(vm)
            sources = {e.active.host for e in enis if e.active is not None}
            if any(e.active is None or e.staged is not None or len(e.bindings) != 1 for e in enis):
                raise BindingStateError(f"vm {vm!r}", "moving", (BindingState.ACTIVE,), action="stage a move",
                                        message=f"cannot stage a move of vm {vm!r}: its ENIs are not all "
                                                "active and idle (another move in progress?)")
            if len(sources) > 1:
                raise BindingStateError(f"vm {vm!r}", "split", (), action="stage a move",
                                        message=f"vm {vm!r} has ENIs active on several hosts {sorted(sources)}")
            source = sources.pop() if sources else destination
            if enis and source == destination:
                raise TenantInputError(f"vm {vm!r} is already on host {destination!r}")
            plan = plan_move(self.mode, self.hosts, vm, [e.id for e in enis], source, destination) if enis else \
                _empty_plan(self.mode, vm, source, destination)
            move = Move(move_id, plan)
            self.moves[move_id] = move
            move.fsm.set(_M.STAGING)
            staged = []
            try:
                for e in enis:
                    src_b = e.active
                    assert src_b is not None
                    staged.append(e.new_binding(vm, destination, _port_for(ports, e.id, src_b.port)))
                await self._timed(move, plan.stage)
            except BaseException as exc:
                move.error = str(exc) or type(exc).__name__
                await run_to_completion(self._rollback(move))
                raise
            for b in staged:
                b.staged(move_id)
            move.fsm.set(_M.STAGED)
            return move

    async def activate(self, move: Move) -> None:
        """At switchover (the source is paused): the destination binding becomes the active one.
        The caller then has the guest announce itself (QMP ``announce-self``). A failure reverts the
        switchover (the source binding is active again) and re-raises."""
        self._require_up("activate a move")
        async with self._vm_lock(move.vm):
            move.fsm.require("activate", _M.STAGED)
            move.fsm.set(_M.ACTIVATING)
            try:
                await self._timed(move, move.plan.activate)
            except BaseException as exc:
                move.error = str(exc) or type(exc).__name__
                await run_to_completion(self._revert(move))
                raise
            for e in self._move_enis(move):
                src, dst = e.binding_on(move.source), e.binding_on(move.destination)
                assert src is not None and dst is not None
                src.releasing(move.id)
                dst.activated(move.id)
            move.fsm.set(_M.ACTIVE)

    async def release(self, move: Move) -> None:
        """After the migration completed (the source QEMU is gone): remove the source binding."""
        self._require_up("release a move")
        async with self._vm_lock(move.vm):
            move.fsm.require("release", _M.ACTIVE)
            move.fsm.set(_M.RELEASING)
            try:
                await self._timed(move, move.plan.release)
            except BaseException as exc:
                move.error = str(exc) or type(exc).__name__
                move.fsm.set(_M.FAILED, move.error)   # the source bindings stay RELEASING: leftovers
                raise
            for e in self._move_enis(move):
                src = e.binding_on(move.source)
                if src is not None:
                    src.detached(move.id)
                    e.forget(src)
            move.fsm.set(_M.DONE)

    async def rollback(self, move: Move) -> None:
        """A failed or cancelled migration: the destination binding is removed, the source binding
        stays (or becomes again) the active one. Allowed before release; idempotent once rolled back."""
        if move.state is _M.ROLLED_BACK:
            return
        self._require_up("roll back a move")
        async with self._vm_lock(move.vm):
            if move.state is _M.ROLLED_BACK:
                return
            move.fsm.require("roll back", _M.PLANNED, _M.STAGED, _M.ACTIVE)
            if move.state is _M.ACTIVE:
                await run_to_completion(self._revert(move))
            else:
                await run_to_completion(self._rollback(move))

    async def move(self, vm: str, destination: str, *, move_id: str,
                   ports: Mapping[str, PortSpec] | PortSpec | None = None) -> Move:
        """stage + activate + release in one call (a restart elsewhere, or tests)."""
        m = await self.stage(vm, destination, move_id=move_id, ports=ports)
        try:
            await self.activate(m)
        except BaseException:
            if m.state is _M.STAGED:
                await self.rollback(m)
            raise
        await self.release(m)
        return m

    def _move_enis(self, move: Move) -> list[Eni]:
        return [self.eni(i) for i in move.enis]

    async def _rollback(self, move: Move) -> None:
        """Undo a stage: delete the destination ports, forget the destination bindings."""
        if move.state is _M.PLANNED:
            move.fsm.set(_M.ROLLED_BACK, "nothing was staged")
            return
        move.fsm.set(_M.ROLLING_BACK, move.error)
        errors = await self._timed(move, move.plan.rollback, best_effort=True)
        self._forget_destination(move)
        if errors:
            move.error = f"rollback: {errors[0]}"
            move.fsm.set(_M.FAILED, move.error)
            raise ProgrammingError(move.destination, f"roll back move {move.id}", str(errors[0])) from errors[0]
        move.fsm.set(_M.ROLLED_BACK)

    async def _revert(self, move: Move) -> None:
        """Undo an activation (complete or partial): the source is the active binding again."""
        move.fsm.set(_M.ROLLING_BACK, move.error or "revert switchover")
        errors = await self._timed(move, move.plan.revert, best_effort=True)
        for e in self._move_enis(move):
            src = e.binding_on(move.source)
            if src is not None and src.state is BindingState.RELEASING:
                src.activated(f"{move.id} reverted")
        self._forget_destination(move)
        if errors:
            move.error = f"revert: {errors[0]}"
            move.fsm.set(_M.FAILED, move.error)
            raise ProgrammingError(move.destination, f"revert move {move.id}", str(errors[0])) from errors[0]
        move.fsm.set(_M.ROLLED_BACK)

    def _forget_destination(self, move: Move) -> None:
        for e in self._move_enis(move):
            dst = e.binding_on(move.destination)
            if dst is None:
                continue
            if dst.state in (BindingState.STAGED, BindingState.ACTIVE):
                dst.releasing(f"{move.id} rolled back")
            if dst.state is BindingState.RELEASING:
                dst.detached(f"{move.id} rolled back")
            e.forget(dst)

    # ---- inspection ------------------------------------------------------------------------------------------
    async def counters(self, eni_id: str, host: str | None = None) -> PortCounters:
        """Drop counters of an ENI's port on ``host`` (default: where it is active)."""
        e = self.eni(eni_id)
        if host is None:
            b = e.active
            if b is None:
                raise BindingStateError(f"ENI {eni_id!r}", "detached", (BindingState.ACTIVE,), action="read counters")
            host = b.host
        return await self._dataplane(host).counters(e.spec.port_name)

    async def inventory(self) -> dict[str, HostInventory]:
        """What is programmed on every host (links, FDB, neighbours, rules)."""
        invs = await asyncio.gather(*(dp.inventory() for dp in self._dp.values()))
        return {i.host: i for i in invs}

    def op_timings(self) -> dict[str, dict[str, float]]:
        """Per host and operation: count and mean milliseconds of data-plane operations so far."""
        out: dict[str, dict[str, float]] = {}
        for h, dp in self._dp.items():
            for op, xs in dp.timing.by_op.items():
                out.setdefault(h, {})[op] = round(sum(xs) / len(xs) * 1e3, 3)
        return out

    def snapshot(self) -> dict[str, Any]:
        """The controller's state as plain data (what a manager would persist)."""
        return {"datacenter": self.datacenter, "mode": self.mode.value, "state": self.state.value,
                "hosts": {h: self.underlay.host_ip(h) for h in self.hosts},
                "networks": [n.to_dict() for n in self.networks.values()],
                "enis": [e.to_dict() for e in self.enis.values()],
                "moves": [m.to_dict() for m in self.moves.values()]}

    def journal_of(self, op_id: str) -> list[JournalEntry]:
        return [j for j in self.journal if j.op_id == op_id]

    def __repr__(self) -> str:
        return f"<NetworkController {self.datacenter} {self.mode.value} {self.state.value} hosts={list(self.hosts)}>"


def _port_for(ports: Mapping[str, PortSpec] | PortSpec | None, eni_id: str,
              default: PortSpec | None = None) -> PortSpec:
    if isinstance(ports, PortSpec):
        return ports
    if ports is not None and eni_id in ports:
        p = ports[eni_id]
        if not isinstance(p, PortSpec):
            raise TenantInputError(f"port of ENI {eni_id!r} must be a PortSpec, got {p!r}")
        return p
    return default or PortSpec(PortKind.TAP)


def _empty_plan(mode: MobilityMode, vm: str, source: str, destination: str) -> MovePlan:
    empty = [Phase(n) for n in ("stage", "activate", "release", "rollback", "revert")]
    return MovePlan(mode=mode, vm=vm, source=source, destination=destination, enis=(), stage=empty[0],
                    activate=empty[1], release=empty[2], rollback=empty[3], revert=empty[4])


__all__ = ["NetworkController", "ControllerState", "Move", "MoveState", "JournalEntry", "MobilityMode",
           "NetworkError"]
