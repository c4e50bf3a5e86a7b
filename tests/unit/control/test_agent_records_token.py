"""The host agent's newest fencing token on disk, written from its RPC's thread pool: calls that
race never fail on each other's temporary file and never move the token back (concurrent first
calls to a fresh agent used to answer 500: one renamed the other's temporary file away)."""
from __future__ import annotations

import random
import threading
from pathlib import Path

from hvsim.control.agent_records import AgentRecords


def test_concurrent_token_writes_keep_the_largest(tmp_path: Path) -> None:
    rec = AgentRecords(tmp_path / "state")
    tokens = list(range(1, 401))
    random.Random(7).shuffle(tokens)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(mine: list[int]) -> None:
        start.wait()
        for t in mine:
            try:
                rec.set_token(t)
            except BaseException as e:   # noqa: BLE001 (collected, asserted below)
                errors.append(e)
    threads = [threading.Thread(target=writer, args=(tokens[i::8],)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert rec.token == 400
    assert AgentRecords(tmp_path / "state").token == 400          # what a restarted agent reads
    assert not list((tmp_path / "state").glob(".*.tmp"))
    rec.set_token(5)                                                # an older token never moves it back
    assert AgentRecords(tmp_path / "state").token == 400
