"""`hvsim --manager ADDR ...`: the CLI against a running manager (through :class:`ManagerClient`).

    hvsim --manager unix:/run/hvsim/manager.sock --token-file /run/hvsim/token host list
    hvsim --manager ADDR vm define web --memory 256 [--host h1] [--group g]
    hvsim --manager ADDR vm start|stop|destroy|undefine web
    hvsim --manager ADDR vm migrate web --to h2 [--policy stepwise] [--no-wait]   # a progress bar
    hvsim --manager ADDR vm exec web 'uname -a'          # exits with the guest command's exit code
    hvsim --manager ADDR op list | op show OP-ID
    hvsim --manager ADDR reservation show [--datacenter dc2] [--management-vcpus 2 --management-memory-mib 2048]
    hvsim --manager ADDR reservation apply ...            # add the plan's reserve rules
    hvsim --manager ADDR ha show                          # host verdicts, power evidence, HA events
    ... --json                                            # on any list/show/define: JSON instead of a table

``ADDR`` is ``unix:/PATH`` or ``http(s)://HOST:PORT`` (also ``$HVSIM_MANAGER``); the bearer token comes
from ``--token-file`` (``$HVSIM_TOKEN_FILE``) or ``$HVSIM_TOKEN``. Errors follow
:mod:`hvsim.cli.common`: one line; exit 2 for bad input (the manager's 4xx input answers included,
naming the field), 1 for a refused or failed operation or an unreachable manager.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar

import pydantic
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..control.client import ManagerClient
from ..control.ops import OperationRecord, OpState
from ..control.schema import ExecRequest, HostCreate, MigrateRequest, VMDefine
from ..control.state import as_dict, input_error
from .common import EXIT_FAILED, _click_globals, cli_command, fail
from .core import check_timeout

T = TypeVar("T")
MIB = 2**20
MAX_TOKEN_BYTES = 4096

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="hvsim against a manager: hosts, VMs and operations through its API")
host_app = typer.Typer(no_args_is_help=True, help="Hosts the manager knows.")
vm_app = typer.Typer(no_args_is_help=True, help="VMs the manager knows: define, start, stop, migrate, exec.")
op_app = typer.Typer(no_args_is_help=True, help="Operations the manager recorded.")
app.add_typer(host_app, name="host")
app.add_typer(vm_app, name="vm")
app.add_typer(op_app, name="op")
reservation_app = typer.Typer(no_args_is_help=True, help="Reserved failover capacity: sized, applied.")
ha_app = typer.Typer(no_args_is_help=True, help="HA: lost hosts and the restarts of their protected VMs.")
app.add_typer(reservation_app, name="reservation")
app.add_typer(ha_app, name="ha")

JSON_OPT = typer.Option(False, "--json", help="print JSON instead of a table")


@app.callback()
def _root(ctx: typer.Context,
          manager: Optional[str] = typer.Option(None, "--manager", envvar="HVSIM_MANAGER", metavar="ADDR",
                                                help="the manager: unix:/PATH or http(s)://HOST:PORT"),
          token_file: Optional[Path] = typer.Option(None, "--token-file", envvar="HVSIM_TOKEN_FILE",
                                                    help="file holding the manager's bearer token"),
          debug: bool = typer.Option(False, "--debug", help="print tracebacks and full error details")) -> None:
    ctx.obj = {"debug": debug, "manager": manager, "token_file": token_file}


def _connection() -> tuple[str, str]:
    """(address, token) from the root options; a missing or unreadable one is bad input (exit 2)."""
    ctx = _click_globals.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    obj = root.obj if root is not None and isinstance(root.obj, dict) else {}
    addr = obj.get("manager")
    if not addr:
        raise typer.BadParameter("give the manager's address (unix:/PATH or http(s)://HOST:PORT) or set "
                                 "HVSIM_MANAGER", param_hint="--manager")
    tf: Path | None = obj.get("token_file")
    if tf is not None:
        try:
            token = tf.read_bytes()[:MAX_TOKEN_BYTES].decode().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise typer.BadParameter(f"cannot read {tf}: {getattr(e, 'strerror', None) or e}",
                                     param_hint="--token-file") from e
    else:
        token = os.environ.get("HVSIM_TOKEN", "").strip()
    if token and not token.isprintable():
        raise typer.BadParameter("the token holds control characters or line breaks", param_hint="--token-file")
    if not token:
        raise typer.BadParameter("the manager's bearer token is missing (give --token-file or set HVSIM_TOKEN)",
                                 param_hint="--token-file")
    return addr, token


def _call(fn: Callable[[ManagerClient], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run ``fn`` with a client of the manager (closed on every path)."""
    addr, token = _connection()

    async def go() -> T:
        async with ManagerClient(addr, token, timeout=timeout) as c:
            return await fn(c)
    return asyncio.run(go())


def _build(cls: Callable[..., T], **kw: Any) -> T:
    """A request body, or bad input (exit 2) naming the option."""
    try:
        return cls(**kw)
    except pydantic.ValidationError as e:
        err = input_error(e)
        raise typer.BadParameter(str(err).split(": ", 1)[-1],
                                 param_hint=f"--{err.field.replace('_', '-')}") from e


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _table(title: str, cols: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*("-" if v is None else str(v) for v in r))
    Console().print(t)


async def _all(it: Any) -> list[Any]:
    return [x async for x in it]


def _op_line(op: OperationRecord) -> str:
    return f"operation {op.id}: {op.kind.value} {op.vm} {op.state.value}" + (f" ({op.error})" if op.error else "")


def _done(op: OperationRecord, as_json: bool) -> None:
    """Print a finished operation; a failed one is an error line and exit 1."""
    if as_json:
        _json(as_dict(op))
    if op.state is not OpState.SUCCEEDED:
        raise fail(_op_line(op), EXIT_FAILED)
    if not as_json:
        print(_op_line(op))


# -- hosts ----------------------------------------------------------------------------------------
@host_app.command("list")
@cli_command
def host_list(as_json: bool = JSON_OPT) -> None:
    """The hosts, their capacity and status."""
    hosts = _call(lambda c: _all(c.iter_hosts()))
    if as_json:
        _json([as_dict(h) for h in hosts])
        return
    _table("hosts", ("name", "dc", "vcpus", "memory MiB", "status", "agent"),
           [(h.name, h.datacenter, h.vcpus, h.memory_mib, h.status.value, h.agent) for h in hosts])


@host_app.command("add")
@cli_command
def host_add(name: str = typer.Argument(..., help="the host's name"),
             agent: str = typer.Option(..., "--agent", help="its host agent: unix:/PATH or https://IP:PORT"),
             datacenter: str = typer.Option("dc1", "--datacenter"),
             as_json: bool = JSON_OPT) -> None:
    """Register a host by its agent (its capacity is what the agent reports)."""
    body = _build(HostCreate, name=name, agent=agent, datacenter=datacenter)
    h = _call(lambda c: c.add_host(body))
    if as_json:
        _json(as_dict(h))
    else:
        print(f"host {h.name}: {h.status.value}, {h.vcpus} vcpus, {h.memory_mib} MiB")


# -- VMs ------------------------------------------------------------------------------------------
@vm_app.command("list")
@cli_command
def vm_list(as_json: bool = JSON_OPT) -> None:
    """The VMs, where they live and their power state."""
    vms = _call(lambda c: _all(c.iter_vms()))
    if as_json:
        _json([as_dict(v) for v in vms])
        return
    _table("vms", ("name", "host", "power", "vcpus", "memory MiB", "group"),
           [(v.name, v.host, v.power.value, v.vcpus, v.memory_mib, v.group) for v in vms])


@vm_app.command("define")
@cli_command
def vm_define(name: str = typer.Argument(..., help="the VM's name"),
              memory_mib: int = typer.Option(256, "--memory", help="MiB"),
              vcpus: int = typer.Option(1, "--vcpus"),
              host: Optional[str] = typer.Option(None, "--host", help="pin it (default: placed by the manager)"),
              group: Optional[str] = typer.Option(None, "--group"),
              priority: int = typer.Option(0, "--priority"),
              protected: bool = typer.Option(False, "--protected"),
              as_json: bool = JSON_OPT) -> None:
    """Define a VM (not started); the manager places it unless --host is given."""
    try:
        body = _build(VMDefine, name=name, memory_mib=memory_mib, vcpus=vcpus, host=host, group=group,
                      priority=priority, protected=protected)
    except typer.BadParameter as e:
        if e.param_hint == "--memory-mib":
            e.param_hint = "--memory"
        if e.param_hint == "--name":
            e.param_hint = "NAME"
        raise
    vm, op = _call(lambda c: c.define_vm(body))
    if as_json:
        _json({"vm": as_dict(vm), "operation": as_dict(op)})
    else:
        print(f"vm {vm.name}: defined on {vm.host} ({_op_line(op)})")


def _vm_op(call: Callable[[ManagerClient], Awaitable[OperationRecord]], as_json: bool,
           timeout: float = 300.0) -> None:
    _done(_call(call, timeout=timeout), as_json)


@vm_app.command("start")
@cli_command
def vm_start(name: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """Start the VM on its host (waits until its QEMU runs)."""
    _vm_op(lambda c: c.start_vm(name), as_json)


@vm_app.command("stop")
@cli_command
def vm_stop(name: str = typer.Argument(...),
            timeout: float = typer.Option(60.0, "--timeout", help="seconds for the guest to power off"),
            as_json: bool = JSON_OPT) -> None:
    """Stop the VM (the guest powers off; killed after --timeout)."""
    check_timeout(timeout)
    _vm_op(lambda c: c.stop_vm(name, timeout=timeout), as_json, timeout=timeout + 60)


@vm_app.command("destroy")
@cli_command
def vm_destroy(name: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """Kill the VM's QEMU at once (the VM stays defined)."""
    _vm_op(lambda c: c.destroy_vm(name), as_json)


@vm_app.command("undefine")
@cli_command
def vm_undefine(name: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """Remove a stopped VM's definition."""
    _vm_op(lambda c: c.undefine_vm(name), as_json)


@vm_app.command("exec")
@cli_command
def vm_exec(name: str = typer.Argument(...), command: str = typer.Argument(..., help="shell command in the guest"),
            timeout: float = typer.Option(30.0, "--timeout", help="seconds for the command"),
            as_json: bool = JSON_OPT) -> None:
    """Run a command in the guest through its agent; exits with the command's exit code."""
    check_timeout(timeout)
    body = _build(ExecRequest, command=command, timeout=timeout)
    res = _call(lambda c: c.exec_vm(name, body), timeout=timeout + 60)
    if as_json:
        _json(as_dict(res))
    else:
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        sys.stdout.flush()
        if res.truncated:
            print("hvsim: note: output truncated by the guest agent", file=sys.stderr)
    raise typer.Exit(res.exit_code if 0 <= res.exit_code < 256 else EXIT_FAILED)


async def follow(c: ManagerClient, op: OperationRecord, console: Console, poll: float = 0.25) -> OperationRecord:
    """A progress bar of a migration until its operation ends; returns the final record."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
            TextColumn("{task.fields[state]} pass {task.fields[passes]}: sent {task.fields[sent]} MiB, left "
                       "{task.fields[left]} MiB, {task.fields[mbps]} MB/s"), TimeElapsedColumn()]
    with Progress(*cols, console=console, transient=False) as bar:
        task = bar.add_task(f"{op.vm} {op.params.get('source', '?')}->{op.params.get('destination', '?')}",
                            total=1.0, state="preparing", passes=0, sent="0", left="-", mbps="-")
        while not op.terminal:
            try:
                p = await c.progress(op.id)
            except Exception:               # noqa: BLE001 (no progress yet, or already gone: the op tells)
                p = None
            if p is not None:
                done = 1.0 - p.remaining / p.total if p.total else 0.0
                bar.update(task, completed=min(max(done, 0.0), 0.99), state=p.state, passes=p.passes,
                           sent=f"{p.transferred / MIB:.0f}", left=f"{p.remaining / MIB:.0f}", mbps=f"{p.mbps:.1f}")
            await asyncio.sleep(poll)
            op = await c.get_op(op.id)
        bar.update(task, completed=1.0 if op.state is OpState.SUCCEEDED else bar.tasks[0].completed,
                   state=op.state.value)
    return op


@vm_app.command("migrate")
@cli_command
def vm_migrate(name: str = typer.Argument(...),
               to: str = typer.Option(..., "--to", help="the destination host"),
               policy: str = typer.Option("hvsim-predictive", "--policy",
                                          help="qemu-default, stepwise or hvsim-predictive"),
               wait: bool = typer.Option(True, "--wait/--no-wait", help="follow it with a progress bar"),
               as_json: bool = JSON_OPT) -> None:
    """Live-migrate the VM to another host (the source host agent drives it)."""
    try:
        body = _build(MigrateRequest, destination=to, policy=policy)
    except typer.BadParameter as e:
        if e.param_hint == "--destination":
            e.param_hint = "--to"
        raise
    console = Console(stderr=True)

    async def go(c: ManagerClient) -> OperationRecord:
        op = await c.migrate_vm(name, body)
        if not wait:
            return op
        return await follow(c, op, console if not as_json else Console(stderr=True, quiet=True))
    op = _call(go, timeout=120)
    if not wait:
        if as_json:
            _json(as_dict(op))
        else:
            print(_op_line(op))
        return
    _done(op, as_json)


# -- operations -----------------------------------------------------------------------------------
@op_app.command("list")
@cli_command
def op_list(limit: int = typer.Option(100, "--limit", min=1, max=1000, help="the newest N"),
            as_json: bool = JSON_OPT) -> None:
    """The recorded operations (oldest first)."""
    async def newest(c: ManagerClient) -> list[OperationRecord]:
        ops = await _all(_iter_ops(c))
        return ops[-limit:]
    ops = _call(newest)
    if as_json:
        _json([as_dict(o) for o in ops])
        return
    _table("operations", ("id", "kind", "vm", "state", "steps", "error"),
           [(o.id, o.kind.value, o.vm, o.state.value, ",".join(o.steps), o.error) for o in ops])


async def _iter_ops(c: ManagerClient) -> Any:
    after: str | None = None
    while True:
        items, after, _ = await c.list_ops(limit=500, after=after)
        for x in items:
            yield x
        if after is None:
            return


@op_app.command("show")
@cli_command
def op_show(op_id: str = typer.Argument(..., metavar="OP-ID"), as_json: bool = JSON_OPT) -> None:
    """One operation with its history."""
    op = _call(lambda c: c.get_op(op_id))
    if as_json:
        _json(as_dict(op))
        return
    print(_op_line(op))
    for k, v in sorted(op.params.items()):
        print(f"  {k}: {v}")
    if op.steps:
        print(f"  steps: {', '.join(op.steps)}")
    print(f"  manager: {op.manager} (token {op.token})")
    _table("history", ("at", "state", "note"),
           [(f"{h.at:.3f}", h.state.value, h.note) for h in op.history])



# -- reserved capacity and HA -----------------------------------------------------------------------
DC_OPT = typer.Option(None, "--datacenter", help="hold the reservation on this datacenter's hosts")
MVCPU_OPT = typer.Option(0, "--management-vcpus", min=0, max=4096, help="the management host's vCPUs")
MMEM_OPT = typer.Option(0, "--management-memory-mib", min=0, max=16 * 1024 * 1024, help="the management host's MiB")


def print_reservation(rep: Any) -> None:
    """The plan against slot sizing, as ``reservation show`` prints it."""
    p = rep.plan
    print(f"candidates: {', '.join(rep.candidates) or '-'} ({rep.candidates_are})")
    _table("must fail over", ("item", "vcpus", "memory MiB", "reserved on"),
           [(i["name"], i["vcpus"], i["memory_mib"], p["assignment"].get(i["name"], "NO HOST")) for i in p["items"]])
    s = p["slots"]
    ov = p["overhead"]
    pct = ov["percent"]
    _table("reservation vs vSphere-HA slots", ("sizing", "vcpus", "memory MiB", "detail"), [
        ("ours (per-host reserve rules)", p["reserved"]["vcpus"], p["reserved"]["memory_mib"],
         f"{len(p['per_host'])} host(s)" + ("" if p["fits"] else f"; does not fit: {', '.join(p['unplaced'])}")),
        ("slots", s["reserved"]["vcpus"], s["reserved"]["memory_mib"],
         f"{s['slots_needed']} x ({s['slot']['vcpus']} vCPU, {s['slot']['memory_mib']} MiB); "
         f"{s['slots_available']} slots on the candidates" + ("" if s["fits"] else " (NOT ENOUGH)")),
        ("overhead of slots", ov["vcpus"], ov["memory_mib"],
         f"{pct['vcpus']}% vCPU, {pct['memory_mib']}% memory" if pct["vcpus"] is not None else "-"),
    ])
    if rep.held:
        _table("held now", ("rule", "spec"), [(h["rule"], json.dumps(h["spec"], sort_keys=True)) for h in rep.held])
    else:
        print("held now: no reserve rule")


@reservation_app.command("show")
@cli_command
def reservation_show(datacenter: Optional[str] = DC_OPT, management_vcpus: int = MVCPU_OPT,
                     management_memory_mib: int = MMEM_OPT, as_json: bool = JSON_OPT) -> None:
    """Size the failover reservation for the protected VMs (and the management host) and compare it
    with vSphere-HA slot sizing."""
    rep = _call(lambda c: c.reservation(datacenter, management_vcpus, management_memory_mib))
    if as_json:
        _json(as_dict(rep))
        return
    print_reservation(rep)


@reservation_app.command("apply")
@cli_command
def reservation_apply(datacenter: Optional[str] = DC_OPT, management_vcpus: int = MVCPU_OPT,
                      management_memory_mib: int = MMEM_OPT) -> None:
    """Add the plan's reserve rules (one per host it uses); a plan that does not fit is refused."""
    from ..control.schema import RuleCreate

    async def go(c: ManagerClient) -> list[str]:
        rep = await c.reservation(datacenter, management_vcpus, management_memory_mib)
        if not rep.plan["fits"]:
            raise fail(f"the reservation does not fit: {', '.join(rep.plan['unplaced'])} fit on no candidate host",
                       EXIT_FAILED)
        names = []
        for r in rep.plan["rules"]:
            await c.add_rule(RuleCreate(name=r["name"], spec={k: v for k, v in r.items() if k != "name"}))
            names.append(r["name"])
        return names
    for n in _call(go):
        print(f"rule {n}: added")


@ha_app.command("show")
@cli_command
def ha_show(as_json: bool = JSON_OPT) -> None:
    """Unreachable hosts (verdict, power evidence) and the HA controller's recent events."""
    rep = _call(lambda c: c.ha())
    if as_json:
        _json(as_dict(rep))
        return
    print(f"HA {rep.state}: grace {rep.grace_s:g} s without power evidence, {rep.off_grace_s:g} s powered off")
    _table("unreachable hosts", ("host", "verdict", "power", "for s", "detail"),
           [(h, w["verdict"], w["power"], w["unreachable_s"], w["detail"]) for h, w in rep.hosts.items()])
    _table("events", ("at", "kind", "host", "vm", "detail"),
           [(f"{e['at']:.1f}", e["kind"], e["host"], e["vm"], e["detail"]) for e in rep.events[-30:]])
