"""The host's reading of the source agent's output lines (pure logic: no guest)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hvsim.crosscloud.criterion import CutoverCosts, SwitchoverCriterion
from hvsim.crosscloud.transfer import AgentTransfer, Endpoint

MiB = 1 << 20


def transfer() -> AgentTransfer:
    dummy: Any = object()          # the lines are parsed without reaching any cloud
    return AgentTransfer(Endpoint(dummy, "src", "/dev/vda"), Endpoint(dummy, "dst", "/dev/sda"), Path("/nonexistent"))


def test_pending_after_a_round_is_what_was_written_during_it_not_the_last_stat() -> None:
    t = transfer()
    # the last STAT before the round ended: 60 MiB of the round's blocks (its zero tail) not yet scanned
    t._src_line(f"STAT round=1 active=1 sent={90 * MiB} acked_seq=10 next_seq=11 pending={60 * MiB} "
                f"dirty={3 * MiB} rate=2097152 link=up reconnects=0 resent=0", 1.0)
    assert t.stats.pending == 63 * MiB
    t._src_line(f"ROUND 1 done bytes={96 * MiB} blocks=24576 secs=48.000 dirty={4 * MiB} final=0", 1.4)
    assert t.stats.pending == 4 * MiB
    # the one-pass prediction made right now starts from the 4 MiB written during the round
    c = SwitchoverCriterion(8.0, CutoverCosts(quiesce_s=0.1, verify_s=0.5, start_s=0.3, overhead_s=0.1))
    d = c.evaluate(t.stats.rounds, t.stats.pending, 50.0)
    assert d.predicted_s is not None and d.predicted_s < 1.0 + 4 * MiB / (2 * MiB) + 0.1
    # a later STAT (the writer goes on) replaces it again
    t._src_line(f"STAT round=1 active=0 sent={96 * MiB} acked_seq=20 next_seq=21 pending=0 dirty={5 * MiB} "
                "rate=2097152 link=up reconnects=0 resent=0", 2.0)
    assert t.stats.pending == 5 * MiB
