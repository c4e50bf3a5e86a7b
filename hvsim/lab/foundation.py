"""Lab scenario 1: an emulated datacenter of 2 hosts and 3 guests; a command in each guest via
the agent; a status table; clean ACPI shutdown of everything."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hvsim.core.cluster import Cluster
from hvsim.core.model import HostSpec, VMSpec


async def run(console: Console, out_dir: Path) -> None:
    async with Cluster("lab") as cl:
        cl.add_datacenter("dc1", cloud="lab-cloud")
        cl.add_host(HostSpec("host-a", vcpus=2, memory_mib=1024, datacenter="dc1"))
        cl.add_host(HostSpec("host-b", vcpus=2, memory_mib=1024, datacenter="dc1"))
        placement = {"web-1": "host-a", "web-2": "host-b", "db-1": "host-b"}
        vms = [await cl.define_vm(VMSpec(name, memory_mib=256), host) for name, host in placement.items()]
        console.print(f"booting {len(vms)} guests on {len(cl.hosts)} hosts (accel {cl.accel()}) ...")
        await asyncio.gather(*(vm.start(wait_ready=True, ready_timeout=120) for vm in vms))
        outputs = await asyncio.gather(*(
            vm.exec("echo \"$(hostname) $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s\"", timeout=30, check=True)
            for vm in vms))
        table = Table(title="datacenter dc1")
        for col in ("host", "VM", "state", "memory MiB", "boot s", "agent says"):
            table.add_column(col)
        rows = []
        for vm, out in zip(vms, outputs):
            row = vm.status_row()
            rows.append(row | {"agent": out.stdout.strip()})
            table.add_row(row["host"], row["vm"], row["state"], str(row["memory_mib"]),
                          f"{row['boot_s']:.2f}", out.stdout.strip())
        console.print(table)
        for h in cl.hosts.values():
            console.print(f"  {h.name}: {h.used_memory_mib}/{h.spec.memory_capacity_mib} MiB, "
                          f"{h.used_vcpus}/{h.spec.vcpu_capacity} vCPUs in use")
        await asyncio.gather(*(vm.shutdown(timeout=60) for vm in vms))
        console.print("all guests shut down via ACPI: " +
                      ", ".join(f"{vm.name}={vm.state.value}({vm.reason})" for vm in vms))
        (out_dir / "foundation.json").write_text(json.dumps({"vms": rows}, indent=2))
