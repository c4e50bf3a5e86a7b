"""Fixtures for migration HIL tests: hosts in an Underlay (shaped links), a Cluster inside it.

The cluster is closed before the underlay (its QEMUs live in the underlay's namespaces)."""
from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from hvsim.core.cluster import Cluster
from hvsim.core.model import HostSpec, VMSpec
from hvsim.network.underlay import Underlay
from hvsim.core.vm import VM
from hvsim.testing.plugin import Artifacts

from ..shared import SharedLab, shared_lab_scope, shared_lab_test

LINK_MBIT = 400          # fast enough that each migration of a small guest takes ~1-3 s
GUEST_MIB = 160


@pytest.fixture
async def underlay_hosts() -> list[str]:
    return ["a", "b", "c"]


@pytest.fixture
async def underlay(underlay_hosts: list[str], hvsim_underlay: Callable[..., Any]) -> Underlay:
    assert os.geteuid() == 0, "migration HIL tests need root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        assert shutil.which(tool), f"{tool} missing: install iproute2"
    ul: Underlay = await hvsim_underlay(underlay_hosts, mbit=LINK_MBIT)
    return ul


@pytest.fixture
async def lab(underlay: Underlay, cluster: Cluster) -> AsyncIterator[Callable[..., Any]]:
    """``await lab.boot(name, host)`` -> a running, agent-ready VM on a host of the underlay."""
    for h in underlay.hosts:
        cluster.add_host(HostSpec(h, vcpus=4, memory_mib=1024), network=underlay.host_network(h))

    class Lab:
        cl = cluster
        ul = underlay

        @staticmethod
        async def boot(name: str, host: str = "a", memory_mib: int = GUEST_MIB) -> VM:
            vm = await cluster.define_vm(VMSpec(name, memory_mib=memory_mib), host)
            await vm.start(wait_ready=True, ready_timeout=120)
            return vm

    yield Lab


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared_lab_class() -> AsyncIterator[SharedLab]:
    async for lab in shared_lab_scope(["a", "b", "c"], mbit=LINK_MBIT):
        yield lab


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared_mp_class() -> AsyncIterator[SharedLab]:
    """The same with the multi-process drivers (swap shim, qemu-storage-daemon) and 2 GiB hosts."""
    from hvsim.drivers.qsd import QsdDriver
    from hvsim.drivers.shim.component import ShimDriver
    async for lab in shared_lab_scope(["a", "b", "c"], mbit=LINK_MBIT, drivers=(ShimDriver(), QsdDriver()),
                                      host_mib=2048):
        yield lab


@pytest_asyncio.fixture(loop_scope="class")
async def shared_lab(shared_lab_class: SharedLab, hvsim_artifacts: Artifacts) -> AsyncIterator[SharedLab]:
    """The class's lab, reset to a known state before and after the test; artefacts kept on failure."""
    async for lab in shared_lab_test(shared_lab_class, hvsim_artifacts):
        yield lab


@pytest_asyncio.fixture(loop_scope="class")
async def shared_mp(shared_mp_class: SharedLab, hvsim_artifacts: Artifacts) -> AsyncIterator[SharedLab]:
    async for lab in shared_lab_test(shared_mp_class, hvsim_artifacts):
        yield lab
