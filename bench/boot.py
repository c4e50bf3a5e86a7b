"""Boot benchmark: boot-to-agent-ready time, QMP round trip through hvsim vs bare qemu.qmp on the
same VM, and host CPU used by idle guests. Writes bench/results/boot.json."""
from __future__ import annotations

import asyncio
import statistics
import time

import psutil
from qemu.qmp import QMPClient

from hvsim.core.cluster import Cluster, images_dir
from qmp_bridge.accel import choose_accel
from hvsim.core.model import HostSpec, VMSpec

from ._common import print_table, write_result

BOOTS = 5
RTT_SAMPLES = 300
IDLE_GUESTS = 8
IDLE_WINDOW_S = 5.0


async def boot_times(n: int) -> list[float]:
    times = []
    async with Cluster("bench-boot") as cl:
        cl.add_host(HostSpec("h1", vcpus=2, memory_mib=2048))
        for i in range(n):
            vm = await cl.define_vm(VMSpec(f"boot{i}", memory_mib=256), "h1")
            await vm.start(wait_ready=True, ready_timeout=120)
            times.append(vm.boot_time_s or 0.0)
            await vm.destroy()
    return times


async def qmp_rtt() -> dict[str, float]:
    async with Cluster("bench-rtt") as cl:
        cl.add_host(HostSpec("h1", vcpus=2, memory_mib=2048))
        vm = await cl.define_vm(VMSpec("rtt", memory_mib=256), "h1")
        raw_sock = cl.run_dir / "raw-qmp.sock"
        # a second QMP monitor on the same QEMU, for the bare qemu.qmp client
        orig = vm.machine_spec

        def with_raw_monitor(*a, **kw):  # type: ignore[no-untyped-def]
            import dataclasses
            spec = orig(*a, **kw)
            return dataclasses.replace(spec, extra_args=spec.extra_args + (
                "-chardev", f"socket,id=rawqmp,path={raw_sock},server=on,wait=off",
                "-mon", "chardev=rawqmp,mode=control"))
        vm.machine_spec = with_raw_monitor  # type: ignore[method-assign]
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
    h, r = statistics.median(samples["hvsim"]), statistics.median(samples["raw"])
    return {"hvsim": round(h, 1), "raw": round(r, 1), "ratio": round(h / r, 3), "samples": RTT_SAMPLES}


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


async def run(quick: bool) -> dict:
    times = await boot_times(BOOTS)
    rtt = await qmp_rtt()
    idle = await idle_cpu(IDLE_GUESTS)
    return {
        "boot_to_ready_s": {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
                            "max": round(max(times), 3), "samples": [round(t, 3) for t in times]},
        "qmp_rtt_us": rtt,
        "idle_guest_cpu_pct": idle,
        "accel": choose_accel(str(images_dir() / "vmlinuz"), str(images_dir() / "initrd.img")),
    }


def main(quick: bool = False) -> None:
    res = asyncio.run(run(quick))
    b, r, i = res["boot_to_ready_s"], res["qmp_rtt_us"], res["idle_guest_cpu_pct"]
    print_table(["metric", "value", "baseline", "ratio"], [
        ["boot-to-agent-ready median s", b["median"], "", ""],
        ["boot min / max s", f"{b['min']} / {b['max']}", "", ""],
        ["QMP query-status RTT us", r["hvsim"], r["raw"], r["ratio"]],
        [f"CPU % of one core, {i['guests']} idle guests", i["total_pct_of_one_core"], "", ""],
        ["CPU % per idle guest", i["per_guest_pct"], "", ""],
    ])
    write_result("boot", res)


if __name__ == "__main__":
    main()
