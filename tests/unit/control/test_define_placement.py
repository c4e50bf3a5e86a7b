"""Many VMs defined at once without a host (a real manager process, SQLite): the manager places
every one under the stored required rules, and the independent check of what the store holds
finds no rule broken, whatever the interleaving of the concurrent requests."""
from __future__ import annotations

import asyncio
from pathlib import Path

from hvsim.control.client import ManagerClient
from hvsim.control.schema import HostCreate, RuleCreate, VMDefine
from hvsim.control.state import GroupRecord

from .manager_proc import manager_process


async def test_concurrent_placed_defines_break_no_required_rule(tmp_path: Path) -> None:
    with manager_process(tmp_path / "run", f"sqlite://{tmp_path / 'state.db'}") as m:
        async with ManagerClient(m.address, m.token, timeout=60) as c:
            for h in range(8):
                await c.add_host(HostCreate(name=f"h{h}", vcpus=64, memory_mib=65536))
            for g in range(3):
                await c.add_group(GroupRecord(name=f"s{g}"))
                await c.add_rule(RuleCreate(name=f"s{g}-spread", spec={"kind": "spread", "groups": [f"s{g}"],
                                                                      "level": "host", "max_skew": 1}))
            await c.add_group(GroupRecord(name="solo"))
            await c.add_rule(RuleCreate(name="solo-anti", spec={"kind": "anti_affinity", "groups": ["solo"],
                                                                "level": "host"}))
            sem = asyncio.Semaphore(16)

            async def define(i: int) -> str:
                group = "solo" if i % 25 == 0 else f"s{i % 3}" if i % 2 else None   # 8 solo: one per host
                async with sem:
                    vm, _ = await c.define_vm(VMDefine(name=f"vm{i:03d}", group=group))
                assert vm.host is not None
                return vm.host
            await asyncio.gather(*(define(i) for i in range(200)))
            chk = await c.placement()
            assert chk.vms == 200
            assert chk.required_violations == 0, chk.problems
            solo = [v.host or "-" async for v in c.iter_vms() if v.group == "solo"]
            assert sorted(solo) == [f"h{h}" for h in range(8)]
