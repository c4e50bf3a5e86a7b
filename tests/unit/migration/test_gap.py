"""The guest-observed gap split by QMP event timestamps (pure logic, synthetic beats and events)."""
from __future__ import annotations

import pytest

from hvsim.guest.heartbeat import Beat
from hvsim.migration.gap import EventRecorder, event_time, explain_gap, largest_gap


def beats(times: list[float]) -> list[Beat]:
    return [Beat(i, i * 10_000_000, t, 0) for i, t in enumerate(times)]


def recorder(side: str, events: list[tuple[float, str, dict]]) -> EventRecorder:
    r = EventRecorder(side)
    r.events = list(events)
    return r


def test_a_precopy_gap_is_split_into_parts_that_add_up() -> None:
    bs = beats([0.0, 0.01, 0.02, 0.03, 0.33, 0.34])          # 300 ms gap after 0.03
    src = recorder("source", [(0.035, "STOP", {}), (0.2, "MIGRATION", {"status": "completed"})])
    dst = recorder("destination", [(0.25, "RESUME", {})])
    g = explain_gap(bs, src, dst)
    assert g is not None and g.gap_ms == pytest.approx(300.0)
    assert g.before_stop_ms == pytest.approx(5.0)
    assert g.stop_and_copy_ms == pytest.approx(165.0)
    assert g.drain_and_load_ms == pytest.approx(50.0)
    assert g.resume_to_beat_ms == pytest.approx(80.0)
    assert g.unexplained_ms == pytest.approx(0.0, abs=0.2)


def test_a_postcopy_gap_ends_its_copy_at_the_destination_resume() -> None:
    bs = beats([0.0, 0.01, 0.9, 0.91])
    src = recorder("source", [(0.0, "MIGRATION", {"status": "postcopy-active"}), (0.012, "STOP", {})])
    dst = recorder("destination", [(0.1, "RESUME", {})])
    g = explain_gap(bs, src, dst, postcopy=True)
    assert g is not None and g.postcopy
    assert g.stop_and_copy_ms == pytest.approx(88.0) and g.drain_and_load_ms == 0.0
    assert g.resume_to_beat_ms == pytest.approx(800.0)      # the stall: faults over the link


def test_missing_events_leave_parts_unknown_not_wrong() -> None:
    bs = beats([0.0, 0.01, 0.5])
    g = explain_gap(bs, recorder("source", []), recorder("destination", []))
    assert g is not None and g.gap_ms == pytest.approx(490.0)
    assert g.stop_and_copy_ms is None and g.unexplained_ms is None
    assert explain_gap([], recorder("s", []), recorder("d", [])) is None
    assert largest_gap(beats([1.0])) is None


def test_qemu_timestamps() -> None:
    assert event_time({"timestamp": {"seconds": 10, "microseconds": 500000}}) == pytest.approx(10.5)
    assert event_time({"timestamp": {"seconds": "x"}}) is None
    assert event_time({}) is None


def test_a_larger_stall_during_precopy_is_reported_beside_the_switch_over_gap() -> None:
    bs = beats([0.0, 0.01, 0.51, 0.52, 0.53, 0.73, 0.74])        # 500 ms stall, then a 200 ms switch-over
    src = recorder("source", [(0.535, "STOP", {}), (0.6, "MIGRATION", {"status": "completed"})])
    dst = recorder("destination", [(0.65, "RESUME", {})])
    g = explain_gap(bs, src, dst)
    assert g is not None and g.gap_ms == pytest.approx(200.0) and g.before_stop_ms == pytest.approx(5.0)
    assert g.largest_gap_ms == pytest.approx(500.0) and g.largest_gap_at_s == pytest.approx(0.025, abs=0.01)
