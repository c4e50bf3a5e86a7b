"""etcd with mutual TLS (certificates from our CA, for clients and peers), and etcd members on
namespace addresses (one per emulated host of an underlay), reached only from inside those
namespaces."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hvsim.control.errors import StoreError, StoreUnavailableError
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.pki import CertificateAuthority
from hvsim.control.store import EtcdStore, TLSFiles, make_store
from hvsim.network import Underlay

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_mutual_tls_cluster(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki", "etcd-test")
    async with EtcdCluster(tls=ca) as etcd:
        assert etcd.store_url.startswith("etcds://") and all(u.startswith("https://") for u in etcd.client_urls)
        async with make_store(etcd.store_url, tls=etcd.client_tls("manager")) as store:
            await store.put("/tls/a", b"1")
            async with store.watch("/tls/") as w:
                await store.put("/tls/b", b"2")
                assert (await w.next(timeout=10)).key == "/tls/b"
            assert (await store.get("/tls/a")).value == b"1"  # type: ignore[union-attr]
        # a foreign CA's client certificate, a server we do not trust, or plain text: refused
        foreign = CertificateAuthority.create(tmp_path / "foreign", "intruder")
        intruder = foreign.issue_client("manager")
        good = etcd.client_tls("x")
        assert good is not None
        for files in (TLSFiles(ca.cert_path, intruder.cert_path, intruder.key_path),
                      TLSFiles(foreign.cert_path, good.cert, good.key)):
            async with EtcdStore(etcd.client_urls, tls=files, retry_for=1, timeout=2) as bad:
                with pytest.raises((StoreUnavailableError, StoreError)):
                    await bad.put("/tls/evil", b"x")
        plain = [u.replace("https://", "http://") for u in etcd.client_urls]
        async with EtcdStore(plain, retry_for=1, timeout=2) as bad:
            with pytest.raises((StoreUnavailableError, StoreError)):
                await bad.get("/tls/a")
        async with make_store(etcd.store_url, tls=etcd.client_tls()) as store:
            assert await store.get("/tls/evil") is None


CLIENT = r"""
import asyncio, sys
from hvsim.control.store import EtcdStore
async def main():
    async with EtcdStore(sys.argv[1].split(","), retry_for=20) as s:
        for i in range(20):
            await s.put(f"/ns/{sys.argv[2]}/{i:02d}", b"v")
        print(await s.count("/ns/"))
asyncio.run(main())
"""


async def test_members_on_namespace_addresses() -> None:
    hosts = ["e0", "e1", "e2"]
    async with Underlay(hosts, mbit=1000) as ul:
        async with EtcdCluster(addresses=[ul.host_ip(h) for h in hosts], netns=[ul.host_ns(h) for h in hosts]) as etcd:
            assert all(m.host.startswith("198.18.") for m in etcd.members.values())
            leader = await etcd.leader()

            def write_from(host: str, tag: str) -> int:
                out = subprocess.run(["ip", "netns", "exec", ul.host_ns(host), sys.executable, "-c", CLIENT,
                                      ",".join(etcd.client_urls), tag], capture_output=True, text=True, timeout=120)
                assert out.returncode == 0, out.stderr
                return int(out.stdout.strip())
            assert write_from("e1", "first") == 20
            await etcd.kill(leader)
            other = next(h for h, n in zip(hosts, etcd.members, strict=True) if n != leader)
            assert write_from(other, "after-kill") == 40        # 2 of 3 members keep serving
            await etcd.restart(leader)
