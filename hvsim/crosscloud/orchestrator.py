"""The cross-cloud migration: the AWS MGN / VMware HCX workflow over the agent-based transfer.

::

    NEW -> PREPARING      both clouds reached through their drivers (credentials), the source checked
                          (running, agent channel), the destination's capacity checked: every refusal
                          before anything is created; then the destination instance is created and
                          started, and the migration agents are installed in both guests
        -> REPLICATING    rounds (continuous, with lag and RPO visible); after each the switchover
                          criterion; a test cutover may run here (a clone on an isolated network)
        -> CUTTING_OVER   only if the predicted downtime fits the budget (or the operator accepts the
                          achievable one): quiesce the writer, freeze, copy the rest, verify both disks,
                          stop (pause) the source, start the application at the destination, move the
                          service address
        -> CUT_OVER       -> FINALIZED (source deleted, agents removed)  or  -> REVERTED
    REPLICATING/CUT_OVER -> REVERTED   destination deleted, the source resumed as it was
    any                 -> FAILED     destination deleted, the source left running; nothing migrated

**Durable and resumable.** With a :class:`~hvsim.crosscloud.journal.OperationJournal` the
migration is an operation of the control plane: its record (state, rounds, decisions, cutover
step, costs, test cutovers, result) is written to the store under the operation's fenced lease at
every state change, every round and at the cutover's point of no return. After the orchestrator's
crash (the manager's restart) the guests' agents are gone with its streams, the application keeps
running, and :meth:`CrossCloudMigration.resume` takes the operation over once the dead holder's
lease has expired:

- ``preparing``: the half-built destination and the agents are removed, and preparing starts again;
- ``replicating``: fresh agents; the source agent counts the rounds done and its next round
  copies only the 64 KiB chunks whose hashes differ between the disks (nothing both already hold
  is sent again); the rounds and bytes of the earlier life are kept;
- ``cutting-over`` before the disks were verified equal: rolled back (the source resumed and
  thawed, its application restarted), then as ``replicating``; once verified (the record's
  ``cutover_step``) the cutover is completed at the destination instead: the disks were equal
  and the source stopped, so the destination's copy is the newer one;
- ``cut-over``: the destination's application is restarted if it is not running;
  finalize/revert as before.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvbase.fsm import StateMachine

from hvbase.aio import run_to_completion
from ..control.errors import FencedError
from .app import AckLog, WriterApp, verify_records
from .criterion import CutoverCosts, Decision, SwitchoverCriterion, Verdict
from .errors import (CrossCloudError, CrossCloudInputError, CrossCloudStateError, CutoverRefusedError,
                     NativeMigrationRefusedError, ReplicationError)
from .profiles import native_blockers
from .journal import OperationJournal, check_op_id
from .provider import CloudRegistry, ProviderDriver
from .transfer import AgentTransfer, Endpoint

log = logging.getLogger("hvsim.crosscloud")


class XState(enum.Enum):
    NEW = "new"
    PREPARING = "preparing"
    REPLICATING = "replicating"
    CUTTING_OVER = "cutting-over"
    CUT_OVER = "cut-over"
    FINALIZED = "finalized"
    REVERTED = "reverted"
    FAILED = "failed"


X = XState
TRANSITIONS = {
    X.NEW: {X.PREPARING, X.FAILED},
    X.PREPARING: {X.REPLICATING, X.FAILED},
    X.REPLICATING: {X.CUTTING_OVER, X.REVERTED, X.FAILED},
    X.CUTTING_OVER: {X.CUT_OVER, X.REPLICATING, X.FAILED},    # -> replicating: rolled back after a restart
    X.CUT_OVER: {X.FINALIZED, X.REVERTED, X.FAILED},
    X.FINALIZED: set(),
    X.REVERTED: set(),
    X.FAILED: set(),
}


class CrossCloudMigration:
    """One VM moving from ``source_cloud`` to ``dest_cloud`` (registered in ``registry``)."""

    def __init__(self, registry: CloudRegistry, *, vm: str, source_cloud: str, source_credentials: str,
                 dest_cloud: str, dest_credentials: str, source_app: WriterApp, workdir: Path,
                 budget_s: float = 5.0, rate_bps: float = 0.0, deadline_s: float = 900.0, max_rounds: int = 30,
                 costs: CutoverCosts | None = None, corrupt_seq: int | None = None, calibrate: bool = True,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 journal: OperationJournal | None = None, op_id: str | None = None) -> None:
        if isinstance(rate_bps, bool) or not isinstance(rate_bps, (int, float)) or rate_bps < 0:
            raise CrossCloudInputError(f"rate_bps must be >= 0 (0 = unlimited), got {rate_bps!r}")
        self.registry = registry
        self.vm = vm
        self.dest_vm = vm
        self.source_cloud, self.dest_cloud = source_cloud, dest_cloud
        self._creds = (source_credentials, dest_credentials)
        self.app = source_app
        self.acks: AckLog = source_app.acks
        self.workdir = Path(workdir)
        self.criterion = SwitchoverCriterion(budget_s, costs or CutoverCosts(), max_rounds=max_rounds,
                                             deadline_s=deadline_s)
        self.rate_bps = float(rate_bps)
        self.corrupt_seq = corrupt_seq
        self.calibrate = calibrate and costs is None
        self.on_event = on_event
        self.fsm: StateMachine[XState] = StateMachine(f"cross-cloud migration of vm {vm!r}", X.NEW, TRANSITIONS,
                                                      error=CrossCloudStateError, log=log)
        self.src: ProviderDriver | None = None
        self.dst: ProviderDriver | None = None
        self.transfer: AgentTransfer | None = None
        self.dest_app: WriterApp | None = None
        self.decision: Decision | None = None
        self.decisions: list[Decision] = []
        self.test_results: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._t0 = time.monotonic()
        self.started_at = time.time()
        self._frozen = False
        self._spec: Any = None
        self.journal = journal
        self.op_id = check_op_id(op_id or f"{source_cloud}-{vm}-{dest_cloud}".lower()) if journal else op_id
        self.cutover_step: str | None = None
        self.resumes: list[dict[str, Any]] = []
        self._old_decisions: list[dict[str, Any]] = []
        self._abandoned = False
        self._lease_wait_s = 0.0

    @property
    def state(self) -> XState:
        return self.fsm.state

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, data)
            except Exception:  # an observer's bug must not break the migration
                log.exception("progress callback failed")

    async def _persist(self) -> None:
        """The record into the journal (if any), under the operation's fence."""
        if self.journal is not None and self.op_id is not None and not self._abandoned:
            await self.journal.save(self.op_id, self.to_record())

    async def _set(self, state: XState, reason: str) -> None:
        self.fsm.set(state, reason)
        await self._persist()

    async def _failed(self, exc: BaseException) -> None:
        """A step failed or was cancelled: clean up, unless the orchestrator is being abandoned (as
        a crash would leave everything), or it lost the operation's lease (FencedError): another
        orchestrator may be driving it now, so this one only lets go of its agents' streams."""
        if self._abandoned:
            return
        if self.journal is not None and self.op_id is not None and (
                isinstance(exc, FencedError) or not self.journal.holds(self.op_id)):
            log.error("cross-cloud operation %s: the lease is lost (%s); leaving the operation to its holder",
                      self.op_id, exc)
            await run_to_completion(self.abandon())
            return
        await run_to_completion(self._fail(exc))

    # -- preparing -------------------------------------------------------------------------------------
    async def validate(self) -> None:
        """Every refusal that needs no resource: clouds, credentials, the source and its agent channel,
        the destination's capacity. Nothing is created."""
        self.src = await self.registry.connect(self.source_cloud, self._creds[0])
        self.dst = await self.registry.connect(self.dest_cloud, self._creds[1])
        st = await self.src.vm_state(self.vm)
        if st is None:
            raise CrossCloudInputError(f"cloud {self.source_cloud!r} has no vm {self.vm!r}")
        if st != "running":
            raise CrossCloudInputError(f"vm {self.vm!r} is {st}, not running")
        if await self.dst.vm_state(self.dest_vm) is not None:
            raise CrossCloudInputError(f"cloud {self.dest_cloud!r} already has a vm {self.dest_vm!r}")
        await self.src.probe_agent(self.vm)
        self._spec = await self.src.describe(self.vm)
        await self.dst.check_capacity(self._spec)

    def _source_spec(self) -> Any:
        assert self._spec is not None, "validate() first"
        return self._spec

    def native_blockers(self) -> list[str]:
        assert self.src is not None and self.dst is not None
        spec = self._source_spec()
        return native_blockers(spec, self.dst.profile.apply(spec))

    async def migrate_native(self) -> None:
        """QEMU live migration between the two clouds: always refused here with the reasons (the
        profiles differ), before anything starts."""
        await self.validate()
        blockers = self.native_blockers()
        if blockers:
            raise NativeMigrationRefusedError(
                f"native live migration of vm {self.vm!r} from {self.source_cloud} (profile {self.src.profile.name}) "  # type: ignore[union-attr]
                f"to {self.dest_cloud} (profile {self.dst.profile.name}) refused before anything started: "  # type: ignore[union-attr]
                f"{', '.join(blockers)}", blockers)
        raise CrossCloudError("the profiles match: use hvsim.migration.migrate inside one cloud")

    async def prepare(self) -> None:
        self.fsm.require("prepare", X.NEW)
        if self.journal is not None and self.op_id is not None:
            await self.journal.claim(self.op_id)
        try:
            await self.validate()           # every refusal before anything is created
        except BaseException:
            await run_to_completion(self._release())
            raise
        assert self.src is not None and self.dst is not None
        try:
            await self._set(X.PREPARING, "creating the destination")
            spec = self._source_spec()
            size = spec.disks[0].size_mib
            await self.dst.create_instance(spec, data_size_mib=size)
            self._emit("phase", {"phase": "destination created", "cloud": self.dest_cloud})
            await self.dst.start(self.dest_vm)
            self.transfer = self._make_transfer()
            await self.transfer.prepare()
            self._emit("phase", {"phase": "agents installed"})
            if self.calibrate:
                self.criterion.costs = await self.measure_costs()
                self._emit("phase", {"phase": "cutover costs measured", **dataclasses.asdict(self.criterion.costs)})
        except BaseException as exc:
            await self._failed(exc)
            raise
        await self._set(X.REPLICATING, "agents installed")

    def _make_transfer(self) -> AgentTransfer:
        assert self.src is not None and self.dst is not None
        return AgentTransfer(Endpoint(self.src, self.vm, self.src.profile.guest_disk),
                             Endpoint(self.dst, self.dest_vm, self.dst.profile.guest_disk),
                             self.workdir, rate_bps=self.rate_bps, corrupt_seq=self.corrupt_seq, on_event=self._emit)

    async def measure_costs(self) -> CutoverCosts:
        """The fixed parts of a cutover's downtime, measured on these two guests before any cutover:
        the verification is one whole-disk hash of both disks (timed now, in parallel); quiesce,
        the final round's control and the start are each a few guest-agent round trips (measured)."""
        assert self.transfer is not None and self.src is not None and self.dst is not None
        rtts = []
        for prov, name in ((self.src, self.vm), (self.dst, self.dest_vm)) * 3:
            t = time.monotonic()
            await prov.exec(name, "true", timeout=30)
            rtts.append(time.monotonic() - t)
        rtt = sorted(rtts)[len(rtts) // 2]
        await self.transfer.hash_time()      # the first pass warms the caches as the replication will
        verify_s = await self.transfer.hash_time()
        # quiesce: stop the writer (kill + its STOP line) and sync+freeze: ~2 round trips;
        # final round: the control line and the FINAL line: ~2; start: pause the source, mount,
        # start the writer and its first acknowledgement: ~4
        return CutoverCosts(quiesce_s=2 * rtt, verify_s=verify_s, start_s=4 * rtt, overhead_s=2 * rtt)

    # -- replicating ------------------------------------------------------------------------------------
    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    async def round(self) -> Decision:
        """One replication round, then the criterion."""
        self.fsm.require("replicate", X.REPLICATING)
        assert self.transfer is not None
        try:
            await self.transfer.run_round()
        except BaseException as exc:   # a failure or a cancel: destination cleaned, the source left running
            await self._failed(exc)
            raise
        d = self.evaluate()
        await self._persist()
        return d

    def evaluate(self) -> Decision:
        assert self.transfer is not None
        st = self.transfer.stats
        d = self.criterion.evaluate(st.rounds, st.pending, self.elapsed_s(),
                                    achievable_s=self.decision.achievable_s if self.decision else None,
                                    bandwidth_hint=self.rate_bps or None)
        self.decision = d
        self.decisions.append(d)
        self._emit("decision", {"verdict": d.verdict.value, "predicted_s": d.predicted_s, "reason": d.reason,
                                **self.status()})
        return d

    async def replicate(self, *, until_ready: bool = True, rounds: int | None = None,
                        interval_s: float = 0.0) -> Decision:
        """Rounds until the criterion gives a verdict other than ``continue`` (``until_ready``), or
        ``rounds`` rounds (continuous replication: every ``interval_s``)."""
        n = 0
        while True:
            d = await self.round()
            n += 1
            if until_ready and d.verdict is not Verdict.CONTINUE:
                return d
            if rounds is not None and n >= rounds:
                return d
            if interval_s:
                await asyncio.sleep(interval_s)

    def status(self) -> dict[str, Any]:
        """Progress, lag and RPO (what MGN's console shows)."""
        st = self.transfer.stats if self.transfer else None
        done = st.rounds[-1].round if st and st.rounds else 0
        cut = st.round_cut_t.get(done) if st else None
        return {"state": self.state.value, "rounds": done,
                "sent_bytes": st.sent_total if st else 0,
                "lag_bytes": st.pending if st else None,
                "rpo_s": round(time.monotonic() - cut, 2) if cut else None,
                "link": st.stat.get("link") if st else None,
                "reconnects": int(st.stat.get("reconnects", 0)) if st and st.stat else 0,
                "resent": int(st.stat.get("resent", 0)) if st and st.stat else 0,
                "predicted_downtime_s": round(self.decision.predicted_s, 3) if self.decision and
                self.decision.predicted_s is not None else None,
                "acked_records": self.acks.count}

    async def set_rate(self, bps: float) -> None:
        if isinstance(bps, bool) or not isinstance(bps, (int, float)) or bps < 0:
            raise CrossCloudInputError(f"rate must be >= 0 bytes/s (0 = unlimited), got {bps!r}")
        assert self.transfer is not None
        self.rate_bps = float(bps)
        await self.transfer.set_rate(bps)
        await self._persist()

    async def test_cutover(self) -> dict[str, Any]:
        """A throw-away clone of the destination at a consistent point, booted on an isolated network;
        the application is checked there (every record acknowledged up to the point verifies, the
        writer starts and appends) and the clone is deleted. Replication goes on afterwards."""
        self.fsm.require("test cutover", X.REPLICATING)
        assert self.transfer is not None and self.dst is not None
        clone = f"{self.dest_vm}-test"[:32]
        t0 = time.monotonic()
        await self.app.freeze()             # a consistent point: one round with the file system frozen
        self._frozen = True
        try:
            point = self.acks.last_seq
            await self.transfer.run_round()
            await self.dst.clone_for_test(self.dest_vm, clone)
        finally:
            await self.app.thaw()
            self._frozen = False
        frozen_s = time.monotonic() - t0
        res: dict[str, Any] = {"clone": clone, "point_seq": point, "frozen_s": round(frozen_s, 3)}
        try:
            await self.dst.start(clone)
            t_app = time.monotonic()
            probe = WriterApp(self.dst, clone, self.dst.profile.guest_disk, AckLog(), rate_kib=self.app.rate_kib,
                              record=self.app.record)
            await probe.mount()
            res["records"] = await verify_records(self.dst, clone, self.acks, upto=point, record=self.app.record)
            await probe.start()
            await probe.proc.wait_line(lambda s: s.startswith("ACK"), 30)  # type: ignore[union-attr]
            res["start_s"] = round(time.monotonic() - t_app, 3)
            res["status"] = await probe.status()
            res["isolated"] = (await self.dst.exec(clone, "ping -c 1 -W 1 198.19.0.1 >/dev/null 2>&1; echo $?")
                               ).stdout.strip() != "0"
            await probe.stop()
            res["ok"] = True
        finally:
            await self.dst.delete(clone)
        self.test_results.append(res)
        self._emit("test-cutover", res)
        await self._persist()
        return res

    # -- cutover ---------------------------------------------------------------------------------------
    async def cutover(self, *, accept_downtime: bool = False) -> dict[str, Any]:
        """Cut over if the predicted downtime fits the budget; else CutoverRefusedError with the
        achievable downtime and the options, unless ``accept_downtime``."""
        self.fsm.require("cut over", X.REPLICATING)
        assert self.transfer is not None and self.src is not None and self.dst is not None
        d = self.evaluate()      # now: the delta may have grown since the last round (a test cutover)
        # a prediction within the budget may cut over even where the criterion would rather run one
        # more round first (an operator's explicit cutover)
        fits = d.predicted_s is not None and d.predicted_s <= self.criterion.budget_s
        if not fits and not accept_downtime:
            opts = d.options(self.criterion.budget_s)
            raise CutoverRefusedError(
                f"cutover of vm {self.vm!r} refused: predicted downtime "
                f"{d.predicted_s if d.predicted_s is not None else float('nan'):.1f} s exceeds the budget "
                f"{self.criterion.budget_s:g} s ({d.reason}). Options: " + "; ".join(opts),
                d.predicted_s or float("inf"), self.criterion.budget_s, d.achievable_s or float("inf"), opts)
        self.cutover_step = "quiescing"
        await self._set(X.CUTTING_OVER, "quiescing the source")
        predicted = d.predicted_s
        try:
            t_q = await self.app.quiesce()
            self._frozen = True
            last_src = self.acks.last_seq
            t_last = self.acks.last.get(self.app.origin, t_q)
            rec = await self.transfer.final()
            t_copied = time.monotonic()
            ver = await self.transfer.verify()
            t_verified = time.monotonic()
            self.cutover_step = "verified"      # the point of no return: a restart completes the cutover
            await self._persist()
            self._emit("phase", {"phase": "cutover verified"})
            await self.src.pause(self.vm)
            self.dest_app = WriterApp(self.dst, self.dest_vm, self.dst.profile.guest_disk, self.acks,
                                      rate_kib=self.app.rate_kib, record=self.app.record,
                                      service_ip=self.app.service_ip)
            await self.dest_app.start()
            assert self.dest_app.proc is not None
            await self.dest_app.proc.wait_line(lambda s: s.startswith("ACK"), 60)
            t_first = self.acks.first.get(self.dest_app.origin, time.monotonic())
            if self.app.service_ip:
                await self.dst.route_service(self.dest_vm)
        except BaseException as exc:
            await self._failed(exc)
            raise
        self.cutover_step = "done"
        self.fsm.set(X.CUT_OVER, f"running in {self.dest_cloud}")
        self.result = {"downtime_s": round(t_first - t_last, 3), "predicted_downtime_s":
                       round(predicted, 3) if predicted is not None else None,
                       "quiesce_s": round(t_q - t_last, 3), "final_round": rec.__dict__,
                       "final_copy_s": round(t_copied - t_q, 3), "verify_s": round(t_verified - t_copied, 3),
                       "start_s": round(t_first - t_verified, 3), "verify": ver, "last_source_seq": last_src,
                       "rounds": len(self.transfer.stats.rounds), "sent_bytes": self.transfer.stats.sent_total,
                       "accepted_over_budget": not fits, "total_s": round(self.elapsed_s(), 3)}
        await self._persist()
        self._emit("cutover", self.result)
        return self.result

    async def verify_destination(self) -> dict[str, Any]:
        """Every acknowledged record (at the source and at the destination) is on the destination's disk."""
        self.fsm.require("verify", X.CUT_OVER, X.FINALIZED)
        assert self.dst is not None
        return await verify_records(self.dst, self.dest_vm, self.acks, record=self.app.record)

    async def finalize(self) -> None:
        """The source is deleted and the agents removed: the migration cannot be reverted any more."""
        self.fsm.require("finalize", X.CUT_OVER)
        assert self.transfer is not None and self.src is not None
        await self.transfer.discard()
        await self.src.delete(self.vm)
        await self._set(X.FINALIZED, "source deleted")
        self._emit("phase", {"phase": "finalized"})
        await self._release()

    async def revert(self) -> None:
        """Back to the source as it was: the destination is deleted; after a cutover the source is
        resumed, thawed and its application restarted (records acknowledged by the destination after
        the cutover are discarded with it)."""
        self.fsm.require("revert", X.REPLICATING, X.CUT_OVER)
        assert self.src is not None and self.dst is not None
        was_cut = self.state is X.CUT_OVER
        if self.dest_app is not None:
            await self.dest_app.stop()
        if self.transfer is not None:
            await self.transfer.discard()
        await self.dst.delete(self.dest_vm)
        if was_cut:
            await self.src.resume(self.vm)
            await self.app.thaw()
            self._frozen = False
            await self.app.start()
            if self.app.service_ip:
                await self.src.route_service(self.vm)
        await self._set(X.REVERTED, "destination deleted")
        self._emit("phase", {"phase": "reverted"})
        await self._release()

    async def _fail(self, exc: BaseException) -> None:
        """Destination deleted, agents removed, the source running as before: nothing is migrated."""
        self.error = exc
        log.error("cross-cloud migration of %s failed: %s", self.vm, str(exc).splitlines()[0] if str(exc) else exc)
        if self.transfer is not None:
            await self.transfer.discard()
        if self.dst is not None:
            for name in (self.dest_vm, f"{self.dest_vm}-test"[:32]):
                try:
                    await self.dst.delete(name)
                except Exception as e:  # keep cleaning
                    log.error("deleting %s: %s", name, e)
        if self.src is not None:
            try:
                if await self.src.vm_state(self.vm) == "paused":
                    await self.src.resume(self.vm)
                if self._frozen and await self.src.vm_state(self.vm) == "running":
                    await self.app.thaw()
                    await self.app.start()
            except Exception as e:
                log.error("restoring the source: %s", e)
        if self.fsm.can(X.FAILED):
            self.fsm.set(X.FAILED, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            try:
                await self._persist()
                await self._release()
            except Exception as e:   # the journal may be what failed; the cleanup above is done
                log.error("recording the failure of %s: %s", self.vm, e)

    async def _release(self) -> None:
        if self.journal is not None and self.op_id is not None:
            await self.journal.release(self.op_id)

    def to_dict(self) -> dict[str, Any]:
        """The durable record of this operation (what the control plane stores)."""
        return {"vm": self.vm, "source_cloud": self.source_cloud, "dest_cloud": self.dest_cloud,
                "state": self.state.value, "budget_s": self.criterion.budget_s, "rate_bps": self.rate_bps,
                "status": self.status(), "result": self.result, "test_cutovers": self.test_results,
                "decisions": self._decision_log()[-20:],
                "transfer": self.transfer.to_dict() if self.transfer else None,
                "error": str(self.error) if self.error else None}

    def _decision_log(self) -> list[dict[str, Any]]:
        return self._old_decisions + [{"verdict": d.verdict.value, "predicted_s": d.predicted_s, "reason": d.reason}
                                      for d in self.decisions]

    # -- durable record, crash and resume ----------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """What :meth:`resume` needs (no credentials): :meth:`to_dict` plus the parameters."""
        c = self.criterion
        return {**self.to_dict(), "op_id": self.op_id, "dest_vm": self.dest_vm, "started_at": self.started_at,
                "elapsed_s": round(self.elapsed_s(), 3), "cutover_step": self.cutover_step,
                "frozen": self._frozen, "resumes": self.resumes,
                "params": {"deadline_s": c.deadline_s, "max_rounds": c.max_rounds,
                           "costs": dataclasses.asdict(c.costs), "calibrated": self.calibrate,
                           "rate_kib": self.app.rate_kib, "record": self.app.record,
                           "service_ip": self.app.service_ip}}

    async def abandon(self) -> None:
        """Leave everything as the orchestrator's crash would (for the tests of a manager restart):
        the agents' streams close (so the guests kill the agents), the destination's application
        stream too, the journal's lease is neither released nor revoked; nothing is cleaned up.
        Cancel any task running a step of this migration after calling this."""
        self._abandoned = True
        if self.transfer is not None:
            await self.transfer.abandon()
        if self.dest_app is not None and self.dest_app.proc is not None:
            await self.dest_app.proc.stop()
        if self.journal is not None:
            await self.journal.abandon()

    @classmethod
    async def resume(cls, journal: OperationJournal, op_id: str, registry: CloudRegistry, *,
                     source_credentials: str, dest_credentials: str, source_app: WriterApp, workdir: Path,
                     wait_s: float = 30.0, on_event: Callable[[str, dict[str, Any]], None] | None = None
                     ) -> CrossCloudMigration:
        """Take over operation ``op_id`` from its record after the orchestrator's restart (see the
        module docstring for what each state resumes to). ``source_app`` is the application's
        handle (it kept running). Waits up to ``wait_s`` for the dead holder's lease to expire."""
        rec = await journal.load(op_id)
        if rec is None:
            raise CrossCloudInputError(f"no cross-cloud operation {op_id!r} in the store")
        state = XState(rec["state"])
        prm = rec["params"]
        m = cls(registry, vm=rec["vm"], source_cloud=rec["source_cloud"], source_credentials=source_credentials,
                dest_cloud=rec["dest_cloud"], dest_credentials=dest_credentials, source_app=source_app,
                workdir=workdir, budget_s=rec["budget_s"], rate_bps=rec["rate_bps"], deadline_s=prm["deadline_s"],
                max_rounds=prm["max_rounds"], costs=CutoverCosts(**prm["costs"]), calibrate=False,
                on_event=on_event, journal=journal, op_id=op_id)
        m.dest_vm = rec.get("dest_vm", m.dest_vm)
        m.fsm = StateMachine(f"cross-cloud migration of vm {m.vm!r}", state, TRANSITIONS, error=CrossCloudStateError,
                             log=log)
        m.started_at = float(rec.get("started_at", time.time()))
        m._t0 = time.monotonic() - max(0.0, time.time() - m.started_at)
        m._old_decisions = list(rec.get("decisions", []))
        m.test_results = list(rec.get("test_cutovers", []))
        m.result = dict(rec.get("result") or {})
        m.resumes = list(rec.get("resumes", []))
        m.cutover_step = rec.get("cutover_step")
        if state in (X.FINALIZED, X.REVERTED, X.FAILED):
            return m                                    # nothing to drive: the record, read only
        t_claim = time.monotonic()
        await journal.claim(op_id, wait_s=wait_s)
        m._lease_wait_s = round(time.monotonic() - t_claim, 3)
        try:
            await m._take_over(state, rec)
        except BaseException:
            await run_to_completion(journal.release(op_id))
            raise
        return m

    async def _take_over(self, state: XState, rec: dict[str, Any]) -> None:
        t0 = time.monotonic()
        self.src = await self.registry.connect(self.source_cloud, self._creds[0])
        self.dst = await self.registry.connect(self.dest_cloud, self._creds[1])
        entry: dict[str, Any] = {"at": time.time(), "from_state": state.value, "step": self.cutover_step,
                                 "lease_wait_s": self._lease_wait_s,
                                 "previous_holder": rec.get("holder"), "previous_token": rec.get("token")}
        self.transfer = self._make_transfer()
        if rec.get("transfer"):
            self.transfer.restore(rec["transfer"])
        self.transfer.installed = [self.transfer.source, self.transfer.dest]
        if state in (X.NEW, X.PREPARING):
            # half built: remove it and prepare again from the start
            await self.transfer.discard()
            for name in (self.dest_vm, f"{self.dest_vm}-test"[:32]):
                await self.dst.delete(name)
            self.transfer = None
            self.fsm = StateMachine(f"cross-cloud migration of vm {self.vm!r}", X.NEW, TRANSITIONS,
                                    error=CrossCloudStateError, log=log)
            entry["action"] = "prepared again"
            self.resumes.append(entry)
            await self.prepare()
            return
        needs_source = state is X.REPLICATING or (state is X.CUTTING_OVER and self.cutover_step != "verified")
        if needs_source and await self.src.vm_state(self.vm) is None:
            # the source is gone before the destination held everything: nothing can be migrated
            # (the destination is cleaned, FAILED)
            exc = ReplicationError(f"resuming {self.op_id}: cloud {self.source_cloud!r} has no vm {self.vm!r} any more")
            await self._failed(exc)
            raise exc
        if state is X.CUTTING_OVER and self.cutover_step != "verified":
            await self._roll_back_cutover()
            entry["action"] = "cutover rolled back"
            self.fsm.set(X.REPLICATING, "cutover rolled back after a restart")
            state = X.REPLICATING
        if state is X.REPLICATING:
            if await self.dst.vm_state(self.dest_vm) != "running":
                exc = ReplicationError(f"resuming {self.op_id}: the destination vm {self.dest_vm!r} is not running")
                await self._failed(exc)
                raise exc
            try:
                await self.transfer.prepare(resume=True)
            except BaseException as exc:
                await self._failed(exc)
                raise
            entry.setdefault("action", "replication resumed")
            entry["resync"] = self.transfer.stats.resyncs[-1] if self.transfer.stats.resyncs else None
        elif state is X.CUTTING_OVER:                   # verified: complete it at the destination
            if await self.src.vm_state(self.vm) == "running":
                await self.src.pause(self.vm)
            await self._start_destination_app()
            self.cutover_step = "done"
            self.fsm.set(X.CUT_OVER, f"cutover completed after a restart; running in {self.dest_cloud}")
            self.result = {**self.result, "completed_after_restart": True}
            entry["action"] = "cutover completed"
        elif state is X.CUT_OVER:
            await self._start_destination_app()
            entry["action"] = "destination application checked"
        entry["secs"] = round(time.monotonic() - t0, 3)
        self.resumes.append(entry)
        await self._persist()
        self._emit("phase", {"phase": "resumed", **entry})

    async def _roll_back_cutover(self) -> None:
        """The cutover stopped before the disks were verified: the source goes on as it was."""
        assert self.src is not None
        if await self.src.vm_state(self.vm) == "paused":
            await self.src.resume(self.vm)
        await self.app.thaw()
        self._frozen = False
        running = await self.src.exec(self.vm, "pidof hvsim-writer >/dev/null && echo yes || echo no", timeout=30)
        if running.stdout.strip() != "yes":
            await self.app.start()

    async def _start_destination_app(self) -> None:
        """The destination's application (its stream died with the old orchestrator)."""
        assert self.dst is not None
        running = await self.dst.exec(self.dest_vm, "pidof hvsim-writer >/dev/null && echo yes || echo no", timeout=30)
        if running.stdout.strip() == "yes":
            await self.dst.exec(self.dest_vm, "kill -TERM $(pidof hvsim-writer) 2>/dev/null; sleep 0.5; true")
        self.dest_app = WriterApp(self.dst, self.dest_vm, self.dst.profile.guest_disk, self.acks,
                                  rate_kib=self.app.rate_kib, record=self.app.record, service_ip=self.app.service_ip)
        await self.dest_app.start()
        if self.app.service_ip:
            await self.dst.route_service(self.dest_vm)
