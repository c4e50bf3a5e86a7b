"""Lab scenario: live migration of a busy guest between two hosts on a 200 Mbit/s shaped link:
QEMU's default first (what the cluster learns from it feeds the plan), then the plan of
hvsim-predictive under the default contract (300 ms guest-observed downtime) printed before it
migrates, the migration with a live progress bar and the contract's verdict, then Nova's
stepping; every policy side by side, with the guest-observed gap explained."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from rich.console import Console

from hvsim.core.cluster import Cluster
from hvsim.migration import MigrationError, plan_migration, start_migration
from hvsim.cli.migrate import decisions_table, follow, plan_table, result_table
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
            console.print(f"guest rewrites {WSS_MIB} MiB at {RATE:g} MiB/s")
            results = []
            for policy in ("qemu-default", "hvsim-predictive", "stepwise"):
                dest = "host-b" if vm.host.name == "host-a" else "host-a"
                if policy == "hvsim-predictive":
                    plan = await plan_migration(vm, dest, time_budget_s=TIMEOUTS[policy])
                    console.print(plan_table(plan))
                    console.print("migrating with hvsim-predictive under that contract:")
                m = start_migration(vm, dest, policy=policy, timeout=TIMEOUTS[policy],
                                    policy_params=STEPWISE if policy == "stepwise" else {})
                if policy == "hvsim-predictive":
                    await follow(m, console)
                else:
                    try:
                        await m.wait()
                    except MigrationError as exc:
                        console.print(f"  {policy}: {str(exc).splitlines()[0]}")
                r = m.result
                assert r is not None
                console.print(f"  {r.summary()}")
                if policy == "hvsim-predictive":
                    console.print(decisions_table(r))
                    pe = r.plan_error or {}
                    console.print(f"  contract ({r.contract['downtime_budget_ms'] if r.contract else '-'} ms): "
                                  f"{'met' if r.contract_met else 'missed'}; guest saw "
                                  f"{r.downtime_ms_guest or 0:.0f} ms; plan error total "
                                  f"{(pe.get('total_s') or 0):+.0%}, downtime {(pe.get('downtime_ms') or 0):+.0%}")
                if r.gap:
                    gp = r.gap
                    console.print(f"  gap {gp['gap_ms']:.0f} ms = before stop {gp['before_stop_ms']} + stop-and-copy "
                                  f"{gp['stop_and_copy_ms']} + drain/load {gp['drain_and_load_ms']} + resume->beat "
                                  f"{gp['resume_to_beat_ms']} ms")
                results.append(r)
                await asyncio.sleep(2)
            console.print(result_table(results, title=f"one cell: 256 MiB guest, {WSS_MIB} MiB at {RATE:g} MiB/s, "
                                                      f"{LINK_MBIT} Mbit/s link"))
            console.print(f"vm {vm.name}: {vm.state.value} on {vm.host.name}")
            (out_dir / "migration.json").write_text(json.dumps([r.to_dict() for r in results], indent=1,
                                                               default=str))
