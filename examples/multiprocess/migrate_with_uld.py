"""A multi-process VM (QEMU + its swap shim) migrates with its user-level driver: the destination
host starts its own shim, the shim's state (swap map, cache, counters) crosses the shaped link, and
the guest resumes attached to the new shim.

Run as root: .venv/bin/python examples/multiprocess/migrate_with_uld.py"""
import asyncio

from hvsim.core.cluster import Cluster
from hvsim.core.model import DiskSpec, HostSpec, VMSpec
from hvsim.drivers.shim.component import ShimDriver, ShimOptions
from hvsim.memory import consolidate_memory, restore_memory, setup_guest_swap
from hvsim.migration import migrate
from hvsim.network import Underlay


async def main() -> None:
    async with Underlay(["a", "b"], mbit=200) as ul:                      # two host namespaces, tbf link
        async with Cluster("mp-demo", drivers=(ShimDriver(ShimOptions(latency_ms=1.0)),)) as cl:
            for h in ("a", "b"):
                cl.add_host(HostSpec(h, vcpus=2, memory_mib=2048), network=ul.host_network(h))
            spec = VMSpec("web", memory_mib=192, disks=(DiskSpec("swap", 128, kind="shim"),))
            vm = await cl.define_vm(spec, "a")
            await vm.start(wait_ready=True, ready_timeout=120)
            await setup_guest_swap(vm, "swap")
            await vm.exec("memfill 64 --sock /run/mf.sock", timeout=120, check=True)
            await consolidate_memory(vm, 96, timeout=120)                    # some of it goes to the shim
            await restore_memory(vm, timeout=120)                            # the shim prefetches it back
            before = vm.component("shim:swap")
            cached = (await before.stats())["cache_pages"]
            print("source shim", before.pids(), "on", before.host.name, cached, "pages cached")
            m = await migrate(vm, "b", uld="precopy", timeout=180)          # or "stop-copy", "cold", "shared"
            after = vm.component("shim:swap")                                # another process, in b's namespace
            cached = (await after.stats())["cache_pages"]
            print("destination shim", after.pids(), "on", after.host.name, cached, "pages cached")
            print(m.result.summary())
            b = m.result.uld["breakdown"]
            print("downtime breakdown (ms):", {k: round(v) for k, v in b.items() if v is not None})
            res = await vm.exec("retouch seq --sock /run/mf.sock", timeout=240)
            print(res.stdout.strip())                                       # OK ... bad=0: every page verified


asyncio.run(main())
