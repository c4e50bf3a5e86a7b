"""Two clouds shared by the tests of a class, the source guest passed on between them.

A cross-cloud test spends its time booting guests (the source in cloud A, with its data disk and
writer; the destination that ``prepare()`` creates in cloud B), not building the scene. The scene (the
WAN underlay, both clusters, the providers) is made once per class (``shared_clouds``); each test sees
it in the state of a fresh one, through a view with its own work directory:

- before and after every test: every VM in cloud B deleted and every allocation on its host released,
  in cloud A every VM but the guest kept for the next test, every WAN and client link up at its rate,
  both providers no longer authenticated, the test's writers stopped (a guest's own tasks, its agent's
  and QMP's readers, live as long as the guest: nothing is cancelled wholesale);
- ``source_vm()`` (the same signature as :meth:`Scene.source_vm`) reuses the source guest an earlier
  test left only if that test passed, the guest has the same spec (memory, disk size, prefill), is
  running on cloud A's host, not lent to anything, and answers a check that no writer, migration agent,
  agent directory or tracing instance of a migration is left in it; its writer's log is removed (a new
  writer starts from record 1, as on a fresh disk) and a new writer with its own AckLog is started.
  Otherwise the guest is deleted and a fresh one made by :meth:`Scene.source_vm`;
- a failed test keeps the artefacts of both clouds (consoles, QEMU/QMP logs, state, events, tc) in its
  own ``test-results`` folder, and its guest is never passed on;
- at the end of the class both clusters and the underlay are closed and checked: a process or
  namespace that survived fails the teardown.

Tests that end with the source running and clean (a cancel, a revert, a refusal) come first in their
class; those that consume it (finalize, crash it, stop its agent) come after them.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from hvsim.core.lifecycle import VMState
from hvsim.crosscloud.app import AckLog, WriterApp
from hvsim.crosscloud.provider import InProcessProvider
from hvsim.crosscloud.scene import Scene, two_clouds
from hvsim.testing.plugin import Artifacts, Shared

WAN_MBIT = 40.0
LAN_MBIT = 1000.0
log = logging.getLogger("hvsim.testing.crosscloud")
# nothing of a migration or of a writer left in the guest (the agent's directory, its tracing instance)
CLEAN = ("! pidof hvsim-writer hvsim-migrate >/dev/null && [ ! -e /run/hvmig ] && "
         "! ls /sys/kernel/tracing/instances/ 2>/dev/null | grep -q hvmig && echo clean")


class SharedClouds:
    def __init__(self, scene: Scene, shared: Shared) -> None:
        self.base, self.shared = scene, shared
        self.scene = scene                       # the current test's view (its own work directory)
        self.apps: list[WriterApp] = []
        self.specs: dict[str, tuple[int, int, int]] = {}    # guest -> (memory, disk, prefill) it was made with
        self.passed_on: set[str] = set()         # the source guests the last test made or reused, if it passed
        self.tests = 0

    async def source_vm(self, name: str = "app1", *, disk_mib: int = 64, prefill_mib: int = 16,
                        memory_mib: int = 256, rate_kib: float = 64.0, record: int = 4096) -> WriterApp:
        """What :meth:`Scene.source_vm` returns, on the guest an earlier test left when it is in a
        known state (see the module docstring), else on a fresh one."""
        s = self.scene
        want = (memory_mib, disk_mib, prefill_mib)
        if name in self.passed_on and self.specs.get(name) == want and await self._clean(s.a, name):
            log.info("source guest %s: reused (the last test left it clean)", name)
            await s.a.authenticate(s.a.credentials)
            await s.a.exec(name, "rm -f /data/log && sync", timeout=30, check=True)
            app = WriterApp(s.a, name, s.a.profile.guest_disk, AckLog(), rate_kib=rate_kib, record=record,
                            service_ip=s.wan.service_ip)
            self.apps.append(app)
            await app.start()
            await s.wan.move_service(name, s.a.host)
            return app
        log.info("source guest %s: a fresh one", name)
        await self._delete(s.a, name)
        self.specs[name] = want
        app = await s.source_vm(name, disk_mib=disk_mib, prefill_mib=prefill_mib, memory_mib=memory_mib,
                                rate_kib=rate_kib, record=record)
        self.apps.append(app)
        return app

    @staticmethod
    async def _clean(p: InProcessProvider, name: str) -> bool:
        vm = p.cluster.vms.get(name)
        if vm is None or vm.state is not VMState.RUNNING or vm.host.name != p.host or vm.busy_with is not None:
            return False
        try:
            await vm.agent.ping(timeout=3)           # a stopped agent (SIGSTOP) is seen at once
            return (await vm.exec(CLEAN, timeout=10)).stdout.strip() == "clean"
        except Exception:  # a guest that cannot answer is not reused (a fresh one is made)
            return False

    @staticmethod
    async def _delete(p: InProcessProvider, name: str) -> None:
        vm = p.cluster.vms.get(name)
        if vm is not None:
            await vm.destroy()
            await p.cluster.undefine_vm(name)
        p.cluster.host(p.host).release(name)

    async def begin(self, test: str) -> Scene:
        await self.reset(keep=self.passed_on)
        self.tests += 1
        workdir = self.base.workdir / f"{self.tests:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', test)[-60:]}"
        workdir.mkdir(mode=0o700)
        self.scene = dataclasses.replace(self.base, workdir=workdir)
        return self.scene

    async def end(self, failed: bool) -> None:
        sources = {app.vm for app in self.apps if app.provider is self.base.a}
        for app in self.apps:
            if app.proc is not None and app.proc.running:
                try:
                    await app.stop()
                except Exception:   # the guest is not answering: it is not passed on
                    failed = True
        self.apps.clear()
        self.passed_on = set() if failed else sources
        await self.reset(keep=self.passed_on)

    async def reset(self, keep: set[str]) -> None:
        """Cloud B empty; cloud A holding at most the guests ``keep``; links up at their rates; nobody
        signed in."""
        s = self.base
        for p in (s.a, s.b):
            for name in list(p.cluster.vms):
                if p is not s.a or name not in keep:
                    await self._delete(p, name)
            host = p.cluster.host(p.host)
            for name in list(host.allocations):
                if name not in p.cluster.vms:
                    host.release(name)
            p.authenticated = False
        for h, mbit in (("a1", WAN_MBIT), ("b1", WAN_MBIT), ("client", LAN_MBIT)):
            await s.wan.set_wan_link(h, True)
            await s.underlay.set_bandwidth(h, mbit)


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared_clouds_class() -> AsyncIterator[SharedClouds]:
    shared = Shared()
    async with two_clouds(wan_mbit=WAN_MBIT, lan_mbit=LAN_MBIT) as scene:
        shared.adopt(scene.a.cluster, scene.b.cluster, scene.underlay)
        problems: list[str] = []
        try:
            yield SharedClouds(scene, shared)
        finally:
            problems = await shared.close()
    if problems:
        pytest.fail("processes or files survived the class: " + "; ".join(problems))


@pytest_asyncio.fixture(loop_scope="class")
async def shared_clouds(shared_clouds_class: SharedClouds, hvsim_artifacts: Artifacts,
                        request: pytest.FixtureRequest) -> AsyncIterator[SharedClouds]:
    """The class's clouds for one test (``shared_clouds.scene`` is its view); see the module docstring."""
    sc = shared_clouds_class
    await sc.begin(request.node.name)
    try:
        yield sc
    finally:
        if hvsim_artifacts.failed:
            await sc.shared.keep(hvsim_artifacts.dir)
        await sc.end(hvsim_artifacts.failed)
