"""One failover scene per module (two datacenters, a witness, etcd, host agents, real guests, the
manager on a dc1 host, the failover controller): the faults run one after the other on it (the
suite's time budget). A failing test keeps every log of the scene under ``test-results/<test>/``."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from hvsim.core.cluster import images_dir
from hvsim.failover.scene import Scene, failover_scene, keep_logs
from hvsim.testing.plugin import Artifacts

GUESTS = {                   # name: (host, protected, priority)
    "app-hi": ("dc1-h1", True, 100),
    "app-lo": ("dc1-h1", True, 10),
    "scratch": ("dc1-h1", False, 0),
    "dc2-db": ("dc2-h1", False, 0),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scene() -> AsyncIterator[Scene]:
    async with failover_scene(images=images_dir()) as sc:
        await asyncio.gather(*(sc.define_start(name, host, protected=protected, priority=prio)
                               for name, (host, protected, prio) in GUESTS.items()))
        yield sc


@pytest.fixture(autouse=True)
def keep_scene_logs(request: pytest.FixtureRequest, scene: Scene) -> Iterator[None]:
    yield None
    art = Artifacts(request)
    if art.failed:
        keep_logs(scene, art.dir)
