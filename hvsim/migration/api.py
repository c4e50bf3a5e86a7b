"""Entry points: ``start_migration`` (background, returns the Migration at once) and ``migrate``.

Everything that can be refused is refused here, synchronously, before any process starts:
unknown policy or policy parameter, bad timeout, unknown or same destination host, a VM that
is not running or paused or is busy with another operation, hosts not on the same kind of network,
and a destination without capacity (the VM's lease reserves it and releases it on failure).
"""
from __future__ import annotations

import math
import secrets
from typing import Any

from ..core.errors import BusyError, CapacityError, IllegalTransitionError, NotFoundError
from ..core.host import Host
from ..core.model import native_migration_blockers
from ..core.vm import VM
from ..guest.heartbeat import HeartbeatMonitor
from .components import ComponentMigration, UldHooks, UldMode
from .costs import costs_of
from .errors import IncompatibleMachinesError, MigrationInputError, MigrationRefusedError, MigrationStateError
from .orchestrator import Migration
from .planner import Contract, Plan
from .planning import make_plan, measure
from .policies import make_policy
from .transfer import QemuLiveTransfer, TransferOptions

_OPTIONS = {"policy_params", "port", "poll_interval", "heartbeat", "dest_extra_args", "sample_dirty_rate",
            "link_mbit", "postcopy_preempt", "transfer_factory", "uld", "uld_hooks", "uld_precopy_interval",
            "uld_stall_timeout", "uld_final_timeout", "contract", "downtime_budget_ms", "time_budget_s",
            "postcopy_window_s", "if_infeasible", "recover_within_s", "postcopy_stall_s"}
_CONTRACT_KEYS = ("downtime_budget_ms", "time_budget_s", "postcopy_window_s", "if_infeasible")


def contract_from(options: dict[str, Any]) -> Contract:
    """The contract of a migration: ``contract=Contract(...)`` or its fields as options (not both)."""
    given = {k: options[k] for k in _CONTRACT_KEYS if k in options}
    c = options.get("contract")
    if c is not None:
        if not isinstance(c, Contract):
            raise MigrationInputError(f"contract must be a hvsim.migration.Contract, got {type(c).__name__}")
        if given:
            raise MigrationInputError(f"give either contract= or {sorted(given)}, not both")
        return c
    return Contract(**given)


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise MigrationInputError(f"{name} must be a number within {lo:g}..{hi:g}, got {value!r}")
    return float(value)


def start_migration(vm: VM, dest_host: Host | str, policy: Any = "hvsim-predictive",
                    timeout: float = 300.0, **options: Any) -> Migration:
    """Validate, lend the VM to a migration to ``dest_host`` (capacity reserved there) and start
    migrating in the background.

    Options: ``policy_params`` (dict for the policy), ``port`` (fixed listen port), ``poll_interval``
    (s, default 0.2), ``heartbeat`` (a HeartbeatMonitor already reading the source's heartbeat
    socket; it is attached to the destination too and left open), ``dest_extra_args`` (extra QEMU
    args for the destination, e.g. for fault injection), ``sample_dirty_rate`` (bool, default off:
    QMP calc-dirty-rate before the start), ``link_mbit`` (a bandwidth hint for the policy),
    ``postcopy_preempt`` (bool, default off), ``transfer_factory`` (``(migration_id, TransferOptions,
    uses_postcopy=, components=) -> QemuLiveTransfer``: another way to reach the destination, e.g. a destination
    run by another host agent). Both dirty-rate sampling and preemption are off because with them destination guests of
    concurrent migrations logged kernel BUGs (memory corruption) here; see docs/migration.md.

    User-level drivers (components implementing the core's ``MigratableComponent``, e.g. the swap
    shim): ``uld`` is ``"precopy"`` (default: a peer on the destination, the full state ahead of
    the RAM, deltas during RAM pre-copy, the last delta at ``pause-before-switchover``),
    ``"stop-copy"`` (the whole state inside the pause), ``"cold"`` (a peer that starts empty) or
    ``"shared"`` (the destination QEMU uses the source's drivers); ``uld_precopy_interval`` (s
    between deltas, default 0.5), ``uld_stall_timeout`` (s without progress on the state link
    before the migration fails, default 5), ``uld_final_timeout`` (s, default 120),
    ``uld_hooks`` (a :class:`~hvsim.migration.components.UldHooks` for fault injection).

    The contract (``contract=Contract(...)``, or its fields as options): ``downtime_budget_ms``
    (default 300, guest-observed), ``time_budget_s`` (default: the timeout), ``postcopy_window_s``
    (default 0: postcopy not allowed), ``if_infeasible`` ("best-effort" or "refuse"). Policies that
    plan (hvsim-predictive) measure the guest and the link first and follow the plan; the result
    records it (``result.plan``, ``result.plan_error``, ``result.contract_met``).
    ``recover_within_s`` (default 60): how long a postcopy whose stream broke is retried before
    PostcopyPausedError (the guest kept paused on the destination, its pages on the source);
    ``postcopy_stall_s`` (default 2): no byte sent that long in postcopy counts as a broken stream.
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise MigrationInputError(f"unknown migration option(s) {unknown}; known: {sorted(_OPTIONS)}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise MigrationInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    poll = _number("poll_interval", options.get("poll_interval", 0.2), 0.01, 5)
    port = options.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535):
        raise MigrationInputError(f"port must be an integer within 1024..65535, got {port!r}")
    link_mbit = options.get("link_mbit")
    if link_mbit is not None:
        link_mbit = _number("link_mbit", link_mbit, 0.001, 1e6)
    hb = options.get("heartbeat")
    if hb is not None and not isinstance(hb, HeartbeatMonitor):
        raise MigrationInputError(f"heartbeat must be a HeartbeatMonitor, got {type(hb).__name__}")
    params = options.get("policy_params") or {}
    if not isinstance(params, dict):
        raise MigrationInputError(f"policy_params must be a dict, got {type(params).__name__}")
    pol = make_policy(policy, **params)
    factory = options.get("transfer_factory") or QemuLiveTransfer
    if not callable(factory):
        raise MigrationInputError(f"transfer_factory must be callable, got {type(factory).__name__}")
    uld_mode = UldMode.parse(options.get("uld", "precopy"))
    hooks = options.get("uld_hooks")
    if hooks is not None and not isinstance(hooks, UldHooks):
        raise MigrationInputError(f"uld_hooks must be a UldHooks, got {type(hooks).__name__}")
    uld_interval = _number("uld_precopy_interval", options.get("uld_precopy_interval", 0.5), 0.01, 60)
    uld_stall = _number("uld_stall_timeout", options.get("uld_stall_timeout", 5.0), 0.1, 600)
    uld_final = _number("uld_final_timeout", options.get("uld_final_timeout", 120.0), 1, 3600)
    contract = contract_from(options)
    recover_within = _number("recover_within_s", options.get("recover_within_s", 60.0), 0.5, 86400)
    stall_s = _number("postcopy_stall_s", options.get("postcopy_stall_s", 2.0), 0.2, 600)

    if isinstance(dest_host, str):
        try:
            dest = vm.env.host(dest_host)
        except NotFoundError as exc:
            raise MigrationInputError(f"cannot migrate vm {vm.name!r}: {exc}") from exc
    else:
        dest = dest_host
    check_native_compatible(vm, dest)
    if not isinstance(dest_host, str):
        if vm.env.hosts.get(dest.name) is not dest:
            raise MigrationInputError(f"host {dest.name!r} is not part of cluster {vm.env.name!r}")
    if dest is vm.host:
        raise MigrationInputError(f"cannot migrate vm {vm.name!r}: source and destination are the same "
                                  f"host {dest.name!r}")
    if (dest.netns is None) != (vm.host.netns is None):
        raise MigrationInputError(
            f"cannot migrate vm {vm.name!r}: hosts {vm.host.name!r} and {dest.name!r} are not on one network "
            "(put both in an Underlay: add_host(..., network=underlay.host_network(name)))")
    try:
        lease = vm.begin_migration(dest)
    except (BusyError, IllegalTransitionError) as exc:
        raise MigrationStateError(str(exc)) from exc
    except CapacityError as exc:
        raise MigrationRefusedError(f"migration of vm {vm.name!r} refused before anything started: {exc}") \
            from exc
    mid = f"{vm.name}:{lease.source.name}->{dest.name}:{secrets.token_hex(2)}"
    try:
        comps = ComponentMigration(mid, lease, uld_mode, precopy_interval=uld_interval, stall_timeout=uld_stall,
                                   final_timeout=uld_final, hooks=hooks)
        comps_or_none = comps if comps.active else None
        transfer = factory(mid, TransferOptions(
            port=port, dest_extra_args=tuple(options.get("dest_extra_args") or ()),
            sample_dirty_rate=bool(options.get("sample_dirty_rate")),
            postcopy_preempt=bool(options.get("postcopy_preempt"))), uses_postcopy=pol.wants_postcopy(contract),
            components=comps_or_none)
        m = Migration(lease, pol, transfer, float(timeout), costs=costs_of(vm.env), poll_interval=poll,
                      heartbeat=hb, link_mbit=link_mbit, migration_id=mid, components=comps_or_none,
                      contract=contract, recover_within_s=recover_within, postcopy_stall_s=stall_s)
        m.begin()
    except BaseException:
        lease.abort("not-started")
        raise
    return m


def check_native_compatible(vm: VM, dest: Host) -> None:
    """MigrationRefusedError naming every difference if ``dest``'s hypervisor would start the
    destination QEMU with another machine than the source's (its profile: machine type, CPU model,
    disk bus, NIC model): QEMU's stream cannot cross that, so nothing is started."""
    profile = dest.spec.profile
    if profile is None:
        return
    blockers = native_migration_blockers(vm.spec, profile.apply(vm.spec))
    if blockers:
        raise IncompatibleMachinesError(
            f"native live migration of vm {vm.name!r} from host {vm.host.name!r} to host {dest.name!r} (profile "
            f"{profile.name}) refused before anything started: QEMU cannot migrate between these machines "
            f"({', '.join(blockers)}); use the agent-based cross-cloud migration (hvsim.crosscloud)", blockers)


def _dest_of(vm: VM, dest_host: Host | str) -> Host:
    if isinstance(dest_host, str):
        try:
            return vm.env.host(dest_host)
        except NotFoundError as exc:
            raise MigrationInputError(f"cannot plan a migration of vm {vm.name!r}: {exc}") from exc
    return dest_host


async def plan_migration(vm: VM, dest_host: Host | str, *, link_mbit: float | None = None,
                         **contract: Any) -> Plan:
    """Measure the guest and the link and predict the plan of migrating ``vm`` to ``dest_host``
    under the contract (its fields as keyword arguments); starts nothing, changes nothing."""
    unknown = sorted(set(contract) - set(_CONTRACT_KEYS) - {"contract"})
    if unknown:
        raise MigrationInputError(f"unknown plan option(s) {unknown}; known: {sorted(_CONTRACT_KEYS)}")
    c = contract_from(contract)
    dest = _dest_of(vm, dest_host)
    if dest is vm.host:
        raise MigrationInputError(f"cannot plan a migration of vm {vm.name!r} to its own host {dest.name!r}")
    if vm.state.value not in ("running", "paused"):
        raise MigrationStateError(f"cannot plan a migration of vm {vm.name!r}: it is {vm.state.value}")
    hint = _number("link_mbit", link_mbit, 0.001, 1e6) * 1e6 / 8 if link_mbit is not None else None
    m, _raw = await measure(vm.qmp, vm.pid, vm.spec.memory_mib * 2**20, src_host=vm.host.name, dst_host=dest.name,
                            src_netns=vm.host.netns, dst_netns=dest.netns, dst_address=dest.address,
                            costs=costs_of(vm.env), bandwidth_hint=hint, vm=vm.name)
    return make_plan(m, c)


async def migrate(vm: VM, dest_host: Host | str, policy: Any = "hvsim-predictive",
                  timeout: float = 300.0, **options: Any) -> Migration:
    """Live-migrate ``vm`` and wait; returns the finished Migration (``.result`` holds the
    measurements). Raises a MigrationError on failure, timeout or cancel (``exc.result`` too).
    Cancelling the awaiting task does not stop the migration: use ``Migration.cancel()``."""
    m = start_migration(vm, dest_host, policy=policy, timeout=timeout, **options)
    await m.wait()
    return m
