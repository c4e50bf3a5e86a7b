"""Entry points: ``start_migration`` (background, returns the Migration at once) and ``migrate``.

Everything that can be refused is refused here, synchronously, before any process starts:
unknown policy or policy parameter, bad timeout, unknown or same destination host, a VM that
is not running or paused, a VM already migrating, hosts not on the same kind of network, and a
destination without capacity (the reservation is taken here and released on failure).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..core.errors import CapacityError, IllegalTransitionError, NotFoundError
from ..guest.heartbeat import HeartbeatMonitor
from ..core.lifecycle import VMState, check_action
from .engine import Migration
from .errors import MigrationInputError, MigrationRefusedError, MigrationStateError
from .policies.base import make_policy

if TYPE_CHECKING:
    from ..core.host import Host
    from ..core.vm import VM

_OPTIONS = {"policy_params", "port", "poll_interval", "heartbeat", "dest_extra_args", "sample_dirty_rate",
            "link_mbit", "postcopy_preempt"}
_active: dict[int, Migration] = {}


def start_migration(vm: "VM", dest_host: "Host | str", policy: str = "hvsim-predictive",
                    timeout: float = 300.0, **options: Any) -> Migration:
    """Validate, reserve capacity on ``dest_host`` and start migrating ``vm`` in the background.

    Options: ``policy_params`` (dict for the policy), ``port`` (fixed listen port), ``poll_interval``
    (s, default 0.2), ``heartbeat`` (a HeartbeatMonitor already reading the source's heartbeat
    socket; it is attached to the destination too and left open), ``dest_extra_args`` (extra QEMU
    args for the destination, e.g. for fault injection), ``sample_dirty_rate`` (bool, default off:
    QMP calc-dirty-rate before the start), ``link_mbit`` (a bandwidth hint for the policy),
    ``postcopy_preempt`` (bool, default off). Both are off because with them destination guests of
    concurrent migrations logged kernel BUGs (memory corruption) here; see docs/migration.md.
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise MigrationInputError(f"unknown migration option(s) {unknown}; known: {sorted(_OPTIONS)}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise MigrationInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    poll = options.get("poll_interval", 0.2)
    if not isinstance(poll, (int, float)) or not 0.01 <= poll <= 5:
        raise MigrationInputError(f"poll_interval must be within 0.01..5 s, got {poll!r}")
    port = options.get("port")
    if port is not None and (not isinstance(port, int) or not 1024 <= port <= 65535):
        raise MigrationInputError(f"port must be an integer within 1024..65535, got {port!r}")
    hb = options.get("heartbeat")
    if hb is not None and not isinstance(hb, HeartbeatMonitor):
        raise MigrationInputError(f"heartbeat must be a HeartbeatMonitor, got {type(hb).__name__}")
    pol = make_policy(policy, **(options.get("policy_params") or {}))

    if isinstance(dest_host, str):
        try:
            dest = vm.cluster.host(dest_host)
        except NotFoundError as exc:
            raise MigrationInputError(f"cannot migrate vm {vm.name!r}: {exc}") from exc
    else:
        dest = dest_host
        if vm.cluster.hosts.get(dest.name) is not dest:
            raise MigrationInputError(f"host {dest.name!r} is not part of cluster {vm.cluster.name!r}")
    if dest is vm.host:
        raise MigrationInputError(f"cannot migrate vm {vm.name!r}: source and destination are the same "
                                  f"host {dest.name!r}")
    if (dest.netns is None) != (vm.host.netns is None):
        raise MigrationInputError(
            f"cannot migrate vm {vm.name!r}: hosts {vm.host.name!r} and {dest.name!r} are not on one network "
            "(put both in an Underlay: add_host(..., netns=underlay.host_ns(name)))")
    if id(vm) in _active:
        raise MigrationStateError(f"vm {vm.name!r} is already migrating ({_active[id(vm)]})")
    try:
        check_action(vm.name, vm.state, "migrate")
    except IllegalTransitionError as exc:
        raise MigrationStateError(str(exc)) from exc
    try:
        dest.reserve(vm.spec)
    except CapacityError as exc:
        raise MigrationRefusedError(f"migration of vm {vm.name!r} refused before anything started: {exc}") \
            from exc
    prior = vm.state
    try:
        m = Migration(vm, dest, pol, float(timeout), port=port, poll_interval=float(poll), heartbeat=hb,
                      dest_extra_args=tuple(options.get("dest_extra_args") or ()),
                      sample_dirty_rate=options.get("sample_dirty_rate"), link_mbit=options.get("link_mbit"),
                      postcopy_preempt=options.get("postcopy_preempt"), prior_state=prior)
        vm._set_state(VMState.MIGRATING, f"migrating to {dest.name}")
        m.begin()
    except BaseException:
        dest.release(vm.name)
        if vm.state is VMState.MIGRATING:
            vm._set_state(prior, "migration-failed")
        raise
    _active[id(vm)] = m
    vm.cluster.on_close(m.aclose)   # a migration still running at teardown is rolled back first
    assert m._task is not None
    m._task.add_done_callback(lambda _t: _active.pop(id(vm), None))
    return m


async def migrate(vm: "VM", dest_host: "Host | str", policy: str = "hvsim-predictive",
                  timeout: float = 300.0, **options: Any) -> Migration:
    """Live-migrate ``vm`` and wait; returns the finished Migration (``.result`` holds the
    measurements). Raises a MigrationError on failure, timeout or cancel (``exc.result`` too).
    Cancelling the awaiting task does not stop the migration: use ``Migration.cancel()``."""
    m = start_migration(vm, dest_host, policy=policy, timeout=timeout, **options)
    await m.wait()
    return m
