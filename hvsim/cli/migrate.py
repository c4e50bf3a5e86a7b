"""`hvsim vm migrate`: two hosts on a shaped link, a busy guest, a live migration with a progress bar."""
from __future__ import annotations

import asyncio
import math
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..migration import (Contract, Migration, MigrationError, MigrationInputError, MigrationResult, Plan,
                         plan_migration, policy_names, start_migration)
from .common import cli_command

MIB = 2**20
MAX_RATE = 100_000.0    # MiB/s the guest's `dirty` is asked to write (0 = flat out)


def _fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.0f}{unit}"


async def follow(m: Migration, console: Console) -> MigrationResult | None:
    """Show a live progress bar of ``m`` until it ends; return its result (None if it failed:
    the error is printed, ``m.result`` still holds the measurements)."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
            TextColumn("{task.fields[state]} pass {task.fields[passes]}: sent {task.fields[sent]} left "
                       "{task.fields[left]} MiB, dirty {task.fields[dirty]} link {task.fields[bw]} MiB/s, "
                       "downtime~{task.fields[pred]}"),
            TimeElapsedColumn()]
    with Progress(*cols, console=console, transient=False) as bar:
        task = bar.add_task(f"{m.vm_name}->{m.dest.name}", total=1.0,
                            state="preparing", passes=0, sent="0", left="-", dirty="-", bw="-", pred="-")
        async for p in m:
            done = 1.0 - (p.remaining / p.total if p.total and p.passes <= 1 else 0.0)
            if p.passes > 1:
                done = max(0.9, 1.0 - p.remaining / max(p.total, 1))
            bar.update(task, completed=min(done, 0.99), state=p.state.value, passes=p.passes,
                       sent=f"{p.transferred / MIB:.0f}", left=f"{p.remaining / MIB:.0f}" if p.passes else "-",
                       dirty=f"{p.dirty_rate / MIB:.1f}", bw=f"{(p.bandwidth or 0) / MIB:.1f}",
                       pred=_fmt(p.predicted_downtime_ms, " ms"))
        try:
            res = await m.wait()
        except MigrationError as exc:
            bar.update(task, state=m.state.value)
            console.print(f"[red]{type(exc).__name__}[/red]: {exc}")
            return None
        bar.update(task, completed=1.0, state=m.state.value)
        return res


def result_table(results: list[MigrationResult], title: str = "migration") -> Table:
    t = Table(title=title)
    for col in ("policy", "outcome", "total s", "dt qemu ms", "dt guest ms", "predicted ms",
                "sent MiB", "touched MiB", "passes", "postcopy"):
        t.add_column(col, justify="right" if col not in ("policy", "outcome") else "left")
    for r in results:
        t.add_row(r.policy, r.outcome, f"{r.total_s or 0:.1f}", _fmt(r.downtime_ms_qemu),
                  _fmt(r.downtime_ms_guest), _fmt(r.predicted_downtime_ms), f"{r.bytes / MIB:.1f}",
                  f"{r.touched_bytes / MIB:.1f}", str(r.passes), "yes" if r.postcopy else "")
    return t


def plan_table(plan: Plan | dict[str, Any], title: str | None = None) -> Table:
    """The plan: every strategy's predicted total time, bytes, downtime; the chosen one marked."""
    d = plan.to_dict() if isinstance(plan, Plan) else plan
    c, meas = d["contract"], d["measurement"]
    wss = "-" if meas["wss_bytes"] is None else f"{meas['wss_bytes'] / MIB:.0f}"
    t = Table(title=title or (
        f"plan: budget {c['downtime_budget_ms']:.0f} ms downtime, {c['time_budget_s'] or '-'} s, postcopy window "
        f"{c['postcopy_window_s']:g} s | measured: {meas['touched_bytes'] / MIB:.0f} MiB to send, dirty "
        f"{meas['dirty_rate'] / MIB:.1f} MiB/s, link {meas['bandwidth'] / MIB:.1f} MiB/s, working set {wss} MiB"),
        caption=d["reason"])
    for col in ("strategy", "total s", "sent MiB", "downtime ms", "passes", "postcopy s", "verdict"):
        t.add_column(col, justify="left" if col in ("strategy", "verdict") else "right")
    chosen = d["chosen"]
    for p in d["predictions"]:
        is_chosen = p["label"] == chosen["label"]
        verdict = ["chosen"] if is_chosen else []
        if not p["allowed"]:
            verdict.append("not allowed")
        if not p["meets_downtime"]:
            verdict.append("over downtime budget")
        if not p["meets_time"]:
            verdict.append("over time budget")
        t.add_row(p["label"], f"{p['total_s']:.1f}", f"{p['bytes'] / MIB:.0f}", f"{p['downtime_ms']:.0f}",
                  str(p["passes"]), f"{p['degradation_s']:.1f}" if p["strategy"] == "postcopy" else "-",
                  ", ".join(verdict) or "ok", style="bold" if is_chosen else None)
    return t


def decisions_table(r: MigrationResult) -> Table:
    t = Table(title=f"decisions of {r.policy}")
    for col in ("t s", "pass", "action", "value", "reason"):
        t.add_column(col)
    for d in r.decisions:
        t.add_row(f"{d.t:.2f}", str(d.passes), d.action, "" if d.value is None else f"{d.value:g}", d.reason)
    return t


@cli_command
def migrate_cmd(policy: str = typer.Option("hvsim-predictive", "--policy", help="one of: " +
                                           ", ".join(policy_names())),
                memory_mib: int = typer.Option(256, "--memory", help="guest memory in MiB"),
                wss_mib: int = typer.Option(64, "--wss", help="working set the guest keeps dirty (MiB)"),
                rate: float = typer.Option(8.0, "--rate", help="dirty rate in MiB/s (0 = flat out)"),
                link_mbit: float = typer.Option(200.0, "--link-mbit", help="underlay link bandwidth"),
                timeout: float = typer.Option(120.0, "--timeout", help="migration timeout in seconds"),
                plan_only: bool = typer.Option(False, "--plan", help="measure and print the plan; migrate nothing"),
                budget_ms: float = typer.Option(300.0, "--budget-ms", help="guest-observed downtime budget"),
                postcopy_window: float = typer.Option(
                    0.0, "--postcopy-window", help="seconds the guest may run on the destination while its pages "
                    "still arrive (0: no postcopy)")) -> None:
    """Boot a guest running `dirty` on host-a, live-migrate it to host-b over a shaped link
    (with --plan: print what each strategy would give, migrate nothing).

    Exits 0 when the migration completed (or the plan was printed), 1 when it (or anything before it)
    failed, 2 for a bad option."""
    from ..core.cluster import Cluster
    from ..core.model import HostSpec, VMSpec
    from ..network import Underlay
    from .core import check_images, check_timeout, reclaim_leftovers

    # every option is checked before anything is created
    if policy not in policy_names():
        raise typer.BadParameter(f"unknown policy {policy!r}; one of: {', '.join(policy_names())}",
                                 param_hint="--policy")
    try:
        Contract(downtime_budget_ms=budget_ms, postcopy_window_s=postcopy_window)
    except MigrationInputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--budget-ms/--postcopy-window") from exc
    spec = VMSpec("guest", memory_mib=memory_mib)
    if wss_mib <= 0 or wss_mib >= memory_mib:
        raise typer.BadParameter(f"must be within 1..{memory_mib - 1} MiB, got {wss_mib}", param_hint="--wss")
    if not math.isfinite(rate) or not 0 <= rate <= MAX_RATE:
        raise typer.BadParameter(f"must be a finite number of MiB/s in 0..{MAX_RATE:g}, got {rate!r}",
                                 param_hint="--rate")
    check_timeout(timeout)
    underlay = Underlay(["host-a", "host-b"], mbit=link_mbit)     # TopologyError (exit 2) for a bad --link-mbit
    check_images()
    console = Console()

    async def go() -> int:
        await reclaim_leftovers(Console(stderr=True))
        async with underlay as ul:
            async with Cluster("cli-mig") as cl:
                for h in ("host-a", "host-b"):
                    cl.add_host(HostSpec(h, vcpus=2, memory_mib=max(1024, memory_mib + 256)),
                                network=ul.host_network(h))
                vm = await cl.define_vm(spec, "host-a")
                console.print(f"booting a {memory_mib} MiB guest on host-a (link {link_mbit:g} Mbit/s) ...")
                await vm.start(wait_ready=True, ready_timeout=120)
                await vm.exec(f"dirty {wss_mib} {rate:g} >/dev/null 2>&1 &", check=True)
                await asyncio.sleep(min(20.0, wss_mib / rate + 1) if rate > 0 else 2.0)
                contract = {"downtime_budget_ms": budget_ms, "postcopy_window_s": postcopy_window,
                            "time_budget_s": timeout}
                if plan_only:
                    console.print(plan_table(await plan_migration(vm, "host-b", **contract)))
                    console.print("--plan: nothing was migrated")
                    console.print(f"vm {vm.name}: {vm.state.value} on {vm.host.name}")
                    return 0
                m = start_migration(vm, "host-b", policy=policy, timeout=timeout, **contract)
                res = await follow(m, console)
                r = res or m.result
                if r is not None:
                    if r.plan:
                        console.print(plan_table(r.plan))
                    console.print(result_table([r]))
                    console.print(decisions_table(r))
                console.print(f"vm {vm.name}: {vm.state.value} on {vm.host.name}")
                return 0 if res is not None else 1
    raise typer.Exit(asyncio.run(go()))


def register(app: Any) -> None:
    from .core import vm_app
    vm_app.command("migrate")(migrate_cmd)
