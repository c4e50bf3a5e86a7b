"""Mutual TLS with certificates from our CA, over real TLS connections on loopback and on a unix
socket: a good pair talks; no certificate, a foreign CA, an expired certificate or a wrong server
name is refused, and the refused peer's bytes never reach the server's handler."""
from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import stat
from pathlib import Path

import pytest

from hvbase.aio import wait_for
from hvsim.control.errors import ControlInputError
from hvsim.control.pki import CertificateAuthority, client_context, peer_name, server_context

PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)


class Echo:
    def __init__(self) -> None:
        self.peers: list[str | None] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            data = await r.readline()
            self.peers.append(peer_name(w.get_extra_info("ssl_object")))
            w.write(b"echo " + data)
            await w.drain()
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


async def talk(port_or_path: int | str, ctx: ssl.SSLContext, server_hostname: str | None = None) -> bytes:
    if isinstance(port_or_path, int):
        r, w = await asyncio.open_connection("127.0.0.1", port_or_path, ssl=ctx, server_hostname=server_hostname)
    else:
        r, w = await asyncio.open_unix_connection(port_or_path, ssl=ctx, server_hostname=server_hostname)
    try:
        w.write(b"hello\n")
        await w.drain()
        return await wait_for(r.readline(), 10)
    finally:
        w.close()


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "pki", "test")


async def serve(ca: CertificateAuthority, echo: Echo, **issue: object) -> tuple[asyncio.Server, int]:
    srv_cert = ca.issue_server("manager", **issue)  # type: ignore[arg-type]
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0, ssl=server_context(srv_cert, ca.cert_path))
    return server, server.sockets[0].getsockname()[1]


async def test_mutual_tls_identity_and_file_modes(ca: CertificateAuthority) -> None:
    echo = Echo()
    server, port = await serve(ca, echo)
    cli = ca.issue_client("host-agent h1")
    async with server:
        assert await talk(port, client_context(cli, ca.cert_path)) == b"echo hello\n"
    assert echo.peers == ["host-agent h1"]
    assert stat.S_IMODE(os.stat(ca.directory).st_mode) == 0o700
    for p in ca.directory.glob("*key.pem"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert CertificateAuthority.load(ca.directory).cert == ca.cert


async def refused(port: int, ctx: ssl.SSLContext, echo: Echo) -> None:
    try:
        got = await talk(port, ctx)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError):
        got = b""
    assert got == b""
    assert echo.peers == []   # the handler never read a byte from the refused peer


async def test_client_without_certificate_refused(ca: CertificateAuthority) -> None:
    echo = Echo()
    server, port = await serve(ca, echo)
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    async with server:
        await refused(port, ctx, echo)


async def test_client_of_another_ca_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    echo = Echo()
    server, port = await serve(ca, echo)
    other = CertificateAuthority.create(tmp_path / "other", "intruder")
    ctx = client_context(other.issue_client("host-agent h1"), ca.cert_path)  # trusts our CA, own cert foreign
    async with server:
        await refused(port, ctx, echo)


async def test_expired_client_certificate_refused(ca: CertificateAuthority) -> None:
    echo = Echo()
    server, port = await serve(ca, echo)
    old = ca.issue_client("host-agent old", not_before=PAST, not_after=PAST + datetime.timedelta(days=1))
    async with server:
        await refused(port, client_context(old, ca.cert_path), echo)


async def test_expired_server_certificate_refused_by_client(ca: CertificateAuthority) -> None:
    echo = Echo()
    server, port = await serve(ca, echo, not_before=PAST, not_after=PAST + datetime.timedelta(days=1))
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            await talk(port, client_context(ca.issue_client("c"), ca.cert_path))


async def test_server_name_must_match(ca: CertificateAuthority) -> None:
    echo = Echo()
    server, port = await serve(ca, echo, ips=["198.18.0.7"], dns=[])   # not the address we dial
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
            await talk(port, client_context(ca.issue_client("c"), ca.cert_path))


async def test_over_a_unix_socket_by_dns_name(ca: CertificateAuthority, tmp_path: Path) -> None:
    echo = Echo()
    srv = ca.issue_server("manager", ips=[], dns=["manager.hvsim"])
    sock_dir = tmp_path / "run"
    sock_dir.mkdir(mode=0o700)
    path = str(sock_dir / "m.sock")
    server = await asyncio.start_unix_server(echo.handle, path, ssl=server_context(srv, ca.cert_path))
    async with server:
        ctx = client_context(ca.issue_client("cli"), ca.cert_path)
        assert await talk(path, ctx, server_hostname="manager.hvsim") == b"echo hello\n"
        with pytest.raises(ssl.SSLCertVerificationError):
            await talk(path, ctx, server_hostname="other.hvsim")
    assert echo.peers == ["cli"]


def test_bad_input(ca: CertificateAuthority) -> None:
    with pytest.raises(ControlInputError, match="ips"):
        ca.issue_server("s", ips=["not-an-ip"])
    with pytest.raises(ControlInputError, match="name"):
        ca.issue_client("../etc/passwd")
    with pytest.raises(ControlInputError, match="ips"):
        ca.issue_server("s", ips=[], dns=[])
