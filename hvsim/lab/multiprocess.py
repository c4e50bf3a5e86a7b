"""Lab scenario: a multi-process VM (QEMU + its swap shim) migrates with its user-level driver.

One experiment (:func:`run_case`): two hosts on a shaped link; a guest whose swap disk is served by
the shim (1 ms datastore) fills memory with ``memfill``, is consolidated with the balloon (a large
part goes to swap) and restored with prefetch, so the shim holds a warm cache of tens of MiB; the
guest then keeps dirtying a small working set (``dirty``, about 0.3 of the link) while it migrates
(or not); afterwards ``retouch`` re-reads and verifies every page. Configurations:

  no-migration    the same preparation and retouch without migrating (the reference)
  shared-socket   today's behaviour: the destination QEMU uses the source host's shim
  cold-uld        the destination shim starts empty (no state moved)
  stop-copy-uld   the full checkpoint moves inside the pause (the patent's method and QEMU 8.2's)
  precopy-uld     ours: full state ahead of the RAM, deltas during pre-copy, the last delta in the pause

``bench/multiprocess.py`` runs the matrix with repeats; the lab ``run()`` shows one guest migrating
with ``precopy-uld`` and back with ``stop-copy-uld``, with the downtime breakdown of each.
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

from hvsim.core.cluster import Cluster
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.core.vm import VM
from hvsim.drivers.shim.component import ShimComponent, ShimDriver, ShimOptions
from hvsim.guest.heartbeat import HeartbeatMonitor
from hvsim.guest.swap import guest_swap_stats, setup_guest_swap
from hvsim.memory import consolidate_memory, restore_memory
from hvsim.migration import MigrationCosts, MigrationError, MigrationResult, costs_of, migrate
from hvsim.network import Underlay

CONFIGS = ("no-migration", "shared-socket", "cold-uld", "stop-copy-uld", "precopy-uld")
ULD_MODE = {"shared-socket": "shared", "cold-uld": "cold", "stop-copy-uld": "stop-copy", "precopy-uld": "precopy"}
MIB = 2**20
_OK = re.compile(r"OK order=(\w+) pages=(\d+) bad=(\d+) secs=([0-9.]+)")
BREAKDOWN = ("stop_to_pause_ms", "quiesce_ms", "transfer_ms", "restore_ms", "resume_ms")


@dataclass(frozen=True)
class Setup:
    link_mbit: float = 200.0
    latency_ms: float = 1.0
    guest_mib: int = 256
    fill_mib: int = 128
    target_mib: int = 128
    swap_mib: int = 384
    dirty_wss_mib: int = 16
    dirty_rate_mib_s: float = 7.0          # ~0.3 of a 200 Mbit/s link's 22.8 MiB/s goodput
    policy: str = "hvsim-predictive"
    # the same policy for every configuration; a hard maximum that stop-copy's long pause fits under
    policy_params: tuple[tuple[str, Any], ...] = (("hard_max_ms", 20000.0),)
    timeout_s: float = 600.0


@dataclass
class CaseResult:
    config: str
    downtime_ms_guest: float | None = None
    uld_downtime_ms: float | None = None
    uld_bytes: int = 0
    hit_rate_before: float | None = None    # the shim's hit rate over its life before the migration
    hit_rate_after: float | None = None     # over the first retouch after the migration
    retouch_s: float | None = None
    verified: bool = False
    # context
    cache_bytes: int | None = None
    swapped_bytes: int | None = None
    migration_s: float | None = None
    uld_head_s: float | None = None
    breakdown: dict[str, Any] = field(default_factory=dict)
    shim_pid_before: int | None = None
    shim_pid_after: int | None = None
    retouch_shim: dict[str, Any] = field(default_factory=dict)   # the shim's counters over the retouch
    costs: dict[str, Any] | None = None     # the cluster's learned migration costs after this run
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def bench_row(self) -> dict[str, Any]:
        keys = ("config", "downtime_ms_guest", "uld_downtime_ms", "uld_bytes", "hit_rate_after", "retouch_s",
                "verified")
        return {k: getattr(self, k) for k in keys}

    @property
    def uld_share(self) -> float | None:
        if self.uld_downtime_ms is None or not self.downtime_ms_guest:
            return None
        return self.uld_downtime_ms / self.downtime_ms_guest


def _hit_rate(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    h = after["hits"] - before.get("hits", 0)
    m = after["misses"] - before.get("misses", 0)
    return h / (h + m) if h + m > 0 else None


async def prepare_guest(cl: Cluster, setup: Setup, host: str = "a", name: str = "mp") -> tuple[VM, CaseResult]:
    """Boot, fill, consolidate, restore with prefetch: a guest whose shim holds a warm cache."""
    res = CaseResult("")
    vm = await cl.define_vm(VMSpec(name, memory_mib=setup.guest_mib,
                                   disks=(DiskSpec("swap", setup.swap_mib, kind="shim"),)), host)
    await vm.start(wait_ready=True, ready_timeout=180)
    await setup_guest_swap(vm, "swap", page_cluster=0)
    await vm.exec(f"memfill {setup.fill_mib} --seed 17 --sock /run/mf.sock", timeout=240, check=True)
    cons = await consolidate_memory(vm, setup.target_mib, timeout=240)
    res.swapped_bytes = cons.swapped_bytes
    await restore_memory(vm, timeout=240)
    shim = vm.component("shim:swap")
    assert isinstance(shim, ShimComponent)
    await shim.control.wait_prefetch()
    st = await shim.stats()
    res.cache_bytes = st["cache_bytes"]
    return vm, res


async def run_case(config: str, setup: Setup = Setup(), log: Any = print,
                   costs: dict[str, Any] | None = None) -> CaseResult:
    """One experiment; a failure is recorded in the result (``error``), never raised (cancellation is).
    ``costs``: the learned migration costs to start from (``MigrationCosts.to_dict()``: what one
    long-lived cluster would have learnt from the runs before); the run's are in ``result.costs``."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; known: {CONFIGS}")
    res = CaseResult(config)
    try:
        async with asyncio.timeout(setup.timeout_s):
            await _run_case(config, setup, res, costs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the matrix goes on; the failure is reported with the row
        res.error = f"{type(exc).__name__}: {exc}".strip()[:500]
        res.verified = False
        log(f"  {config}: FAILED: {res.error}")
    return res


async def _run_case(config: str, setup: Setup, res: CaseResult, costs: dict[str, Any] | None) -> None:
    async with Underlay(["a", "b"], mbit=setup.link_mbit) as ul:
        async with Cluster("mpbench", drivers=(ShimDriver(ShimOptions(latency_ms=setup.latency_ms)),)) as cl:
            if costs is not None:
                cl.extension("migration.costs", lambda _c: MigrationCosts.from_dict(costs))
            for h in ("a", "b"):
                cl.add_host(HostSpec(h, vcpus=4, memory_mib=4096), network=ul.host_network(h))
            vm, prep = await prepare_guest(cl, setup)
            res.cache_bytes, res.swapped_bytes = prep.cache_bytes, prep.swapped_bytes
            shim = vm.component("shim:swap")
            st0 = await shim.stats()
            res.hit_rate_before = st0["hit_rate"] if st0["hits"] + st0["misses"] else None
            res.shim_pid_before = shim.pids()[0] if shim.pids() else None
            await vm.exec(f"dirty {setup.dirty_wss_mib} {setup.dirty_rate_mib_s:g} >/dev/null 2>&1 & "
                          "echo $! > /run/dirty.pid", check=True)
            hb = HeartbeatMonitor()
            await hb.attach(vm.heartbeat_socket, timeout=10)
            await hb.wait_beats(20, timeout=30)
            try:
                if config != "no-migration":
                    t0 = time.monotonic()
                    m = await migrate(vm, "b", policy=setup.policy, timeout=300, heartbeat=hb,
                                      uld=ULD_MODE[config], policy_params=dict(setup.policy_params))
                    res.migration_s = time.monotonic() - t0
                    r: MigrationResult | None = m.result
                    assert r is not None
                    res.result = r.to_dict()
                    res.downtime_ms_guest = r.downtime_ms_guest
                    u = r.uld
                    res.uld_bytes = int(u.get("bytes", 0)) if u else 0
                    res.uld_downtime_ms = u.get("downtime_ms") if u else None
                    res.uld_head_s = u.get("head_s") if u else None
                    res.breakdown = dict(u.get("breakdown") or {}) if u else {}
                    res.costs = costs_of(cl).to_dict()
            finally:
                await hb.close()
            await vm.exec("kill $(cat /run/dirty.pid)", timeout=30)
            shim = vm.component("shim:swap")
            res.shim_pid_after = shim.pids()[0] if shim.pids() else None
            st1 = await shim.stats()
            out = await vm.exec("retouch seq --sock /run/mf.sock", timeout=setup.timeout_s)
            st2 = await shim.stats()
            mo = _OK.search(out.stdout)
            if not mo:
                raise RuntimeError(f"retouch printed no report: {out.stdout!r} {out.stderr!r}")
            res.retouch_s = float(mo.group(4))
            res.hit_rate_after = _hit_rate(st1, st2)
            res.retouch_shim = {k: st2[k] - st1.get(k, 0) for k in ("hits", "misses", "prefetched_pages",
                                                                    "prefetch_woken_pages", "backing_reads")} | {
                "cache_pages_before": st1["cache_pages"], "tracked_pages_before": st1["tracked_pages"],
                "skipped_before": st1["prefetch_skipped_pages"]}
            res.verified = (out.exit_code == 0 and int(mo.group(3)) == 0
                            and int(mo.group(2)) == setup.fill_mib * 256)
            with contextlib.suppress(Exception):
                await guest_swap_stats(vm, timeout=10)


# -- the lab scenario --------------------------------------------------------------------------------

def breakdown_rows(results: list[tuple[str, MigrationResult]]) -> list[list[str]]:
    """One row per migration: guest downtime and its ULD breakdown (ms)."""
    rows = []
    for label, r in results:
        b = r.uld.get("breakdown") or {}

        def f(k: str, b: dict[str, Any] = b) -> str:
            v = b.get(k)
            return "-" if v is None else f"{v:.0f}"
        g = r.downtime_ms_guest
        uld = b.get("uld_ms")
        share = f"{uld / g:.0%}" if uld is not None and g else "-"
        rows.append([label, "-" if g is None else f"{g:.0f}", *[f(k) for k in BREAKDOWN], f("uld_ms"), share,
                     f"{r.uld.get('bytes', 0) / MIB:.1f}", f"{r.uld.get('final_bytes', 0) / MIB:.2f}"])
    return rows


BREAKDOWN_HEADERS = ["migration", "guest downtime", "vCPU stop->pause", "ULD quiesce", "ULD transfer",
                     "ULD restore", "resume", "ULD total", "ULD share", "ULD MiB", "in pause MiB"]


async def run(console: Any, out_dir: Path) -> None:
    from rich.table import Table

    setup = Setup()
    console.print(f"two hosts on a {setup.link_mbit:g} Mbit/s link; a {setup.guest_mib} MiB guest swaps to its shim "
                  f"({setup.latency_ms:g} ms datastore): memfill {setup.fill_mib} MiB, consolidate to "
                  f"{setup.target_mib} MiB, restore with prefetch (a warm cache), then dirty "
                  f"{setup.dirty_wss_mib} MiB at {setup.dirty_rate_mib_s:g} MiB/s")
    results: list[tuple[str, MigrationResult]] = []
    async with Underlay(["a", "b"], mbit=setup.link_mbit) as ul:
        async with Cluster("lab-mp", drivers=(ShimDriver(ShimOptions(latency_ms=setup.latency_ms)),)) as cl:
            for h in ("a", "b"):
                cl.add_host(HostSpec(h, vcpus=4, memory_mib=4096), network=ul.host_network(h))
            vm, prep = await prepare_guest(cl, setup)
            console.print(f"  {(prep.swapped_bytes or 0) / MIB:.0f} MiB swapped out; the shim's cache holds "
                          f"{(prep.cache_bytes or 0) / MIB:.0f} MiB")
            await vm.exec(f"dirty {setup.dirty_wss_mib} {setup.dirty_rate_mib_s:g} >/dev/null 2>&1 &", check=True)
            await asyncio.sleep(2)
            for dest, mode, label in (("b", "precopy", "a->b precopy-uld"), ("a", "stop-copy", "b->a stop-copy-uld")):
                src_pid = vm.component("shim:swap").pids()
                try:
                    m = await migrate(vm, dest, policy=setup.policy, timeout=300, uld=mode,
                                      policy_params=dict(setup.policy_params))
                except MigrationError as exc:
                    console.print(f"  {label}: {str(exc).splitlines()[0]}")
                    continue
                assert m.result is not None
                console.print(f"  {label}: {m.result.summary()}")
                console.print(f"    shim pid {src_pid} on {m.result.source} -> {vm.component('shim:swap').pids()} on "
                              f"{vm.host.name} (its own process in {vm.host.netns})")
                results.append((label, m.result))
            table = Table(title="downtime breakdown (ms): vCPU stop -> ULD quiesce -> ULD transfer -> ULD restore "
                                "-> resume")
            for col in BREAKDOWN_HEADERS:
                table.add_column(col, no_wrap=True, justify="right" if col != "migration" else "left")
            for row in breakdown_rows(results):
                table.add_row(*row)
            console.print(table)
            shim = vm.component("shim:swap")
            before = await shim.stats()
            out = await vm.exec("retouch seq --sock /run/mf.sock", timeout=setup.timeout_s)
            after = await shim.stats()
            mo = _OK.search(out.stdout)
            ok = bool(mo and int(mo.group(3)) == 0)
            rate = _hit_rate(before, after)
            hit = f"{rate:.1%}" if rate is not None else "-"
            console.print(f"retouch after both migrations: {mo.group(4) if mo else '?'} s, shim hit rate {hit}, "
                          f"every page verified: {ok}")
            (out_dir / "multiprocess.json").write_text(json.dumps(
                {"setup": asdict(setup), "migrations": [{"label": lb, **r.to_dict()} for lb, r in results],
                 "retouch": out.stdout.strip(), "verified": ok}, indent=1, default=str))
            if not ok:
                raise RuntimeError(f"a page did not verify after the migrations: {out.stdout!r}")
