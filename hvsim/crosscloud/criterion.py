"""The switchover criterion: when may a replication cut over? Pure logic over the recorded rounds.

After every round the orchestrator asks :meth:`SwitchoverCriterion.evaluate` with the rounds so
far and the cut-over costs it measured. The predicted downtime of a cutover now is

    quiesce + (pending delta + what the writer adds while the delta is copied) / bandwidth + verify + start

with the bandwidth measured on the rounds (bytes over seconds, byte-weighted, large rounds only:
a tiny round is all latency) and the write rate measured as the delta that piled up during the
last round over its duration. The verdicts:

- ``cutover``: the prediction fits the downtime budget, and one more round would not cut it by
  ``min_gain`` (a fit is the floor, not the goal: while copying the delta still takes at least
  ``min_copy_s`` and another round, predicted from the write rate and the last round's overhead,
  would shrink the downtime by a quarter, the replication goes on, within the round and time
  limits; so a cutover lands near the fixed costs instead of just under the budget);
- ``continue``: it does not fit yet, but the deltas still shrink (or it fits and another round pays);
- ``not-converging``: the last ``patience`` rounds did not shrink the delta by ``min_shrink``: more
  rounds will not help (the writer dirties as fast as the link drains);
- ``deadline``: the replication ran out of rounds or time.

Neither of the last two cuts over on its own: the operator gets the achievable downtime (the
smallest prediction seen) and the options (throttle the writer, accept the longer window, keep
replicating), so a heavy writer never gets a blind cutover beyond its budget.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CrossCloudInputError


@dataclass(frozen=True)
class RoundRecord:
    """One completed replication round, as the source agent reported it."""
    round: int
    bytes: int            # payload bytes sent in the round
    secs: float           # from its cut to the destination's acknowledgement of its end
    dirty_after: int      # bytes written during the round (the next round's delta)

    def __post_init__(self) -> None:
        if self.round < 1 or self.bytes < 0 or self.dirty_after < 0 or not math.isfinite(self.secs) or self.secs < 0:
            raise CrossCloudInputError(f"bad round record {self}")


@dataclass(frozen=True)
class CutoverCosts:
    """Fixed parts of a cutover's downtime (seconds), measured before the cutover."""
    quiesce_s: float = 0.3      # stop the writer, sync, freeze the file system
    verify_s: float = 1.0       # hash both disks (in parallel)
    start_s: float = 1.0        # mount at the destination, start the application, first record
    overhead_s: float = 0.0     # the final round's control and end messages

    @property
    def fixed_s(self) -> float:
        return self.quiesce_s + self.verify_s + self.start_s + self.overhead_s


class Verdict(enum.Enum):
    CUTOVER = "cutover"
    CONTINUE = "continue"
    NOT_CONVERGING = "not-converging"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    predicted_s: float | None          # downtime of a cutover now
    achievable_s: float | None         # the smallest prediction so far
    bandwidth: float | None            # bytes/s
    write_rate: float | None           # bytes/s the guest dirties
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.verdict is Verdict.CUTOVER

    def options(self, budget_s: float) -> list[str]:
        if self.fits:
            return []
        now = self.predicted_s if self.predicted_s is not None else self.achievable_s or 0.0
        best = (f"; the smallest predicted so far was {self.achievable_s:.1f} s" if self.achievable_s is not None
                and self.achievable_s < now - 0.05 else "")
        # a cutover now takes the current prediction, not the best one seen (the delta has grown since)
        out = [f"accept a downtime of about {now:.1f} s now (budget {budget_s:g} s): cutover --accept-downtime"
               + best]
        if self.write_rate and self.bandwidth:
            room = max(0.0, budget_s - (self.inputs.get("fixed_s") or 0.0))
            target = max(0.0, self.bandwidth * room / max(1.0, self.inputs.get("delta_secs", 1.0)))
            out.append(f"throttle the writer below {self.bandwidth / 2**20:.2f} MiB/s (it writes "
                       f"{self.write_rate / 2**20:.2f} MiB/s) so the delta shrinks under "
                       f"{target / 2**20:.2f} MiB")
        out.append("keep replicating (continuous) and retry later")
        return out


@dataclass
class SwitchoverCriterion:
    budget_s: float
    costs: CutoverCosts = field(default_factory=CutoverCosts)
    max_rounds: int = 30
    deadline_s: float = 600.0
    patience: int = 3
    min_shrink: float = 0.1             # a round must cut the delta by 10 % to count as progress
    min_bw_bytes: int = 1 << 20         # rounds smaller than this do not measure the bandwidth
    min_gain: float = 0.25              # one more round must cut the predicted downtime by this share...
    min_copy_s: float = 0.5             # ...and copying the delta must take this long, to be worth it

    def __post_init__(self) -> None:
        for name, v, lo in (("budget_s", self.budget_s, 0.0), ("deadline_s", self.deadline_s, 0.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= lo:
                raise CrossCloudInputError(f"{name} must be a positive number of seconds, got {v!r}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise CrossCloudInputError(f"max_rounds must be an integer >= 1, got {self.max_rounds!r}")

    @staticmethod
    def bandwidth(rounds: Sequence[RoundRecord], min_bytes: int = 1 << 20,
                  hint: float | None = None) -> float | None:
        big = [r for r in rounds if r.bytes >= min_bytes and r.secs > 0]
        if big:
            recent = big[-3:]
            return sum(r.bytes for r in recent) / sum(r.secs for r in recent)
        return hint

    def predict(self, pending: int, bandwidth: float, write_rate: float) -> tuple[float, float]:
        """(downtime in s, seconds spent copying the delta) of a cutover with ``pending`` bytes dirty.
        The writer is stopped first, so only the flush at the freeze adds to the delta (one round
        trip of the write rate over the quiesce time)."""
        delta = pending + write_rate * self.costs.quiesce_s
        copy_s = delta / bandwidth if bandwidth > 0 else math.inf
        return self.costs.fixed_s + copy_s, copy_s

    def evaluate(self, rounds: Sequence[RoundRecord], pending: int, elapsed_s: float,
                 bandwidth_hint: float | None = None, achievable_s: float | None = None) -> Decision:
        """Decide after the last of ``rounds``; ``pending`` is the delta waiting now (bytes)."""
        if not rounds:
            return Decision(Verdict.CONTINUE, None, achievable_s, bandwidth_hint, None, "no round completed yet")
        bw = self.bandwidth(rounds, self.min_bw_bytes, bandwidth_hint)
        last = rounds[-1]
        wr = last.dirty_after / last.secs if last.secs > 0 else 0.0
        inputs: dict[str, Any] = {"pending": pending, "rounds": len(rounds), "fixed_s": round(self.costs.fixed_s, 3),
                                  "elapsed_s": round(elapsed_s, 2)}
        if not bw:
            return Decision(Verdict.CONTINUE, None, achievable_s, None, wr, "bandwidth not measured yet", inputs)
        predicted, copy_s = self.predict(pending, bw, wr)
        inputs["delta_secs"] = round(copy_s, 3)
        best = predicted if achievable_s is None else min(achievable_s, predicted)
        common = dict(predicted_s=predicted, achievable_s=best, bandwidth=bw, write_rate=wr, inputs=inputs)
        if predicted <= self.budget_s:
            after = self.one_more_round(rounds, pending, bw, wr)
            inputs["after_one_more_round_s"] = round(after, 3)
            room = len(rounds) < self.max_rounds and elapsed_s + copy_s < self.deadline_s
            if (room and copy_s >= self.min_copy_s and after <= predicted * (1 - self.min_gain)
                    and not self._stalled(rounds)):
                return Decision(Verdict.CONTINUE, reason=f"predicted downtime {predicted:.2f} s fits the budget "
                                f"{self.budget_s:g} s, but one more round should cut it to {after:.2f} s",
                                **common)  # type: ignore[arg-type]
            return Decision(Verdict.CUTOVER, reason=f"predicted downtime {predicted:.2f} s fits the budget "
                            f"{self.budget_s:g} s", **common)  # type: ignore[arg-type]
        if len(rounds) >= self.max_rounds or elapsed_s >= self.deadline_s:
            return Decision(Verdict.DEADLINE, reason=f"{len(rounds)} rounds in {elapsed_s:.0f} s and the predicted "
                            f"downtime is still {predicted:.2f} s > {self.budget_s:g} s", **common)  # type: ignore[arg-type]
        if self._stalled(rounds):
            return Decision(Verdict.NOT_CONVERGING, reason=f"the delta stopped shrinking over the last {self.patience} "
                            f"rounds (writes {wr / 2**20:.2f} MiB/s vs link {bw / 2**20:.2f} MiB/s): "
                            f"predicted downtime {predicted:.2f} s > {self.budget_s:g} s", **common)  # type: ignore[arg-type]
        return Decision(Verdict.CONTINUE, reason=f"predicted {predicted:.2f} s > {self.budget_s:g} s; the delta still "
                        "shrinks", **common)  # type: ignore[arg-type]

    def one_more_round(self, rounds: Sequence[RoundRecord], pending: int, bandwidth: float,
                       write_rate: float) -> float:
        """The predicted downtime after one more round: it copies ``pending`` in ``pending /
        bandwidth`` plus the last round's overhead (latency, messages), while the writer adds to
        the next delta."""
        last = rounds[-1]
        overhead = max(0.0, last.secs - last.bytes / bandwidth) if bandwidth > 0 else 0.0
        round_s = pending / bandwidth + overhead if bandwidth > 0 else math.inf
        return self.predict(int(write_rate * round_s), bandwidth, write_rate)[0]

    def _stalled(self, rounds: Sequence[RoundRecord]) -> bool:
        if len(rounds) < self.patience + 1:
            return False
        window = rounds[-(self.patience + 1):]
        best_before = window[0].dirty_after
        return all(r.dirty_after > best_before * (1 - self.min_shrink) for r in window[1:])
