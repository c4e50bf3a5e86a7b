"""Control-plane benchmark: the manager API (a real manager process on its unix socket, our
httpx client) over each store (SQLite file; a real 3-member etcd cluster on loopback).

Per store: 200 hosts, then 10,000 VMs defined (not started) with 16 requests in flight (define
throughput), then list latency (a page of 100 from a random cursor, with the remaining count) and
get latency (one VM by name), p50/p99 over sequential requests. Quick mode: 1,000 VMs over 20
hosts, fewer samples. Placement (violations) and the start overhead through a host agent are not
measured yet: they are recorded as null, not as 0. Writes bench/results/control_plane.json.
"""
from __future__ import annotations

import asyncio
import os
import platform
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

from hvsim.control.client import ManagerClient
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.schema import HostCreate, VMDefine

from ._common import print_table, write_result

TARGETS = {"sqlite": {"list_p99_ms": 50.0, "get_p99_ms": 50.0, "define_per_s": 200.0},
           "etcd": {"list_p99_ms": 100.0, "get_p99_ms": 100.0}}


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


async def measure(store: str, store_url: str, run_dir: Path, hosts: int, vms: int, samples: int,
                  store_pids: list[int]) -> dict[str, Any]:
    with ManagerProcess(run_dir, store_url) as mgr:
        assert mgr.proc is not None
        server = [psutil.Process(mgr.proc.pid)]
        backend = [psutil.Process(p) for p in store_pids]
        async with ManagerClient(f"unix:{mgr.sock}", mgr.token, timeout=60) as c:
            for h in range(hosts):
                await c.add_host(HostCreate(name=f"h{h:03d}", vcpus=64, memory_mib=262144))
            sem = asyncio.Semaphore(16)
            define_lat: list[float] = []

            async def define(i: int) -> None:
                async with sem:
                    t = time.perf_counter()
                    await c.define_vm(VMDefine(name=f"vm{i:05d}", host=f"h{i % hosts:03d}", memory_mib=256))
                    define_lat.append(time.perf_counter() - t)
            load_before = os.getloadavg()[0]
            cpu0 = (own_cpu(), proc_cpu(server), proc_cpu(backend))
            t0 = time.perf_counter()
            await asyncio.gather(*(define(i) for i in range(vms)))
            define_s = time.perf_counter() - t0
            cpu1 = (own_cpu(), proc_cpu(server), proc_cpu(backend))
            define_cpu = [round((b - a) / vms * 1e3, 3) for a, b in zip(cpu0, cpu1, strict=True)]
            _, _, total = await c.list_vms(limit=1)
            assert total == vms, (total, vms)

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
            "violations": None, "start_overhead_ratio": None,
            # CPU ms per request [client (this process), manager, store processes]: less load-sensitive than latency
            "define_cpu_ms": define_cpu, "read_cpu_ms": read_cpu,
            "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
            "raw_ms": {"list": [round(x * 1e3, 3) for x in list_lat], "get": [round(x * 1e3, 3) for x in get_lat]}}


async def run(quick: bool) -> list[dict[str, Any]]:
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
    return runs


def main(quick: bool = False) -> None:
    t0 = time.monotonic()
    runs = asyncio.run(run(quick))
    context = {"quick": quick, "cpus": os.cpu_count(), "loadavg_after": os.getloadavg(),
               "python": platform.python_version(), "kernel": platform.release(),
               "etcd": subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
               "concurrency_define": 16, "list_page": 100, "wall_s": round(time.monotonic() - t0, 1)}
    targets = []
    for r in runs:
        for k, limit in TARGETS[r["store"]].items():
            ok = r[k] >= limit if k == "define_per_s" else r[k] <= limit
            targets.append({"store": r["store"], "metric": k, "target": limit, "value": round(r[k], 2), "met": ok})
    write_result("control_plane", {"runs": runs, "targets": targets, "context": context})
    print_table(["store", "vms", "list p50 ms", "list p99 ms", "get p50 ms", "get p99 ms", "define/s",
                 "define p99 ms", "full list s", "define cpu ms c/m/s", "read cpu ms c/m/s", "load 1m"],
                [[r["store"], r["vms"], r["list_p50_ms"], r["list_p99_ms"], r["get_p50_ms"], r["get_p99_ms"],
                  r["define_per_s"], r["define_p99_ms"], r["full_list_s"], "/".join(map(str, r["define_cpu_ms"])),
                  "/".join(map(str, r["read_cpu_ms"])), "/".join(map(str, r["loadavg_1m"]))] for r in runs])
    print_table(["store", "metric", "target", "value", "met"],
                [[t["store"], t["metric"], t["target"], t["value"], t["met"]] for t in targets])


if __name__ == "__main__":
    main("--quick" in sys.argv)
