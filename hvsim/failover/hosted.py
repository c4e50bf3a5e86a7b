"""A manager process that runs *on an emulated host*: inside the host's network namespace and its
power domain (so powering the host off kills it, like a management appliance on that host), its API
on the host's address over TCP with mutual TLS, advertised in the store as the leader's address.

    m = HostedManager(spec, ns="hvs-..-h-dc1-m", ip="198.18.0.1", cgroup=host.domain.path, run_dir=...)
    await m.start()          # returns once it leads and serves
    m.pid; await m.kill(); await m.stop()
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvsim.control.launch import reap, wait_ready
from hvsim.control.pki import CertificateAuthority
from qmp_bridge.process import die_with_parent, join_cgroup

log = logging.getLogger("hvsim.failover.hosted")

API_PORT = 8443
AGENT_PORT = 7443


@dataclass(frozen=True)
class ControlSpec:
    """What every manager of the run shares (JSON-serialisable: the controller gets it in a file)."""
    store_url: str
    store_tls: tuple[str, str, str]          # CA, cert, key (a client certificate of the run's CA)
    ca_dir: str                              # the run's CA (issues certificates for initiated hosts)
    token_file: str                          # the API bearer token, shared by every manager of the run
    agent_networks: str
    lease_ttl: float
    datastore: str
    images: str | None = None
    api_port: int = API_PORT
    agent_port: int = AGENT_PORT
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ControlSpec:
        d = dict(d)
        d["store_tls"] = tuple(d["store_tls"])
        d["extra_args"] = tuple(d.get("extra_args", ()))
        return cls(**d)

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_dir)

    @property
    def token(self) -> str:
        return Path(self.token_file).read_text().strip()

    def api_client_tls(self, name: str) -> tuple[str, str, str]:
        """(CA, cert, key) of a client certificate for the manager API (and the store)."""
        ca = self.ca
        c = ca.issue_client(name)
        return str(ca.cert_path), str(c.cert_path), str(c.key_path)


class HostedManager:
    """``python -m hvsim.control.api`` in a host's namespace and power domain."""

    def __init__(self, spec: ControlSpec, *, host: str, datacenter: str, ns: str, ip: str, cgroup: Path | None,
                 run_dir: Path, log_level: str = "INFO") -> None:
        self.spec = spec
        self.host = host
        self.datacenter = datacenter
        self.ns = ns
        self.ip = ip
        self.cgroup = cgroup
        self.dir = Path(run_dir)
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"https://{self.ip}:{self.spec.api_port}"

    @property
    def name(self) -> str:
        return f"manager@{self.host}"

    @property
    def log_path(self) -> Path:
        return self.dir / "manager.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def argv(self) -> list[str]:
        ca = self.spec.ca
        server = ca.issue_server(f"manager {self.host}", ips=[self.ip])
        client = ca.issue_client(f"manager {self.host}")
        cap = str(ca.cert_path)
        a = [sys.executable, "-m", "hvsim.control.api", "--store", self.spec.store_url,
             "--store-tls", *self.spec.store_tls, "--token-file", self.spec.token_file,
             "--tcp", f"{self.ip}:{self.spec.api_port}", "--allow-non-loopback",
             "--api-tls", cap, str(server.cert_path), str(server.key_path),
             "--advertise", self.address, "--datacenter", self.datacenter,
             "--agent-tls", cap, str(client.cert_path), str(client.key_path),
             "--agent-networks", self.spec.agent_networks, "--lease-ttl", str(self.spec.lease_ttl),
             "--name", self.name, "--ready-file", str(self.dir / "ready"), "--log-level", self.log_level,
             *self.spec.extra_args]
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--", *a]

    async def start(self, timeout: float = 120.0) -> None:
        """Start it; returns once it leads and serves (it campaigns for the lease first)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ready = self.dir / "ready"
        ready.unlink(missing_ok=True)
        self.launch()
        assert self.proc is not None
        await wait_ready(self.proc, ready, self.log_path, f"manager on {self.host}", timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (it campaigns, then serves)."""
        if self.pid is not None:
            raise RuntimeError(f"the manager on {self.host} runs already (pid {self.pid})")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.dir / "ready").unlink(missing_ok=True)
        die = die_with_parent()
        cg = self.cgroup

        def preexec() -> None:
            die()
            if cg is not None:
                join_cgroup(cg)
        argv = self.argv()
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            logf.flush()
            # Popen on the loop's thread: PDEATHSIG fires when the thread that forked exits
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,  # noqa: ASYNC220
                                         stdout=logf, stderr=subprocess.STDOUT, preexec_fn=preexec, close_fds=True)
        self.starts += 1

    @property
    def ready(self) -> bool:
        return (self.dir / "ready").exists() and self.pid is not None

    async def kill(self) -> None:
        if self.proc is not None:
            await reap(self.proc, signal.SIGKILL)

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (it stops its drivers and releases the lease), SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        return await reap(self.proc, signal.SIGTERM, timeout=timeout)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def describe(self) -> dict[str, Any]:
        return {"host": self.host, "datacenter": self.datacenter, "address": self.address, "pid": self.pid}


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (tmp + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
