"""Lab scenario: a guest on a tenant network migrates while a peer keeps talking to it (issue 13).

One configuration (:func:`run_config`): three hosts on a shaped underlay, a network controller in
one of its three modes, a guest on host a whose NIC is an ENI (its tap on the tenant network), a
peer on host c (a namespace endpoint running the 1 ms UDP prober and a TCP stream; with
``talker`` also a second guest pinging the first), and ``n`` live migrations back and forth
between a and b. The migration moves the ENI by itself (:class:`hvsim.network.component.EniComponent`);
the mode decides what each step reprograms:

  learning          no controller reprogramming: flood-and-learn VXLAN, the guest's announce only
  after-completion  the controller reprograms once the migration completed (a naive inventory poller)
  hvsim             staged before the destination QEMU starts, activated at pause-before-switchover

Per migration: the network blackout (the prober's largest echo gap), the vCPU blackout (the guest
heartbeat's gap), their difference, duplicated echoes (two live copies), whether the TCP stream
survived, and probes lost after the migration completed. ``bench/eni.py`` runs N per mode; the lab
``run()`` shows one migration per mode, the blackout table and a PNG of the echo gaps over time.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvsim.core.cluster import Cluster
from hvsim.core.model import HostSpec, NicSpec, VMSpec
from hvsim.core.vm import VM
from hvsim.guest.heartbeat import HeartbeatMonitor
from hvsim.migration import migrate
from hvsim.network import EniSpec, NetworkController, NetworkSpec, NsEndpoint, Prober, ProbeReport, Underlay
from hvsim.network.component import EniDriver

MODES = ("learning", "after-completion", "hvsim")
NET = NetworkSpec("blue", 100, "10.77.0.0/24", gateway="10.77.0.254")
_PING = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def eni(i: int) -> EniSpec:
    return EniSpec(f"eni-{i}", NET.name, f"52:54:00:77:00:{i:02x}", (f"10.77.0.{i}",))


@dataclass(frozen=True)
class Setup:
    link_mbit: float = 400.0
    guest_mib: int = 160
    probe_us: int = 1000          # one UDP probe every 1 ms (the rate)
    policy: str = "qemu-default"  # the same policy in every mode: only the network side differs
    pre_s: float = 0.8            # probing before each migration starts
    post_s: float = 1.5           # and after it completed
    timeout_s: float = 300.0
    dirty_mib: int = 4            # the guest's ``dirty``: a small working set (and the heartbeat)
    dirty_rate_mib_s: float = 1.0


@dataclass
class MoveSample:
    """One migration under probe."""
    mode: str
    index: int
    source: str
    destination: str
    net_blackout_ms: float | None = None     # the largest gap between echoes (the definition)
    # the longest run of consecutive probes without a timely echo (none, or later than TIMELY_MS), as a
    # send-time span: unlike the echo gap it is not split by the late echoes of probes the guest
    # received before it stopped (or that waited in the destination's tap) and answered after
    loss_blackout_ms: float | None = None
    vcpu_blackout_ms: float | None = None    # the guest heartbeat's gap
    duplicates: int | None = None
    tcp_survived: bool | None = None
    lost_after_completion: int | None = None
    lost: int | None = None
    sent: int | None = None
    prober_late_ms: float | None = None
    migration_s: float | None = None
    final_step_ms: float | None = None       # the ENI's activation inside the pause (hvsim mode)
    stop_to_resume_ms: float | None = None   # QEMU: source STOP -> destination RESUME
    gap_from_ns: int | None = None
    gap_to_ms: float | None = None           # when the echoes came back, since the gap started
    reprogram_ms: float | None = None        # when host c (the peer's) was repointed, since the gap started
    raw: str | None = None                   # per-probe file (seq send_ns first_echo_ns echoes)
    error: str | None = None

    @property
    def net_minus_vcpu_ms(self) -> float | None:
        if self.net_blackout_ms is None or self.vcpu_blackout_ms is None:
            return None
        return self.net_blackout_ms - self.vcpu_blackout_ms

    @property
    def loss_minus_vcpu_ms(self) -> float | None:
        if self.loss_blackout_ms is None or self.vcpu_blackout_ms is None:
            return None
        return self.loss_blackout_ms - self.vcpu_blackout_ms

    @property
    def net_minus_pause_ms(self) -> float | None:
        """Network blackout minus QEMU's pause (source STOP -> destination RESUME): what the network
        and the guest's own wake-up add to the pause."""
        if self.net_blackout_ms is None or self.stop_to_resume_ms is None:
            return None
        return self.net_blackout_ms - self.stop_to_resume_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"net_minus_vcpu_ms": self.net_minus_vcpu_ms,
                               "net_minus_pause_ms": self.net_minus_pause_ms,
                               "loss_minus_vcpu_ms": self.loss_minus_vcpu_ms}


@dataclass
class ConfigResult:
    mode: str
    samples: list[MoveSample] = field(default_factory=list)
    talker: dict[str, Any] | None = None     # the second guest's ping: transmitted / received
    journal: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


async def _peer(ctl: NetworkController, stack: contextlib.AsyncExitStack, host: str, spec: EniSpec) -> NsEndpoint:
    e = ctl.define_eni(spec)
    ep = await stack.enter_async_context(NsEndpoint("peer", spec, e.network))
    await ctl.attach("vm-peer", host, [spec.id], ports=ep.port)
    assert e.active is not None
    await ep.plug(e.active.peer_ifname)
    return ep


async def _guest(cl: Cluster, ctl: NetworkController, name: str, host: str, spec: EniSpec, mib: int) -> VM:
    ctl.define_eni(spec)
    vm = await cl.define_vm(VMSpec(name, memory_mib=mib, nics=(NicSpec(spec.id, network=spec.network),),
                                   kernel_args=ctl.kernel_args([spec.id])), host)
    await vm.start(wait_ready=True, ready_timeout=180)
    return vm


async def _one(vm: VM, peer: NsEndpoint, ctl: NetworkController, setup: Setup, mode: str, i: int,
               raw_dir: Path | None, log: Any) -> MoveSample:
    src = vm.host.name
    dst = "b" if src == "a" else "a"
    s = MoveSample(mode, i, src, dst)
    scratch = None
    if raw_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="hvsim-probe-")
        raw = Path(scratch.name) / "probe.txt"
    else:
        raw = raw_dir / f"probe-{mode}-{i}.txt"
        s.raw = str(raw)
    try:
        return await _probe_one(vm, peer, ctl, setup, s, raw, log)
    finally:
        if scratch is not None:
            scratch.cleanup()


def untimely_run_ms(raw: Path, interval_us: int, timely_ms: float = 50.0) -> float:
    """The longest run of consecutive probes (by sequence) whose echo never came or came later than
    ``timely_ms``, as the span of their send times (ms) plus one interval; 0 when every probe was
    answered in time. ``raw``: udpprobe's per-probe file (seq send_ns first_echo_ns echoes)."""
    rows = []
    for line in raw.read_text().splitlines():
        p = line.split()
        if len(p) >= 3:
            rows.append((int(p[0]), int(p[1]), int(p[2])))
    rows.sort()
    best, start, prev = 0.0, None, None
    for _seq, send, echo in rows:
        bad = echo == 0 or (echo - send) / 1e6 > timely_ms
        if bad:
            start = send if start is None else start
            prev = send
            best = max(best, (prev - start) / 1e6 + interval_us / 1000)
        else:
            start = None
    return best


async def _probe_one(vm: VM, peer: NsEndpoint, ctl: NetworkController, setup: Setup, s: MoveSample, raw: Path,
                     log: Any) -> MoveSample:
    src, dst, mode, i = s.source, s.destination, s.mode, s.index
    hb = HeartbeatMonitor()       # the guest's ``dirty`` beats every 10 ms: the vCPU blackout
    try:
        await hb.attach(vm.heartbeat_socket, timeout=10)
        await hb.wait_beats(10, timeout=30)
        async with Prober(peer.ns, "10.77.0.1", interval_us=setup.probe_us, raw=raw) as pr:
            await asyncio.sleep(setup.pre_s)
            t0 = time.monotonic()
            try:
                m = await migrate(vm, dst, policy=setup.policy, timeout=setup.timeout_s, heartbeat=hb)
            finally:
                t_done = time.monotonic_ns()
                s.migration_s = time.monotonic() - t0
                await asyncio.sleep(setup.post_s)
                rep: ProbeReport = await pr.stop()
    finally:
        await hb.close()
    r = m.result
    assert r is not None
    s.net_blackout_ms = rep.max_gap_ms
    s.gap_from_ns = rep.max_gap_from_ns
    s.vcpu_blackout_ms = r.downtime_ms_guest
    s.duplicates = rep.duplicates
    s.tcp_survived = rep.tcp is not None and rep.tcp.ok
    s.lost_after_completion = rep.lost_after(t_done)
    s.lost, s.sent, s.prober_late_ms = rep.lost, rep.sent, rep.max_send_late_ms
    b = (r.uld or {}).get("breakdown") or {}
    s.final_step_ms, s.stop_to_resume_ms = b.get("final_step_ms"), b.get("total_ms")
    s.gap_to_ms = (rep.max_gap_to_ns - rep.max_gap_from_ns) / 1e6
    s.loss_blackout_ms = untimely_run_ms(raw, rep.interval_us)
    # the controller's journal and the prober share CLOCK_MONOTONIC
    moves = [m for m in ctl.moves.values() if m.id.startswith(f"migration:{vm.name}/") and m.source == src]
    fdb = [j.at for m in moves[-1:] for j in ctl.journal_of(m.id) if j.host == "c" and j.op == "fdb-remote"]
    if fdb:
        s.reprogram_ms = fdb[0] * 1000 - rep.max_gap_from_ns / 1e6

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"
    log(f"  {mode:16s} #{i + 1} {src}->{dst}: network {f(s.net_blackout_ms)} ms, vCPU {f(s.vcpu_blackout_ms)} ms, "
        f"net-vCPU {f(s.net_minus_vcpu_ms)} ms, dup {s.duplicates}, tcp {'ok' if s.tcp_survived else 'BROKEN'}, "
        f"lost after {s.lost_after_completion}, peer's host repointed at {f(s.reprogram_ms)} ms into the gap "
        f"({s.migration_s:.1f}s)")
    return s


async def run_config(mode: str, n: int, setup: Setup = Setup(), *, talker: bool = False,
                     raw_dir: Path | None = None, log: Any = print) -> ConfigResult:
    """``n`` migrations of one guest under probe, back and forth between hosts a and b (the peer on
    c), with the controller in ``mode``. A failure is recorded (``error``), never raised (a
    cancellation is)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    res = ConfigResult(mode)
    try:
        async with asyncio.timeout(setup.timeout_s + n * 60):
            await _run_config(res, n, setup, talker, raw_dir, log)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the matrix goes on; the failure is reported with the row
        res.error = f"{type(exc).__name__}: {exc}".strip()[:500]
        log(f"  {mode}: FAILED: {res.error}")
    return res


async def _run_config(res: ConfigResult, n: int, setup: Setup, talker: bool, raw_dir: Path | None,
                      log: Any) -> None:
    async with Underlay(["a", "b", "c"], mbit=setup.link_mbit) as ul, \
            NetworkController(ul, mode=res.mode) as ctl:
        await ctl.add_network(NET)
        # the cluster closes first: its guests hold the taps the controller deletes
        async with Cluster(f"eni-{res.mode}", drivers=(EniDriver(ctl),)) as cl, \
                contextlib.AsyncExitStack() as stack:
            for h in ul.hosts:
                cl.add_host(HostSpec(h, vcpus=4, memory_mib=2048), network=ul.host_network(h))
            boots = [_guest(cl, ctl, "mover", "a", eni(1), setup.guest_mib)]
            if talker:
                boots.append(_guest(cl, ctl, "talker", "c", eni(2), setup.guest_mib))
            vms = await asyncio.gather(*boots)
            vm = vms[0]
            peer = await _peer(ctl, stack, "c", eni(3))
            await vm.exec("udpecho -d -q -p 7777", timeout=30, check=True)
            await vm.exec(f"dirty {setup.dirty_mib} {setup.dirty_rate_mib_s:g} >/dev/null 2>&1 &", timeout=30,
                          check=True)
            ping_s = int(n * 20 + 10)
            if talker:      # the other guest keeps talking to the mover all along
                await vms[1].exec(f"ping -q -i 0.05 -w {ping_s} 10.77.0.1 > /run/ping.log 2>&1 &", timeout=30,
                                  check=True)
            for i in range(n):
                res.samples.append(await _one(vm, peer, ctl, setup, res.mode, i, raw_dir, log))
            if talker:
                out = await vms[1].exec("kill -INT $(pidof ping) 2>/dev/null; sleep 0.5; cat /run/ping.log",
                                        timeout=30)
                mo = _PING.search(out.stdout)
                res.talker = {"transmitted": int(mo.group(1)), "received": int(mo.group(2))} if mo else \
                    {"output": out.stdout[-300:]}
            res.journal = [j.to_dict() for j in ctl.journal if j.op_id.startswith("migration:mover/")]


# -- reporting -------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1, nearest rank) of ``values``; None without values."""
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, math.ceil(q * len(v)) - 1))
    return v[k]


def summarize(r: ConfigResult) -> dict[str, Any]:
    """The issue's row for one configuration."""
    ok = [s for s in r.samples if s.net_blackout_ms is not None]
    net = [s.net_blackout_ms for s in ok if s.net_blackout_ms is not None]
    diff = [d for s in ok if (d := s.net_minus_vcpu_ms) is not None]
    vcpu = [s.vcpu_blackout_ms for s in ok if s.vcpu_blackout_ms is not None]
    pause = [s.stop_to_resume_ms for s in ok if s.stop_to_resume_ms is not None]
    dpause = [d for s in ok if (d := s.net_minus_pause_ms) is not None]
    final = [s.final_step_ms for s in ok if s.final_step_ms is not None]
    loss = [s.loss_blackout_ms for s in ok if s.loss_blackout_ms is not None]
    dloss = [d for s in ok if (d := s.loss_minus_vcpu_ms) is not None]

    def r1(x: float | None) -> float | None:
        return None if x is None else round(x, 1)
    return {"config": r.mode, "n": len(ok),
            "net_blackout_ms": {"p50": r1(pct(net, 0.5)), "p99": r1(pct(net, 0.99)), "max": r1(max(net, default=None))},
            "vcpu_blackout_ms": {"p50": r1(pct(vcpu, 0.5)), "p99": r1(pct(vcpu, 0.99))},
            "net_minus_vcpu_ms": {"p50": r1(pct(diff, 0.5)), "p99": r1(pct(diff, 0.99))},
            "qemu_pause_ms": {"p50": r1(pct(pause, 0.5)), "p99": r1(pct(pause, 0.99))},
            "net_minus_pause_ms": {"p50": r1(pct(dpause, 0.5)), "p99": r1(pct(dpause, 0.99))},
            "final_step_ms": {"p50": r1(pct(final, 0.5)), "max": r1(max(final, default=None))},
            "loss_blackout_ms": {"p50": r1(pct(loss, 0.5)), "p99": r1(pct(loss, 0.99)),
                                 "max": r1(max(loss, default=None))},
            "loss_minus_vcpu_ms": {"p50": r1(pct(dloss, 0.5)), "p99": r1(pct(dloss, 0.99))},
            "lost_per_migration": {"p50": pct([float(s.lost or 0) for s in ok], 0.5),
                                   "max": max((s.lost or 0 for s in ok), default=None)},
            "duplicates": sum(s.duplicates or 0 for s in ok),
            "tcp_survived": bool(ok) and all(s.tcp_survived for s in ok),
            "lost_after_completion": sum(s.lost_after_completion or 0 for s in ok),
            "error": r.error}


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.0f}" if isinstance(x, float) else str(x)
    return [[r["config"], str(r["n"]), f(r["net_blackout_ms"]["p50"]), f(r["net_blackout_ms"]["p99"]),
             f(r["vcpu_blackout_ms"]["p50"]), f(r["net_minus_vcpu_ms"]["p50"]), f(r["net_minus_vcpu_ms"]["p99"]),
             f(r["qemu_pause_ms"]["p50"]), f(r["net_minus_pause_ms"]["p50"]), f(r["net_minus_pause_ms"]["p99"]),
             f(r["final_step_ms"]["p50"]), f(r["loss_blackout_ms"]["p50"]), f(r["loss_minus_vcpu_ms"]["p50"]),
             f(r["loss_minus_vcpu_ms"]["p99"]), f(r["lost_per_migration"]["p50"]), str(r["duplicates"]),
             "yes" if r["tcp_survived"] else "NO", str(r["lost_after_completion"])]
            for r in rows]


HEADERS = ["config", "n", "net p50 ms", "net p99 ms", "vCPU p50 ms", "net-vCPU p50", "net-vCPU p99",
           "pause p50", "net-pause p50", "net-pause p99", "activate p50", "unanswered p50", "unans-vCPU p50",
           "unans-vCPU p99", "lost p50", "dup", "TCP", "lost after"]


def _probe_rtts(raw: Path, t0_ns: int) -> tuple[list[float], list[float], list[float]]:
    """From a raw probe file: (send time s since ``t0_ns``, RTT ms) of every echoed probe, and the
    send times of the probes that got no echo."""
    xs, ys, lost = [], [], []
    for line in raw.read_text().splitlines():
        p = line.split()
        if len(p) < 3:
            continue
        send, echo = int(p[1]), int(p[2])
        if echo:
            xs.append((send - t0_ns) / 1e9)
            ys.append(max((echo - send) / 1e6, 0.01))
        else:
            lost.append((send - t0_ns) / 1e9)
    return xs, ys, lost


def plot_gaps(results: list[ConfigResult], png: Path) -> Path:
    """Each probe's round trip over its send time around the blackout (lost probes on top), one
    panel per mode (its first migration)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [(r, s) for r in results for s in r.samples[:1] if s.raw and s.gap_from_ns and Path(s.raw).exists()]
    fig, axes = plt.subplots(max(1, len(shown)), 1, figsize=(9, 2.3 * max(1, len(shown))), sharex=True,
                             squeeze=False)
    for ax, (r, s) in zip(axes[:, 0], shown, strict=False):
        assert s.raw is not None and s.gap_from_ns is not None
        xs, ys, lost = _probe_rtts(Path(s.raw), s.gap_from_ns)
        ax.scatter(xs, ys, s=2, lw=0, label="echoed (RTT)")
        ax.scatter(lost, [2000.0] * len(lost), s=4, marker="x", color="red", lw=0.6, label="no echo")
        ax.set_yscale("log")
        ax.set_ylim(0.05, 5000)
        ax.set_ylabel("RTT ms")
        ax.set_title(f"{r.mode}: echo gap {s.net_blackout_ms or 0:.0f} ms, no timely echo for "
                     f"{s.loss_blackout_ms or 0:.0f} ms, vCPU (heartbeat) {s.vcpu_blackout_ms or 0:.0f} ms, "
                     f"QEMU pause {s.stop_to_resume_ms or 0:.0f} ms", fontsize=8)
        ax.legend(loc="upper left", fontsize=7, markerscale=3)
    axes[-1, 0].set_xlim(-0.6, 1.2)
    axes[-1, 0].set_xlabel("probe send time, s since the start of the largest echo gap (1 ms UDP probes from host c)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# -- the lab scenario --------------------------------------------------------------------------------------

async def run(console: Any, out_dir: Path) -> None:
    from rich.table import Table
    setup = Setup(post_s=1.0, pre_s=0.5)
    console.print(f"three hosts on a {setup.link_mbit:g} Mbit/s underlay, tenant network {NET.name} "
                  f"(VXLAN {NET.vni}); guest 'mover' (ENI eni-1) on a migrates to b, guest 'talker' on c "
                  f"pings it, a peer on c probes it every {setup.probe_us / 1000:g} ms (UDP) with a TCP stream")
    raw_dir = out_dir / "network-probes"
    raw_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in MODES:
        results.append(await run_config(mode, 1, setup, talker=True, raw_dir=raw_dir,
                                        log=lambda s: console.print(s, highlight=False)))
    rows = [summarize(r) for r in results]
    table = Table(title="one migration per mode (ms)")
    keep = ["config", "net p50 ms", "vCPU p50 ms", "net-vCPU p50", "pause p50", "activate p50", "unanswered p50",
            "unans-vCPU p50", "lost p50", "dup", "TCP", "lost after"]
    heads = {"net p50 ms": "echo gap", "vCPU p50 ms": "vCPU (heartbeat)", "net-vCPU p50": "gap - vCPU",
             "pause p50": "QEMU pause", "activate p50": "activation", "unanswered p50": "no timely echo",
             "unans-vCPU p50": "no timely echo - vCPU", "lost p50": "probes lost",
             "lost after": "lost after completion"}
    idx = [HEADERS.index(h) for h in keep]
    for h in keep:
        table.add_column(heads.get(h, h))
    for row in table_rows(rows):
        table.add_row(*[row[i] for i in idx])
    console.print(table)
    for r in results:
        if r.talker is not None:
            console.print(f"  {r.mode}: the talker's ping {r.talker}")
    hv = next((r for r in results if r.mode == "hvsim"), None)
    if hv is not None and hv.journal:
        phases = [(j["phase"], j["host"], j["op"]) for j in hv.journal]
        console.print(f"  hvsim: the controller's actions for the move, in order: {phases}")
    png = plot_gaps(results, out_dir / "network.png")
    console.print(f"plot: {png}")
    (out_dir / "network.json").write_text(json.dumps(
        {"setup": asdict(setup), "rows": rows, "samples": [s.to_dict() for r in results for s in r.samples],
         "talker": {r.mode: r.talker for r in results}}, indent=2, default=str))
    failed = [r for r in results if r.error]
    if failed:
        from hvbase.errors import HvsimError
        raise HvsimError("network scene: " + "; ".join(f"{r.mode}: {r.error}" for r in failed))
