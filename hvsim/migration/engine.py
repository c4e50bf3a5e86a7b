"""The migration engine: one live migration of a VM to another host, driven over QMP.

Flow (every step raced against QEMU's death, every path cleaned up)::

    NEW -> PREPARING   destination capacity already reserved (api.start_migration);
                       destination QEMU started in its namespace with ``-incoming defer``;
                       capabilities on both sides; ``migrate-incoming tcp:<dest ip>:<port>``;
                       heartbeat monitor attached to both heartbeat sockets
        -> ACTIVE      ``migrate`` on the source; MIGRATION / MIGRATION_PASS events and
                       ``query-migrate`` every ``poll_interval``; the policy sees each sample
        -> SWITCHING_OVER / POSTCOPY   as the policy decides
        -> COMPLETED   destination running; the VM adopts it; the source QEMU is stopped
    any -> FAILED / CANCELLED / TIMED_OUT   ``migrate_cancel``; the source is checked running
                       (resumed if needed); the destination QEMU and its files are removed
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmp_bridge import LaunchError, QEMUBridgeError, QemuProcess, QMPSession, QMPTimeoutError

from ..core.aio import run_to_completion as _complete
from ..guest.heartbeat import HeartbeatMonitor
from ..core.lifecycle import VMState
from .errors import (DestinationStartError, MigrationAbortedError, MigrationCancelledError, MigrationError,
                     MigrationFailedError, MigrationStateError, MigrationTimeoutError)
from .measure import MigrationResult
from .policies.base import Action, ActionKind, Decision, MigrationContext, Policy
from .policies.predictive import FIXED_COST, POSTCOPY_STALL
from .progress import BandwidthMeter, Observation, observation_from_qmp
from .state import TERMINAL, MigrationState, check_transition

if TYPE_CHECKING:
    from ..core.host import Host
    from ..core.vm import VM

log = logging.getLogger("hvsim.migration")

MAX_BANDWIDTH = 1 << 40          # bytes/s: effectively unlimited, so only the link limits the stream
DEFAULT_PORT_RANGE = (20000, 60000)
MANAGED_CAPS = ["events", "postcopy-ram", "postcopy-preempt", "auto-converge", "xbzrle"]


@dataclass(frozen=True)
class ProgressSnapshot:
    """One live progress sample of a migration (what the async iterator yields)."""
    state: MigrationState
    elapsed_s: float
    passes: int
    transferred: int
    remaining: int
    total: int
    dirty_rate: float            # bytes/s
    bandwidth: float | None      # bytes/s measured over the link
    mbps: float                  # QEMU's own estimate
    expected_downtime_ms: float | None   # QEMU's
    predicted_downtime_ms: float | None  # the policy's (or ours for policies without one)
    status: str


class _Stop(Exception):
    """Internal: why the drive loop asked QEMU to cancel."""

    def __init__(self, outcome: MigrationState, error: MigrationError) -> None:
        self.outcome = outcome
        self.error = error


def netns_ipv4(netns: str) -> str:
    """The first global IPv4 address inside ``netns`` (the host's underlay address)."""
    out = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise DestinationStartError(f"cannot read the addresses of namespace {netns!r}: {out.stderr.strip()}")
    for line in out.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    raise DestinationStartError(f"namespace {netns!r} has no global IPv4 address to listen on")


class Migration:
    """One live migration. Created by ``hvsim.migration.api.start_migration`` (capacity already
    reserved on the destination); runs in a background task; ``await m`` or ``await m.wait()``
    gives the MigrationResult (or raises the MigrationError, the result is then ``m.result``)."""

    def __init__(self, vm: "VM", dest: "Host", policy: Policy, timeout: float, *,
                 port: int | None = None, poll_interval: float = 0.2,
                 heartbeat: HeartbeatMonitor | None = None, dest_extra_args: tuple[str, ...] = (),
                 sample_dirty_rate: bool | None = None, link_mbit: float | None = None,
                 postcopy_preempt: bool | None = None, prior_state: VMState = VMState.RUNNING) -> None:
        self.vm = vm
        self.source = vm.host
        self.dest = dest
        self.policy = policy
        self.timeout = timeout
        self.id = f"{vm.name}:{self.source.name}->{dest.name}:{secrets.token_hex(2)}"
        self.port = port
        self.poll_interval = poll_interval
        self.dest_extra_args = tuple(dest_extra_args)
        # off by default: with calc-dirty-rate before the start, 3 of 8 destination guests of
        # concurrent migrations here logged kernel BUGs (memory corruption); 0 of 8 without it
        self.sample_dirty_rate = bool(sample_dirty_rate)
        self.link_bandwidth_hint = link_mbit * 1e6 / 8 if link_mbit else None
        # off by default: QEMU 7.2's postcopy-preempt also corrupted a destination guest here (1 of 8)
        self.postcopy_preempt = bool(postcopy_preempt)
        self.prior_state = prior_state
        self.state = MigrationState.NEW
        self.history: list[tuple[float, MigrationState, str]] = []
        self.decisions: list[Decision] = []
        self.samples: list[Observation] = []
        self.last: ProgressSnapshot | None = None
        self.result: MigrationResult | None = None
        self.error: BaseException | None = None
        self.log = log.getChild(vm.name)
        self._own_heartbeat = heartbeat is None
        self.heartbeat = heartbeat if heartbeat is not None else HeartbeatMonitor()
        self._queues: list[asyncio.Queue[ProgressSnapshot | None]] = []
        self._cancel = asyncio.Event()
        self._task: asyncio.Task[MigrationResult] | None = None
        self._dest_proc: QemuProcess | None = None
        self._dest_dir: Path | None = None
        self._uri = ""
        self._t0 = time.monotonic()
        self._t_migrate: float | None = None
        self._t_switch: float | None = None
        self._bw = BandwidthMeter()
        self._limit_ms: float | None = None
        self._predicted_at_switch: float | None = None
        self._postcopy = False
        self._source_paused_by_us = False
        self._migrate_issued = False
        self._setup_s: float | None = None
        self._dirty_rate_sampled: float | None = None
        self.capabilities: list[str] = []
        self._last_info: dict[str, Any] = {}
        self._extra_caps: list[str] = []
        self._extra_params: dict[str, Any] = {}
        self._ctx: MigrationContext | None = None

    # -- public API --------------------------------------------------------------------------------
    def begin(self) -> "Migration":
        if self._task is not None:
            raise MigrationStateError(f"migration {self.id} already started")
        self._task = asyncio.create_task(self._run(), name=f"migration-{self.vm.name}")
        return self

    async def wait(self) -> MigrationResult:
        if self._task is None:
            raise MigrationStateError(f"migration {self.id} was never started")
        return await asyncio.shield(self._task)

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.wait().__await__()

    async def aclose(self) -> None:
        """Stop the background task if it still runs (cluster teardown): the rollback runs and the
        destination QEMU and its files are removed. Never raises."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def done(self) -> bool:
        return self.state.terminal

    def cancel(self) -> None:
        """Ask for the migration to stop; the source keeps running. Refused in postcopy (the guest
        already runs on the destination) and once finished."""
        if self.state.terminal:
            raise MigrationStateError(f"migration {self.id} already ended ({self.state.value})")
        if self.state is MigrationState.POSTCOPY:
            raise MigrationStateError(f"migration {self.id} is in postcopy: the guest already runs on "
                                      f"{self.dest.name}, it cannot be cancelled")
        self.log.info("cancel requested")
        self._cancel.set()

    def __aiter__(self) -> AsyncIterator[ProgressSnapshot]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[ProgressSnapshot]:
        q: asyncio.Queue[ProgressSnapshot | None] = asyncio.Queue()
        if self.state.terminal:
            if self.last is not None:
                yield self.last
            return
        self._queues.append(q)
        try:
            if self.last is not None:
                yield self.last
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        finally:
            with contextlib.suppress(ValueError):
                self._queues.remove(q)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    # -- state -------------------------------------------------------------------------------------
    def _transition(self, new: MigrationState, why: str = "") -> None:
        check_transition(self.id, self.state, new)
        self.log.info("migration %s: %s -> %s %s", self.id, self.state.value, new.value, why)
        self.state = new
        self.history.append((self.elapsed_s, new, why))
        if new in TERMINAL:
            for q in self._queues:
                q.put_nowait(None)

    def _publish(self, obs: Observation, pred: float | None) -> None:
        snap = ProgressSnapshot(state=self.state, elapsed_s=self.elapsed_s, passes=obs.passes,
                                transferred=obs.transferred, remaining=obs.remaining, total=obs.total,
                                dirty_rate=obs.dirty_rate, bandwidth=obs.bandwidth, mbps=obs.mbps,
                                expected_downtime_ms=obs.expected_downtime_ms, predicted_downtime_ms=pred,
                                status=obs.status)
        self.last = snap
        for q in self._queues:
            q.put_nowait(snap)

    # -- the run -----------------------------------------------------------------------------------
    async def _run(self) -> MigrationResult:
        try:
            self._transition(MigrationState.PREPARING, "starting the destination")
            await self._prepare()
            await self._start()
            outcome = await self._drive()
        except asyncio.CancelledError:
            await _complete(self._rollback(MigrationState.CANCELLED,
                                           MigrationCancelledError(f"migration {self.id}: task cancelled")))
            raise
        except _Stop as stop:
            await _complete(self._rollback(stop.outcome, stop.error))
            raise stop.error from None
        except MigrationError as exc:
            await _complete(self._rollback(MigrationState.FAILED, exc))
            raise
        except Exception as exc:  # QMP errors and the like: keep the cause, always clean up
            err = MigrationFailedError(f"migration {self.id} failed: {exc}")
            err.__cause__ = exc
            await _complete(self._rollback(MigrationState.FAILED, err))
            raise err from exc
        assert outcome is MigrationState.COMPLETED
        try:
            return await _complete(self._finish())
        except Exception as exc:
            self.error = exc
            raise

    async def _prepare(self) -> None:
        vm, dest = self.vm, self.dest
        src_qmp = vm.qmp
        self._dest_dir = vm.run_dir / f"mig{vm.generation}-{dest.name}-{secrets.token_hex(2)}"
        spec = vm.machine_spec(incoming="defer", run_dir=self._dest_dir)
        if self.dest_extra_args:
            spec = dataclasses.replace(spec, extra_args=tuple(spec.extra_args) + self.dest_extra_args)
        proc = QemuProcess(spec, self._dest_dir, netns=dest.netns)
        self._dest_proc = proc
        sampler = asyncio.create_task(self._sample_dirty_rate(src_qmp)) if self.sample_dirty_rate else None
        try:
            try:
                dq = await proc.launch()
            except LaunchError as exc:
                raise DestinationStartError(
                    f"migration {self.id}: destination QEMU on {dest.name} failed to start "
                    f"(exit code {exc.exit_code}); the source is untouched.\n{exc}") from exc
            if sampler is not None:
                self._dirty_rate_sampled = await sampler
                sampler = None
            self._ctx = self._context()
            self._extra_caps, self._extra_params = self.policy.setup(self._ctx)
            caps = self._capabilities()
            try:
                await dq.execute("migrate-set-capabilities", {"capabilities": self._cap_list(caps["dest"])})
                ip = netns_ipv4(dest.netns) if dest.netns else "127.0.0.1"
                await self._listen(dq, ip)
            except QEMUBridgeError as exc:
                raise DestinationStartError(
                    f"migration {self.id}: destination QEMU on {dest.name} could not prepare the incoming "
                    f"migration: {exc}") from exc
            # beats must be read on both sides: a virtio-serial chardev with no client drops them
            if self._own_heartbeat:
                await self.heartbeat.attach(vm.heartbeat_socket, timeout=5)
            await self.heartbeat.attach(self._dest_dir / "hb.sock", timeout=5)
        finally:
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
        self._setup_s = self.elapsed_s

    async def _listen(self, dq: QMPSession, ip: str) -> None:
        import random
        ports = [self.port] if self.port else random.sample(range(*DEFAULT_PORT_RANGE), 3)
        last: Exception | None = None
        for port in ports:
            uri = f"tcp:{ip}:{port}"
            try:
                await dq.execute("migrate-incoming", {"uri": uri})
                self._uri = uri
                self.log.info("destination %s listening on %s", self.dest.name, uri)
                return
            except QEMUBridgeError as exc:
                last = exc
                if "in use" not in str(exc).lower() or self.port:
                    break
        assert last is not None
        raise last

    async def _sample_dirty_rate(self, qmp: QMPSession) -> float | None:
        """Dirty rate of the guest sampled for 1 s before the start (QMP calc-dirty-rate, page
        sampling); None if QEMU cannot tell. Runs while the destination starts."""
        try:
            await qmp.execute("calc-dirty-rate", {"calc-time": 1, "sample-pages": 4096})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                info = await qmp.execute("query-dirty-rate")
                if info.get("status") == "measured":
                    return float(info.get("dirty-rate", 0)) * 2**20
        except QEMUBridgeError as exc:
            self.log.warning("dirty-rate sampling failed: %s", exc)
        return None

    def _context(self) -> MigrationContext:
        return MigrationContext(vm=self.vm.name, guest_ram_bytes=self.vm.spec.memory_mib * 2**20,
                                postcopy_available=self.policy.uses_postcopy,
                                dirty_rate_estimate=self._dirty_rate_sampled,
                                link_bandwidth_hint=self.link_bandwidth_hint)

    def _cap_list(self, wanted: list[str]) -> list[dict[str, Any]]:
        """Every capability we ever touch, set explicitly: they are sticky in a QEMU process, and a
        QEMU that was a postcopy destination must not keep postcopy on when it becomes a source."""
        names = list(dict.fromkeys(MANAGED_CAPS + wanted))
        return [{"capability": c, "state": c in wanted} for c in names]

    def _capabilities(self) -> dict[str, list[str]]:
        both = ["events"]
        if self.policy.uses_postcopy:
            both.append("postcopy-ram")
            if self.postcopy_preempt:
                both.append("postcopy-preempt")
        both += [c for c in self._extra_caps if c not in both]
        src = list(both)
        if "auto-converge" in getattr(self.policy, "ladder", ()):
            src.append("auto-converge")
        return {"dest": both, "source": src}

    async def _start(self) -> None:
        qmp = self.vm.qmp
        caps = self._capabilities()
        ctx = self._ctx
        assert ctx is not None
        src_caps = caps["source"]
        await qmp.execute("migrate-set-capabilities", {"capabilities": self._cap_list(src_caps)})
        params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH, "max-postcopy-bandwidth": 0,
                                  "downtime-limit": _ms(self.policy.initial_downtime_limit_ms),
                                  "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20}
        if "auto-converge" in src_caps:
            params["throttle-trigger-threshold"] = 100   # QEMU only throttles on its own when rho > 1
        params.update(self._extra_params)
        await qmp.execute("migrate-set-parameters", params)
        self.capabilities = src_caps
        self._limit_ms = float(params["downtime-limit"])
        start_actions = self.policy.start(ctx)
        if self._cancel.is_set():
            raise _Stop(MigrationState.CANCELLED, MigrationCancelledError(
                f"migration {self.id} cancelled before it started; the source is untouched"))
        self._t_migrate = time.monotonic()
        await qmp.execute("migrate", {"uri": self._uri})
        self._migrate_issued = True
        self._transition(MigrationState.ACTIVE, f"migrate {self._uri}")
        for act in start_actions:
            await self._execute(act, None)

    async def _drive(self) -> MigrationState:
        qmp = self.vm.qmp
        assert self._t_migrate is not None
        deadline = self._t0 + self.timeout
        stop: _Stop | None = None
        with qmp.subscribe(["MIGRATION", "MIGRATION_PASS"]) as sub:
            while True:
                with contextlib.suppress(QMPTimeoutError):
                    ev = await sub.get(timeout=self.poll_interval)
                    self.log.debug("event %s", ev)
                info = await qmp.execute("query-migrate")
                if info.get("ram"):
                    self._last_info = info
                t = time.monotonic() - self._t_migrate
                ram = info.get("ram") or {}
                bw = self._bw.update(t, int(ram.get("transferred", 0) or 0))
                obs = observation_from_qmp(info, t, self._limit_ms, bw)
                status = obs.status
                if status == "completed":
                    self.samples.append(obs)
                    self._final = info
                    if stop is not None and stop.outcome is not MigrationState.COMPLETED:
                        self.log.warning("migration completed before the cancel took effect")
                    return MigrationState.COMPLETED
                if status in ("failed", "cancelled"):
                    if stop is not None:
                        raise stop
                    desc = info.get("error-desc", "no error description")
                    raise MigrationFailedError(f"migration {self.id}: QEMU reports {status}: {desc}")
                if status.startswith("postcopy") and self.state is not MigrationState.POSTCOPY:
                    self._postcopy = True
                    self._transition(MigrationState.POSTCOPY, status)
                pred = self._predict(obs)
                obs = dataclasses.replace(obs, predicted_downtime_ms=pred)
                self.samples.append(obs)
                self._publish(obs, pred)
                if stop is not None:
                    continue   # waiting for QEMU to finish cancelling
                if self._cancel.is_set():
                    stop = _Stop(MigrationState.CANCELLED, MigrationCancelledError(
                        f"migration {self.id} cancelled; the source keeps running on {self.source.name}"))
                elif time.monotonic() > deadline and self.state is not MigrationState.POSTCOPY:
                    stop = _Stop(MigrationState.TIMED_OUT, MigrationTimeoutError(
                        f"migration {self.id} did not finish within {self.timeout:g} s (pass {obs.passes}, "
                        f"{obs.transferred / 2**20:.0f} MiB sent); cancelled, the source keeps running"))
                else:
                    if self.state in (MigrationState.ACTIVE, MigrationState.SWITCHING_OVER):
                        for act in self.policy.observe(obs):
                            try:
                                await self._execute(act, obs)
                            except _Stop as s:
                                stop = s
                                break
                if stop is not None:
                    await self._qemu_cancel()

    def _predict(self, obs: Observation) -> float | None:
        p = self.policy.predicted_downtime_ms(obs)
        if p is not None:
            return p
        bw = obs.bandwidth or (obs.mbps * 1e6 / 8 if obs.mbps else None)
        if not bw or obs.passes < 2:
            return None
        return (obs.remaining + 256 * 1024) / bw * 1000 + FIXED_COST.get()

    async def _qemu_cancel(self) -> None:
        if self._source_paused_by_us:
            await self.vm.qmp.execute("cont")
            self._source_paused_by_us = False
        with contextlib.suppress(QEMUBridgeError):
            await self.vm.qmp.execute("migrate_cancel")

    async def _execute(self, act: Action, obs: Observation | None) -> None:
        t = obs.t if obs else 0.0
        passes = obs.passes if obs else 0
        err: str | None = None
        qmp = self.vm.qmp
        self.log.info("policy %s @%.2fs pass %d: %s | inputs %s", self.policy.name, t, passes,
                      act.describe(), act.inputs)
        try:
            if act.kind in (ActionKind.SET_DOWNTIME_LIMIT, ActionKind.SWITCHOVER):
                assert act.value is not None
                await qmp.execute("migrate-set-parameters", {"downtime-limit": _ms(act.value)})
                self._limit_ms = float(_ms(act.value))
                if act.kind is ActionKind.SWITCHOVER:
                    self._predicted_at_switch = act.inputs.get("predicted_ms")
                    self._t_switch = time.monotonic()
                    if self.state is MigrationState.ACTIVE:
                        self._transition(MigrationState.SWITCHING_OVER, act.reason)
            elif act.kind is ActionKind.START_POSTCOPY or (
                    act.kind is ActionKind.FORCE_COMPLETE and self.policy.uses_postcopy):
                self._predicted_at_switch = act.inputs.get("predicted_postcopy_ms", self._postcopy_prediction(obs))
                self._t_switch = time.monotonic()
                if act.kind is ActionKind.START_POSTCOPY and act.value:
                    # background pages limited below the link: urgent page requests find the queue empty
                    await qmp.execute("migrate-set-parameters", {"max-postcopy-bandwidth": int(act.value)})
                await qmp.execute("migrate-start-postcopy")
            elif act.kind is ActionKind.FORCE_COMPLETE:
                await qmp.execute("stop")          # Nova without postcopy: pause, precopy then converges
                self._source_paused_by_us = True
            elif act.kind is ActionKind.AUTO_CONVERGE:
                await qmp.execute("migrate-set-parameters", {"throttle-trigger-threshold": 50,
                                                             "cpu-throttle-initial": int(act.value or 20)})
            elif act.kind is ActionKind.ABORT:
                raise _Stop(MigrationState.FAILED, MigrationAbortedError(
                    f"migration {self.id} aborted by policy {self.policy.name}: {act.reason}; "
                    "the source keeps running"))
        except QEMUBridgeError as exc:
            err = str(exc)
            self.log.warning("policy action %s failed: %s", act.kind.value, exc)
        finally:
            self.decisions.append(Decision(t=round(t, 3), passes=passes, policy=self.policy.name,
                                           action=act.kind.value, value=act.value, reason=act.reason,
                                           inputs=dict(act.inputs), error=err))

    def _postcopy_prediction(self, obs: Observation | None) -> float | None:
        return POSTCOPY_STALL.get()

    # -- endings -----------------------------------------------------------------------------------
    async def _finish(self) -> MigrationResult:
        vm, proc = self.vm, self._dest_proc
        assert proc is not None and proc.qmp is not None and self._dest_dir is not None
        t_done = time.monotonic()
        deadline = t_done + 30
        while True:
            st = await proc.qmp.execute("query-status")
            if st.get("status") == "running" or (self.prior_state is VMState.PAUSED and st.get("status") == "paused"):
                break
            if time.monotonic() > deadline:
                raise MigrationFailedError(f"migration {self.id}: destination reports {st.get('status')!r} "
                                           "30 s after completion")
            await asyncio.sleep(0.05)
        t_running = time.monotonic()
        # let a few beats arrive from the destination so the last gap is closed
        with contextlib.suppress(TimeoutError):
            await self.heartbeat.wait_beats(5, timeout=1.5)
        final = getattr(self, "_final", {}) or {}
        ram = final.get("ram") or {}
        old_proc, old_dir, old_host = vm.process, vm.instance_dir, self.source
        await vm.adopt_migrated(proc, self.dest, self._dest_dir)
        old_host.release(vm.name)
        if old_proc is not None:
            old_proc.expected_exit = True
            await old_proc.stop()
        if old_dir != vm.run_dir and old_dir.name.startswith("mig"):
            shutil.rmtree(old_dir, ignore_errors=True)
        vm._set_state(VMState.RUNNING if self.prior_state is VMState.RUNNING else VMState.PAUSED, "migrated")
        self._transition(MigrationState.COMPLETED, f"running on {self.dest.name}")
        res = self._result("completed", None, t_running)
        res.downtime_ms_qemu = float(final["downtime"]) if "downtime" in final else None
        res.bytes = int(ram.get("transferred", 0) or 0)
        res.touched_bytes = touched_bytes(ram)
        res.passes = int(ram.get("dirty-sync-count", 0) or 0)
        if res.predicted_downtime_ms is None:   # QEMU decided: its (or our) last prediction before the stop
            preds = [o.predicted_downtime_ms for o in self.samples if o.predicted_downtime_ms is not None]
            res.predicted_downtime_ms = round(preds[-1], 1) if preds else None
        # learn the fixed part of the downtime from precopy switch-overs
        bw = self._bw.value
        if (not self._postcopy and res.downtime_ms_guest is not None and bw
                and ram.get("downtime-bytes") is not None):
            FIXED_COST.learn(res.downtime_ms_guest - int(ram["downtime-bytes"]) / bw * 1000)
        if self._postcopy and res.downtime_ms_guest is not None and res.heartbeat_beats > 0:
            POSTCOPY_STALL.learn(res.downtime_ms_guest)
        if self._own_heartbeat:
            await self.heartbeat.close()
        self.result = res
        self.log.info("%s", res.summary())
        return res

    def _result(self, outcome: str, error: str | None, t_end: float) -> MigrationResult:
        t0 = self._t_migrate or self._t0
        hb = self.heartbeat.stats(since=t0 - 0.5) if self.heartbeat.beats else None
        guest_gap = hb.max_gap_ms if hb and hb.beats >= 2 else None
        last = self.samples[-1] if self.samples else None
        return MigrationResult(
            touched_bytes=touched_bytes(self._last_info.get("ram") or {}),
            vm=self.vm.name, policy=self.policy.name, source=self.source.name, destination=self.dest.name,
            outcome=outcome, error=error, total_s=round(t_end - t0, 3), setup_s=self._setup_s,
            downtime_ms_guest=guest_gap, bytes=last.transferred if last else 0,
            passes=last.passes if last else 0, predicted_downtime_ms=self._predicted_at_switch,
            postcopy=self._postcopy, heartbeat_beats=hb.beats if hb else 0,
            heartbeat_lost=hb.lost if hb else None, policy_params=self.policy.params(),
            decisions=list(self.decisions))

    async def _rollback(self, outcome: MigrationState, error: BaseException) -> None:
        """Failure, timeout or cancel: source keeps running untouched, destination gone."""
        self.error = error
        vm = self.vm
        self.log.warning("migration %s ends %s: %s", self.id, outcome.value, str(error).splitlines()[0])
        src_ok = vm.process is not None and vm.process.qmp is not None and not vm.process.exited.done()
        if src_ok and self._migrate_issued:
            try:
                await self._wait_source_settled()
            except QEMUBridgeError as exc:
                self.log.error("source did not settle after cancel: %s", exc)
        if src_ok and self.state is not MigrationState.POSTCOPY:
            try:
                if self._source_paused_by_us:
                    await vm.qmp.execute("cont")
                st = await vm.qmp.execute("query-status")
                if st.get("status") != "running" and self.prior_state is VMState.RUNNING:
                    self.log.warning("source is %s after the rollback; resuming it", st.get("status"))
                    await vm.qmp.execute("cont")
                    st = await vm.qmp.execute("query-status")
                if self.prior_state is VMState.RUNNING and st.get("status") != "running":
                    self.log.error("source QEMU reports %s after rollback", st.get("status"))
            except QEMUBridgeError as exc:
                self.log.error("source check after rollback failed: %s", exc)
        await self._destroy_destination()
        if self._own_heartbeat:
            await self.heartbeat.close()
        self.dest.release(vm.name)
        if vm.state is VMState.MIGRATING:
            vm._set_state(self.prior_state, f"migration-{outcome.value}")
        if self.state is not MigrationState.POSTCOPY or outcome is MigrationState.FAILED:
            self._transition(outcome, str(error).splitlines()[0])
        out = {MigrationState.TIMED_OUT: "timeout", MigrationState.CANCELLED: "cancelled"}.get(outcome, "failed")
        self.result = self._result(out, str(error), time.monotonic())
        if isinstance(error, MigrationError):
            error.migration = self  # type: ignore[attr-defined]
            error.result = self.result  # type: ignore[attr-defined]

    async def _wait_source_settled(self) -> None:
        qmp = self.vm.qmp
        deadline = time.monotonic() + 15
        sent_cancel = False
        while time.monotonic() < deadline:
            info = await qmp.execute("query-migrate")
            status = info.get("status", "none")
            if status in ("cancelled", "failed", "completed", "none"):
                return
            if not sent_cancel and not status.startswith("postcopy"):
                with contextlib.suppress(QEMUBridgeError):
                    await qmp.execute("migrate_cancel")
                sent_cancel = True
            await asyncio.sleep(0.1)
        raise MigrationFailedError(f"migration {self.id}: source still {status!r} 15 s after migrate_cancel")

    async def _destroy_destination(self) -> None:
        proc = self._dest_proc
        if proc is not None:
            proc.expected_exit = True
            with contextlib.suppress(Exception):
                await proc.kill()
        if self._dest_dir is not None:
            shutil.rmtree(self._dest_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<Migration {self.id} {self.state.value} policy={self.policy.name}>"


def touched_bytes(ram: dict[str, Any]) -> int:
    """Guest RAM minus the zero pages QEMU found: what has to cross the link at least once.
    (Zero pages are counted once, in the pass that finds them; resent pages are never zero.)"""
    page = int(ram.get("page-size", 4096) or 4096)
    return max(0, int(ram.get("total", 0) or 0) - int(ram.get("duplicate", 0) or 0) * page
               - int(ram.get("skipped", 0) or 0) * page)


def _ms(value: float) -> int:
    if not math.isfinite(value) or value < 0:
        raise MigrationError(f"bad downtime limit {value!r}")
    return min(2_000_000, max(1, int(round(value))))  # QEMU accepts 0..2000 s

