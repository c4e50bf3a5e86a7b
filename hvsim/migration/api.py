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
from ..core.vm import VM
from ..guest.heartbeat import HeartbeatMonitor
from .costs import costs_of
from .errors import MigrationInputError, MigrationRefusedError, MigrationStateError
from .orchestrator import Migration
from .policies import make_policy
from .transfer import QemuLiveTransfer, TransferOptions

_OPTIONS = {"policy_params", "port", "poll_interval", "heartbeat", "dest_extra_args", "sample_dirty_rate",
            "link_mbit", "postcopy_preempt", "transfer_factory"}


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
    uses_postcopy) -> QemuLiveTransfer``: another way to reach the destination, e.g. a destination
    run by another host agent). Both dirty-rate sampling and preemption are off because with them destination guests of
    concurrent migrations logged kernel BUGs (memory corruption) here; see docs/migration.md.
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

    if isinstance(dest_host, str):
        try:
            dest = vm.env.host(dest_host)
        except NotFoundError as exc:
            raise MigrationInputError(f"cannot migrate vm {vm.name!r}: {exc}") from exc
    else:
        dest = dest_host
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
        transfer = factory(mid, TransferOptions(
            port=port, dest_extra_args=tuple(options.get("dest_extra_args") or ()),
            sample_dirty_rate=bool(options.get("sample_dirty_rate")),
            postcopy_preempt=bool(options.get("postcopy_preempt"))), uses_postcopy=pol.uses_postcopy)
        m = Migration(lease, pol, transfer, float(timeout), costs=costs_of(vm.env), poll_interval=poll,
                      heartbeat=hb, link_mbit=link_mbit, migration_id=mid)
        m.begin()
    except BaseException:
        lease.abort("not-started")
        raise
    return m


async def migrate(vm: VM, dest_host: Host | str, policy: Any = "hvsim-predictive",
                  timeout: float = 300.0, **options: Any) -> Migration:
    """Live-migrate ``vm`` and wait; returns the finished Migration (``.result`` holds the
    measurements). Raises a MigrationError on failure, timeout or cancel (``exc.result`` too).
    Cancelling the awaiting task does not stop the migration: use ``Migration.cancel()``."""
    m = start_migration(vm, dest_host, policy=policy, timeout=timeout, **options)
    await m.wait()
    return m
