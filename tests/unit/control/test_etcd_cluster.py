"""The etcd cluster runner and etcd's fault tolerance with our client: one member killed (the
leader), writes and reads keep working and no acknowledged write is lost; the member restarted
catches up; teardown leaves nothing; leftovers of a dead run are reclaimed."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from hvsim.control.errors import EtcdClusterError, StoreUnavailableError
from hvsim.control.etcd_cluster import MEMBERS_FILE, OWNER_FILE, EtcdCluster, reclaim_stale_runs
from hvsim.control.store import Compare, EtcdStore, Put

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_leader_killed_writes_continue_nothing_lost_then_catch_up(etcd_cluster: EtcdCluster) -> None:
    acked: list[str] = []
    unknown: list[str] = []
    stop = asyncio.Event()

    async def writer(store: EtcdStore, tag: str) -> None:
        i = 0
        while not stop.is_set():
            key = f"/fault/{tag}/{i:05d}"
            try:
                res = await store.txn([Compare.absent(key)], [Put(key, b"v")])
                assert res.succeeded
                acked.append(key)
            except StoreUnavailableError as e:
                assert e.ambiguous, e          # only an in-flight write to the killed member
                unknown.append(key)
            i += 1

    async with EtcdStore(etcd_cluster.client_urls, retry_for=20) as store:
        leader = await etcd_cluster.leader()
        # each writer starts on a different member, so one of them talks to the leader
        stores = []
        for n in range(3):
            s = EtcdStore(etcd_cluster.client_urls[n:] + etcd_cluster.client_urls[:n], retry_for=20)
            await s.open()
            stores.append(s)
        tasks = [asyncio.create_task(writer(s, f"w{n}")) for n, s in enumerate(stores)]
        try:
            while len(acked) < 60:
                await asyncio.sleep(0.05)
            await etcd_cluster.kill(leader)
            at_kill = len(acked)
            while len(acked) < at_kill + 150:       # writes go on with 2 of 3 members
                await asyncio.sleep(0.05)
                assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            new_leader = await etcd_cluster.leader()
            assert new_leader != leader
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            for s in stores:
                await s.close()
        # reads keep working too, and every acknowledged write is there
        keys: set[str] = set()
        for tag in ("w0", "w1", "w2"):
            after = None
            while True:
                page = await store.list(f"/fault/{tag}/", limit=500, after=after)
                keys |= {kv.key for kv in page.items}
                if page.after is None:
                    break
                after = page.after
        assert set(acked) <= keys
        # "outcome unknown" only around the kill: a write in flight to the killed leader, or one a
        # follower had forwarded to it ("leader changed"): at most two per writer
        per_writer = {w: sum(k.split("/")[2] == w for k in unknown) for w in ("w0", "w1", "w2")}
        assert all(n <= 2 for n in per_writer.values()), unknown
        for k in unknown:                     # reading back tells the outcome
            await store.get(k)
        assert sum(s.stats.failovers for s in stores) >= 1

        # the killed member restarted: it catches up and serves everything itself
        await etcd_cluster.restart(leader)
        target = await store.revision()
        for _ in range(200):
            if await etcd_cluster.member_revision(leader) >= target:
                break
            await asyncio.sleep(0.1)
        assert await etcd_cluster.member_revision(leader) >= target
        own = EtcdStore([etcd_cluster.members[leader].client_url], serializable=True)
        async with own:
            mine = 0
            for tag in ("w0", "w1", "w2"):
                mine += await own.count(f"/fault/{tag}/")
        assert mine == len(keys)


async def test_stop_leaves_nothing() -> None:
    cl = EtcdCluster(members=3)
    await cl.start()
    pids = list(cl.pids().values())
    run_dir = cl.run_dir
    assert run_dir is not None and (run_dir.stat().st_mode & 0o777) == 0o700
    for m in cl.members.values():
        assert (m.data_dir.stat().st_mode & 0o777) == 0o700
    await cl.stop()
    await cl.stop()   # idempotent
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not run_dir.exists()


async def test_failed_start_cleans_up_and_says_why() -> None:
    cl = EtcdCluster(members=3, etcd="false")       # exits at once
    with pytest.raises(EtcdClusterError, match="exited"):
        await cl.start()
    assert cl.run_dir is not None and not cl.run_dir.exists()
    assert cl.pids() == {}


async def test_leftovers_of_a_dead_run_are_reclaimed() -> None:
    # a real earlier run, SIGKILLed: its members die with it (PDEATHSIG), its run dir stays
    code = ("import asyncio, sys\nfrom hvsim.control.etcd_cluster import EtcdCluster\n"
            "async def main():\n    c = EtcdCluster()\n    await c.start()\n"
            "    print(c.run_dir, flush=True)\n    await asyncio.sleep(600)\nasyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_dir = Path(proc.stdout.readline().strip())
        assert (run_dir / OWNER_FILE).exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    members = json.loads((run_dir / MEMBERS_FILE).read_text())
    # a member that somehow survived its owner (simulated by a process of ours recorded as one)
    survivor = subprocess.Popen(["sleep", "600"])
    start = Path(f"/proc/{survivor.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    members["m9"] = {"pid": survivor.pid, "start": start}
    (run_dir / MEMBERS_FILE).write_text(json.dumps(members))
    # a live run's dir is never touched
    live = Path(tempfile.mkdtemp(prefix="hvsim-etcd-"))
    me = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (live / OWNER_FILE).write_text(f"{os.getpid()} {me}\n")
    try:
        removed = reclaim_stale_runs()
        assert run_dir in removed and not run_dir.exists()
        assert live.exists() and live not in removed
        assert survivor.wait(timeout=10) == -signal.SIGKILL
        for rec in members.values():
            assert not psutil.pid_exists(rec["pid"]) or psutil.Process(rec["pid"]).status() == psutil.STATUS_ZOMBIE
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()
        (live / OWNER_FILE).unlink()
        live.rmdir()
