"""PKI for mutual TLS between the control plane's processes (manager, host agents, store), made
with ``cryptography``.

One :class:`CertificateAuthority` per lab or test run (an EC P-256 key, self-signed, path length
0) issues server certificates (SANs: the IP addresses the server listens on, loopback or
namespace addresses, and DNS names; for a server on a unix socket the client names the server by
a DNS SAN such as ``manager.hvsim``, since a socket path has no host name) and client certificates
(the common name is the peer's identity, e.g. ``host-agent h1``). Every key file is 0600 in a
0700 directory. :func:`server_context` requires and verifies a client certificate;
:func:`client_context` verifies the server's chain and name. TLS 1.2 is the minimum::

    ca = CertificateAuthority.create(run_dir / "pki", "lab-42")
    srv = ca.issue_server("manager", ips=["127.0.0.1"], dns=["manager.hvsim"])
    cli = ca.issue_client("host-agent h1")
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(srv, ca.cert_path))
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(cli, ca.cert_path))
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ControlInputError, PKIError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$")
_FILE_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _check_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ControlInputError(field, f"{name!r} must be 1-63 letters, digits, space, '.', '_' or '-'")
    return name


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk."""
    name: str
    cert_path: Path
    key_path: Path

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())


class CertificateAuthority:
    """A CA whose key and certificate live in ``directory`` (0700)."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.cert = cert
        self.key = key

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path | str, name: str, *, days: int = 30) -> CertificateAuthority:
        _check_name(name)
        if not isinstance(days, int) or not 1 <= days <= 3650:
            raise ControlInputError("days", f"must be 1..3650, got {days!r}")
        d = Path(directory)
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hvsim CA {name}")])
            now = _utcnow()
            cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5))
                    .not_valid_after(now + datetime.timedelta(days=days))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                 key_encipherment=False, data_encipherment=False,
                                                 key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                    .sign(key, hashes.SHA256()))
            ca = cls(d, cert, key)
            _write_private(d / "ca-key.pem", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        except OSError as e:
            raise PKIError(f"cannot create the CA in {d}: {e}") from e
        return ca

    @classmethod
    def load(cls, directory: Path | str) -> CertificateAuthority:
        d = Path(directory)
        try:
            cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
            key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise PKIError(f"cannot load the CA from {d}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{d / 'ca-key.pem'} is not an EC key")
        return cls(d, cert, key)

    def issue_server(self, name: str, *, ips: Sequence[str] = ("127.0.0.1",), dns: Sequence[str] = (),
                     not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None,
                     peer: bool = False) -> Issued:
        """A server certificate valid for ``ips`` and ``dns`` names (at least one). ``peer``: also
        usable as a client certificate (etcd members dial each other with the same one)."""
        sans: list[x509.GeneralName] = []
        for ip in ips:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError as e:
                raise ControlInputError("ips", f"{ip!r} is not an IP address") from e
        for n in dns:
            if not isinstance(n, str) or not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,250}[A-Za-z0-9])?$", n):
                raise ControlInputError("dns", f"{n!r} is not a DNS name")
            sans.append(x509.DNSName(n))
        if not sans:
            raise ControlInputError("ips", "a server certificate needs at least one IP address or DNS name")
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if peer else [])
        return self._issue(name, "peer" if peer else "server", usages, sans, not_before, not_after)

    def issue_client(self, name: str, *, not_before: datetime.datetime | None = None,
                     not_after: datetime.datetime | None = None) -> Issued:
        """A client certificate whose common name ``name`` is the peer's identity."""
        return self._issue(name, "client", [ExtendedKeyUsageOID.CLIENT_AUTH], [], not_before, not_after)

    def _issue(self, name: str, kind: str, usages: list[x509.ObjectIdentifier], sans: list[x509.GeneralName],
               not_before: datetime.datetime | None, not_after: datetime.datetime | None) -> Issued:
        _check_name(name)
        now = _utcnow()
        start = not_before or now - datetime.timedelta(minutes=5)
        end = not_after or min(now + datetime.timedelta(days=7), self.cert.not_valid_after_utc)
        if end <= start:
            raise ControlInputError("not_after", "must be later than not_before")
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(self.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                            critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        base = _FILE_RE.sub("_", f"{kind}-{name}")
        cert_path, key_path = self.directory / f"{base}.pem", self.directory / f"{base}-key.pem"
        try:
            _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        except OSError as e:
            raise PKIError(f"cannot write the certificate of {name!r}: {e}") from e
        return Issued(name, cert_path, key_path)


def _context(purpose: ssl.Purpose, issued: Issued, ca_path: Path) -> ssl.SSLContext:
    proto = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(proto)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(issued.cert_path, issued.key_path)
        ctx.load_verify_locations(cafile=str(ca_path))
    except (OSError, ssl.SSLError) as e:
        raise PKIError(f"cannot load {issued.cert_path} / {ca_path}: {e}") from e
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(issued: Issued, ca_path: Path) -> ssl.SSLContext:
    """TLS server side: presents ``issued``, requires a client certificate signed by the CA."""
    return _context(ssl.Purpose.CLIENT_AUTH, issued, ca_path)


def client_context(issued: Issued, ca_path: Path) -> ssl.SSLContext:
    """TLS client side: presents ``issued``, verifies the server's chain and its name (IP or DNS SAN)."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, issued, ca_path)
    ctx.check_hostname = True
    return ctx


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The common name of a verified peer certificate (the peer's identity), or ``None``."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


@dataclass(frozen=True)
class ClientTLS:
    """PEM files for a mutual-TLS client (to host agents, to a manager's https API): the CA that
    signed the server's certificate (and ours), our certificate and key."""
    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        return client_context(Issued(self.cert.stem, self.cert, self.key), self.ca)
