"""Boot benchmark: boot-to-agent-ready time, QMP round trip through hvsim vs bare qemu.qmp on the
same VM, and host CPU used by idle guests.

Three configurations, interleaved over ``repeats`` rounds (full 5, quick 3; bench/_common.py):
``boot`` (one fresh guest to agent-ready), ``rtt`` (one guest, 300 query-status round trips
through each path, alternating) and ``idle`` (8 guests booted together, CPU over a 5 s window).

Writes bench/results/boot.json: ``boot_to_ready_s`` {median, min, max, samples (one per round)};
``qmp_rtt_us`` {hvsim, raw: medians over the rounds of each round's median; ratio: hvsim/raw of
those medians; samples: round trips per path and round; hvsim_samples, raw_samples: the per-round
medians; comparison: ratio range and verdict}; ``idle_guest_cpu_pct`` {guests, total_pct_of_one_core,
per_guest_pct, pct_of_host: medians, each with ``_samples``}; accel; context; schedule."""
from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import psutil
from qemu.qmp import QMPClient

from hvsim.core.cluster import KERNEL_FILE, Cluster, images_dir
from hvsim.core.model import HostSpec, VMSpec
from qmp_bridge.accel import choose_accel

from ._common import (
    Samples,
    compare,
    context,
    fmt_stat,
    merge_samples,
    plan,
    print_context,
    print_table,
    repeats,
    run_interleaved,
    write_result,
)

CONFIGS = ("boot", "rtt", "idle")
RTT_SAMPLES = 300
IDLE_GUESTS = 8
IDLE_WINDOW_S = 5.0


async def boot_time(name: str) -> float:
    async with Cluster("bench-boot") as cl:
        cl.add_host(HostSpec("h1", vcpus=2, memory_mib=2048))
        vm = await cl.define_vm(VMSpec(name, memory_mib=256), "h1")
        await vm.start(wait_ready=True, ready_timeout=120)
        t = vm.boot_time_s or 0.0
        await vm.destroy()
    return t


async def qmp_rtt() -> dict[str, float]:
    async with Cluster("bench-rtt") as cl:
        cl.add_host(HostSpec("h1", vcpus=2, memory_mib=2048))
        raw_sock = cl.run_dir / "raw-qmp.sock"
        # a second QMP monitor on the same QEMU, for the bare qemu.qmp client
        vm = await cl.define_vm(VMSpec("rtt", memory_mib=256, qemu_args=(
            "-chardev", f"socket,id=rawqmp,path={raw_sock},server=on,wait=off",
            "-mon", "chardev=rawqmp,mode=control")), "h1")
        await vm.start(wait_ready=True, ready_timeout=120)
        raw = QMPClient("raw")
        await raw.connect(str(raw_sock))
        try:
            samples: dict[str, list[float]] = {"hvsim": [], "raw": []}
            for _ in range(20):  # warm up both paths
                await vm.qmp.execute("query-status")
                await raw.execute("query-status")
            for i in range(RTT_SAMPLES):   # interleaved so both see the same conditions
                for kind in (("hvsim", "raw") if i % 2 == 0 else ("raw", "hvsim")):
                    t0 = time.perf_counter()
                    if kind == "hvsim":
                        await vm.qmp.execute("query-status")
                    else:
                        await raw.execute("query-status")
                    samples[kind].append((time.perf_counter() - t0) * 1e6)
        finally:
            await raw.disconnect()
    return {"hvsim": round(statistics.median(samples["hvsim"]), 1), "raw": round(statistics.median(samples["raw"]), 1)}


async def idle_cpu(n: int) -> dict[str, float]:
    async with Cluster("bench-idle") as cl:
        cl.add_host(HostSpec("h1", vcpus=4, memory_mib=4096, cpu_overcommit=4.0))
        vms = [await cl.define_vm(VMSpec(f"idle{i}", memory_mib=128), "h1") for i in range(n)]
        await asyncio.gather(*(vm.start(wait_ready=True, ready_timeout=240) for vm in vms))
        await asyncio.sleep(3.0)  # let boot work settle
        procs = [psutil.Process(vm.pid) for vm in vms]

        def cpu() -> float:
            total = 0.0
            for p in procs:
                t = p.cpu_times()
                total += t.user + t.system
            return total
        c0, t0 = cpu(), time.monotonic()
        await asyncio.sleep(IDLE_WINDOW_S)
        c1, t1 = cpu(), time.monotonic()
    pct_of_core = 100.0 * (c1 - c0) / (t1 - t0)
    return {"guests": n, "total_pct_of_one_core": round(pct_of_core, 2),
            "per_guest_pct": round(pct_of_core / n, 2),
            "pct_of_host": round(pct_of_core / psutil.cpu_count(), 2)}


async def run(quick: bool) -> tuple[dict[str, Any], Samples[str, Any]]:
    sched = plan(list(CONFIGS), repeats(quick, quick_n=3, full_n=5))

    async def one(cfg: str, rnd: int) -> Any:
        if cfg == "boot":
            t = await boot_time(f"boot{rnd}")
            print(f"  boot to agent ready: {t:.2f}s", flush=True)
            return t
        if cfg == "rtt":
            r = await qmp_rtt()
            print(f"  QMP RTT: hvsim {r['hvsim']} us, raw {r['raw']} us", flush=True)
            return r
        i = await idle_cpu(IDLE_GUESTS)
        print(f"  {IDLE_GUESTS} idle guests: {i['total_pct_of_one_core']} % of one core", flush=True)
        return i

    samples = await run_interleaved(sched, one)
    boots = [round(t, 3) for t in samples.of("boot")]
    rtts = samples.of("rtt")
    h, r = [x["hvsim"] for x in rtts], [x["raw"] for x in rtts]
    cmp = compare(h, r)
    rtt = {"hvsim": statistics.median(h), "raw": statistics.median(r),
           "ratio": None if cmp.ratio is None else round(cmp.ratio, 3), "samples": RTT_SAMPLES,
           "hvsim_samples": h, "raw_samples": r, "comparison": cmp.to_json()}
    return {
        "boot_to_ready_s": {"median": round(statistics.median(boots), 3), "min": min(boots), "max": max(boots),
                            "samples": boots},
        "qmp_rtt_us": rtt,
        "idle_guest_cpu_pct": merge_samples(samples.of("idle"), ident=("guests",)),
        "accel": choose_accel(str(images_dir() / KERNEL_FILE), str(images_dir() / "initrd.img")),
    }, samples


def main(quick: bool = False) -> None:
    ctx = context(quick)
    print_context(ctx)
    res, samples = asyncio.run(run(quick))
    write_result("boot", res, ctx, samples)
    b, r, i = res["boot_to_ready_s"], res["qmp_rtt_us"], res["idle_guest_cpu_pct"]
    cmp = compare(r["hvsim_samples"], r["raw_samples"])
    print_table(["metric", "median (min-max)", "baseline", "ratio (range)", "verdict"], [
        ["boot-to-agent-ready s", fmt_stat(b["samples"]), "", "", ""],
        ["QMP query-status RTT us (hvsim / raw qemu.qmp)", fmt_stat(r["hvsim_samples"]), fmt_stat(r["raw_samples"]),
         cmp.fmt(), cmp.verdict],
        [f"CPU % of one core, {i['guests']} idle guests", fmt_stat(i["total_pct_of_one_core_samples"]), "", "", ""],
        ["CPU % per idle guest", fmt_stat(i["per_guest_pct_samples"]), "", "", ""],
    ])
    print("RTT: each round's median over its samples; verdict 'win' = hvsim faster than the raw client with"
          " non-overlapping ranges, 'loss' = slower")


if __name__ == "__main__":
    main()
