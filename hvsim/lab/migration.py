"""Lab scenario: live migration of a busy guest between two hosts on a 200 Mbit/s shaped link,
with a live progress bar, then every switchover policy on the same cell side by side."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rich.console import Console

from hvsim.core.cluster import Cluster
from hvsim.migration import MigrationError, start_migration
from hvsim.cli.migrate import decisions_table, follow, result_table
from hvsim.core.model import HostSpec, VMSpec
from hvsim.network import Underlay

LINK_MBIT = 200
WSS_MIB, RATE = 64, 16.0          # 64 MiB rewritten at ~0.7 of the link's goodput
STEPWISE = {"downtime_delay_s": 10, "completion_timeout_s": 100, "data_gb_floor": 0,
            "timeout_action": "force_complete", "permit_post_copy": True}
TIMEOUTS = {"qemu-default": 30.0, "stepwise": 60.0, "hvsim-predictive": 60.0}


async def run(console: Console, out_dir: Path) -> None:
    async with Underlay(["host-a", "host-b"], mbit=LINK_MBIT) as ul:
        async with Cluster("lab-mig") as cl:
            for h in ("host-a", "host-b"):
                cl.add_host(HostSpec(h, vcpus=2, memory_mib=1024), network=ul.host_network(h))
            vm = await cl.define_vm(VMSpec("busy", memory_mib=256), "host-a")
            console.print(f"booting a 256 MiB guest on host-a; hosts joined by a {LINK_MBIT} Mbit/s tbf link ...")
            await vm.start(wait_ready=True, ready_timeout=120)
            await vm.exec(f"dirty {WSS_MIB} {RATE:g} >/dev/null 2>&1 &", check=True)
            await asyncio.sleep(WSS_MIB / RATE + 1)
            console.print(f"guest rewrites {WSS_MIB} MiB at {RATE:g} MiB/s; migrating with hvsim-predictive:")
            results = []
            for policy in ("hvsim-predictive", "qemu-default", "stepwise"):
                dest = "host-b" if vm.host.name == "host-a" else "host-a"
                m = start_migration(vm, dest, policy=policy, timeout=TIMEOUTS[policy],
                                       policy_params=STEPWISE if policy == "stepwise" else {})
                if policy == "hvsim-predictive":
                    await follow(m, console)
                else:
                    try:
                        await m.wait()
                    except MigrationError as exc:
                        console.print(f"  {policy}: {str(exc).splitlines()[0]}")
                assert m.result is not None
                console.print(f"  {m.result.summary()}")
                if policy == "hvsim-predictive":
                    console.print(decisions_table(m.result))
                results.append(m.result)
                await asyncio.sleep(2)
            console.print(result_table(results, title=f"one cell: 256 MiB guest, {WSS_MIB} MiB at {RATE:g} MiB/s, "
                                                      f"{LINK_MBIT} Mbit/s link"))
            console.print(f"vm {vm.name}: {vm.state.value} on {vm.host.name}")
            (out_dir / "migration.json").write_text(json.dumps([r.to_dict() for r in results], indent=1,
                                                               default=str))
