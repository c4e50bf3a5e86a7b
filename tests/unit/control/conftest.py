"""Fixtures of the control-plane tests: one real 3-member etcd cluster per test module (module
scope, module event loop), and a ``store`` fixture parametrised over both backends."""
from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.store import EtcdStore, SQLiteStore, Store


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def etcd_cluster() -> AsyncIterator[EtcdCluster]:
    async with EtcdCluster() as cl:
        yield cl


async def wipe_etcd(cluster: EtcdCluster) -> None:
    """Delete every key (between tests sharing one cluster)."""
    zero = base64.b64encode(b"\0").decode()
    async with httpx.AsyncClient(timeout=10) as http:
        for url in cluster.client_urls:
            try:
                r = await http.post(url + "/v3/kv/deleterange", json={"key": zero, "range_end": zero})
                r.raise_for_status()
                return
            except httpx.HTTPError:
                continue
    raise RuntimeError("no etcd member answered the wipe")


@pytest_asyncio.fixture(params=["sqlite", "etcd"], loop_scope="module")
async def store(request: pytest.FixtureRequest, tmp_path: Path, etcd_cluster: EtcdCluster) -> AsyncIterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "state.db")
    else:
        await wipe_etcd(etcd_cluster)
        s = EtcdStore(etcd_cluster.client_urls)
    async with s:
        yield s
