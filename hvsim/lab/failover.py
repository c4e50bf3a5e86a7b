"""Lab scenario: failover of the management process across datacenters (issue 14). dc1's manager
(on the dc1 host dc1-m) is SIGKILLed while a client in the client site writes through the API; the
failover controller in the witness site sees the lease go, initiates a host in dc2 from the
reserved capacity, starts the manager on it, checks it serves reads and writes, and the running
guests are re-adopted without being stopped. A timeline table and a PNG timeline plot
(``failover-timeline.png``), then the figures of bench/results/failover.json when it was run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hvsim.core.cluster import REPO, images_dir
from hvsim.failover.faults import run_fault
from hvsim.failover.scene import failover_scene

STEPS = ["detected", "host-initiating", "host-initiated", "manager-leading", "manager-serving", "host-registered",
         "guests-readopted", "protected-restarted", "done"]


def plot(run: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tl = run["timeline"]
    events = [("fault", 0.0)] + [(k, tl[k]) for k in STEPS if k in tl]
    if run.get("rto_s") is not None:
        events.append(("client: write+read answered", run["rto_s"]))
    events.sort(key=lambda e: e[1])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, (name, t) in enumerate(events):
        ax.plot([t], [i], "o", color="tab:red" if name == "fault" else "tab:blue")
        ax.annotate(f"{name}  {t:.2f} s", (t, i), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.axvspan(0, tl.get("detected", 0), color="tab:red", alpha=0.1, label="lease running out (detection)")
    if "manager-serving" in tl:
        ax.axvspan(tl.get("detected", 0), tl["manager-serving"], color="tab:orange", alpha=0.1,
                   label="host initiated + manager started")
    ax.set_yticks([])
    ax.set_xlabel("seconds after the fault (dc1's manager SIGKILLed)")
    ax.set_title(f"failover dc1 -> dc2: RTO {run.get('rto_s')} s (client), detection {run['detect_s']} s")
    ax.set_xlim(-0.2, max(t for _, t in events) * 1.35 + 0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(console: Console, out_dir: Path) -> None:
    async with failover_scene(images=images_dir()) as sc:
        await sc.define_start("app", "dc1-h1", protected=True, priority=10)
        await sc.define_start("db", "dc2-h1")
        leader = await sc.leader()
        console.print(f"[bold]dc1's manager[/bold] {leader['manager'] if leader else '?'} at "
                      f"{leader['address'] if leader else '?'} (token {leader['token'] if leader else '?'}); "
                      f"guests app on dc1-h1, db on dc2-h1; reserved in dc2: dc2-r1, dc2-r2 (rule dc2-failover)")
        r = await run_fault(sc, "sigkill", 1.0)
    t = Table(title="failover timeline (seconds after the fault)")
    t.add_column("event")
    t.add_column("t s", justify="right")
    t.add_row("fault: manager on dc1-m SIGKILLed", "0.00")
    for k in STEPS:
        if k in r["timeline"]:
            t.add_row(k, f"{r['timeline'][k]:.2f}")
    t.add_row("client: first write + read by the new manager", f"{r['rto_s']:.2f}" if r["rto_s"] else "-")
    console.print(t)
    console.print(f"token {r['old_token']} -> {r['new_token']}; guests re-adopted {r['readopted']}; "
                  f"{r['acked']} writes acknowledged, {r['acked_lost']} lost; stale commands accepted "
                  f"{r['stale_accepted']}; guests stopped {r['guests_stopped']}")
    png = out_dir / "failover-timeline.png"
    plot(r, png)
    console.print(f"timeline plot: {png}")
    (out_dir / "failover.json").write_text(json.dumps(r, indent=1, default=str))
    bench = REPO / "bench" / "results" / "failover.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        console.print(f"[dim]benchmark ({bench.name}): RTO p50 {b.get('rto_p50_s')} s, p99 {b.get('rto_p99_s')} s "
                      f"over {len(b.get('runs', []))} runs[/dim]")
