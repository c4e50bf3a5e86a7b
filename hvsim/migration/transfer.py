"""Transfer strategies: how the guest's state gets to the destination. The orchestrator
(:mod:`.orchestrator`) drives a strategy through its phases and knows nothing of how it copies; a
strategy knows nothing of policies' reasoning, only how to carry out their actions.

:class:`QemuLiveTransfer` is QEMU's own live migration: a destination QEMU started in the destination
host's namespace with an identical machine and ``-incoming defer``, capabilities set explicitly on both
sides (they are sticky in a QEMU process), ``migrate-incoming tcp:<dest address>:<port>``, ``migrate``
on the source, progress from ``MIGRATION``/``MIGRATION_PASS`` events and ``query-migrate``. Another
strategy (agents in the guests copying data between clouds that cannot live-migrate to each other)
implements the same interface.
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hvbase.aio import wait_for
from hvbase.aio import cancel_and_wait
from qmp_bridge import LaunchError, QEMUBridgeError, QemuProcess, QMPSession, QMPTimeoutError

from ..core.vm import MigrationLease
from .components import ComponentMigration
from .costs import MigrationCosts
from .errors import DestinationStartError, MigrationError, MigrationFailedError
from .policies.base import Action, ActionKind, MigrationContext, Policy, PolicySetup
from .progress import BandwidthMeter, Observation, observation_from_qmp

log = logging.getLogger("hvsim.migration")

MAX_BANDWIDTH = 1 << 40          # bytes/s: effectively unlimited, so only the link limits the stream
DEFAULT_PORT_RANGE = (20000, 60000)
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}   # QEMU's defaults (ms)
MANAGED_CAPS = ["events", "postcopy-ram", "postcopy-preempt", "auto-converge", "xbzrle", "pause-before-switchover"]


NOTSENT_LOWAT = 128 * 1024


@dataclass
class TransferOptions:
    port: int | None = None
    dest_extra_args: tuple[str, ...] = ()
    sample_dirty_rate: bool = False
    postcopy_preempt: bool = False
    # unsent bytes a TCP socket may queue in the hosts' namespaces (net.ipv4.tcp_notsent_lowat); None:
    # leave the hosts alone. With the kernel's default (unlimited, autotuned up to 4 MiB) ~3 MB of
    # the stream still sat in the source's socket when QEMU stopped the guest: 126-147 ms of the
    # guest-observed downtime at 200 Mbit/s that QEMU neither counts nor reports.
    notsent_lowat: int | None = NOTSENT_LOWAT


async def tune_netns(netns: str, notsent_lowat: int) -> None:
    """Set ``net.ipv4.tcp_notsent_lowat`` in a host's namespace (never the root namespace)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, "sysctl", "-qw", f"net.ipv4.tcp_notsent_lowat={int(notsent_lowat)}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise MigrationError(f"cannot tune the TCP stack of namespace {netns!r}: {err.decode(errors='replace')}")


class TransferStrategy(abc.ABC):
    """One way of moving a VM. Lifecycle, driven by the orchestrator:
    ``prepare`` (destination ready to receive) -> ``configure(policy setup)`` -> ``start`` ->
    ``poll``/``apply`` until ``poll`` reports completed/failed -> ``finish`` (destination process, to
    commit) or, on any failure/cancel/timeout, ``cancel`` + ``settle`` + ``discard``."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def prepare(self, lease: MigrationLease) -> None:
        """Bring the destination up to receive (nothing of the source changes)."""

    @abc.abstractmethod
    def context(self, policy: Policy, link_bandwidth_hint: float | None,
                costs: MigrationCosts) -> MigrationContext: ...

    @abc.abstractmethod
    async def configure(self, setup: PolicySetup, initial_downtime_limit_ms: float) -> list[str]:
        """Set what the policy needs before the start; returns the source's capabilities."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def poll(self, wait: float) -> tuple[Observation, dict[str, Any]]:
        """Wait up to ``wait`` s for progress, then sample it: (observation, raw info)."""

    @abc.abstractmethod
    async def apply(self, act: Action) -> None:
        """Carry out a policy action (raise QEMUBridgeError if the hypervisor refuses it)."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Ask the transfer to stop (the source keeps running)."""

    @abc.abstractmethod
    async def settle(self) -> None:
        """After a cancel/failure: wait until the source has no transfer running; resume it if the
        strategy paused it; make sure it runs as it did before."""

    @abc.abstractmethod
    async def finish(self) -> QemuProcess | None:
        """The transfer completed: wait until the destination runs; return its process (the VM
        adopts it), or None when the destination belongs to another process (a host agent), which
        has adopted it: the VM is then handed off (:meth:`MigrationLease.hand_off`)."""

    @property
    def destination_heartbeat_socket(self) -> Path | None:
        """The destination guest's heartbeat socket, when this process can read it (guest-observed
        downtime is measured on both sides); None otherwise."""
        return None

    @abc.abstractmethod
    async def discard(self) -> None:
        """Remove everything of the destination (processes, files). Never raises."""


#: QEMU 7.2 under TCG corrupts the destination guest with a tiny downtime limit (kernel oopses right
#: after the switch-over were seen at 50 ms, Nova's first step): every limit we set there is raised to this
TCG_MIN_DOWNTIME_MS = 100


def _ms(value: float) -> int:
    if not math.isfinite(value) or value < 0:
        raise MigrationError(f"bad downtime limit {value!r}")
    return min(2_000_000, max(1, int(round(value))))  # QEMU accepts 0..2000 s


class QemuLiveTransfer(TransferStrategy):
    """QEMU's pre-copy/post-copy live migration over TCP between host namespaces."""

    name = "qemu-live"

    def __init__(self, migration_id: str, options: TransferOptions, uses_postcopy: bool,
                 components: ComponentMigration | None = None) -> None:
        self.id = migration_id
        self.options = options
        self.uses_postcopy = uses_postcopy
        self.components = components      # the VM's user-level drivers that move with it (None: none do)
        self.paused_at: float | None = None
        self.continued_at: float | None = None
        self._stop_ev: Any = None
        self._resume_ev: Any = None
        self._pause_ev: Any = None
        self._pause_task: asyncio.Task[None] | None = None
        self._pause_seen = asyncio.Event()   # poll() saw pre-switchover (backs up the event)
        self.pause_event_at: float | None = None
        self.lease: MigrationLease | None = None
        self.dest_proc: QemuProcess | None = None
        self.uri = ""
        self.capabilities: list[str] = []
        self.limit_ms: float | None = None
        self.min_limit_ms = 0                 # TCG_MIN_DOWNTIME_MS when the source runs under TCG
        self.dirty_rate_sampled: float | None = None
        self.source_paused = False
        self.migrate_issued = False
        self.postcopy_started = False
        self.final: dict[str, Any] = {}
        self.last_info: dict[str, Any] = {}
        self._t_migrate: float | None = None
        self._bw = BandwidthMeter()
        self._events: Any = None
        self.log = log.getChild(migration_id.split(":")[0])

    @property
    def src(self) -> QMPSession:
        assert self.lease is not None
        return self.lease.source_qmp

    @property
    def bandwidth(self) -> float | None:
        return self._bw.value

    @property
    def dest_qmp(self) -> QMPSession | None:
        return self.dest_proc.qmp if self.dest_proc is not None else None

    # -- preparing the destination ------------------------------------------------------------------
    async def prepare(self, lease: MigrationLease) -> None:
        self.lease = lease
        dest = lease.destination
        # the destination's own ULDs first: the destination QEMU attaches to them when it starts
        atts = await self.components.prepare() if self.components is not None else {}
        spec = lease.destination_spec(self.options.dest_extra_args, attachments=atts)
        proc = dest.qemu_process(spec, lease.dir)      # detached in the host's power domain, if it has one
        self.dest_proc = proc
        if self.options.notsent_lowat and lease.source.netns and dest.netns:
            for ns in (lease.source.netns, dest.netns):
                await tune_netns(ns, self.options.notsent_lowat)
        sampler = asyncio.create_task(self._sample_dirty_rate()) if self.options.sample_dirty_rate else None
        try:
            try:
                await proc.launch()
            except LaunchError as exc:
                raise DestinationStartError(
                    f"migration {self.id}: destination QEMU on {dest.name} failed to start "
                    f"(exit code {exc.exit_code}); the source is untouched.\n{exc}") from exc
            finally:
                if proc.pid is not None:
                    lease.track_process(proc.pid, f"migration destination QEMU of vm {lease.vm_name}")
            if sampler is not None:
                self.dirty_rate_sampled = await sampler
                sampler = None
        finally:
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)

    def context(self, policy: Policy, link_bandwidth_hint: float | None,
                costs: MigrationCosts) -> MigrationContext:
        assert self.lease is not None
        return MigrationContext(vm=self.lease.vm_name, guest_ram_bytes=self.lease.spec.memory_mib * 2**20,
                                postcopy_available=self.uses_postcopy, dirty_rate_estimate=self.dirty_rate_sampled,
                                link_bandwidth_hint=link_bandwidth_hint, costs=costs)

    async def _sample_dirty_rate(self) -> float | None:
        """Dirty rate of the guest sampled for 1 s before the start (QMP calc-dirty-rate, page
        sampling); None if QEMU cannot tell. Runs while the destination starts."""
        try:
            await self.src.execute("calc-dirty-rate", {"calc-time": 1, "sample-pages": 4096})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                info = await self.src.execute("query-dirty-rate")
                if info.get("status") == "measured":
                    return float(info.get("dirty-rate", 0)) * 2**20
        except QEMUBridgeError as exc:
            self.log.warning("dirty-rate sampling failed: %s", exc)
        return None

    def _limit(self, value: float) -> int:
        """A downtime limit for QEMU: ``value`` ms, raised to the TCG floor where it applies."""
        ms = _ms(value)
        if ms < self.min_limit_ms:
            self.log.info("downtime limit %d ms raised to %d ms (QEMU 7.2 under TCG corrupts the guest below it)",
                          ms, self.min_limit_ms)
            return self.min_limit_ms
        return ms

    def _cap_list(self, wanted: list[str]) -> list[dict[str, Any]]:
        """Every capability we ever touch, set explicitly: they are sticky in a QEMU process, and a
        QEMU that was a postcopy destination must not keep postcopy on when it becomes a source."""
        names = list(dict.fromkeys(MANAGED_CAPS + wanted))
        return [{"capability": c, "state": c in wanted} for c in names]

    @property
    def destination_heartbeat_socket(self) -> Path | None:
        return self.lease.dir / "hb.sock" if self.lease is not None else None

    async def configure(self, setup: PolicySetup, initial_downtime_limit_ms: float) -> list[str]:
        assert self.lease is not None
        both = ["events"]
        if self.uses_postcopy:
            both.append("postcopy-ram")
            if self.options.postcopy_preempt:
                both.append("postcopy-preempt")
        both += [c for c in setup.capabilities if c not in both]
        src = both + [c for c in setup.source_capabilities if c not in both]
        if self.components is not None and self.components.needs_pause:
            src.append("pause-before-switchover")   # the ULDs' final step runs while QEMU waits
        await self.listen_destination(both)
        await self.src.execute("migrate-set-capabilities", {"capabilities": self._cap_list(src)})
        kvm = await self.src.execute("query-kvm")
        self.min_limit_ms = 0 if isinstance(kvm, dict) and kvm.get("enabled") else TCG_MIN_DOWNTIME_MS
        params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH, "max-postcopy-bandwidth": 0,
                                  "downtime-limit": self._limit(initial_downtime_limit_ms),
                                  "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20}
        if "auto-converge" in src:
            params["throttle-trigger-threshold"] = 100   # QEMU only throttles on its own when rho > 1
        params.update(setup.parameters)
        if "downtime-limit" in setup.parameters:
            params["downtime-limit"] = self._limit(float(params["downtime-limit"]))
        await self.src.execute("migrate-set-parameters", params)
        self.capabilities = src
        self.limit_ms = float(params["downtime-limit"])
        return src

    async def listen_destination(self, capabilities: list[str]) -> None:
        """Set ``capabilities`` on the destination and make it listen (sets :attr:`uri`)."""
        assert self.lease is not None and self.dest_proc is not None and self.dest_proc.qmp is not None
        dq = self.dest_proc.qmp
        try:
            await dq.execute("migrate-set-capabilities", {"capabilities": self._cap_list(capabilities)})
            await self._listen(dq, self.lease.destination.address)
        except QEMUBridgeError as exc:
            raise DestinationStartError(
                f"migration {self.id}: destination QEMU on {self.lease.destination.name} could not prepare the "
                f"incoming migration: {exc}") from exc

    async def _listen(self, dq: QMPSession, ip: str) -> None:
        port = self.options.port
        ports = [port] if port else random.sample(range(*DEFAULT_PORT_RANGE), 3)
        last: Exception | None = None
        for p in ports:
            uri = f"tcp:{ip}:{p}"
            try:
                await dq.execute("migrate-incoming", {"uri": uri})
                self.uri = uri
                self.log.info("destination listening on %s", uri)
                return
            except QEMUBridgeError as exc:
                last = exc
                if "in use" not in str(exc).lower() or port:
                    break
        assert last is not None
        raise last

    # -- running -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._events = self.src.subscribe(["MIGRATION", "MIGRATION_PASS"])
        if self.components is not None and self.components.needs_pause:
            assert self.dest_proc is not None and self.dest_proc.qmp is not None
            self._stop_ev = self.src.subscribe("STOP")
            self._resume_ev = self.dest_proc.qmp.subscribe("RESUME")
            # the pause is handled the moment QEMU announces it, not at the next progress poll
            self._pause_ev = self.src.subscribe("MIGRATION", match={"status": "pre-switchover"})
            self._pause_task = asyncio.create_task(self._pause_watch(), name=f"pause-{self.id}")
        self._t_migrate = time.monotonic()
        await self.src.execute("migrate", {"uri": self.uri})
        self.migrate_issued = True

    @property
    def started_at(self) -> float | None:
        return self._t_migrate

    async def poll(self, wait: float) -> tuple[Observation, dict[str, Any]]:
        assert self._t_migrate is not None
        if self._events is not None:
            with contextlib.suppress(QMPTimeoutError):
                ev = await self._events.get(timeout=wait)
                self.log.debug("event %s", ev)
        if self._pause_task is not None and self._pause_task.done():
            self._pause_task.result()          # a failed ULD switch-over fails the migration here
        info = await self.src.execute("query-migrate")
        if info.get("status") == "pre-switchover" and self._pause_task is not None:
            self._pause_seen.set()       # the watcher goes on even if its event never reached it
            with contextlib.suppress(TimeoutError):   # the watcher is on it: let it finish first
                await wait_for(asyncio.shield(self._pause_task), wait)
            if self._pause_task.done():
                self._pause_task.result()
            info = await self.src.execute("query-migrate")
        if info.get("ram"):
            self.last_info = info
        t = time.monotonic() - self._t_migrate
        ram = info.get("ram") or {}
        bw = self._bw.update(t, int(ram.get("transferred", 0) or 0))
        obs = observation_from_qmp(info, t, self.limit_ms, bw)
        if obs.status == "completed":
            self.final = info
        if obs.status.startswith("postcopy"):
            self.postcopy_started = True
        return obs, info

    async def _pause_watch(self) -> None:
        """QEMU paused before the switch-over (vCPUs stopped, drives flushed): the ULDs' final step,
        then ``migrate-continue``. A ULD failure ends this task with it; ``poll`` raises it (the
        orchestrator cancels: QEMU resumes the source)."""
        assert self.components is not None and self._pause_ev is not None
        event = asyncio.ensure_future(self._pause_ev.get())
        seen = asyncio.ensure_future(self._pause_seen.wait())
        try:
            await asyncio.wait({event, seen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (event, seen):
                if not f.done():
                    f.cancel()
        ev = event.result() if event.done() and not event.cancelled() else {}
        if not ev:
            self.log.warning("QEMU is paused before the switch-over but its MIGRATION event was not seen: "
                             "going on from query-migrate")
        self.paused_at = time.time()
        ts = ev.get("timestamp") or {}
        self.pause_event_at = ts["seconds"] + ts["microseconds"] / 1e6 if "seconds" in ts else None
        self.log.info("paused before switch-over: the ULDs' final step")
        await self.components.switchover()
        await self.src.execute("migrate-continue", {"state": "pre-switchover"})
        self.continued_at = time.time()

    @staticmethod
    def _event_time(sub: Any) -> float | None:
        """Wall-clock time of the last event queued on ``sub`` (QEMU's own timestamp)."""
        last = None
        while sub is not None and (ev := sub.get_nowait()) is not None:
            last = ev
        ts = (last or {}).get("timestamp") or {}
        return ts["seconds"] + ts["microseconds"] / 1e6 if "seconds" in ts else None

    async def apply(self, act: Action) -> None:
        src = self.src
        if act.kind in (ActionKind.SET_DOWNTIME_LIMIT, ActionKind.SWITCHOVER):
            assert act.value is not None
            limit = self._limit(act.value)
            await src.execute("migrate-set-parameters", {"downtime-limit": limit})
            self.limit_ms = float(limit)
        elif act.kind is ActionKind.START_POSTCOPY or (act.kind is ActionKind.FORCE_COMPLETE and self.uses_postcopy):
            if act.kind is ActionKind.START_POSTCOPY and act.value:
                # background pages limited below the link: urgent page requests find the queue empty
                await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": int(act.value)})
            await src.execute("migrate-start-postcopy")
        elif act.kind is ActionKind.FORCE_COMPLETE:
            await src.execute("stop")          # Nova without postcopy: pause, precopy then converges
            self.source_paused = True
        elif act.kind is ActionKind.AUTO_CONVERGE:
            await src.execute("migrate-set-parameters", {"throttle-trigger-threshold": 50,
                                                         "cpu-throttle-initial": int(act.value or 20)})

    async def cancel(self) -> None:
        if self.source_paused:
            await self.src.execute("cont")
            self.source_paused = False
        with contextlib.suppress(QEMUBridgeError):
            await self.src.execute("migrate_cancel")

    async def settle(self) -> None:
        assert self.lease is not None
        task, self._pause_task = self._pause_task, None
        if task is not None:      # a ULD final step still running: stop it first
            await cancel_and_wait(task)
        if not self.lease.source_alive:
            return
        if self.migrate_issued:
            try:
                await self._wait_source_settled()
            except (QEMUBridgeError, MigrationFailedError) as exc:
                self.log.error("source did not settle after cancel: %s", exc)
        if self.postcopy_started:
            return
        try:
            if self.source_paused:
                await self.src.execute("cont")
                self.source_paused = False
            st = await self.src.execute("query-status")
            if st.get("status") != "running" and self.lease.prior_state.value == "running":
                self.log.warning("source is %s after the rollback; resuming it", st.get("status"))
                await self.src.execute("cont")
                st = await self.src.execute("query-status")
            if self.lease.prior_state.value == "running" and st.get("status") != "running":
                self.log.error("source QEMU reports %s after rollback", st.get("status"))
        except QEMUBridgeError as exc:
            self.log.error("source check after rollback failed: %s", exc)

    async def _wait_source_settled(self) -> None:
        deadline = time.monotonic() + 15
        sent_cancel = False
        status = "unknown"
        while time.monotonic() < deadline:
            info = await self.src.execute("query-migrate")
            status = info.get("status", "none")
            if status in ("cancelled", "failed", "completed", "none", "postcopy-paused"):
                return      # (a paused postcopy cannot be cancelled in QEMU 7.2: its QEMU is stopped next)
            if not sent_cancel and not status.startswith("postcopy"):
                with contextlib.suppress(QEMUBridgeError):
                    await self.src.execute("migrate_cancel")
                sent_cancel = True
            await asyncio.sleep(0.1)
        raise MigrationFailedError(f"migration {self.id}: source still {status!r} 15 s after migrate_cancel")

    async def finish(self) -> QemuProcess | None:
        proc = self.dest_proc
        assert proc is not None and proc.qmp is not None and self.lease is not None
        deadline = time.monotonic() + 30
        paused_ok = self.lease.prior_state.value == "paused"
        while True:
            st = await proc.qmp.execute("query-status")
            if st.get("status") == "running" or (paused_ok and st.get("status") == "paused"):
                break
            if time.monotonic() > deadline:
                raise MigrationFailedError(f"migration {self.id}: destination reports {st.get('status')!r} "
                                           "30 s after completion")
            await asyncio.sleep(0.05)
        if self.components is not None and self._stop_ev is not None:
            self.components.finish_breakdown(self._event_time(self._stop_ev), self.continued_at,
                                             self._event_time(self._resume_ev), self.pause_event_at)
        self._close_events()
        return proc

    async def announce(self) -> None:
        """Have the destination QEMU announce the guest's NICs (QMP ``announce-self``: RARP frames
        from every NIC, QEMU's default timing), on top of the announce QEMU makes by itself after an
        incoming migration: what teaches a flood-and-learn network where the guest is now. Logged,
        never raised (the guest runs either way)."""
        proc = self.dest_proc
        if proc is None or proc.qmp is None:
            return
        try:
            await proc.qmp.execute("announce-self", dict(ANNOUNCE))
        except QEMUBridgeError as exc:
            self.log.warning("announce-self on the destination failed: %s", exc)

    def _close_events(self) -> None:
        task, self._pause_task = self._pause_task, None
        if task is not None and not task.done():
            task.cancel()
        for attr in ("_events", "_stop_ev", "_resume_ev", "_pause_ev"):
            sub = getattr(self, attr)
            if sub is not None:
                sub.close()
                setattr(self, attr, None)

    async def discard(self) -> None:
        self._close_events()
        proc = self.dest_proc
        if proc is not None:
            try:
                await proc.kill()
            except (QEMUBridgeError, OSError) as exc:
                self.log.error("killing the destination QEMU failed: %s", exc)
        if self.lease is not None:
            shutil.rmtree(self.lease.dir, ignore_errors=True)

    def final_ram(self) -> dict[str, Any]:
        ram: dict[str, Any] = self.final.get("ram") or {}
        return ram

    def downtime_qemu_ms(self) -> float | None:
        return float(self.final["downtime"]) if "downtime" in self.final else None


def touched_bytes(ram: dict[str, Any]) -> int:
    """Guest RAM minus the zero pages QEMU found: what has to cross the link at least once.
    (Zero pages are counted once, in the pass that finds them; resent pages are never zero.)"""
    page = int(ram.get("page-size", 4096) or 4096)
    return max(0, int(ram.get("total", 0) or 0) - int(ram.get("duplicate", 0) or 0) * page
               - int(ram.get("skipped", 0) or 0) * page)
