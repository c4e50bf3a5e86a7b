"""The orchestration of one migration: phases and state, the policy loop, timeout and cancel, the
rollback, events. How the bytes move is the transfer strategy's (:mod:`.transfer`); what is measured
is :mod:`.measure`'s; when to switch over is the policy's.

Flow (every path cleaned up)::

    NEW -> PREPARING   the VM is lent to us (MigrationLease: MIGRATING, its lock held, destination
                       capacity reserved); the strategy prepares the destination (its own user-level
                       drivers first, :mod:`.components`); the policy's setup is applied; heartbeat
                       monitor attached to both sides; ULD pre-copy moves the drivers' full state
        -> ACTIVE      the transfer starts; every ``poll_interval`` a sample goes to the policy and
                       its actions to the strategy; progress is published on the cluster bus
        -> SWITCHING_OVER / POSTCOPY   as the policy decides
        -> COMPLETED   destination running; the lease commits (the VM adopts the destination QEMU,
                       the source is stopped, VMMoved is published)
    any -> FAILED / CANCELLED / TIMED_OUT   the strategy cancels and settles (source running as it
                       was), discards the destination; the lease aborts
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Generator
from typing import Any

from qmp_bridge import QEMUBridgeError, QEMUExitedError

from hvbase.aio import run_to_completion as _complete
from ..core.events import ClusterEvent
from ..core.vm import MigrationLease
from ..guest.heartbeat import HeartbeatMonitor
from .costs import MigrationCosts
from .errors import (MigrationAbortedError, MigrationCancelledError, MigrationError, MigrationFailedError,
                     MigrationPlanError, MigrationStateError, MigrationTimeoutError, PostcopyPausedError)
from .events import MigrationEnded, MigrationProgress
from .components import ComponentMigration
from .gap import EventRecorder, explain_gap
from .measure import MigrationResult, guest_downtime_ms, learn_costs, working_set_seen
from .planner import Contract, Plan, plan_error
from .planning import make_plan, measure
from .policies.base import Action, ActionKind, Decision, MigrationContext, Policy
from .progress import Observation, ProgressSnapshot
from .recovery import PostcopyRecovery
from .state import MigrationState, machine
from .transfer import QemuLiveTransfer, touched_bytes

log = logging.getLogger("hvsim.migration")

DEVICE_STATE_BYTES = 256 * 1024     # what a prediction without a policy's own assumes for device state


class _Stop(Exception):
    """Internal: why the drive loop asked the transfer to cancel."""

    def __init__(self, outcome: MigrationState, error: MigrationError) -> None:
        self.outcome = outcome
        self.error = error


class _Paused(Exception):
    """Internal: postcopy could not be recovered within the bound; both QEMUs are kept."""

    def __init__(self, error: PostcopyPausedError) -> None:
        self.error = error


class Migration:
    """One live migration. Created by :func:`hvsim.migration.api.start_migration` with the VM's lease;
    runs in a background task; ``await m`` or ``await m.wait()`` gives the MigrationResult (or raises
    the MigrationError; the result is then ``m.result``). ``async for snapshot in m`` follows it."""

    def __init__(self, lease: MigrationLease, policy: Policy, transfer: QemuLiveTransfer, timeout: float, *,
                 costs: MigrationCosts, poll_interval: float = 0.2, heartbeat: HeartbeatMonitor | None = None,
                 link_mbit: float | None = None, migration_id: str,
                 components: ComponentMigration | None = None, contract: Contract | None = None,
                 recover_within_s: float = 60.0, postcopy_stall_s: float = 2.0) -> None:
        self.lease = lease
        self.components = components
        self.vm_name = lease.vm_name
        self.source = lease.source
        self.dest = lease.destination
        self.policy = policy
        self.transfer = transfer
        self.timeout = timeout
        self.costs = costs
        self.id = migration_id
        self.poll_interval = poll_interval
        self.link_bandwidth_hint = link_mbit * 1e6 / 8 if link_mbit else None
        self.prior_state = lease.prior_state
        self.fsm = machine(self.id)
        self.history: list[tuple[float, MigrationState, str]] = []
        self.decisions: list[Decision] = []
        self.samples: list[Observation] = []
        self.last: ProgressSnapshot | None = None
        self.result: MigrationResult | None = None
        self.error: BaseException | None = None
        self.capabilities: list[str] = []
        self.log = log.getChild(lease.vm_name)
        self._own_heartbeat = heartbeat is None
        self.heartbeat = heartbeat if heartbeat is not None else HeartbeatMonitor()
        self._cancel = asyncio.Event()
        self._cancel_reason = ""
        self._task: asyncio.Task[MigrationResult] | None = None
        self._t0 = time.monotonic()
        self._t_switch: float | None = None
        self._predicted_at_switch: float | None = None
        self._setup_s: float | None = None
        self._ctx: MigrationContext | None = None
        self.contract = (contract or Contract()).with_time_budget(timeout)
        self.plan: Plan | None = None
        self.survey: dict[str, Any] | None = None
        self.recover_within_s = recover_within_s
        self.postcopy_stall_s = postcopy_stall_s
        self.recovery: PostcopyRecovery | None = None
        self._src_events = EventRecorder("source")
        self._dst_events = EventRecorder("destination")
        self._pc_progress: tuple[float, int] = (0.0, -1)
        lease.on_preempt = self._preempted

    # -- public API --------------------------------------------------------------------------------
    @property
    def state(self) -> MigrationState:
        return self.fsm.state

    def begin(self) -> Migration:
        if self._task is not None:
            raise MigrationStateError(f"migration {self.id} already started")
        self._task = asyncio.create_task(self._run(), name=f"migration-{self.vm_name}")
        # the outcome lives in .state/.result/.error; nobody is obliged to await a background migration
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self

    async def wait(self) -> MigrationResult:
        if self._task is None:
            raise MigrationStateError(f"migration {self.id} was never started")
        return await asyncio.shield(self._task)

    def __await__(self) -> Generator[Any, None, MigrationResult]:
        return self.wait().__await__()

    async def aclose(self) -> None:
        """Stop the background task if it still runs (cluster teardown): the rollback runs and the
        destination QEMU and its files are removed. Never raises."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def done(self) -> bool:
        return self.state.terminal

    def cancel(self, reason: str = "") -> None:
        """Ask for the migration to stop; the source keeps running. Refused in postcopy (the guest
        already runs on the destination) and once finished."""
        if self.state.terminal:
            raise MigrationStateError(f"migration {self.id} already ended ({self.state.value})")
        if self.state in (MigrationState.POSTCOPY, MigrationState.POSTCOPY_PAUSED):
            raise MigrationStateError(f"migration {self.id} is in {self.state.value}: the guest already runs on "
                                      f"{self.dest.name}, it cannot be cancelled")
        self.log.info("cancel requested%s", f": {reason}" if reason else "")
        self._cancel_reason = reason
        self._cancel.set()

    def _preempted(self, reason: str) -> None:
        """The VM's owner wants it back (destroy, teardown): cancel unless postcopy forbids it. A
        postcopy paused past its bound is abandoned: the owner destroys the VM explicitly."""
        if self.state is MigrationState.POSTCOPY_PAUSED:
            if self._task is not None and not self._task.done():
                self._task.cancel()
            else:
                self._task = asyncio.create_task(self._abandon(reason), name=f"migration-{self.vm_name}-abandon")
            return
        if not self.state.terminal and self.state is not MigrationState.POSTCOPY:
            self.cancel(reason)

    async def _abandon(self, reason: str) -> MigrationResult:
        await _complete(self._rollback(MigrationState.FAILED, MigrationFailedError(
            f"migration {self.id}: postcopy paused and abandoned ({reason}); both QEMUs stopped")))
        assert self.result is not None
        return self.result

    async def recover(self, within_s: float | None = None) -> MigrationResult:
        """Resume a postcopy migration that stayed paused past its bound (PostcopyPausedError), once
        the link is back: the destination still listens, the source still has the pages. Returns the
        result when it completes; raises PostcopyPausedError again if it cannot resume within
        ``within_s`` (default: the migration's bound)."""
        if self.state is not MigrationState.POSTCOPY_PAUSED or (self._task is not None and not self._task.done()):
            raise MigrationStateError(f"migration {self.id} is {self.state.value}: only a migration paused in "
                                      "postcopy (PostcopyPausedError) can be recovered")
        self._task = asyncio.create_task(self._run_recovered(within_s or self.recover_within_s),
                                         name=f"migration-{self.vm_name}-recover")
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await self.wait()

    def __aiter__(self) -> AsyncIterator[ProgressSnapshot]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[ProgressSnapshot]:
        if self.state.terminal:
            if self.last is not None:
                yield self.last
            return
        mine = self.id

        def about_me(e: ClusterEvent) -> bool:
            return getattr(e, "migration", None) == mine
        with self.lease.subscribe(f"migration {mine} progress", (MigrationProgress, MigrationEnded), about_me) as sub:
            if self.last is not None:
                yield self.last
            async for ev in sub:
                if isinstance(ev, MigrationEnded):
                    return
                assert isinstance(ev, MigrationProgress)
                yield ev.snapshot

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    # -- state -------------------------------------------------------------------------------------
    def _transition(self, new: MigrationState, why: str = "") -> None:
        self.fsm.set(new, why)
        self.history.append((self.elapsed_s, new, why))

    def _publish(self, obs: Observation, pred: float | None) -> None:
        snap = ProgressSnapshot(state=self.state, elapsed_s=self.elapsed_s, passes=obs.passes,
                                transferred=obs.transferred, remaining=obs.remaining, total=obs.total,
                                dirty_rate=obs.dirty_rate, bandwidth=obs.bandwidth, mbps=obs.mbps,
                                expected_downtime_ms=obs.expected_downtime_ms, predicted_downtime_ms=pred,
                                status=obs.status)
        self.last = snap
        self.lease.publish(MigrationProgress(migration=self.id, vm=self.vm_name, snapshot=snap))

    # -- the run -----------------------------------------------------------------------------------
    async def _run(self) -> MigrationResult:
        try:
            self._transition(MigrationState.PREPARING, "starting the destination")
            await self._prepare()
            await self._start()
            await self._drive()
        except asyncio.CancelledError:
            await _complete(self._rollback(MigrationState.CANCELLED,
                                           MigrationCancelledError(f"migration {self.id}: task cancelled")))
            raise
        except _Stop as stop:
            await _complete(self._rollback(stop.outcome, stop.error))
            raise stop.error from None
        except _Paused as paused:
            self._paused(paused.error)
            raise paused.error from None
        except MigrationError as exc:
            await _complete(self._rollback(MigrationState.FAILED, exc))
            raise
        except Exception as exc:  # QMP errors and the like: keep the cause, always clean up
            err = MigrationFailedError(f"migration {self.id} failed: {exc}")
            err.__cause__ = exc
            await _complete(self._rollback(MigrationState.FAILED, err))
            raise err from exc
        try:
            return await _complete(self._finish())
        except Exception as exc:
            self.error = exc
            raise

    async def _run_recovered(self, within_s: float) -> MigrationResult:
        try:
            await self._resume_postcopy(time.monotonic() + within_s)
            await self._drive()
        except asyncio.CancelledError:
            await _complete(self._rollback(MigrationState.FAILED, MigrationFailedError(
                f"migration {self.id}: recovery cancelled; postcopy abandoned")))
            raise
        except _Paused as paused:
            self._paused(paused.error)
            raise paused.error from None
        try:
            return await _complete(self._finish())
        except Exception as exc:
            self.error = exc
            raise

    def _paused(self, error: PostcopyPausedError) -> None:
        """Postcopy could not resume within the bound: nothing is stopped or removed; the result says so."""
        self.error = error
        error.migration = self
        self.result = self._result("postcopy-paused", str(error), time.monotonic())
        error.result = self.result
        self.log.error("%s", error)

    async def _plan(self) -> None:
        lease = self.lease
        m, raw = await measure(
            lease.source_qmp, lease.source_pid, lease.spec.memory_mib * 2**20, src_host=self.source.name,
            dst_host=self.dest.name, src_netns=self.source.netns, dst_netns=self.dest.netns,
            dst_address=self.dest.address, costs=self.costs, bandwidth_hint=self.link_bandwidth_hint, vm=self.vm_name,
            margin=float(getattr(self.policy, "margin_factor", 1.2)))
        self.survey = raw
        self.plan = make_plan(m, self.contract)
        self.log.info("plan: %s", self.plan.reason)

    async def _prepare(self) -> None:
        if self.policy.wants_plan:
            await asyncio.gather(self.transfer.prepare(self.lease), self._plan())
        else:
            await self.transfer.prepare(self.lease)
        if self.plan is not None and not self.plan.feasible and self.contract.if_infeasible == "refuse":
            err = MigrationPlanError(f"migration {self.id} refused by its plan: {self.plan.reason}; "
                                     "nothing was migrated")
            err.plan = self.plan
            raise err
        ctx = self.transfer.context(self.policy, self.link_bandwidth_hint, self.costs)
        ctx = dataclasses.replace(ctx, contract=self.contract, plan=self.plan)
        if self.plan is not None and ctx.dirty_rate_estimate is None and self.plan.measurement.dirty_rate:
            ctx = dataclasses.replace(ctx, dirty_rate_estimate=self.plan.measurement.dirty_rate)
        self._ctx = ctx
        self._src_events.start(self.lease.source_qmp)
        dq = self.transfer.dest_qmp
        if dq is not None:
            self._dst_events.start(dq)
        self.capabilities = await self.transfer.configure(self.policy.setup(ctx), self.policy.initial_downtime_limit_ms)
        # beats must be read on both sides: a virtio-serial chardev with no client drops them
        if self._own_heartbeat:
            await self.heartbeat.attach(self.lease.source_heartbeat_socket, timeout=5)
        dest_hb = self.transfer.destination_heartbeat_socket
        if dest_hb is not None:
            await self.heartbeat.attach(dest_hb, timeout=5)
        self._setup_s = self.elapsed_s

    async def _start(self) -> None:
        assert self._ctx is not None
        start_actions = self.policy.start(self._ctx)
        if self.components is not None:
            await self.components.head_start()
        if self._cancel.is_set():
            raise _Stop(MigrationState.CANCELLED, MigrationCancelledError(
                f"migration {self.id} cancelled before it started; the source is untouched"))
        await self.transfer.start()
        if self.components is not None:
            self.components.start()
        self._transition(MigrationState.ACTIVE, f"migrate {self.transfer.uri}")
        for act in start_actions:
            await self._execute(act, None)

    async def _drive(self) -> None:
        deadline = self._t0 + self.timeout
        stop: _Stop | None = None
        while True:
            obs, info = await self.transfer.poll(self.poll_interval)
            status = obs.status
            if status == "completed":
                self.samples.append(obs)
                if stop is not None and stop.outcome is not MigrationState.COMPLETED:
                    self.log.warning("migration completed before the cancel took effect")
                return
            if status in ("failed", "cancelled"):
                if stop is not None:
                    raise stop
                desc = info.get("error-desc", "no error description")
                raise MigrationFailedError(f"migration {self.id}: QEMU reports {status}: {desc}")
            if status.startswith("postcopy") and self.state not in (MigrationState.POSTCOPY,
                                                                    MigrationState.POSTCOPY_PAUSED):
                self._transition(MigrationState.POSTCOPY, status)
            if self.components is not None:
                pend, fixed = self.components.pending()
                obs = dataclasses.replace(obs, uld_pending_bytes=pend, uld_fixed_ms=fixed)
                if self.components.error is not None and stop is None and self.state not in (
                        MigrationState.POSTCOPY, MigrationState.POSTCOPY_PAUSED):
                    err = self.components.error
                    stop = _Stop(MigrationState.FAILED, MigrationFailedError(
                        f"migration {self.id} failed: {err}; the source keeps running on {self.source.name}"))
                    stop.error.__cause__ = err
                    await self.transfer.cancel()
            if self.state is MigrationState.POSTCOPY and stop is None and self._postcopy_broken(obs):
                await self._recover_postcopy(obs)
                continue
            pred = self._predict(obs)
            obs = dataclasses.replace(obs, predicted_downtime_ms=pred)
            self.samples.append(obs)
            self._publish(obs, pred)
            if stop is not None:
                continue   # waiting for the transfer to finish cancelling
            if self._cancel.is_set():
                why = f" ({self._cancel_reason})" if self._cancel_reason else ""
                stop = _Stop(MigrationState.CANCELLED, MigrationCancelledError(
                    f"migration {self.id} cancelled{why}; the source keeps running on {self.source.name}"))
            elif time.monotonic() > deadline and self.state is not MigrationState.POSTCOPY:
                stop = _Stop(MigrationState.TIMED_OUT, MigrationTimeoutError(
                    f"migration {self.id} did not finish within {self.timeout:g} s (pass {obs.passes}, "
                    f"{obs.transferred / 2**20:.0f} MiB sent); cancelled, the source keeps running"))
            elif self.state in (MigrationState.ACTIVE, MigrationState.SWITCHING_OVER):
                for act in self.policy.observe(obs):
                    try:
                        await self._execute(act, obs)
                    except _Stop as s:
                        stop = s
                        break
            if stop is not None:
                await self.transfer.cancel()

    # -- postcopy recovery --------------------------------------------------------------------------
    def _postcopy_broken(self, obs: Observation) -> bool:
        """The stream broke (QEMU paused it) or carried nothing for ``postcopy_stall_s``."""
        now = time.monotonic()
        t, sent = self._pc_progress
        if obs.transferred != sent:
            self._pc_progress = (now, obs.transferred)
            return obs.status == "postcopy-paused"
        return obs.status == "postcopy-paused" or now - t > self.postcopy_stall_s

    async def _recover_postcopy(self, obs: Observation) -> None:
        why = "QEMU paused postcopy" if obs.status == "postcopy-paused" else \
            f"no byte sent for {self.postcopy_stall_s:g} s in postcopy"
        self._transition(MigrationState.POSTCOPY_PAUSED, why)
        dq = self.transfer.dest_qmp
        assert dq is not None
        if self.recovery is None:
            self.recovery = PostcopyRecovery(self.lease.source_qmp, dq, self.dest.address)
        try:
            await self.recovery.pause()
        except QEMUExitedError as exc:
            raise _Paused(PostcopyPausedError(
                f"migration {self.id}: the migration stream broke during postcopy and a QEMU exited ({exc}). "
                f"The source keeps the guest's pages (QEMU postcopy-paused on {self.source.name}); QEMU 7.2 "
                "cannot resume it into a new destination: see docs/migration.md, postcopy recovery")) from exc
        except (TimeoutError, QEMUBridgeError) as exc:
            raise _Paused(PostcopyPausedError(
                f"migration {self.id}: the migration stream broke during postcopy and could not be paused "
                f"cleanly ({exc}); both QEMUs are kept as they are (guest on {self.dest.name}, its remaining "
                f"pages on {self.source.name})")) from exc
        await self._resume_postcopy(time.monotonic() + self.recover_within_s)

    async def _resume_postcopy(self, deadline: float) -> None:
        assert self.recovery is not None
        try:
            ok = await self.recovery.resume(deadline)
        except QEMUBridgeError as exc:
            self.log.warning("postcopy resume failed: %s", exc)
            ok = False
        if ok:
            self._pc_progress = (time.monotonic(), -1)
            self._transition(MigrationState.POSTCOPY, "postcopy resumed")
            return
        raise _Paused(PostcopyPausedError(
            f"migration {self.id}: the migration stream broke during postcopy and could not be resumed "
            f"within {self.recover_within_s:g} s. The guest waits on {self.dest.name} (QEMU postcopy-paused) "
            f"and its remaining pages are kept on {self.source.name}; nothing was stopped or removed. "
            "Restore the link, then `await migration.recover()` (the destination still listens on "
            f"{self.recovery.uri})"))

    def _predict(self, obs: Observation) -> float | None:
        p = self.policy.predicted_downtime_ms(obs)
        if p is not None:
            return p
        bw = obs.bandwidth or (obs.mbps * 1e6 / 8 if obs.mbps else None)
        if not bw or obs.passes < 2:
            return None
        return ((obs.remaining + DEVICE_STATE_BYTES + obs.uld_pending_bytes) / bw * 1000 + obs.uld_fixed_ms
                + self.costs.fixed.get())

    async def _execute(self, act: Action, obs: Observation | None) -> None:
        t = obs.t if obs else 0.0
        passes = obs.passes if obs else 0
        err: str | None = None
        self.log.info("policy %s @%.2fs pass %d: %s | inputs %s", self.policy.name, t, passes,
                      act.describe(), act.inputs)
        try:
            if act.kind is ActionKind.ABORT:
                raise _Stop(MigrationState.FAILED, MigrationAbortedError(
                    f"migration {self.id} aborted by policy {self.policy.name}: {act.reason}; "
                    "the source keeps running"))
            if act.kind is ActionKind.SWITCHOVER:
                self._predicted_at_switch = act.inputs.get("predicted_ms")
                self._t_switch = time.monotonic()
            elif act.kind is ActionKind.START_POSTCOPY or (
                    act.kind is ActionKind.FORCE_COMPLETE and self.policy.uses_postcopy):
                self._predicted_at_switch = act.inputs.get("predicted_postcopy_ms", self.costs.postcopy_stall.get())
                self._t_switch = time.monotonic()
            await self.transfer.apply(act)
            if act.kind is ActionKind.SWITCHOVER and self.state is MigrationState.ACTIVE:
                self._transition(MigrationState.SWITCHING_OVER, act.reason)
        except QEMUBridgeError as exc:
            err = str(exc)
            self.log.warning("policy action %s failed: %s", act.kind.value, exc)
        finally:
            inputs = dict(act.inputs)
            applied = getattr(self.transfer, "limit_ms", None)
            if (act.kind in (ActionKind.SET_DOWNTIME_LIMIT, ActionKind.SWITCHOVER) and err is None
                    and applied is not None and act.value is not None and applied != round(act.value)):
                inputs["applied_limit_ms"] = applied      # raised to the TCG floor by the transfer
            self.decisions.append(Decision(t=round(t, 3), passes=passes, policy=self.policy.name,
                                           action=act.kind.value, value=act.value, reason=act.reason,
                                           inputs=inputs, error=err))

    # -- endings -----------------------------------------------------------------------------------
    async def _finish(self) -> MigrationResult:
        proc = await self.transfer.finish()
        t_running = time.monotonic()
        if any(n.network != "default" for n in self.lease.spec.nics):
            await self.transfer.announce()     # a NIC on a tenant network: tell the network where it is
        # let a few beats arrive from the destination so the last gap is closed
        if self.transfer.destination_heartbeat_socket is not None:
            try:
                await self.heartbeat.wait_beats(5, timeout=1.5)
            except TimeoutError:
                self.log.info("fewer than 5 heartbeats from the destination within 1.5 s (no heartbeat writer?)")
        if proc is None:
            await self.lease.hand_off()       # the destination's own process adopted it
        else:
            await self.lease.commit(proc, components=self.components.peers() if self.components else None)
        if self.components is not None:
            await self.components.committed()
        self._transition(MigrationState.COMPLETED, f"running on {self.dest.name}")
        ram = self.transfer.final_ram()
        res = self._result("completed", None, t_running)
        res.downtime_ms_qemu = self.transfer.downtime_qemu_ms()
        res.bytes = int(ram.get("transferred", 0) or 0)
        res.touched_bytes = touched_bytes(ram)
        res.passes = int(ram.get("dirty-sync-count", 0) or 0)
        if res.predicted_downtime_ms is None:   # QEMU decided: its (or our) last prediction before the stop
            preds = [o.predicted_downtime_ms for o in self.samples if o.predicted_downtime_ms is not None]
            res.predicted_downtime_ms = round(preds[-1], 1) if preds else None
        if res.postcopy and res.predicted_downtime_ms is None and self.plan is not None:
            res.predicted_downtime_ms = round(self.plan.chosen.downtime_ms, 1)
        gap = explain_gap(self.heartbeat.beats, self._src_events, self._dst_events,
                          since=(self.transfer.started_at or self._t0) - 0.5, postcopy=res.postcopy)
        res.gap = gap.to_dict() if gap is not None else None
        self._src_events.close()
        self._dst_events.close()
        if self.plan is not None:
            res.plan_error = plan_error(self.plan, res.total_s, res.downtime_ms_guest)
        c = self.contract
        res.contract_met = (res.downtime_ms_guest is None or res.downtime_ms_guest <= c.downtime_budget_ms) \
            and (c.time_budget_s is None or (res.total_s or 0) <= c.time_budget_s)
        learn_costs(self.costs, res, ram, self.transfer.bandwidth, self.lease.spec.memory_mib)
        self._learn_working_set()
        ch = self.plan.chosen if self.plan is not None else None
        if ch is not None and not res.postcopy and ch.converges and ch.stop_pending_bytes > 0 \
                and ram.get("downtime-bytes") is not None:
            self.costs.switch_fill.learn(int(ram["downtime-bytes"]) / ch.stop_pending_bytes)
        if self._own_heartbeat:
            await self.heartbeat.close()
        self.result = res
        self.log.info("%s", res.summary())
        self.lease.publish(MigrationEnded(migration=self.id, vm=self.vm_name, outcome="completed", result=res))
        return res

    def _learn_working_set(self) -> None:
        wss = working_set_seen(self.samples)
        if wss:
            self.costs.working_set[self.vm_name] = int(wss)

    def _result(self, outcome: str, error: str | None, t_end: float) -> MigrationResult:
        t0 = self.transfer.started_at or self._t0
        gap, beats, lost = guest_downtime_ms(self.heartbeat, since=t0 - 0.5)
        last = self.samples[-1] if self.samples else None
        return MigrationResult(
            touched_bytes=touched_bytes(self.transfer.last_info.get("ram") or {}),
            vm=self.vm_name, policy=self.policy.name, source=self.source.name, destination=self.dest.name,
            outcome=outcome, error=error, total_s=round(t_end - t0, 3), setup_s=self._setup_s,
            downtime_ms_guest=gap, bytes=last.transferred if last else 0,
            passes=last.passes if last else 0, predicted_downtime_ms=self._predicted_at_switch,
            postcopy=self.transfer.postcopy_started, heartbeat_beats=beats, heartbeat_lost=lost,
            policy_params=self.policy.params(), decisions=list(self.decisions), contract=self.contract.to_dict(),
            plan=self.plan.to_dict() if self.plan is not None else None, survey=self.survey,
            recovery=[st.to_dict() for st in self.recovery.steps] if self.recovery is not None else [],
            uld=self.components.result() if self.components is not None else {})

    async def _rollback(self, outcome: MigrationState, error: BaseException) -> None:
        """Failure, timeout or cancel: source keeps running untouched, destination gone."""
        self.error = error
        self.log.warning("migration %s ends %s: %s", self.id, outcome.value, str(error).splitlines()[0])
        self._src_events.close()
        self._dst_events.close()
        await self.transfer.settle()
        if self.components is not None:
            try:
                await self.components.rollback()     # source ULDs serve again, peers retired
            except Exception as exc:                  # never keeps the lease from being given back
                self.log.error("ULD rollback failed: %s", exc)
        await self.transfer.discard()
        if self._own_heartbeat:
            await self.heartbeat.close()
        self.lease.abort(outcome.value)
        if self.state in (MigrationState.POSTCOPY, MigrationState.POSTCOPY_PAUSED):
            outcome = MigrationState.FAILED     # the guest ran on the destination: the migration failed
        self._transition(outcome, str(error).splitlines()[0])
        out = {MigrationState.TIMED_OUT: "timeout", MigrationState.CANCELLED: "cancelled"}.get(outcome, "failed")
        self._learn_working_set()
        self.result = self._result(out, str(error), time.monotonic())
        if isinstance(error, MigrationError):
            error.migration = self
            error.result = self.result
        self.lease.publish(MigrationEnded(migration=self.id, vm=self.vm_name, outcome=out, result=self.result))

    def __repr__(self) -> str:
        return f"<Migration {self.id} {self.state.value} policy={self.policy.name}>"

