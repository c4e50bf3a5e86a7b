"""Lab scenario: memory consolidation and restore with swap prefetch (issue 4).

One experiment (:func:`run_case`) boots a small guest whose swap disk is served by the hvsim shim
(or by nbdkit, the peer), fills most of its memory with ``memfill``, consolidates it with the
balloon (forcing at least half of the fill out to swap), restores it (with or without shim
prefetch) and has ``retouch`` re-read and verify every page in one order. ``bench/swap_prefetch.py``
runs the full matrix; the lab ``run()`` shows prefetch against no prefetch with a hit-rate table and
a PNG plot of the guest's swap-ins over time.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvbase.aio import wait_for
from hvsim.core.cluster import Cluster
from hvsim.core.components import ComponentDriver
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.drivers.nbdkit import NbdkitComponent, NbdkitDriver, NbdkitOptions
from hvsim.drivers.shim.component import ShimComponent, ShimDriver, ShimOptions
from hvsim.memory import consolidate_memory, restore_memory
from hvsim.guest.swap import guest_swap_back, guest_swap_stats, setup_guest_swap

CONFIGS = ("baseline", "floor", "shim-no-prefetch", "shim-prefetch", "shim-prefetch-guest-assisted",
           "nbdkit-delay", "nbdkit-readahead")
PATTERNS = ("seq", "rev", "rand")
SHIM_CONFIGS = frozenset({"baseline", "floor", "shim-no-prefetch", "shim-prefetch", "shim-prefetch-guest-assisted"})
PREFETCH_CONFIGS = frozenset({"shim-prefetch", "shim-prefetch-guest-assisted"})
MIB = 1024 * 1024
_OK = re.compile(r"OK order=(\w+) pages=(\d+) bad=(\d+) secs=([0-9.]+)")


@dataclass(frozen=True)
class Setup:
    latency_ms: float = 1.0
    guest_mib: int = 256
    fill_mib: int = 128
    target_mib: int = 128
    swap_mib: int = 384
    timeout_s: float = 300.0

    @property
    def budget_bytes(self) -> int:
        return (self.guest_mib - self.target_mib) * MIB


@dataclass
class CaseResult:
    config: str
    pattern: str
    retouch_s: float | None = None
    hit_rate: float | None = None
    accuracy: float | None = None
    cache_bytes: int | None = None       # the most the shim's cache held (incl. reservations) during the run
    budget_bytes: int | None = None
    swapped_bytes: int | None = None     # guest swap in use after consolidation
    verified: bool = False
    # context (not part of the bench JSON)
    swap_back_s: float | None = None
    retouch_only_s: float | None = None
    consolidate_s: float | None = None
    restore_s: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s since retouch start, pswpin pages)
    error: str | None = None

    def bench_row(self) -> dict[str, Any]:
        keys = ("config", "pattern", "retouch_s", "hit_rate", "accuracy", "cache_bytes", "budget_bytes",
                "swapped_bytes", "verified")
        return {k: getattr(self, k) for k in keys}


async def _sample(vm: Any, res: CaseResult, shim: Any, guest: bool, t0: float, stop: asyncio.Event) -> None:
    """Until ``stop``: the shim's peak cache size and (optionally) the guest's pswpin over time."""
    while not stop.is_set():
        if shim is not None:
            with contextlib.suppress(Exception):
                st = await shim.control.stats()
                res.cache_bytes = max(res.cache_bytes or 0, st["cache_bytes"] + st["reserved_bytes"])
        if guest:
            with contextlib.suppress(Exception):
                s = await guest_swap_stats(vm, timeout=10)
                res.timeline.append((time.monotonic() - t0, s["pswpin"]))
        with contextlib.suppress(TimeoutError):
            await wait_for(stop.wait(), 0.25 if guest else 0.5)


async def run_case(config: str, pattern: str, setup: Setup = Setup(), *, sample_guest: bool = False,
                   log: Any = print) -> CaseResult:
    """One experiment; failures are recorded in the result (``error``), never raised (but cancellation is)."""
    if config not in CONFIGS or pattern not in PATTERNS:
        raise ValueError(f"unknown config {config!r} or pattern {pattern!r}")
    res = CaseResult(config, pattern)
    try:
        async with asyncio.timeout(setup.timeout_s):
            await _run_case(config, pattern, setup, sample_guest, res)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the matrix goes on; the failure is reported with the row
        res.error = f"{type(exc).__name__}: {exc}".strip()[:500]
        res.verified = False
        log(f"  {config}/{pattern}: FAILED: {res.error}")
    return res


async def _run_case(config: str, pattern: str, setup: Setup, sample_guest: bool, res: CaseResult) -> None:
    driver: ComponentDriver
    if config in SHIM_CONFIGS:
        driver = ShimDriver(ShimOptions(latency_ms=0.0 if config == "floor" else setup.latency_ms))
    else:
        ra = setup.budget_bytes if config == "nbdkit-readahead" else None
        driver = NbdkitDriver(NbdkitOptions(latency_ms=setup.latency_ms, readahead_budget=ra))
    async with Cluster("swapbench", drivers=(driver,)) as cl:
        host = cl.add_host(HostSpec("h1", vcpus=2, memory_mib=4096))
        spec = VMSpec("guest", memory_mib=setup.guest_mib, disks=(DiskSpec("swap", setup.swap_mib, kind=driver.kind),))
        vm = await cl.define_vm(spec, host)
        await vm.start(wait_ready=True, ready_timeout=120)
        swap = await setup_guest_swap(vm, "swap", page_cluster=0)
        await vm.exec(f"memfill {setup.fill_mib}", timeout=120, check=True)
        disk = vm.component(f"{driver.kind}:swap")
        shim = disk if isinstance(disk, ShimComponent) else None
        if config != "baseline":
            cons = await consolidate_memory(vm, setup.target_mib, timeout=120)
            res.consolidate_s = cons.seconds
            res.swapped_bytes = cons.swapped_bytes
            if config == "nbdkit-readahead" and isinstance(disk, NbdkitComponent):
                # the cache holds what the guest just wrote; empty it like the shim's (budget 0 until
                # restore): a fresh nbdkit on the same socket, QEMU reconnects (reconnect-delay)
                await disk.stop()
                await disk.prepare(host)
            if shim is not None:
                await shim.control.reset_stats()
            rest = await restore_memory(vm, timeout=120, prefetch=config in PREFETCH_CONFIGS)
            res.restore_s = rest.seconds
            res.budget_bytes = rest.budget_bytes or (setup.budget_bytes if config == "nbdkit-readahead" else 0)
        else:
            res.swapped_bytes = (await guest_swap_stats(vm))["swap_used_bytes"]
            res.budget_bytes = 0
        stop = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.ensure_future(_sample(vm, res, shim, sample_guest, t0, stop))
        try:
            if config == "shim-prefetch-guest-assisted":
                res.swap_back_s = await guest_swap_back(vm, swap.device)
            out = await vm.exec(f"retouch {pattern}", timeout=setup.timeout_s)
        finally:
            stop.set()
            await sampler
        m = _OK.search(out.stdout)
        if not m:
            raise RuntimeError(f"retouch printed no report: {out.stdout!r} {out.stderr!r}")
        res.retouch_only_s = float(m.group(4))
        res.retouch_s = res.retouch_only_s + (res.swap_back_s or 0.0)
        res.verified = out.exit_code == 0 and int(m.group(3)) == 0 and int(m.group(2)) == setup.fill_mib * 256
        if shim is not None:
            st = await shim.control.stats()
            res.stats = st
            res.hit_rate, res.accuracy = st["hit_rate"], st["accuracy"]
            res.cache_bytes = max(res.cache_bytes or 0, st["cache_bytes"])
            if res.budget_bytes:
                assert st["budget_bytes"] == res.budget_bytes, st


# -- the lab scenario --------------------------------------------------------------------------------

def plot_timelines(results: list[CaseResult], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in results:
        if not r.timeline:
            continue
        base = r.timeline[0][1]
        xs = [t for t, _ in r.timeline]
        ys = [(p - base) * 4096 / MIB for _, p in r.timeline]
        ax.plot(xs, ys, marker=".", label=f"{r.config} ({r.pattern}, {r.retouch_s or 0:.1f}s)")
    ax.set_xlabel("seconds since retouch (or the guest-assisted swap-back) started")
    ax.set_ylabel("guest swap-in (MiB, pswpin)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


async def run(console: Any, out_dir: Path) -> None:
    from rich.table import Table

    setup = Setup(latency_ms=1.0)
    console.print(f"guest {setup.guest_mib} MiB, memfill {setup.fill_mib} MiB, consolidate to {setup.target_mib} MiB, "
                  f"swap on the shim with {setup.latency_ms:g} ms datastore latency, page-cluster 0")
    results = []
    for config in ("shim-no-prefetch", "shim-prefetch", "shim-prefetch-guest-assisted"):
        console.print(f"  {config}: boot, fill, consolidate, restore, retouch seq ...")
        results.append(await run_case(config, "seq", setup, sample_guest=True, log=console.print))
    table = Table(title="retouch seq after consolidation + restore")
    for col in ("config", "retouch s", "swapped MiB", "hit rate", "accuracy", "peak cache MiB", "budget MiB",
                "verified"):
        table.add_column(col, no_wrap=True)
    for r in results:
        table.add_row(r.config, f"{r.retouch_s:.2f}" if r.retouch_s is not None else "-",
                      f"{(r.swapped_bytes or 0) / MIB:.0f}",
                      f"{r.hit_rate:.1%}" if r.hit_rate is not None else "-",
                      f"{r.accuracy:.1%}" if r.accuracy is not None else "-",
                      f"{(r.cache_bytes or 0) / MIB:.1f}", f"{(r.budget_bytes or 0) / MIB:.0f}",
                      "yes" if r.verified else f"NO {r.error or ''}")
    console.print(table)
    a, b, c = results
    if a.retouch_s and b.retouch_s and c.retouch_s:
        console.print(f"prefetch speed-up: {a.retouch_s / b.retouch_s:.1f}x; guest-assisted (swap-back "
                      f"{c.swap_back_s or 0:.2f}s + retouch): {a.retouch_s / c.retouch_s:.1f}x")
    png = plot_timelines(results, out_dir / "swap_prefetch.png",
                         f"guest swap-in during retouch ({setup.latency_ms:g} ms datastore)")
    console.print(f"plot: {png}")
    rows = [asdict(r) | {"stats": {k: v for k, v in r.stats.items() if isinstance(v, (int, float, str, bool))}}
            for r in results]
    (out_dir / "swap_prefetch.json").write_text(json.dumps({"setup": asdict(setup), "runs": rows}, indent=2))
    if not all(r.verified for r in results):
        raise RuntimeError("a swap_prefetch lab run did not verify: " + "; ".join(
            f"{r.config}: {r.error}" for r in results if not r.verified))
