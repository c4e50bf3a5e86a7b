"""Fixtures of the HIL tests at this level: ``shared_host`` (see tests/hil/shared.py), a cluster with one
host ``h1`` (2 vCPUs, 2 GiB, no underlay) shared by the tests of a class, guests reused when they are
in a known state."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from hvsim.testing.plugin import Artifacts

from .shared import SharedLab, shared_lab_scope, shared_lab_test


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared_host_class() -> AsyncIterator[SharedLab]:
    async for lab in shared_lab_scope(["h1"], host_mib=2048, host_vcpus=2):
        yield lab


@pytest_asyncio.fixture(loop_scope="class")
async def shared_host(shared_host_class: SharedLab, hvsim_artifacts: Artifacts) -> AsyncIterator[SharedLab]:
    async for lab in shared_lab_test(shared_host_class, hvsim_artifacts):
        yield lab
