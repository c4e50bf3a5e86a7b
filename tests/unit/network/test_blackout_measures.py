"""The blackout measures of the ENI lab scene and benchmark (pure logic over udpprobe's raw file)."""
from __future__ import annotations

from pathlib import Path

from hvsim.lab.network import ConfigResult, MoveSample, pct, summarize, untimely_run_ms

MS = 1_000_000


def _raw(tmp_path: Path, rows: list[tuple[int, int]]) -> Path:
    """rows: (send ms, echo ms or 0) for seq 0, 1, ..."""
    p = tmp_path / "probe.txt"
    p.write_text("".join(f"{i} {s * MS} {e * MS if e else 0} {1 if e else 0}\n" for i, (s, e) in enumerate(rows)))
    return p


def test_the_longest_run_without_a_timely_echo(tmp_path: Path) -> None:
    rows = [(t, t + 1) for t in range(0, 10)]                 # answered in 1 ms
    rows += [(t, 0) for t in range(10, 30)]                   # 20 ms lost
    rows += [(t, 400) for t in range(30, 40)]                 # answered, but 360+ ms late: not timely
    rows += [(t, t + 2) for t in range(40, 50)]
    rows += [(t, 0) for t in range(50, 55)]                   # a shorter run later
    assert untimely_run_ms(_raw(tmp_path, rows), 1000) == 30.0    # 10..39 and one interval


def test_late_echoes_do_not_split_the_run_but_timely_ones_do(tmp_path: Path) -> None:
    rows = [(t, 0) for t in range(0, 10)] + [(10, 11)] + [(t, 0) for t in range(11, 15)]
    assert untimely_run_ms(_raw(tmp_path, rows), 1000) == 10.0
    assert untimely_run_ms(_raw(tmp_path, [(t, t + 1) for t in range(5)]), 1000) == 0.0


def test_nearest_rank_percentiles() -> None:
    assert pct([], 0.5) is None
    assert pct([3.0, 1.0], 0.5) == 1.0
    assert pct([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert pct([5.0], 0.99) == 5.0


def test_summary_of_a_configuration() -> None:
    r = ConfigResult("hvsim", samples=[
        MoveSample("hvsim", 0, "a", "b", net_blackout_ms=300, vcpu_blackout_ms=290, duplicates=0, tcp_survived=True,
                   lost_after_completion=0, lost=10, stop_to_resume_ms=250, loss_blackout_ms=310),
        MoveSample("hvsim", 1, "b", "a", net_blackout_ms=340, vcpu_blackout_ms=360, duplicates=1, tcp_survived=False,
                   lost_after_completion=2, lost=20, stop_to_resume_ms=260, loss_blackout_ms=330),
        MoveSample("hvsim", 2, "a", "b", error="boom")])          # no measurement: not counted
    s = summarize(r)
    assert s["n"] == 2
    assert s["net_minus_vcpu_ms"] == {"p50": -20.0, "p99": 10.0}
    assert s["net_minus_pause_ms"] == {"p50": 50.0, "p99": 80.0}
    assert s["duplicates"] == 1 and s["tcp_survived"] is False and s["lost_after_completion"] == 2
