"""The manager API over TCP with mutual TLS (``--api-tls``) plus the bearer token: on loopback, our
client with a certificate of the manager's CA is served; one with a foreign CA's certificate, one
without a certificate, one that does not trust the server, and plain HTTP are refused, as is a
good certificate with a wrong bearer token. And on a namespace address of an underlay (the manager
inside one namespace, curl inside another: nothing contacts the underlay from the root namespace)."""
from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiAuthError, ApiUnavailableError, ControlInputError
from hvsim.control.launch import ManagerProcess, short_dir
from hvsim.control.pki import CertificateAuthority, ClientTLS
from hvsim.control.schema import HostCreate
from hvsim.network import Underlay

pytestmark = pytest.mark.asyncio(loop_scope="module")
PORT = 7481


async def test_manager_api_over_mutual_tls_on_loopback() -> None:
    base = short_dir("hvsim-tls-")
    try:
        ca = CertificateAuthority.create(base / "pki", "api")
        foreign = CertificateAuthority.create(base / "foreign", "intruder")
        m = ManagerProcess(base / "m", f"sqlite://{base / 'state.db'}", tcp=f"127.0.0.1:{PORT}", ca=ca,
                           api_tls=True, lease_ttl=3)
        async with m:
            assert m.address == f"https://127.0.0.1:{PORT}"
            async with ManagerClient(m.address, m.token, tls=m.client_tls()) as c:
                await c.add_host(HostCreate(name="h1", vcpus=2, memory_mib=1024))
                assert (await c.get_host("h1")).vcpus == 2
                assert (await c.health())["leader"] is True
            intruder = foreign.issue_client("intruder")
            good = m.client_tls()
            refused = [ClientTLS(ca.cert_path, intruder.cert_path, intruder.key_path),     # foreign client cert
                       ClientTLS(foreign.cert_path, good.cert, good.key)]                 # does not trust the server
            for tls in refused:
                async with ManagerClient(m.address, m.token, tls=tls, timeout=10) as bad:
                    with pytest.raises(ApiUnavailableError):
                        await bad.health()
            no_cert = ssl.create_default_context(cafile=str(ca.cert_path))          # trusts it, shows nothing
            async with ManagerClient(m.address, m.token, ssl_context=no_cert, timeout=10) as bad:
                with pytest.raises(ApiUnavailableError):
                    await bad.health()
            async with ManagerClient(f"http://127.0.0.1:{PORT}", m.token, timeout=10) as bad:
                with pytest.raises(ApiUnavailableError):
                    await bad.health()
            async with ManagerClient(m.address, "x" * 32, tls=m.client_tls()) as bad:
                with pytest.raises(ApiAuthError):
                    await bad.health()
            with pytest.raises(ControlInputError):
                ManagerClient(m.address, m.token)                                    # https needs tls=
    finally:
        shutil.rmtree(base, ignore_errors=True)


def curl(ns: str, url: str, ca: Path, cert: Path | None, key: Path | None, token: str) -> str:
    a = ["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "10", "--cacert", str(ca), "-o", "/dev/null",
         "-w", "%{http_code}", "-H", f"Authorization: Bearer {token}"]
    if cert is not None and key is not None:
        a += ["--cert", str(cert), "--key", str(key)]
    r = subprocess.run(a + [url], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or "000"


async def test_manager_api_over_mutual_tls_in_a_namespace() -> None:
    base = short_dir("hvsim-tlsns-")
    try:
        ca = CertificateAuthority.create(base / "pki", "api")
        foreign = CertificateAuthority.create(base / "foreign", "intruder")
        async with Underlay(["mgr", "cli"], mbit=1000) as ul:
            ip = ul.host_ip("mgr")
            m = ManagerProcess(base / "m", f"sqlite://{base / 'state.db'}", netns=ul.host_ns("mgr"),
                               tcp=f"{ip}:{PORT}", allow_non_loopback=True, ca=ca, api_tls=True, lease_ttl=3,
                               datacenter="dc1")
            async with m:
                url = f"https://{ip}:{PORT}/v1/health"
                good = m.client_tls()
                intruder = foreign.issue_client("intruder")
                ns = ul.host_ns("cli")
                assert curl(ns, url, ca.cert_path, good.cert, good.key, m.token) == "200"
                assert curl(ns, url, ca.cert_path, good.cert, good.key, "y" * 32) == "401"
                assert curl(ns, url, ca.cert_path, intruder.cert_path, intruder.key_path, m.token) == "000"
                assert curl(ns, url, ca.cert_path, None, None, m.token) == "000"
    finally:
        shutil.rmtree(base, ignore_errors=True)
