"""The manager on a real 3-member etcd with the etcd leader SIGKILLed under concurrent defines
(placed by the manager): the manager keeps serving with 2 of 3 members, every define it
acknowledged is in the store afterwards, and the placement still breaks no required rule."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiError
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.schema import HostCreate, RuleCreate, VMDefine
from hvsim.control.state import GroupRecord

from .manager_proc import manager_process

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_etcd_leader_killed_under_defines_loses_no_acknowledged_one(tmp_path: Path) -> None:
    async with EtcdCluster() as etcd:
        with manager_process(tmp_path / "run", etcd.store_url) as m:
            async with ManagerClient(m.address, m.token, timeout=60) as c:
                for h in range(4):
                    await c.add_host(HostCreate(name=f"h{h}", vcpus=64, memory_mib=65536))
                await c.add_group(GroupRecord(name="web"))
                await c.add_rule(RuleCreate(name="web-spread", spec={"kind": "spread", "groups": ["web"],
                                                                    "level": "host", "max_skew": 1}))
                acked: list[str] = []
                refused: list[str] = []
                stop = asyncio.Event()

                async def definer(tag: str) -> None:
                    i = 0
                    while not stop.is_set():
                        name = f"{tag}-{i:04d}"
                        try:
                            await c.define_vm(VMDefine(name=name, group="web"))
                            acked.append(name)
                        except ApiError:        # unavailable while the cluster elects: not acknowledged
                            refused.append(name)
                            await asyncio.sleep(0.1)
                        i += 1
                tasks = [asyncio.create_task(definer(f"w{n}")) for n in range(4)]
                try:
                    while len(acked) < 40:
                        await asyncio.sleep(0.05)
                    await etcd.kill(await etcd.leader())
                    at_kill = len(acked)
                    deadline = asyncio.get_running_loop().time() + 60
                    while len(acked) < at_kill + 80:             # the manager goes on with 2 of 3 members
                        assert asyncio.get_running_loop().time() < deadline, (len(acked), refused[-3:])
                        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
                        await asyncio.sleep(0.05)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
                stored = {v.name async for v in c.iter_vms()}
                assert set(acked) <= stored, sorted(set(acked) - stored)     # no acknowledged define lost
                assert (await c.placement()).required_violations == 0
