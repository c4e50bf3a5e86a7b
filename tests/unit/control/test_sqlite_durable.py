"""SQLite backend: a write is acknowledged only once committed. A writer process is SIGKILLed in
the middle of a stream of writes; every write it acknowledged is in the file afterwards."""
from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

from hvbase.aio import wait_for
from hvsim.control.errors import LeaseExpiredError
from hvsim.control.store import SQLiteStore

WRITER = r"""
import asyncio, sys
from hvsim.control.store import SQLiteStore, Put
async def main():
    async with SQLiteStore(sys.argv[1]) as s:
        i = 0
        while True:
            await s.txn((), [Put(f"/acked/{i:06d}", b"v" * 200), Put(f"/pair/{i:06d}", b"p")])
            print(i, flush=True)
            i += 1
asyncio.run(main())
"""


async def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(db),
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    acked = -1
    try:
        while acked < 200:
            line = await wait_for(proc.stdout.readline(), 30)
            assert line, "writer died"
            acked = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    for line in rest.split():
        acked = max(acked, int(line))
    async with SQLiteStore(db) as s:
        n = await s.count("/acked/")
        assert n >= acked + 1
        assert await s.count("/pair/") == n          # each transaction whole, or not at all
        page = await s.list("/acked/", limit=1000)
        assert [kv.key for kv in page.items[: acked + 1]] == [f"/acked/{i:06d}" for i in range(acked + 1)]
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


async def test_group_commit_isolates_a_failing_write(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "s.db") as s:
        dead = await s.grant(30)
        await s.revoke(dead)
        results = await asyncio.gather(*(s.put(f"/g/{i:02d}", b"v", lease=dead if i == 7 else None)
                                         for i in range(50)), return_exceptions=True)
        assert isinstance(results[7], LeaseExpiredError)
        revs = [r for i, r in enumerate(results) if i != 7]
        assert all(isinstance(r, int) for r in revs) and len(set(revs)) == 49   # one revision each
        assert await s.count("/g/") == 49 and await s.get("/g/07") is None
        assert s.stats.by_op["batches"] < 50                                   # they were grouped
