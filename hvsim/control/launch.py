"""Starting the control plane's processes, as the lab, the tests and the benchmark do: an emulated
host "powered on" by this process (its power domain, optionally its network namespace, and its host
agent process running inside both) and a manager process.

    async with EmulatedHost("h1", base, vcpus=2, memory_mib=2048) as h:   # power domain + agent
        print(h.address)                     # unix:/.../agent.sock (or https://IP:PORT with tls=)
        await h.kill_agent()                 # SIGKILL: the guests keep running
        await h.start_agent()                # a new agent re-adopts them
    # leaving the block powers the host off: every process of it (agent, QEMUs) is killed

The power domain belongs to the process that powers the host on (its owner pid is in the cgroup's
name), not to the agent: a dead agent is not a dead host, and :func:`~hvsim.core.power.reclaim_stale`
powers a host off only once its owner died. The agent gets ``PR_SET_PDEATHSIG`` so it never outlives
its launcher.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hvsim.core.power import PowerDomain
from qmp_bridge.process import die_with_parent, join_cgroup

from .errors import ControlError
from .pki import CertificateAuthority, ClientTLS, Issued

log = logging.getLogger("hvsim.control.launch")


class LaunchError(ControlError):
    """A control-plane process did not come up (its log tail is in the message)."""


def short_dir(prefix: str) -> Path:
    """A 0700 directory with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


async def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log_path: Path, what: str,
                     timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise LaunchError(f"{what} exited with {proc.returncode} before it was ready:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} not ready after {timeout:g} s:\n{_tail(log_path)}")
        await asyncio.sleep(0.05)


async def reap(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Signal ``proc`` (if it runs) and wait for it; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 (a Popen: no event to wait on)
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)
    return proc.returncode


class EmulatedHost:
    """One emulated host: power domain, optional namespace, the host agent process."""

    def __init__(self, name: str, base_dir: Path, *, vcpus: int = 2, memory_mib: int = 2048,
                 datacenter: str = "dc1", datastore: Path | None = None, netns: str | None = None,
                 address: str | None = None, port: int | None = None, ca: CertificateAuthority | None = None,
                 images: Path | None = None, accel: str | None = None, log_level: str = "INFO",
                 tcp_only: bool = False, wan: Mapping[str, Any] | None = None, import_dir: Path | None = None) -> None:
        self.name = name
        self.wan = wan                    # the WAN config (hvsim.crosscloud.network.WanConfig.to_json())
        self.import_dir = import_dir
        self.dir = Path(base_dir) / name
        self.vcpus = vcpus
        self.memory_mib = memory_mib
        self.datacenter = datacenter
        self.datastore = datastore or Path(base_dir) / "datastore"
        self.netns = netns
        self.host_address = address or "127.0.0.1"
        self.port = port
        self.ca = ca
        self.images = images
        self.accel = accel
        self.log_level = log_level
        self.tcp_only = tcp_only
        self.domain: PowerDomain | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_cert: Issued | None = None
        self.client_cert: Issued | None = None
        self.starts = 0

    @property
    def socket(self) -> Path:
        return self.dir / "sock" / "agent.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "agent.log"

    @property
    def address(self) -> str:
        """How the manager reaches this agent."""
        if self.tcp_only:
            return f"https://{self.host_address}:{self.port}"
        return f"unix:{self.socket}"

    @property
    def agent_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    async def __aenter__(self) -> EmulatedHost:
        await self.power_on()
        try:
            await self.start_agent()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def power_on(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.datastore.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.tcp_only:
            if self.ca is None or self.port is None:
                raise LaunchError(f"host {self.name}: a TCP-only agent needs a CA and a port")
            self.server_cert = self.ca.issue_server(f"agent {self.name}", ips=[self.host_address])
        if self.ca is not None:
            self.client_cert = self.ca.issue_client(f"agent {self.name}")
        self.domain = PowerDomain.create(self.name)

    def argv(self) -> list[str]:
        a = [sys.executable, "-m", "hvsim.control.agent_app", "--host", self.name, "--datacenter", self.datacenter,
             "--vcpus", str(self.vcpus), "--memory-mib", str(self.memory_mib), "--state-dir", str(self.dir / "state"),
             "--datastore", str(self.datastore), "--address", self.host_address,
             "--ready-file", str(self.dir / "ready"), "--log-level", self.log_level]
        if self.domain is not None:
            a += ["--power-domain", str(self.domain.path)]
        if self.tcp_only:
            assert self.server_cert is not None and self.ca is not None
            a += ["--tcp", f"{self.host_address}:{self.port}", "--tls", str(self.ca.cert_path),
                  str(self.server_cert.cert_path), str(self.server_cert.key_path)]
            if self.host_address not in ("127.0.0.1", "::1"):
                a.append("--allow-non-loopback")
        else:
            a += ["--socket", str(self.socket)]
        if self.client_cert is not None and self.ca is not None:
            a += ["--client-tls", str(self.ca.cert_path), str(self.client_cert.cert_path),
                  str(self.client_cert.key_path)]
        if self.images is not None:
            a += ["--images", str(self.images)]
        if self.accel is not None:
            a += ["--accel", self.accel]
        if self.wan is not None:
            a += ["--wan", str(self.dir / "wan.json")]
        if self.import_dir is not None:
            a += ["--import-dir", str(self.import_dir)]
        # nsenter, not `ip netns exec`: the latter remounts /sys, which hides the cgroup v2 tree the
        # host's power domain (and its QEMUs' cgroup) lives in
        return (["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.netns else []) + a

    async def start_agent(self, timeout: float = 120.0) -> None:
        """Start the host agent (inside the power domain and namespace); it re-adopts every guest."""
        if self.agent_pid is not None:
            raise LaunchError(f"host {self.name}: its agent runs already (pid {self.agent_pid})")
        assert self.domain is not None
        ready = self.dir / "ready"
        ready.unlink(missing_ok=True)
        if self.wan is not None:
            (self.dir / "wan.json").write_text(json.dumps(dict(self.wan)))  # noqa: ASYNC240 (tiny)
        die = die_with_parent()
        cg = self.domain.path

        def preexec() -> None:
            die()
            join_cgroup(cg)
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            logf.flush()
            # Popen on the loop's thread on purpose: PDEATHSIG fires when the *thread* that forked exits
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,  # noqa: ASYNC220
                                         stdout=logf, stderr=subprocess.STDOUT, preexec_fn=preexec, close_fds=True)
        self.starts += 1
        await wait_ready(self.proc, ready, self.log_path, f"host agent of {self.name}", timeout)

    async def kill_agent(self) -> None:
        """SIGKILL the agent (a crash): its guests keep running."""
        if self.proc is not None:
            await reap(self.proc, signal.SIGKILL)

    async def stop_agent(self) -> int | None:
        """SIGTERM the agent (a graceful stop): it lets its guests go, they keep running."""
        if self.proc is None:
            return None
        return await reap(self.proc, signal.SIGTERM, timeout=60)

    def pids(self) -> list[int]:
        return self.domain.pids() if self.domain is not None else []

    async def power_off(self) -> list[int]:
        """Kill every process of the host (agent and guests) at once."""
        killed = await asyncio.to_thread(self.domain.power_off) if self.domain is not None else []
        if self.proc is not None:
            await reap(self.proc, signal.SIGKILL)
        return killed

    async def power_cycle(self) -> None:
        """Power off (every process dies), then on again with a new agent; its disk (state dir)
        stays, so the agent finds its records and reports the guests it lost."""
        await self.power_off()
        if self.domain is not None:
            await asyncio.to_thread(self.domain.remove)
            self.domain = None
        self.domain = PowerDomain.create(self.name)
        await self.start_agent()

    async def close(self, keep_dir: bool = False) -> None:
        """Power off (nothing of the host survives) and remove its files."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                await reap(self.proc, signal.SIGTERM, timeout=30)
        finally:
            if self.domain is not None:
                await asyncio.to_thread(self.domain.remove)
                self.domain = None
            if not keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)


class ManagerProcess:
    """A manager process (``python -m hvsim.control.api``), optionally inside a namespace.

    ``api_tls``: serve the ``tcp`` API as HTTPS with mutual TLS: ``True`` issues a server
    certificate for the ``tcp`` IP from ``ca``; or give ``(CA, CERT, KEY)`` paths. ``advertise``
    (default: the socket, or ``https://``/``http://`` + ``tcp``) and ``datacenter`` go into the leader
    record. ``start(wait="leading")`` (default) returns once it leads; ``wait="serving"`` once its
    API answers (a standby answers "not leader"). Managers that stand in for each other share one
    ``token_file`` (clients keep their bearer token when they follow the leader)."""

    def __init__(self, run_dir: Path, store_url: str, *, netns: str | None = None, tcp: str | None = None,
                 ca: CertificateAuthority | None = None, agent_networks: str | None = None,
                 lease_ttl: float | None = None, store_tls: tuple[Path, Path, Path] | None = None,
                 log_level: str = "INFO", allow_non_loopback: bool = False,
                 api_tls: bool | tuple[Path, Path, Path] | None = None, advertise: str | None = None,
                 datacenter: str | None = None, name: str | None = None, token_file: Path | None = None,
                 ha_grace: float | None = None, import_dir: Path | None = None) -> None:
        self.dir = Path(run_dir)
        self.import_dir = import_dir
        self._token_file = token_file          # shared by managers that stand in for each other
        self.api_tls = api_tls
        self.advertise = advertise
        self.datacenter = datacenter
        self.name = name
        self.server_cert: Issued | None = None
        self.api_client_cert: Issued | None = None
        self.store_url = store_url
        self.netns = netns
        self.tcp = tcp
        self.ca = ca
        self.agent_networks = agent_networks
        self.lease_ttl = lease_ttl
        self.store_tls = store_tls
        self.log_level = log_level
        self.allow_non_loopback = allow_non_loopback
        self.ha_grace = ha_grace
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_cert: Issued | None = None
        self.starts = 0

    @property
    def socket(self) -> Path:
        return self.dir / "sock" / "manager.sock"

    @property
    def token_file(self) -> Path:
        return self._token_file if self._token_file is not None else self.dir / "token"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def log_path(self) -> Path:
        return self.dir / "manager.log"

    @property
    def address(self) -> str:
        """What a client dials: the advertised address, else the socket (or the tcp address)."""
        if self.advertise is not None:
            return self.advertise
        if self.tcp:
            return f"{'https' if self.api_tls else 'http'}://{self.tcp}"
        return f"unix:{self.socket}"

    def _api_tls_files(self) -> tuple[Path, Path, Path] | None:
        if self.api_tls is None or self.api_tls is False:
            return None
        if self.api_tls is True:
            if self.ca is None or not self.tcp:
                raise LaunchError("api_tls=True needs a CA (ca=) and a tcp address")
            if self.server_cert is None:
                ip = self.tcp.rpartition(":")[0].strip("[]")
                self.server_cert = self.ca.issue_server(f"manager {self.dir.name}", ips=[ip])
            return (self.ca.cert_path, self.server_cert.cert_path, self.server_cert.key_path)
        return self.api_tls

    def client_tls(self) -> ClientTLS:
        """Client TLS files for this manager's https API (a client certificate of ``ca``)."""
        if self.ca is None:
            raise LaunchError("client_tls() needs the manager's CA (ca=)")
        if self.api_client_cert is None:
            self.api_client_cert = self.ca.issue_client(f"api client of {self.dir.name}")
        return ClientTLS(self.ca.cert_path, self.api_client_cert.cert_path, self.api_client_cert.key_path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def argv(self) -> list[str]:
        a = [sys.executable, "-m", "hvsim.control.api", "--store", self.store_url, "--token-file",
             str(self.token_file), "--ready-file", str(self.dir / "ready"), "--log-level", self.log_level]
        a += ["--tcp", self.tcp] if self.tcp else ["--socket", str(self.socket)]
        if self.allow_non_loopback:
            a.append("--allow-non-loopback")
        if self.ca is not None:
            if self.client_cert is None:
                self.client_cert = self.ca.issue_client("manager")
            a += ["--agent-tls", str(self.ca.cert_path), str(self.client_cert.cert_path),
                  str(self.client_cert.key_path)]
        if self.agent_networks:
            a += ["--agent-networks", self.agent_networks]
        if self.lease_ttl is not None:
            a += ["--lease-ttl", str(self.lease_ttl)]
        if self.store_tls is not None:
            a += ["--store-tls", *map(str, self.store_tls)]
        if self.ha_grace is not None:
            a += ["--ha-grace", str(self.ha_grace)]
        if self.import_dir is not None:
            a += ["--import-dir", str(self.import_dir)]
        files = self._api_tls_files()
        if files is not None:
            a += ["--api-tls", *map(str, files)]
        if self.advertise is not None:
            a += ["--advertise", self.advertise]
        if self.datacenter is not None:
            a += ["--datacenter", self.datacenter]
        if self.name is not None:
            a += ["--name", self.name]
        a += ["--serving-file", str(self.dir / "serving")]
        # nsenter, not `ip netns exec` (see EmulatedHost.argv): the manager reads the hosts' power
        # domains (HA's power evidence) in the cgroup v2 tree that `ip netns exec`'s /sys remount hides
        return (["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.netns else []) + a

    async def start(self, timeout: float = 90.0, wait: str = "leading") -> None:
        """Start it; return once it leads (``wait="leading"``) or once its API serves (``"serving"``)."""
        if wait not in ("leading", "serving"):
            raise LaunchError(f"wait must be 'leading' or 'serving', not {wait!r}")
        if self.pid is not None:
            raise LaunchError(f"the manager runs already (pid {self.pid})")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ready = self.dir / "ready"
        ready.unlink(missing_ok=True)
        (self.dir / "serving").unlink(missing_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,  # noqa: ASYNC220 (see EmulatedHost)
                                         stdout=logf, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
                                         close_fds=True)
        self.starts += 1
        await wait_ready(self.proc, ready if wait == "leading" else self.dir / "serving", self.log_path, "manager",
                         timeout)

    async def wait_leading(self, timeout: float = 90.0) -> None:
        """Wait until it leads (its ready file)."""
        if self.proc is None:
            raise LaunchError("the manager was not started")
        await wait_ready(self.proc, self.dir / "ready", self.log_path, "manager (leading)", timeout)

    async def kill(self) -> None:
        if self.proc is not None:
            await reap(self.proc, signal.SIGKILL)

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        return await reap(self.proc, signal.SIGTERM, timeout=30)

    async def __aenter__(self) -> ManagerProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def reclaim(*hosts: EmulatedHost) -> None:
    """Best-effort, synchronous: power off hosts (for fixtures' finalizers)."""
    for h in hosts:
        if h.domain is not None:
            with contextlib.suppress(Exception):
                h.domain.remove()
        if h.proc is not None and h.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.proc.pid, signal.SIGKILL)
            h.proc.wait()
