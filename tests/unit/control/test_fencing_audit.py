"""The fencing audit on hand-made histories and journals (pure logic), including histories it must
flag, and the agent's history file (append-only, survives a reopen, a torn last line)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hvsim.control.errors import ControlInputError
from hvsim.control.fencing import HISTORY_FILE, HistoryEntry, HistoryLog, StoreTerm, audit, read_history


def e(seq: int, wall: float, token: int, accepted: bool = True, verb: str = "start") -> HistoryEntry:
    return HistoryEntry(seq=seq, wall=wall, verb=verb, vm="vm1", token=token, accepted=accepted,
                        reason="" if accepted else "stale")


def term(token: int, since: float, last_rev: int, last_wall: float, writes: int = 3) -> StoreTerm:
    return StoreTerm(token=token, holder=f"m{token}", since=since, last_write_revision=last_rev, writes=writes,
                     last_wall=last_wall)


def test_a_clean_handover_passes() -> None:
    # token 10 acts until t=105, its lease expires; token 20 is acquired at t=110 (revision 20)
    hist = {"h1": [e(1, 100, 10), e(2, 105, 10), e(3, 111, 20), e(4, 112, 10, accepted=False)],
            "h2": [e(1, 101, 10), e(2, 113, 20)]}
    terms = [term(10, 90, 18, 104), term(20, 110, 30, 115)]
    a = audit(hist, terms)
    assert a.ok, a.summary()
    assert (a.commands, a.accepted, a.refused, a.stale_accepted) == (6, 5, 1, 0)
    assert a.tokens == [10, 20] and a.overlaps == [] and a.store_writes == 6


def test_an_agent_accepting_an_older_token_after_a_newer_is_stale() -> None:
    # clock-free rule: h1 accepted 20, then 10 (whatever the wall clocks say)
    hist = {"h1": [e(1, 100, 20), e(2, 99, 10)]}
    a = audit(hist)
    assert a.stale_accepted == 1 and not a.ok
    assert "seq 2" in a.stale[0] and "after it had accepted token 20" in a.stale[0]


def test_a_command_accepted_after_the_newer_token_was_acquired_is_stale() -> None:
    # h2 never heard of token 20 but accepted token 10 after 20 was acquired (t=110): the old
    # manager acted late. The store journal says when 20 came into force.
    hist = {"h1": [e(1, 111, 20)], "h2": [e(1, 100, 10), e(2, 112, 10)]}
    a = audit(hist, [term(10, 90, 18, 104), term(20, 110, 30, 115)])
    assert a.stale_accepted == 1
    assert "host h2 seq 2" in a.stale[0] and "token 20" in a.stale[0]
    assert [(o.older, o.newer) for o in a.overlaps] == [(10, 20)]
    # without the journal, token 20's first accepted command (t=111) is when it came into force
    b = audit(hist)
    assert b.stale_accepted == 1 and not b.ok


def test_a_store_write_after_the_newer_acquisition_is_stale() -> None:
    # token 10's last write has revision 25, after token 20 was acquired at revision 20
    a = audit({}, [term(10, 90, 25, 104), term(20, 110, 30, 115)])
    assert a.stale_accepted == 1 and "revision 25" in a.stale[0]
    # the same journal with the write before the acquisition is clean
    assert audit({}, [term(10, 90, 19, 104), term(20, 110, 30, 115)]).ok


def test_overlapping_activity_windows_are_listed() -> None:
    # token 10's last store write (wall 112) is after token 20 came into force (110), though
    # revisions say nothing (say a clock jump): the overlap is listed
    a = audit({}, [term(10, 90, 19, 112), term(20, 110, 30, 115)])
    assert [(o.older, o.newer, o.start, o.end) for o in a.overlaps] == [(10, 20, 110, 112)]
    assert not a.ok


def test_refused_commands_are_never_stale_and_dicts_are_accepted() -> None:
    hist = {"h1": [e(1, 111, 20).to_dict(), e(2, 120, 10, accepted=False).to_dict()]}
    a = audit(hist, [term(10, 90, 18, 104), term(20, 110, 30, 115)])
    assert a.ok and a.refused == 1


def test_malformed_entries_are_refused() -> None:
    with pytest.raises(ControlInputError):
        HistoryEntry.parse({"seq": -1, "wall": 1.0, "verb": "x", "accepted": True})
    with pytest.raises(ControlInputError):
        HistoryEntry.parse({"seq": 1, "wall": 1.0, "verb": "x", "accepted": "yes"})
    with pytest.raises(ControlInputError):
        HistoryEntry.parse({"seq": 1, "wall": 1.0, "verb": "x", "token": True, "accepted": True})


def test_history_log_appends_survives_reopen_and_skips_a_torn_line(tmp_path: Path) -> None:
    h = HistoryLog(tmp_path)
    h.append("start", "vm1", 5, True)
    h.append("stop", "vm1", 3, False, "stale fencing token 3")
    h.close()
    assert stat.S_IMODE(os.stat(tmp_path / HISTORY_FILE).st_mode) == 0o600
    with open(tmp_path / HISTORY_FILE, "ab") as f:                   # the agent died mid-append
        f.write(b'{"seq":3,"wall":1.0,"ve')
    h = HistoryLog(tmp_path)                                          # a restarted agent
    assert h.seq == 2
    h.append("destroy", "vm1", 7, True)
    h.close()
    got = read_history(tmp_path)
    assert [(x.seq, x.verb, x.token, x.accepted) for x in got] == [(1, "start", 5, True), (2, "stop", 3, False),
                                                                    (3, "destroy", 7, True)]
    assert [x.seq for x in read_history(tmp_path, since=2)] == [3]
    # a malformed line in the middle is an error, not skipped
    lines = (tmp_path / HISTORY_FILE).read_bytes().split(b"\n")
    lines.insert(1, json.dumps({"seq": "x"}).encode())
    (tmp_path / HISTORY_FILE).write_bytes(b"\n".join(lines))
    with pytest.raises(ControlInputError):
        read_history(tmp_path)
