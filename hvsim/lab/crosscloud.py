"""Lab scenario: a guest moves from cloud A (pc, virtio-blk) to cloud B (q35, virtio-scsi) by
migration agents in the guests over a shaped WAN: native migration refused with the reasons,
replication with its lag and RPO, the orchestrator's crash and a new one resuming the operation
from its record in the store (only what differs is copied again), a test cutover on an isolated
clone, the cutover with its
downtime, every acknowledged record verified, and the benchmark's comparison of the three
configurations (bench/results/crosscloud.json, when it was run)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hvsim.control.store import SQLiteStore
from hvsim.core.cluster import REPO
from hvsim.crosscloud.errors import NativeMigrationRefusedError
from hvsim.crosscloud.journal import OperationJournal
from hvsim.crosscloud.orchestrator import CrossCloudMigration
from hvsim.crosscloud.scene import two_clouds


async def run(console: Console, out_dir: Path) -> None:
    summary: dict[str, Any] = {}
    db = out_dir / "crosscloud-ops.db"
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        f.unlink(missing_ok=True)
    stores: list[SQLiteStore] = []        # one per orchestrator's life, on the same file
    try:
        await _run(console, out_dir, summary, db, stores)
    finally:
        for st in stores:
            await st.close()


async def _store(db: Path, stores: list[SQLiteStore]) -> SQLiteStore:
    st = SQLiteStore(db)
    stores.append(st)
    await st.open()
    return st


async def _run(console: Console, out_dir: Path, summary: dict[str, Any], db: Path, stores: list[SQLiteStore]) -> None:
    store = await _store(db, stores)
    async with two_clouds(wan_mbit=40.0) as s:
        app = await s.source_vm("app1", disk_mib=64, prefill_mib=16, rate_kib=64)
        m = CrossCloudMigration(s.registry, vm="app1", source_cloud="cloud-a", source_credentials=s.a.credentials,
                                dest_cloud="cloud-b", dest_credentials=s.b.credentials, source_app=app,
                                workdir=s.workdir, budget_s=8.0, rate_bps=3 << 20,
                                journal=OperationJournal(store, "manager-1", ttl=3), op_id="lab-app1")
        try:
            await m.migrate_native()
        except NativeMigrationRefusedError as exc:
            console.print(f"[bold]native live migration A -> B refused:[/bold] {', '.join(exc.blockers)}")
            summary["native_refused"] = exc.blockers
        await m.prepare()
        t = Table(title="replication over the WAN (agents throttled to 3 MiB/s)")
        for col in ("round", "sent MiB", "lag KiB", "RPO s", "predicted downtime s", "verdict"):
            t.add_column(col)
        while True:
            d = await m.round()
            st = m.status()
            t.add_row(str(st["rounds"]), f"{st['sent_bytes'] / 2**20:.1f}", f"{(st['lag_bytes'] or 0) / 1024:.0f}",
                      str(st["rpo_s"]), f"{d.predicted_s:.2f}" if d.predicted_s else "-", d.verdict.value)
            if st["rounds"] == 1 and not m.resumes:
                # the orchestrator (the manager) crashes: its agents die with its streams, the
                # application goes on; a new one takes the operation over from its record
                await m.abandon()
                await store.close()
                t0 = time.monotonic()
                store = await _store(db, stores)
                m = await CrossCloudMigration.resume(OperationJournal(store, "manager-2", ttl=3), "lab-app1",
                                                     s.registry, source_credentials=s.a.credentials,
                                                     dest_credentials=s.b.credentials, source_app=app,
                                                     workdir=s.workdir, wait_s=20)
                entry = m.resumes[-1]
                rs = entry["resync"]
                t.add_row("restart", "-", f"{rs['differ_bytes'] / 1024:.0f}", "-", "-",
                          f"manager-2 took over in {time.monotonic() - t0:.1f} s ({entry['lease_wait_s']:.1f} s for "
                          f"manager-1's lease to run out, {entry['secs']:.1f} s to restart the agents and compare "
                          f"the disks); {rs['differ_chunks']} of {rs['chunks']} chunks differed: only those are "
                          "copied again")
                summary["restart"] = {"takeover_s": round(time.monotonic() - t0, 2), **entry}
                continue
            if d.verdict.value != "continue":
                break
        console.print(t)
        tc = await m.test_cutover()
        console.print(f"[bold]test cutover[/bold]: clone {tc['clone']} on an isolated network (reaches nobody: "
                      f"{tc['isolated']}), {tc['records']['acked']} records up to seq {tc['point_seq']} verified, "
                      f"the application started there in {tc['start_s']} s; clone discarded")
        res = await m.cutover(accept_downtime=not d.fits)
        assert m.dest_app is not None
        await m.dest_app.stop()
        v = await m.verify_destination()
        console.print(f"[bold]cutover[/bold]: downtime {res['downtime_s']} s (predicted {res['predicted_downtime_s']} "
                      f"s; quiesce {res['quiesce_s']}, final copy {res['final_copy_s']}, verify {res['verify_s']}, "
                      f"start {res['start_s']}), {res['rounds']} rounds, service address now at "
                      f"{s.wan.service_at}; {v['acked']} acknowledged records, missing {v['missing']}, "
                      f"changed {v['changed']}")
        await m.finalize()
        summary.update(test_cutover=tc, cutover=res, verify=v, status=m.status())
    bench = REPO / "bench" / "results" / "crosscloud.json"
    if bench.is_file():
        runs = json.loads(bench.read_text())["runs"]
        t = Table(title=f"cold vs one-pass vs iterative (from {bench.relative_to(REPO)}, medians)")
        for col in ("config", "writer MiB/s", "downtime s", "predicted s", "total s", "bytes/used", "rounds",
                    "verified"):
            t.add_column(col)
        for r in runs:
            t.add_row(r["config"], f"{r['write_rate_mib_s']:g}", f"{r['downtime_s']:.2f}",
                      f"{r['predicted_downtime_s']:.2f}" if r["predicted_downtime_s"] else "-", f"{r['total_s']:.1f}",
                      f"{r['bytes_ratio']:.2f}", str(r["rounds"]), str(r["verified"]))
        console.print(t)
    else:
        console.print("[dim]no bench/results/crosscloud.json yet: `python -m bench --quick --only crosscloud`[/dim]")
    (out_dir / "crosscloud.json").write_text(json.dumps(summary, indent=2, default=str))
