"""A real etcd cluster (Debian's ``etcd-server`` 3.4) for the lab and the tests.

:class:`EtcdCluster` starts N members (3 by default) on loopback with free ports, or on given
addresses (one per member, optionally each inside a network namespace through ``ip netns exec``),
with their data dirs (0700) under one run dir (0700), and waits until they agree on a leader.
It can SIGKILL one member and restart it (same data dir: it rejoins and catches up), and it
tears everything down on every path (``async with``). Members on namespace addresses are probed
from inside their namespace (curl through ``ip netns exec``), never from this one: their
addresses exist only inside the underlay, so ``client_urls`` are for clients started there.
Members get ``PR_SET_PDEATHSIG``, so they die with the process that started them; a run dir
left by a dead earlier run (its owner file names a pid + start time that no longer exist) is
reclaimed by :func:`reclaim_stale_runs`,
which also kills any member process of it still alive (by pid, only if its start time matches)::

    async with EtcdCluster() as etcd:        # EtcdCluster(tls=ca): mutual TLS, clients and peers
        async with make_store(etcd.store_url, tls=etcd.client_tls()) as store:
            await store.put("/x", b"1")
        await etcd.kill("m1"); ...; await etcd.restart("m1")
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hvbase.aio import wait_for
from hvbase.fsm import StateMachine, guarded
from qmp_bridge.process import die_with_parent, tail

from .errors import ControlInputError, EtcdClusterError
from .pki import CertificateAuthority, Issued, client_context
from .store.etcd import TLSFiles

log = logging.getLogger("hvsim.control.etcd")

ETCD = "etcd"
RUN_PREFIX = "hvsim-etcd-"
OWNER_FILE = "owner"
MEMBERS_FILE = "members.json"


def _proc_start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive_as(pid: int, start: str) -> bool:
    return bool(start) and os.path.exists(f"/proc/{pid}") and _proc_start_time(pid) == start


def reclaim_stale_runs(base: Path | None = None) -> list[Path]:
    """Remove run dirs of earlier EtcdCluster runs whose owner process is gone, killing (SIGKILL,
    by pid) any of their members still alive. Returns the removed dirs."""
    base = base or Path(tempfile.gettempdir())
    removed = []
    for d in base.glob(RUN_PREFIX + "*"):
        try:
            pid_s, _, start = (d / OWNER_FILE).read_text().strip().partition(" ")
            owner = int(pid_s)
        except (OSError, ValueError):
            continue
        if _alive_as(owner, start):
            continue
        try:
            members = json.loads((d / MEMBERS_FILE).read_text())
        except (OSError, ValueError):
            members = {}
        for rec in members.values() if isinstance(members, dict) else ():
            try:
                pid, pstart = int(rec["pid"]), str(rec["start"])
            except (KeyError, TypeError, ValueError):
                continue
            if _alive_as(pid, pstart):
                log.warning("killing leftover etcd member pid %d of %s", pid, d)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ClusterState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


CLUSTER_TABLE = {
    ClusterState.NEW: {ClusterState.STARTING},
    ClusterState.STARTING: {ClusterState.RUNNING, ClusterState.FAILED},
    ClusterState.RUNNING: {ClusterState.STOPPING},
    ClusterState.FAILED: {ClusterState.STOPPING},
    ClusterState.STOPPING: {ClusterState.STOPPED},
    ClusterState.STOPPED: set(),
}


class MemberState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    KILLED = "killed"
    EXITED = "exited"
    STOPPED = "stopped"


MEMBER_TABLE = {
    MemberState.NEW: {MemberState.RUNNING, MemberState.STOPPED},
    MemberState.RUNNING: {MemberState.KILLED, MemberState.EXITED, MemberState.STOPPED},
    MemberState.KILLED: {MemberState.RUNNING, MemberState.STOPPED},
    MemberState.EXITED: {MemberState.RUNNING, MemberState.STOPPED},
    MemberState.STOPPED: set(),
}


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    netns: str | None = None
    proc: asyncio.subprocess.Process | None = None
    scheme: str = "http"
    cert: Issued | None = None

    def __post_init__(self) -> None:
        self.fsm = StateMachine(f"etcd member {self.name!r}", MemberState.NEW, MEMBER_TABLE, log=log)

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"


class EtcdCluster:
    """N etcd members under one run dir; see the module docstring."""

    def __init__(self, members: int = 3, *, addresses: list[str] | None = None,
                 netns: list[str | None] | None = None, run_dir: Path | None = None,
                 keep_run_dir: bool = False, etcd: str = ETCD, tls: CertificateAuthority | None = None) -> None:
        if not isinstance(members, int) or not 1 <= members <= 7:
            raise ControlInputError("members", f"must be 1..7, got {members!r}")
        if addresses is not None and len(addresses) != members:
            raise ControlInputError("addresses", f"give one address per member ({members}), got {len(addresses)}")
        if netns is not None and len(netns) != members:
            raise ControlInputError("netns", f"give one namespace (or None) per member ({members})")
        self.size = members
        self.tls = tls
        self._client_cert: Issued | None = None
        self.addresses = addresses
        self.netns = netns
        self.etcd = etcd
        self.keep_run_dir = keep_run_dir
        self._given_run_dir = run_dir
        self.run_dir: Path | None = None
        self.token = "hvsim-" + secrets.token_hex(6)
        self.members: dict[str, Member] = {}
        self.fsm = StateMachine("etcd cluster", ClusterState.NEW, CLUSTER_TABLE, log=log)
        self._http: httpx.AsyncClient | None = None

    # -- public -------------------------------------------------------------------------------
    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members.values()]

    @property
    def store_url(self) -> str:
        """``etcd://H:P,H:P,H:P`` (``etcds://`` with TLS) for :func:`hvsim.control.store.make_store`."""
        return ("etcds://" if self.tls else "etcd://") + ",".join(f"{m.host}:{m.client_port}"
                                                                 for m in self.members.values())

    def client_tls(self, name: str = "etcd-client") -> TLSFiles | None:
        """With TLS: files for a store client (a certificate ``name`` from the cluster's CA)."""
        if self.tls is None:
            return None
        issued = self.tls.issue_client(name)
        return TLSFiles(self.tls.cert_path, issued.cert_path, issued.key_path)

    async def __aenter__(self) -> EtcdCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @guarded(ClusterState.NEW)
    async def start(self, timeout: float = 30.0) -> None:
        if shutil.which(self.etcd) is None:
            raise EtcdClusterError(f"{self.etcd} not found: install Debian's etcd-server (make setup)")
        self.fsm.set(ClusterState.STARTING)
        try:
            self._make_run_dir()
            self._plan()
            verify: ssl.SSLContext | bool = True
            if self.tls is not None:
                verify = client_context(self.tls.issue_client("etcd-runner"), self.tls.cert_path)
            self._http = httpx.AsyncClient(timeout=2.0, verify=verify)
            for m in self.members.values():
                await self._launch(m)
            await self.wait_healthy(timeout=timeout)
        except BaseException as e:
            self.fsm.set(ClusterState.FAILED, reason=str(e) or type(e).__name__)
            await self.stop()
            if isinstance(e, EtcdClusterError | OSError):
                raise EtcdClusterError(f"etcd cluster did not start: {e}\n{self._log_tails()}") from e
            raise
        self.fsm.set(ClusterState.RUNNING)

    @guarded(ClusterState.RUNNING)
    async def kill(self, name: str) -> None:
        """SIGKILL one member (a crash: no clean shutdown)."""
        m = self._member(name)
        m.fsm.require("kill", MemberState.RUNNING)
        assert m.proc is not None
        m.proc.kill()
        await m.proc.wait()
        m.fsm.set(MemberState.KILLED, "SIGKILL")

    @guarded(ClusterState.RUNNING)
    async def restart(self, name: str, timeout: float = 30.0) -> None:
        """Start a killed (or exited) member again on its data dir; returns once it is healthy."""
        m = self._member(name)
        m.fsm.require("restart", MemberState.KILLED, MemberState.EXITED)
        await self._launch(m)
        await self.wait_healthy([name], timeout=timeout)

    async def leader(self) -> str:
        """The name of the member the running members agree is the leader."""
        st = await self._statuses()
        ids = {m: s["header"]["member_id"] for m, s in st.items()}
        leaders = {s.get("leader") for s in st.values()}
        if len(leaders) != 1 or None in leaders or "0" in leaders:
            raise EtcdClusterError(f"members do not agree on a leader: {leaders}")
        lid = leaders.pop()
        for name, mid in ids.items():
            if mid == lid:
                return name
        raise EtcdClusterError(f"leader {lid} is not a running member (running: {sorted(st)})")

    async def member_revision(self, name: str) -> int:
        """The store revision that member has applied (its own view, no leader round trip)."""
        st = await self._status(self._member(name))
        return int(st["header"]["revision"])

    async def wait_healthy(self, names: list[str] | None = None, timeout: float = 30.0) -> None:
        """Until every named running member (default: all running) reports healthy and all agree
        on one leader."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            for m in self.members.values():
                self._check_alive(m)
            try:
                want = names or [n for n, m in self.members.items() if m.fsm.state is MemberState.RUNNING]
                for n in want:
                    if not await self._healthy(self._member(n)):
                        raise EtcdClusterError(f"member {n} is not healthy yet")
                await self.leader()
                return
            except (EtcdClusterError, httpx.HTTPError, KeyError, ValueError) as e:
                last = e
            if time.monotonic() > deadline:
                raise EtcdClusterError(f"etcd not healthy within {timeout} s: {last}")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL), remove the run dir. Idempotent."""
        if self.fsm.state in (ClusterState.STOPPED, ClusterState.STOPPING):
            return
        if self.fsm.state is ClusterState.NEW:
            self.fsm.set(ClusterState.STARTING, "stopped before start")
            self.fsm.set(ClusterState.FAILED, "stopped before start")
        if self.fsm.state is ClusterState.STARTING:
            self.fsm.set(ClusterState.FAILED, "stopped while starting")
        self.fsm.set(ClusterState.STOPPING)
        try:
            for m in self.members.values():
                await self._terminate(m)
        finally:
            if self._http is not None:
                http, self._http = self._http, None
                await http.aclose()
            if self.run_dir is not None and not self.keep_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            self.fsm.set(ClusterState.STOPPED)

    def pids(self) -> dict[str, int]:
        return {n: m.proc.pid for n, m in self.members.items()
                if m.proc is not None and m.proc.returncode is None}

    # -- internals ----------------------------------------------------------------------------
    def _member(self, name: str) -> Member:
        try:
            return self.members[name]
        except KeyError:
            raise ControlInputError("member", f"no member {name!r} (have {sorted(self.members)})") from None

    def _make_run_dir(self) -> None:
        if self._given_run_dir is None:
            reclaim_stale_runs()
            self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX))
        else:
            self.run_dir = Path(self._given_run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / OWNER_FILE).write_text(f"{os.getpid()} {_proc_start_time(os.getpid())}\n")

    def _plan(self) -> None:
        assert self.run_dir is not None
        for i in range(self.size):
            name = f"m{i}"
            host = self.addresses[i] if self.addresses else "127.0.0.1"
            ns = self.netns[i] if self.netns else None
            if self.addresses and ns is not None:
                client, peer = 2379, 2380
            else:
                client, peer = free_port(host), free_port(host)
            mdir = self.run_dir / name
            mdir.mkdir(mode=0o700, exist_ok=True)
            m = Member(name, host, client, peer, mdir / "data", mdir / "etcd.log", ns)
            if self.tls is not None:
                m.scheme = "https"
                m.cert = self.tls.issue_server(f"etcd {name}", ips=[host], peer=True)
            self.members[name] = m

    def _argv(self, m: Member) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members.values())
        argv = [self.etcd, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.token,
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--logger", "zap", "--log-outputs", "stderr"]
        if self.tls is not None and m.cert is not None:
            ca = str(self.tls.cert_path)
            cert, key = str(m.cert.cert_path), str(m.cert.key_path)
            argv += ["--cert-file", cert, "--key-file", key, "--client-cert-auth", "--trusted-ca-file", ca,
                     "--peer-cert-file", cert, "--peer-key-file", key, "--peer-client-cert-auth",
                     "--peer-trusted-ca-file", ca]
        if m.netns is not None:
            argv = ["ip", "netns", "exec", m.netns, *argv]
        return argv

    async def _launch(self, m: Member) -> None:
        with open(m.log_path, "ab") as logf:  # noqa: ASYNC230 (a local log file, opened once per start)
            logf.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self._argv(m))}\n".encode())
            logf.flush()
            m.proc = await asyncio.create_subprocess_exec(
                *self._argv(m), stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                preexec_fn=die_with_parent(), start_new_session=True)
        m.fsm.set(MemberState.RUNNING, f"pid {m.proc.pid}")
        self._record_pids()

    def _record_pids(self) -> None:
        if self.run_dir is None:
            return
        recs = {n: {"pid": m.proc.pid, "start": _proc_start_time(m.proc.pid)}
                for n, m in self.members.items() if m.proc is not None and m.proc.returncode is None}
        tmp = self.run_dir / (MEMBERS_FILE + ".tmp")
        tmp.write_text(json.dumps(recs))
        tmp.replace(self.run_dir / MEMBERS_FILE)

    def _check_alive(self, m: Member) -> None:
        if m.fsm.state is MemberState.RUNNING and m.proc is not None and m.proc.returncode is not None:
            m.fsm.set(MemberState.EXITED, f"exit code {m.proc.returncode}")
            raise EtcdClusterError(f"etcd member {m.name} exited with code {m.proc.returncode}:\n"
                                   f"{tail(m.log_path, 15)}")

    async def _terminate(self, m: Member) -> None:
        if m.proc is not None and m.proc.returncode is None:
            m.proc.send_signal(signal.SIGTERM)
            try:
                await wait_for(m.proc.wait(), 5.0)
            except TimeoutError:
                m.proc.kill()
                await m.proc.wait()
        if m.fsm.state is not MemberState.STOPPED:
            m.fsm.set(MemberState.STOPPED)

    async def _probe(self, m: Member, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """A JSON request to one member: with httpx from here, or, for a member inside a network
        namespace (unreachable from this one), with curl run in that namespace."""
        if m.netns is None:
            assert self._http is not None
            r = (await self._http.post(m.client_url + path, json=body) if body is not None
                 else await self._http.get(m.client_url + path))
            r.raise_for_status()
            data: dict[str, Any] = r.json()
            return data
        argv = ["ip", "netns", "exec", m.netns, "curl", "-sS", "--fail", "-m", "2"]
        if self.tls is not None:
            if self._client_cert is None:
                self._client_cert = self.tls.issue_client("etcd-runner")
            argv += ["--cacert", str(self.tls.cert_path), "--cert", str(self._client_cert.cert_path),
                     "--key", str(self._client_cert.key_path)]
        if body is not None:
            argv += ["-X", "POST", "-d", json.dumps(body)]
        proc = await asyncio.create_subprocess_exec(*argv, m.client_url + path, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise httpx.ConnectError(f"curl in {m.netns}: {err.decode(errors='replace').strip()}")
        try:
            parsed: dict[str, Any] = json.loads(out)
        except ValueError as e:
            raise httpx.DecodingError(f"not JSON from {m.name}: {out[:100]!r}") from e
        return parsed

    async def _status(self, m: Member) -> dict[str, Any]:
        return await self._probe(m, "/v3/maintenance/status", {})

    async def _statuses(self) -> dict[str, dict[str, Any]]:
        out = {}
        for n, m in self.members.items():
            if m.fsm.state is MemberState.RUNNING:
                try:
                    out[n] = await self._status(m)
                except httpx.HTTPError:
                    continue
        if not out:
            raise EtcdClusterError("no member answers")
        return out

    async def _healthy(self, m: Member) -> bool:
        try:
            return (await self._probe(m, "/health", None)).get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def _log_tails(self) -> str:
        return "\n".join(f"[{m.name}] {tail(m.log_path, 8)}" for m in self.members.values())
