"""The migration plan, predicted before the first byte (pure logic, no QEMU).

From a short measurement of the guest and the link (:class:`Measurement`: what must be sent at
least once, the dirty rate, the writable working set if the sample saw it, the link goodput, the
guest's vCPU load, and the learnt fixed cost and postcopy stall of guests this size), predict for
every strategy the total time, the bytes sent and the guest-observed downtime, then choose by the
caller's :class:`Contract`.

Model (one writer of a working set W at D bytes/s, link goodput B, device state S, fixed cost F):

- bulk pass: the touched memory T crosses once, t1 = T / B; meanwhile the guest dirties
  d1 = min(W, D t1) bytes (distinct pages: a rewritten page is resent once).
- resend pass k sends d_{k-1} in d_{k-1} / B while the guest dirties d_k = min(W, D d_{k-1} / B): the
  dirty set shrinks by rho = D / B per pass. During a pass the pending bytes go down at B - D.
- the switch-over happens as soon as the pending bytes fit the budget with the policy's margin:
  pending <= P* = (budget - F - S/B) B / margin; the guest is then stopped for
  (fill x pending + S) / B + F, where fill (learnt, starts at 1) is what QEMU really sent while
  stopped against the model's pending (QEMU's last sync finds fewer pages than the estimate). A
  precopy whose dirty set stops shrinking switches at the smallest pending it reaches (``accept``).
- auto-converge at throttle p (QEMU starts throttling at the second bitmap sync, so from pass 3):
  the guest's vCPU runs 1 - p of the time; a CPU-bound guest (measured vCPU load u >= 0.8) then
  dirties D min(1, (1 - p) / u); a guest whose vCPU is mostly idle is not slowed (its writer needs
  little CPU and catches up between the sleeps). The throttle puts the vCPU to sleep for
  10 ms x p / (1 - p) at a time, and a heartbeat sees that as a gap: it counts against the
  downtime budget like the stop itself.
- postcopy after pass N: the switch-over at the end of pass N costs the learnt stall (the guest
  faults the pages it needs first over the link, measured on earlier postcopy migrations of guests
  this size); the rest (the dirty set then) arrives in the background in rest / B, the
  degradation window the caller must allow (``postcopy_window_s``).

Choice: the strategies the contract allows that meet both budgets; plain precopy first when it
does (throttling and postcopy degrade the guest), else the fastest. When none does the plan says
so before anything starts (``feasible`` False): ``if_infeasible="refuse"`` refuses the migration,
``"best-effort"`` takes the allowed strategy with the smallest downtime that finishes within the
time budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import MigrationInputError

MIB = 2**20
THROTTLE_TIMESLICE_MS = 10.0            # QEMU's CPU_THROTTLE_TIMESLICE_NS
THROTTLE_LEVELS = (20, 40, 60, 80, 90, 95, 96, 98, 99)
BEAT_PERIOD_MS = 10.0                   # the heartbeat's period: the gap's granularity
MAX_PASSES = 60
INFEASIBLE_ACTIONS = ("best-effort", "refuse")


@dataclass(frozen=True)
class Contract:
    """What the caller asks of a migration. ``downtime_budget_ms``: the largest guest-observed
    stop (also a throttled vCPU's sleep and the postcopy stall); ``time_budget_s``: from ``migrate``
    until the destination runs (None: the migration's timeout); ``postcopy_window_s``: how long the
    guest may run on the destination while its remaining pages arrive (0: no postcopy);
    ``if_infeasible``: what to do when the plan cannot meet the budgets."""
    downtime_budget_ms: float = 300.0
    time_budget_s: float | None = None
    postcopy_window_s: float = 0.0
    if_infeasible: str = "best-effort"

    def __post_init__(self) -> None:
        for name in ("downtime_budget_ms", "postcopy_window_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MigrationInputError(f"contract: {name} must be a number >= 0, got {v!r}")
        if self.downtime_budget_ms < 100:
            raise MigrationInputError(
                f"contract: downtime_budget_ms must be >= 100 ms (QEMU 7.2 under TCG needs a downtime limit of at "
                f"least 100 ms), got {self.downtime_budget_ms!r}")
        t = self.time_budget_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                              or t <= 0):
            raise MigrationInputError(f"contract: time_budget_s must be a positive number or None, got {t!r}")
        if self.if_infeasible not in INFEASIBLE_ACTIONS:
            raise MigrationInputError(f"contract: if_infeasible must be one of {INFEASIBLE_ACTIONS}, "
                                      f"got {self.if_infeasible!r}")

    @property
    def postcopy_allowed(self) -> bool:
        return self.postcopy_window_s > 0

    def with_time_budget(self, timeout: float) -> Contract:
        """The contract with its time budget bounded by the migration's timeout."""
        t = timeout if self.time_budget_s is None else min(self.time_budget_s, timeout)
        return replace(self, time_budget_s=t)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    """The short measurement a plan is predicted from (bytes, bytes/s, ms)."""
    guest_ram_bytes: int
    touched_bytes: int                 # what must cross at least once (non-zero memory)
    dirty_rate: float                  # distinct bytes dirtied per second (short window)
    bandwidth: float                   # link goodput
    wss_bytes: int | None = None       # the writable working set, if the sample saw its end
    vcpu_load: float | None = None     # share of the vCPU the guest used while sampled (0..1)
    fixed_cost_ms: float = 60.0        # learnt: guest-observed downtime not explained by bytes / B
    postcopy_stall_ms: float = 800.0   # learnt: the guest's stall after a postcopy switch-over
    device_state_bytes: int = 256 * 1024
    margin: float = 1.2                # the policy's margin on the pending bytes at the switch-over
    switch_fill: float = 1.0           # learnt: bytes QEMU sent while stopped / the predicted pending
    sources: dict[str, str] = field(default_factory=dict)   # how each value was obtained

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or not math.isfinite(self.bandwidth):
            raise MigrationInputError(f"measurement: bandwidth must be > 0, got {self.bandwidth!r}")
        if self.dirty_rate < 0 or not math.isfinite(self.dirty_rate):
            raise MigrationInputError(f"measurement: dirty_rate must be >= 0, got {self.dirty_rate!r}")
        if self.guest_ram_bytes <= 0 or self.touched_bytes < 0:
            raise MigrationInputError("measurement: guest_ram_bytes must be > 0 and touched_bytes >= 0")
        if self.margin < 1:
            raise MigrationInputError("measurement: margin must be >= 1")

    @property
    def rho(self) -> float:
        return self.dirty_rate / self.bandwidth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """One strategy's predicted outcome. ``total_s`` from ``migrate`` to the destination running
    (postcopy: until the last page arrived); ``downtime_ms``: the largest guest-observed gap."""
    strategy: str                      # precopy | auto-converge | postcopy
    label: str
    total_s: float
    bytes: int
    downtime_ms: float
    passes: int
    switch_s: float                    # when the source stops
    throttle_pct: int = 0
    postcopy_after_pass: int | None = None
    degradation_s: float = 0.0         # postcopy: the guest runs while pages still arrive
    converges: bool = True             # precopy reached the budget (False: accepts its smallest downtime)
    stop_pending_bytes: int = 0        # precopy: the pending bytes the model stops with
    allowed: bool = True
    meets_downtime: bool = False
    meets_time: bool = False
    note: str = ""

    @property
    def meets(self) -> bool:
        return self.allowed and self.meets_downtime and self.meets_time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    contract: Contract
    measurement: Measurement
    predictions: tuple[Prediction, ...]
    chosen: Prediction
    feasible: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"contract": self.contract.to_dict(), "measurement": self.measurement.to_dict(),
                "predictions": [p.to_dict() for p in self.predictions], "chosen": self.chosen.to_dict(),
                "feasible": self.feasible, "reason": self.reason}

    def rows(self) -> list[list[str]]:
        """The table: strategy, total s, MiB sent, downtime ms, passes, degradation, verdict."""
        out = []
        for p in self.predictions:
            verdict = ("chosen" if p is self.chosen else "") + (
                "" if p.allowed else " not allowed") + ("" if p.meets_downtime else " over downtime budget") + (
                "" if p.meets_time else " over time budget")
            out.append([p.label, f"{p.total_s:.1f}", f"{p.bytes / MIB:.0f}", f"{p.downtime_ms:.0f}", str(p.passes),
                        f"{p.degradation_s:.1f}" if p.strategy == "postcopy" else "-", verdict.strip() or "ok"])
        return out


# -- the model ---------------------------------------------------------------------------------------
def _dirty(m: Measurement, seconds: float, rate: float) -> float:
    """Distinct bytes dirtied in ``seconds``: min(W, D t); an unknown working set is taken as at
    most the guest's touched memory."""
    d = rate * seconds
    cap = float(m.wss_bytes) if m.wss_bytes is not None else float(max(m.touched_bytes, 1))
    return min(d, cap, float(m.guest_ram_bytes))


def switch_pending(m: Measurement, budget_ms: float) -> float:
    """P*: the pending bytes at which the policy switches over (0 if nothing fits the budget)."""
    room_s = (budget_ms - m.fixed_cost_ms) / 1000.0 - m.device_state_bytes / m.bandwidth
    return max(0.0, room_s * m.bandwidth / m.margin)


def stop_downtime_ms(m: Measurement, pending: float) -> float:
    return (pending + m.device_state_bytes) / m.bandwidth * 1000.0 + m.fixed_cost_ms


def throttle_gap_ms(pct: int) -> float:
    """The longest heartbeat gap a throttled vCPU shows: QEMU sleeps it 10 ms x p / (1 - p) at a time."""
    if pct <= 0:
        return 0.0
    p = pct / 100.0
    return THROTTLE_TIMESLICE_MS * p / (1 - p) + BEAT_PERIOD_MS


CPU_BOUND_LOAD = 0.8       # a guest busier than this is taken to dirty memory in proportion to its CPU


def throttled_rate(m: Measurement, pct: int) -> float:
    """The dirty rate under a throttle of ``pct`` %. Only a CPU-bound guest (vCPU load >= 0.8, or
    unknown) slows down in proportion to the CPU it is left; a guest whose vCPU is mostly idle
    writes at a pace that needs little CPU and catches up between the throttle's sleeps (measured:
    a writer at 1.2 x the link with 11 % vCPU load kept its rate under a 95 % throttle)."""
    if pct <= 0:
        return m.dirty_rate
    u = 1.0 if m.vcpu_load is None else m.vcpu_load
    if u < CPU_BOUND_LOAD:
        return m.dirty_rate
    return m.dirty_rate * min(1.0, (1 - pct / 100.0) / min(1.0, u))


@dataclass
class _Run:
    t: float
    sent: float
    passes: int
    d: float          # dirty set at the start of the current pass


def _precopy(m: Measurement, budget_ms: float, throttle_pct: int = 0) -> tuple[_Run, float, bool]:
    """Simulate precopy with the policy's deliberate switch-over. Returns the run at the stop, the
    pending bytes then, and whether it reached the budget (False: stopped at its smallest pending)."""
    B = m.bandwidth
    target = switch_pending(m, budget_ms)
    t1 = m.touched_bytes / B
    run = _Run(t=t1, sent=float(m.touched_bytes), passes=1, d=_dirty(m, t1, m.dirty_rate))
    best: tuple[_Run, float] | None = None
    while True:
        # pass ``passes + 1`` starts with the dirty set ``d``
        rate = throttled_rate(m, throttle_pct) if run.passes + 1 >= 3 else m.dirty_rate
        if run.d <= target:
            run.passes += 1
            return run, run.d, True
        tp = run.d / B
        d_next = _dirty(m, tp, rate)
        if d_next < target and B > rate:
            # the pending bytes go down at B - D within this pass and cross P* before its end
            tau = (run.d - target) / (B - rate)
            run.passes += 1
            run.t += tau
            run.sent += tau * B
            return run, target, True
        if best is None or run.d < best[1]:
            best = (_Run(run.t, run.sent, run.passes + 1, run.d), run.d)
        stuck = d_next >= run.d * 0.98 and (not throttle_pct or run.passes + 1 >= 3)
        if run.passes + 1 >= MAX_PASSES or stuck:
            # the dirty set stops shrinking: accept the smallest pending seen (at a pass boundary)
            b, pend = best
            return b, pend, False
        run.passes += 1
        run.t += tp
        run.sent += run.d
        run.d = d_next


def predict_precopy(m: Measurement, c: Contract, throttle_pct: int = 0) -> Prediction:
    run, pending, ok = _precopy(m, c.downtime_budget_ms, throttle_pct)
    # what QEMU really sends while stopped, against the model's pending, as earlier switch-overs showed
    stop = stop_downtime_ms(m, pending * (m.switch_fill if ok else 1.0))
    dt = max(stop, throttle_gap_ms(throttle_pct)) if throttle_pct and run.passes >= 3 else stop
    total = run.t + stop / 1000.0
    strategy = "auto-converge" if throttle_pct else "precopy"
    label = f"precopy + auto-converge {throttle_pct}%" if throttle_pct else "precopy"
    note = "" if ok else f"dirty set stops shrinking (rho {m.rho:.2f}): accepts its smallest downtime"
    if throttle_pct:
        note = (note + "; " if note else "") + f"vCPU throttled {throttle_pct}% from pass 3 " \
            f"(sleeps {throttle_gap_ms(throttle_pct) - BEAT_PERIOD_MS:.0f} ms at a time)"
    return Prediction(strategy=strategy, label=label, total_s=total, bytes=int(run.sent + pending), downtime_ms=dt,
                      passes=run.passes, switch_s=run.t, throttle_pct=throttle_pct, converges=ok, note=note,
                      stop_pending_bytes=int(pending))


def predict_postcopy(m: Measurement, after_pass: int) -> Prediction:
    """Switch to postcopy when pass ``after_pass`` ends (1: right after the bulk pass)."""
    B = m.bandwidth
    t = m.touched_bytes / B
    sent = float(m.touched_bytes)
    d = _dirty(m, t, m.dirty_rate)
    for _ in range(after_pass - 1):
        tp = d / B
        sent += d
        t += tp
        d = _dirty(m, tp, m.dirty_rate)
    rest = d + m.device_state_bytes
    stall = m.postcopy_stall_ms
    return Prediction(strategy="postcopy", label=f"postcopy after pass {after_pass}", total_s=t + rest / B,
                      bytes=int(sent + rest), downtime_ms=stall, passes=after_pass, switch_s=t,
                      postcopy_after_pass=after_pass, degradation_s=rest / B,
                      note=f"stall learnt from earlier postcopy migrations ({stall:.0f} ms)")


def _judge(p: Prediction, c: Contract) -> Prediction:
    allowed = p.strategy != "postcopy" or (c.postcopy_allowed and p.degradation_s <= c.postcopy_window_s)
    tb = c.time_budget_s
    return replace(p, allowed=allowed, meets_downtime=p.downtime_ms <= c.downtime_budget_ms,
                   meets_time=tb is None or p.total_s <= tb)


def plan(m: Measurement, c: Contract, throttle_levels: tuple[int, ...] = THROTTLE_LEVELS,
         postcopy_passes: tuple[int, ...] = (1, 2)) -> Plan:
    """Predict every strategy and choose by the contract (see the module docstring)."""
    preds = [_judge(predict_precopy(m, c), c)]
    # auto-converge: if plain precopy meets the budgets, the fastest throttle (when it saves time);
    # else the weakest throttle that meets them, else the one with the smallest downtime
    ac = [_judge(predict_precopy(m, c, p), c) for p in throttle_levels]
    if ac:
        meets = [p for p in ac if p.meets]
        pick: Prediction | None
        if preds[0].meets:
            fastest = min(meets, key=lambda p: p.total_s) if meets else None
            pick = fastest if fastest is not None and fastest.total_s < 0.95 * preds[0].total_s else None
        elif meets:
            pick = min(meets, key=lambda p: p.throttle_pct)
        else:
            pick = min(ac, key=lambda p: (p.downtime_ms, p.total_s))
        if pick is not None:
            preds.append(pick)
    preds += [_judge(predict_postcopy(m, n), c) for n in postcopy_passes]
    ok = [p for p in preds if p.meets]
    if ok:
        pre = [p for p in ok if p.strategy == "precopy"]
        chosen = pre[0] if pre else min(ok, key=lambda p: (p.total_s, p.bytes))
        why = (f"{chosen.label} meets the {c.downtime_budget_ms:.0f} ms downtime budget"
               + (f" within the {c.time_budget_s:g} s time budget" if c.time_budget_s else "")
               + ("" if chosen.strategy == "precopy" else ": plain precopy cannot"))
        return Plan(c, m, tuple(preds), chosen, True, why)
    allowed = [p for p in preds if p.allowed]
    in_time = [p for p in allowed if p.meets_time] or allowed
    chosen = min(in_time, key=lambda p: (p.downtime_ms, p.total_s))
    best_dt = min(preds, key=lambda p: p.downtime_ms)
    why = (f"no allowed strategy meets the {c.downtime_budget_ms:.0f} ms downtime budget"
           + (f" within {c.time_budget_s:g} s" if c.time_budget_s else "")
           + f" (rho {m.rho:.2f}); best effort: {chosen.label}, {chosen.downtime_ms:.0f} ms predicted")
    if best_dt is not chosen and not best_dt.allowed:
        why += f" ({best_dt.label} would give {best_dt.downtime_ms:.0f} ms: allow a postcopy window of " \
               f"{best_dt.degradation_s:.1f} s)"
    return Plan(c, m, tuple(preds), chosen, False, why)


def plan_error(plan_: Plan, total_s: float | None, downtime_ms: float | None) -> dict[str, float | None]:
    """(predicted - actual) / actual for the chosen strategy's total time and downtime."""
    def err(pred: float, actual: float | None) -> float | None:
        return None if not actual else round((pred - actual) / actual, 3)
    return {"total_s": err(plan_.chosen.total_s, total_s), "downtime_ms": err(plan_.chosen.downtime_ms, downtime_ms)}


def timeline(m: Measurement, passes: int, throttle_pct: int = 0) -> list[tuple[int, float, float]]:
    """The predicted precopy without a switch-over: (pass, start s, dirty bytes at its start) for the
    first ``passes`` passes (what a recorded sequence of bitmap syncs can be checked against)."""
    B = m.bandwidth
    t = m.touched_bytes / B
    d = _dirty(m, t, m.dirty_rate)
    out = [(2, t, d)]
    for k in range(3, passes + 1):
        rate = throttled_rate(m, throttle_pct) if k >= 3 else m.dirty_rate
        tp = d / B
        t += tp
        d = _dirty(m, tp, rate)
        out.append((k, t, d))
    return out
