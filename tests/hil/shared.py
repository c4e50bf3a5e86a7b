"""A lab shared by the tests of a class: one cluster (and underlay), guests reused between tests.

A boot of a TCG guest (plus its setup: memfill, swap, a warm shim cache) is most of what a HIL test
costs. Tests that only need "a running guest on host X" and leave it so (a refused, failed, cancelled or
timed-out migration leaves the source untouched; an exec, a pause and resume, a QMP timeout leave the
guest running), and that each assert that state at their end, share one. Each test gets the lab in a
known state: every link up at the lab's rate, no background writer (``dirty``, started by the tests) left
in the guests, and ``SharedLab.guest`` re-checks the guest (running on its host, not lent to anything,
no migration files, its agent answering, plus the caller's own check) and boots a fresh one when it is
not so: a test that broke the guest cannot fail the next one. A failed test keeps the artefacts of the
whole lab (consoles, QEMU/QMP logs, state, events, tc) in its own test-results folder; at the end of
the class everything is torn down and checked for survivors, as the plugin's fixtures do.

Use from a conftest::

    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    async def shared_lab_class():
        async for lab in shared_lab_scope(["a", "b"], mbit=400):
            yield lab

    @pytest_asyncio.fixture(loop_scope="class")
    async def shared_lab(shared_lab_class, hvsim_artifacts):
        async for lab in shared_lab_test(shared_lab_class, hvsim_artifacts):
            yield lab

and mark the class ``@pytest.mark.asyncio(loop_scope="class")`` (its tests and the lab share one loop).
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from hvsim.core.cluster import Cluster
from hvsim.core.lifecycle import VMState
from hvsim.core.model import HostSpec, VMSpec
from hvsim.core.vm import VM
from hvsim.network.underlay import Underlay
from hvsim.testing.plugin import Artifacts, Shared


class SharedLab:
    def __init__(self, shared: Shared, cl: Cluster, ul: Underlay | None, mbit: float | None) -> None:
        self.shared, self.cl, self._mbit = shared, cl, mbit
        self._ul = ul

    @property
    def ul(self) -> Underlay:
        assert self._ul is not None, "this shared lab has no underlay"
        return self._ul

    async def guest(self, name: str, host: str = "a", memory_mib: int = 160,
                    boot: Callable[[], Awaitable[VM]] | None = None,
                    still_good: Callable[[VM], Awaitable[bool]] | None = None, **spec: Any) -> VM:
        """The running guest ``name`` on ``host``: the one an earlier test left if it is in a known
        state (running there, its agent answering, no destination files, ``still_good``), otherwise a
        fresh one (``boot()``, by default a plain guest of ``memory_mib`` with ``spec``)."""
        vm = self.cl.vms.get(name)
        if vm is not None:
            if await self._known_state(vm, host) and (still_good is None or await still_good(vm)):
                return vm
            await self.drop(name)
        if boot is not None:
            vm = await boot()
            assert vm.name == name and vm.host.name == host
            return vm
        vm = await self.cl.define_vm(VMSpec(name, memory_mib=memory_mib, **spec), host)
        await vm.start(wait_ready=True, ready_timeout=120)
        return vm

    @staticmethod
    async def _known_state(vm: VM, host: str) -> bool:
        if vm.state is not VMState.RUNNING or vm.host.name != host or vm.busy_with is not None:
            return False
        if list(vm.run_dir.glob("mig*")):     # it migrated (or something of a destination is left)
            return False
        try:
            return (await vm.exec("echo alive", timeout=30)).stdout.strip() == "alive"
        except Exception:  # a guest that cannot answer is not reused (a fresh one is booted)
            return False

    async def drop(self, name: str) -> None:
        vm = self.cl.vms.get(name)
        if vm is not None:
            await vm.destroy()
            await self.cl.undefine_vm(name)

    async def reset(self) -> None:
        """Links up at the lab's rate; the guests' background writers stopped."""
        if self._ul is not None and self._mbit is not None:
            for h in self._ul.hosts:
                await self._ul.set_link(h, True)
                await self._ul.set_bandwidth(h, self._mbit)
        for vm in list(self.cl.vms.values()):
            if vm.state is VMState.RUNNING and vm.busy_with is None:
                try:
                    await vm.exec("for p in $(pidof dirty); do kill $p; done; true", timeout=30)
                except Exception:   # not answering: guest() will not reuse it
                    pass


async def shared_lab_scope(hosts: Sequence[str], mbit: float | None = None, drivers: tuple[Any, ...] = (),
                           host_mib: int = 1024, host_vcpus: int = 4) -> AsyncIterator[SharedLab]:
    """The lab of a class: ``hosts`` on a shaped underlay of ``mbit`` (none without ``mbit``), one
    cluster with ``drivers``; torn down and checked for survivors at the end (a failure of the class's
    last test's teardown if anything survived)."""
    shared = Shared()
    problems: list[str] = []
    try:
        ul = None
        if mbit is not None:
            assert os.geteuid() == 0, "HIL tests with an underlay need root (network namespaces, tc)"
            ul = await shared.underlay(list(hosts), mbit=mbit)
        cl = await shared.cluster("shared", drivers=drivers)
        for h in hosts:
            cl.add_host(HostSpec(h, vcpus=host_vcpus, memory_mib=host_mib),
                        **({"network": ul.host_network(h)} if ul is not None else {}))
        yield SharedLab(shared, cl, ul, mbit)
    finally:
        problems = await shared.close()
    if problems:
        pytest.fail("processes or files survived the class: " + "; ".join(problems))


async def shared_lab_test(lab: SharedLab, artifacts: Artifacts) -> AsyncIterator[SharedLab]:
    """One test's view of the class's lab: reset before and after, artefacts kept if it failed."""
    await lab.reset()
    yield lab
    if artifacts.failed:
        await lab.shared.keep(artifacts.dir)
    await lab.reset()
