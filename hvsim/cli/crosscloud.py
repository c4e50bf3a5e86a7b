"""`hvsim crosscloud migrate`: two clouds of different providers (A: pc/virtio-blk, B: q35/virtio-scsi)
on a shaped WAN, a guest in A whose writer acknowledges records, moved to B by migration agents
in the guests: replication with a progress bar (lag, RPO, predicted downtime), an optional test
cutover, the cutover if the predicted downtime fits the budget (else the achievable downtime and
the options, exit 1, unless --accept-downtime), every acknowledged record verified, then finalize
(or --revert). ``--json``: one JSON object per event on stdout, the operation's record last."""
from __future__ import annotations

import asyncio
import json
import math
import sys
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..crosscloud.errors import CrossCloudInputError, CutoverRefusedError
from ..crosscloud.orchestrator import CrossCloudMigration
from ..crosscloud.scene import two_clouds
from .common import cli_command

xcloud_app = typer.Typer(no_args_is_help=True, help="cross-cloud migration by agents in the guests (issue 15)")
MIB = 2**20


def _check(name: str, v: float, lo: float, hi: float) -> None:
    if not math.isfinite(v) or not lo <= v <= hi:
        raise CrossCloudInputError(f"--{name} must be in [{lo:g}, {hi:g}], got {v!r}")


async def _run(o: dict[str, Any]) -> dict[str, Any]:
    console = Console(stderr=True)
    jsonl = o["json"]

    def emit(kind: str, data: dict[str, Any]) -> None:
        if jsonl:
            print(json.dumps({"event": kind, **data}, default=str), flush=True)

    async with two_clouds(wan_mbit=o["wan_mbit"]) as s:
        app = await s.source_vm("app1", disk_mib=o["disk_mib"], prefill_mib=o["prefill_mib"], rate_kib=o["writer_kib"])
        m = CrossCloudMigration(s.registry, vm="app1", source_cloud="cloud-a", source_credentials=s.a.credentials,
                                dest_cloud="cloud-b", dest_credentials=s.b.credentials, source_app=app,
                                workdir=s.workdir, budget_s=o["budget"], rate_bps=o["rate"] * MIB, on_event=emit)
        cols = [TextColumn("[bold]app1 A->B"), BarColumn(bar_width=20),
                TextColumn("{task.fields[state]} round {task.fields[round]}: sent {task.fields[sent]} MiB, lag "
                           "{task.fields[lag]} KiB, RPO {task.fields[rpo]} s, downtime~{task.fields[pred]} s"),
                TimeElapsedColumn()]
        with Progress(*cols, console=console, disable=jsonl) as bar:
            task = bar.add_task("", total=1.0, state="preparing", round=0, sent="0", lag="-", rpo="-", pred="-")
            await m.prepare()
            disk = o["disk_mib"] * MIB
            while True:
                d = await m.round()
                st = m.status()
                bar.update(task, completed=min(0.95, st["sent_bytes"] / disk), state=st["state"], round=st["rounds"],
                           sent=f"{st['sent_bytes'] / MIB:.1f}", lag=f"{(st['lag_bytes'] or 0) / 1024:.0f}",
                           rpo=st["rpo_s"], pred=f"{d.predicted_s:.2f}" if d.predicted_s else "-")
                if d.verdict.value != "continue":
                    break
            if o["test_cutover"]:
                tc = await m.test_cutover()
                console.print(f"test cutover: {tc['records']['acked']} records verified on an isolated clone, "
                              f"application started in {tc['start_s']} s, clone discarded")
            try:
                res = await m.cutover(accept_downtime=o["accept_downtime"])
            except CutoverRefusedError as exc:
                console.print(f"[red]cutover refused[/red]: {exc}")
                await m.revert()
                emit("refused", {"predicted_s": exc.predicted_s, "achievable_s": exc.achievable_s,
                                 "options": exc.options})
                raise
            bar.update(task, completed=1.0, state=m.state.value)
        assert m.dest_app is not None
        await m.dest_app.stop()
        v = await m.verify_destination()
        console.print(f"cutover: downtime {res['downtime_s']} s (predicted {res['predicted_downtime_s']} s), "
                      f"{v['acked']} acknowledged records verified at B (missing {v['missing']})")
        await (m.revert() if o["revert"] else m.finalize())
        return m.to_dict() | {"verify": v}


@xcloud_app.command("migrate")
@cli_command
def migrate_cmd(
        budget: float = typer.Option(8.0, help="downtime budget, seconds"),
        rate: float = typer.Option(3.0, help="replication throttle, MiB/s (0 = unlimited)"),
        wan_mbit: float = typer.Option(40.0, help="WAN bandwidth between the clouds, Mbit/s"),
        writer_kib: float = typer.Option(64.0, help="the guest application's write rate, KiB/s"),
        disk_mib: int = typer.Option(64, help="data disk size, MiB"),
        prefill_mib: int = typer.Option(16, help="data on the disk before the migration, MiB"),
        test_cutover: bool = typer.Option(True, help="run a test cutover on an isolated clone first"),
        accept_downtime: bool = typer.Option(False, help="cut over even if the predicted downtime exceeds the budget"),
        revert: bool = typer.Option(False, help="revert after the cutover instead of finalizing"),
        json_out: bool = typer.Option(False, "--json", help="JSON events on stdout, the operation's record last"),
) -> None:
    """Move a guest from cloud A to cloud B by agents in the guests (a self-contained two-cloud lab)."""
    _check("budget", budget, 0.1, 3600)
    _check("rate", rate, 0, 10_000)
    _check("wan-mbit", wan_mbit, 1, 10_000)
    _check("writer-kib", writer_kib, 0, 65_536)
    _check("disk-mib", disk_mib, 16, 4096)
    _check("prefill-mib", prefill_mib, 0, disk_mib - 12)
    rec = asyncio.run(_run(dict(budget=budget, rate=rate, wan_mbit=wan_mbit, writer_kib=writer_kib, disk_mib=disk_mib,
                                prefill_mib=prefill_mib, test_cutover=test_cutover, accept_downtime=accept_downtime,
                                revert=revert, json=json_out)))
    if json_out:
        print(json.dumps({"event": "result", **rec}, default=str))
    else:
        print(json.dumps(rec.get("result", {}), default=str), file=sys.stdout)


def register(app: Any) -> None:
    app.add_typer(xcloud_app, name="crosscloud")
