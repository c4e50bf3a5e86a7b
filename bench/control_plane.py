"""Control-plane benchmark: the manager API (a real manager process on its unix socket, our
httpx client) over each store (SQLite file; a real 3-member etcd cluster on loopback).

Per store: 200 hosts, required placement rules (10 groups spread evenly over the hosts, 5 groups
anti-affine per host), then 10,000 VMs defined (not started) **without a host**, so the manager's
placement controller places every one, with 16 requests in flight (define throughput), and the
independent check of the stored placement (``violations``: required rules broken, must be 0); then
list latency (a page of 100 from a random cursor, with the remaining count) and get latency (one
VM by name), p50/p99 over sequential requests. Quick mode: 1,000 VMs over 20 hosts, fewer samples.
One pass per store (the API part is many thousand requests; its spread is in the raw samples).

``start_overhead_ratio``: the start of the same 256 MiB guest (until its guest agent answers)
through a manager (SQLite) and a host agent in its own power domain, against
``Cluster.define_vm`` + ``VM.start`` in this process, interleaved with the harness (``plan`` /
``run_interleaved``: 3 rounds quick, 5 full, the order shuffled per round); the guest is stopped
between trials (not timed). The ratio is the ratio of medians, with its min/max extremes and the
verdict of :func:`bench._common.meets` against 1.1. Boot time under TCG varies by more than the
overhead, so each trial also records the guest's own boot (launch to agent ready, measured by the
VM; the agent reports it): ``added_ms`` is the median of (wall - boot) through the control plane
minus the same in-process, and ``paired_ratio`` = (in-process median + added) / in-process median.
Writes bench/results/control_plane.json.
"""
from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from hvsim.control.agent_client import AgentClient
from hvsim.control.client import ManagerClient
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.launch import EmulatedHost
from hvsim.control.launch import ManagerProcess as ManagedManager
from hvsim.control.schema import HostCreate, RuleCreate, VMDefine
from hvsim.control.state import GroupRecord
from hvsim.core.cluster import Cluster
from hvsim.core.model import HostSpec, VMSpec

from ._common import (
    compare, context, fmt_stat, meets, plan, print_context, print_table, repeats, run_interleaved, write_result,
)

TARGETS = {"sqlite": {"list_p99_ms": 50.0, "get_p99_ms": 50.0, "define_per_s": 200.0},
           "etcd": {"list_p99_ms": 100.0, "get_p99_ms": 100.0}}
START_TARGET = 1.1
SPREAD_GROUPS = 10          # each: a required spread rule (max skew 1 per host)
ANTI_GROUPS = 5             # each: a required anti-affinity rule per host, hosts // 4 members
GUEST_MIB = 256


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))]


class ManagerProcess:
    def __init__(self, run_dir: Path, store_url: str) -> None:
        self.run_dir = run_dir
        self.store_url = store_url
        self.sock = run_dir / "sock" / "manager.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ManagerProcess:
        ready = self.run_dir / "ready"
        self.log = open(self.run_dir / "manager.log", "wb")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen([sys.executable, "-m", "hvsim.control.api", "--store", self.store_url,
                                      "--token-file", str(self.run_dir / "token"), "--socket", str(self.sock),
                                      "--ready-file", str(ready)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"manager did not start: {(self.run_dir / 'manager.log').read_text()[-2000:]}")
            time.sleep(0.05)
        self.token = (self.run_dir / "token").read_text().strip()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def setup_rules(c: ManagerClient, hosts: int, vms: int) -> list[str | None]:
    """Groups and required rules; the group of each VM (None: ungrouped)."""
    anti_size = max(1, hosts // 4)
    for g in range(SPREAD_GROUPS):
        await c.add_group(GroupRecord(name=f"spread{g}"))
        await c.add_rule(RuleCreate(name=f"spread{g}-host", spec={"kind": "spread", "groups": [f"spread{g}"],
                                                                   "level": "host", "max_skew": 1}))
    for g in range(ANTI_GROUPS):
        await c.add_group(GroupRecord(name=f"anti{g}"))
        await c.add_rule(RuleCreate(name=f"anti{g}-host", spec={"kind": "anti_affinity", "groups": [f"anti{g}"],
                                                                 "level": "host"}))
    groups: list[str | None] = []
    anti_left = [anti_size] * ANTI_GROUPS
    for i in range(vms):
        if i % 10 == 9 and any(anti_left):                   # every tenth VM: an anti-affine group with room
            g = next(k for k, n in enumerate(anti_left) if n)
            anti_left[g] -= 1
            groups.append(f"anti{g}")
        elif i % 2 == 0:
            groups.append(f"spread{(i // 2) % SPREAD_GROUPS}")
        else:
            groups.append(None)
    return groups


async def measure(store: str, store_url: str, run_dir: Path, hosts: int, vms: int, samples: int,
                  store_pids: list[int]) -> dict[str, Any]:
    with ManagerProcess(run_dir, store_url) as mgr:
        assert mgr.proc is not None
        server = [psutil.Process(mgr.proc.pid)]
        backend = [psutil.Process(p) for p in store_pids]
        async with ManagerClient(f"unix:{mgr.sock}", mgr.token, timeout=60) as c:
            for h in range(hosts):
                await c.add_host(HostCreate(name=f"h{h:03d}", vcpus=64, memory_mib=262144))
            groups = await setup_rules(c, hosts, vms)
            sem = asyncio.Semaphore(16)
            define_lat: list[float] = []
            placed: dict[str, str] = {}

            async def define(i: int) -> None:
                async with sem:
                    t = time.perf_counter()
                    vm, _ = await c.define_vm(VMDefine(name=f"vm{i:05d}", group=groups[i], memory_mib=256))
                    define_lat.append(time.perf_counter() - t)
                    assert vm.host is not None
                    placed[vm.name] = vm.host
            load_before = os.getloadavg()[0]
            cpu0 = (own_cpu(), proc_cpu(server), proc_cpu(backend))
            t0 = time.perf_counter()
            await asyncio.gather(*(define(i) for i in range(vms)))
            define_s = time.perf_counter() - t0
            cpu1 = (own_cpu(), proc_cpu(server), proc_cpu(backend))
            define_cpu = [round((b - a) / vms * 1e3, 3) for a, b in zip(cpu0, cpu1, strict=True)]
            _, _, total = await c.list_vms(limit=1)
            assert total == vms, (total, vms)
            t = time.perf_counter()
            chk = await c.placement()
            check_s = time.perf_counter() - t
            per_host: dict[str, int] = {}
            for where in placed.values():
                per_host[where] = per_host.get(where, 0) + 1

            rng = random.Random(42)
            names = [f"vm{i:05d}" for i in range(vms)]
            for _ in range(20):                                 # warm up
                await c.get_vm(rng.choice(names))
                await c.list_vms(limit=100, after=rng.choice(names))
            get_lat, list_lat = [], []
            cpu0 = (own_cpu(), proc_cpu(server), proc_cpu(backend))
            for i in range(samples):                            # interleaved: both see the same conditions
                for kind in (("get", "list") if i % 2 == 0 else ("list", "get")):
                    name = rng.choice(names)
                    t = time.perf_counter()
                    if kind == "get":
                        vm = await c.get_vm(name)
                        get_lat.append(time.perf_counter() - t)
                        assert vm.name == name
                    else:
                        items, _, _ = await c.list_vms(limit=100, after=name)
                        list_lat.append(time.perf_counter() - t)
                        assert len(items) == min(100, vms - 1 - names.index(name))
            cpu1 = (own_cpu(), proc_cpu(server), proc_cpu(backend))
            read_cpu = [round((b - a) / (2 * samples) * 1e3, 3) for a, b in zip(cpu0, cpu1, strict=True)]
            load_after = os.getloadavg()[0]
            t = time.perf_counter()
            seen = 0
            async for _ in c.iter_vms(page=1000):
                seen += 1
            full_list_s = time.perf_counter() - t
            assert seen == vms
    return {"store": store, "hosts": hosts, "vms": vms, "samples": samples,
            "list_p50_ms": statistics.median(list_lat) * 1e3, "list_p99_ms": pct(list_lat, 99) * 1e3,
            "get_p50_ms": statistics.median(get_lat) * 1e3, "get_p99_ms": pct(get_lat, 99) * 1e3,
            "define_per_s": vms / define_s, "define_p50_ms": statistics.median(define_lat) * 1e3,
            "define_p99_ms": pct(define_lat, 99) * 1e3, "full_list_s": full_list_s,
            "violations": chk.required_violations, "placement_problems": chk.problems[:10],
            "rules": SPREAD_GROUPS + ANTI_GROUPS, "placement_check_s": round(check_s, 3),
            "vms_per_host_min_max": [min(per_host.values()), max(per_host.values())],
            "start_overhead_ratio": None,
            # CPU ms per request [client (this process), manager, store processes]: less load-sensitive than latency
            "define_cpu_ms": define_cpu, "read_cpu_ms": read_cpu,
            "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
            "raw_ms": {"list": [round(x * 1e3, 3) for x in list_lat], "get": [round(x * 1e3, 3) for x in get_lat]}}


async def start_overhead(quick: bool, base: Path) -> tuple[dict[str, Any], Any]:
    """The start of one guest through manager + host agent vs in this process (interleaved).
    Each trial also records the guest's own boot (QEMU launch to guest agent ready, as the VM
    measures it, on the agent's side for the control plane): wall - boot is what surrounds the boot
    (the control plane's calls and records, or the in-process define), a paired figure the boot's
    variance under TCG does not blur."""
    sched = plan(["in-process", "control-plane"], repeats(quick, quick_n=3, full_n=5))
    async with EmulatedHost("cp1", base, vcpus=2, memory_mib=1024) as host:
        mgr = ManagedManager(base / "manager", f"sqlite://{base / 'start.db'}")
        async with mgr, ManagerClient(mgr.address, mgr.token, timeout=300) as c, \
                AgentClient(host.address, tls=None, timeout=60) as agent:
            await c.add_host(HostCreate(name="cp1", agent=host.address))
            await c.define_vm(VMDefine(name="g", memory_mib=GUEST_MIB, host="cp1"))
            async with Cluster("bench-cp") as cl:
                cl.add_host(HostSpec("local", vcpus=2, memory_mib=1024))

                async def one(cfg: str, _round: int) -> tuple[float, float]:
                    if cfg == "in-process":
                        t = time.perf_counter()
                        vm = await cl.define_vm(VMSpec("g", memory_mib=GUEST_MIB), "local")
                        await vm.start(wait_ready=True, ready_timeout=120)
                        dt = time.perf_counter() - t
                        boot = vm.boot_time_s or 0.0
                        await vm.shutdown()
                        await cl.undefine_vm("g")
                    else:
                        t = time.perf_counter()
                        await c.start_vm("g")
                        dt = time.perf_counter() - t
                        boot = (await agent.vm("g")).boot_s or 0.0
                        await c.stop_vm("g")
                    return dt, boot
                samples = await run_interleaved(sched, one)
    cp, inproc = [w for w, _ in samples.of("control-plane")], [w for w, _ in samples.of("in-process")]
    cp_around = [w - b for w, b in samples.of("control-plane")]
    in_around = [w - b for w, b in samples.of("in-process")]
    cmp = compare(cp, inproc)
    added = statistics.median(cp_around) - statistics.median(in_around)
    base_s = statistics.median(inproc)
    res = {"ratio": cmp.ratio, "ratio_range": cmp.range, "verdict_vs_in_process": cmp.verdict,
           "target": START_TARGET, "met": meets(cmp, at_most=START_TARGET),
           "control_plane_s": fmt_stat(cp), "in_process_s": fmt_stat(inproc),
           "control_plane_samples_s": [round(x, 3) for x in cp], "in_process_samples_s": [round(x, 3) for x in inproc],
           "around_boot_ms": {"control_plane": fmt_stat(cp_around, 1e3), "in_process": fmt_stat(in_around, 1e3),
                              "control_plane_samples": [round(x * 1e3, 1) for x in cp_around],
                              "in_process_samples": [round(x * 1e3, 1) for x in in_around]},
           "added_ms": round(added * 1e3, 1),
           "paired_ratio": round((base_s + added) / base_s, 4),
           "guest_mib": GUEST_MIB}
    return res, samples


async def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    hosts, vms, samples = (20, 1000, 200) if quick else (200, 10000, 1000)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hvsim-bench-cp-") as tmp:
        d = Path(tmp) / "sqlite"
        d.mkdir(mode=0o700)
        runs.append(await measure("sqlite", f"sqlite://{d / 'state.db'}", d, hosts, vms, samples, []))
        async with EtcdCluster() as etcd:
            d = Path(tmp) / "etcd"
            d.mkdir(mode=0o700)
            runs.append(await measure("etcd", etcd.store_url, d, hosts, vms, samples, list(etcd.pids().values())))
        d = Path(tmp) / "start"
        d.mkdir(mode=0o700)
        start, sched = await start_overhead(quick, d)
    for r in runs:
        r["start_overhead_ratio"] = start["ratio"]      # measured once (manager on SQLite), the same figure
    return runs, start, sched


def main(quick: bool = False) -> None:
    ctx = context(quick)
    print_context(ctx)
    runs, start, samples = asyncio.run(run(quick))
    ctx["etcd"] = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    ctx["concurrency_define"] = 16
    ctx["list_page"] = 100
    targets = []
    for r in runs:
        for k, limit in TARGETS[r["store"]].items():
            ok = r[k] >= limit if k == "define_per_s" else r[k] <= limit
            targets.append({"store": r["store"], "metric": k, "target": limit, "value": round(r[k], 2), "met": ok})
        targets.append({"store": r["store"], "metric": "violations", "target": 0, "value": r["violations"],
                        "met": r["violations"] == 0})
    targets.append({"store": "sqlite", "metric": "start_overhead_ratio", "target": START_TARGET,
                    "value": start["ratio"], "met": start["met"]})
    targets.append({"store": "sqlite", "metric": "start_overhead_paired_ratio", "target": START_TARGET,
                    "value": start["paired_ratio"], "met": start["paired_ratio"] <= START_TARGET})
    write_result("control_plane", {"runs": runs, "start_overhead": start, "targets": targets}, ctx, samples)
    print_table(["store", "vms", "list p50 ms", "list p99 ms", "get p50 ms", "get p99 ms", "define/s",
                 "define p99 ms", "violations", "full list s", "define cpu ms c/m/s", "read cpu ms c/m/s", "load 1m"],
                [[r["store"], r["vms"], r["list_p50_ms"], r["list_p99_ms"], r["get_p50_ms"], r["get_p99_ms"],
                  r["define_per_s"], r["define_p99_ms"], r["violations"], r["full_list_s"],
                  "/".join(map(str, r["define_cpu_ms"])), "/".join(map(str, r["read_cpu_ms"])),
                  "/".join(map(str, r["loadavg_1m"]))] for r in runs])
    print_table(["start", "control plane s", "in-process s", "ratio", "ratio range", "verdict",
                 "around boot ms cp / in", "added ms", "paired ratio"],
                [["guest", start["control_plane_s"], start["in_process_s"], start["ratio"],
                  "-" if start["ratio_range"] is None else "-".join(f"{x:.3f}" for x in start["ratio_range"]),
                  start["met"], f"{start['around_boot_ms']['control_plane']} / {start['around_boot_ms']['in_process']}",
                  start["added_ms"], start["paired_ratio"]]])
    print_table(["store", "metric", "target", "value", "met"],
                [[t["store"], t["metric"], t["target"], t["value"], t["met"]] for t in targets])


if __name__ == "__main__":
    main("--quick" in sys.argv)
