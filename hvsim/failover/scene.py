"""The failover scene the HIL tests, the benchmark and the lab share: two datacenters and a witness
on a shaped WAN, a 3-member etcd (mutual TLS) with one member per site, host agents (TCP + mTLS
only), the manager of dc1 on a dc1 host, reserved capacity in dc2, the failover controller in the
witness site, and clients inside the client site's namespace.

    async with failover_scene() as sc:
        await sc.api("POST", "/v1/vms", {...})        # sent from inside the client namespace
        await sc.manager.kill()                        # the fault
        tl = await sc.wait_takeover()                  # the controller's timeline

Sites and hosts (``HostSlot`` names)::

    dc1:  dc1-m (management host: host agent + the manager), dc1-h1 (guests), dc1-e (etcd member)
    dc2:  dc2-h1 (guests), dc2-e (etcd member), slots dc2-r1, dc2-r2 (reserved: initiated on failover)
    wit:  wit (etcd member + failover controller), client (API clients)

**etcd placement**: one member per site. A write commits on 2 of 3 members, so losing all of dc1
(one member) keeps quorum (dc2 + witness) and every acknowledged write (it is on 2 members, at
least one of which survives): RPO 0. With only two sites one of them would hold 2 members and its
loss would lose quorum; the witness is what makes "dc1 lost" survivable.
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
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvbase.aio import wait_for
from hvsim.control.api import ensure_token
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.launch import EmulatedHost, reap, short_dir, wait_ready
from hvsim.control.pki import CertificateAuthority
from hvsim.core import power
from qmp_bridge.process import die_with_parent

from .controller import ControllerConfig, HomeHost, SlotSpec
from .errors import FailoverError
from .hosted import AGENT_PORT, ControlSpec, HostedManager
from .sites import Sites

log = logging.getLogger("hvsim.failover.scene")

SITES = {"dc1": ["dc1-m", "dc1-h1", "dc1-e"], "dc2": ["dc2-h1", "dc2-e"], "wit": ["wit", "client"]}
SLOTS = {"dc2": ["dc2-r1", "dc2-r2"]}
AGENT_HOSTS = ["dc1-m", "dc1-h1", "dc2-h1"]
ETCD_HOSTS = ["dc1-e", "dc2-e", "wit"]
RESERVE_RULE = "dc2-failover"


class NsClient:
    """``nsclient serve`` in a namespace: API requests sent from inside it over its stdin/stdout
    (several in flight, answers matched by id)."""

    def __init__(self, sites: Sites, host: str, spec_path: Path, log_path: Path) -> None:
        self.argv = sites.argv_in(host, [sys.executable, "-m", "hvsim.failover.nsclient", "--spec", str(spec_path),
                                         "serve"])
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._n = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with open(self.log_path, "ab") as errf:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                             stderr=errf, preexec_fn=die_with_parent(),
                                                             limit=64 << 20)
        line = await wait_for(self._readline(), 60)
        if not json.loads(line).get("ready"):
            raise FailoverError(f"the namespace client did not start: {line!r}")
        self._reader = asyncio.create_task(self._read(), name="nsclient-reader")

    async def _readline(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise FailoverError(f"the namespace client exited ({self.proc.returncode}); see {self.log_path}")
        return line

    async def _read(self) -> None:
        try:
            while True:
                resp = json.loads(await self._readline())
                fut = self._waiting.pop(int(resp.get("id", -1)), None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except (FailoverError, ValueError) as e:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(FailoverError(f"the namespace client: {e}"))
            self._waiting.clear()

    async def rpc(self, req: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self._n += 1
        rid = self._n
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self.proc.stdin.write((json.dumps({**req, "id": rid}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            return await wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    async def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


@dataclass
class Writer:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def entries(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def acked(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if "acked" in e]

    async def stop(self) -> None:
        await reap(self.proc, signal.SIGTERM, timeout=30)


@dataclass
class Scene:
    base: Path
    sites: Sites
    etcd: EtcdCluster
    ca: CertificateAuthority
    spec: ControlSpec
    spec_path: Path
    hosts: dict[str, EmulatedHost]
    manager: HostedManager
    controller_cfg: ControllerConfig
    controller: subprocess.Popen[bytes] | None = None
    client: NsClient | None = None
    writers: list[Writer] = field(default_factory=list)
    extra_managers: list[HostedManager] = field(default_factory=list)
    _ha_restarted: set[str] = field(default_factory=set)

    # -- the API, from inside the client namespace -------------------------------------------------
    async def api(self, method: str, path: str, body: Any = None, *, retry_for: float = 60.0,
                  timeout: float = 300.0) -> Any:
        assert self.client is not None
        r = await self.client.rpc({"method": method, "path": path, "json": body, "retry_for": retry_for},
                                  timeout=timeout)
        if not r["ok"]:
            raise FailoverError(f"{method} {path}: {r.get('status')} {r.get('error')}")
        return r["body"]

    async def api_status(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, body) without raising: 200 for success, the error status otherwise."""
        assert self.client is not None
        r = await self.client.rpc({"method": method, "path": path, "json": body, "retry_for": 30})
        return (200, r["body"]) if r["ok"] else (int(r.get("status") or 0), r.get("body") or r.get("error"))

    async def leader(self) -> dict[str, Any] | None:
        assert self.client is not None
        r = await self.client.rpc({"op": "leader", "timeout": 60})
        return r.get("body")

    # -- the controller ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        p = Path(self.controller_cfg.status_file)
        try:
            d: dict[str, Any] = json.loads(p.read_text())
            return d
        except (OSError, ValueError):
            return {}

    async def wait_status(self, pred: Any, timeout: float = 180.0, what: str = "the controller") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st and pred(st):
                return st
            if self.controller is not None and self.controller.poll() is not None:
                raise FailoverError(f"the failover controller exited ({self.controller.returncode})")
            await asyncio.sleep(0.1)
        raise FailoverError(f"{what}: not reached in {timeout:g} s; status {json.dumps(self.status())[:2000]}")

    async def wait_takeover(self, after: int = 0, timeout: float = 240.0) -> dict[str, Any]:
        """The timeline of the first takeover with index >= ``after`` that ended (done or gave up)."""
        def done(st: dict[str, Any]) -> bool:
            tls = [t for t in st.get("timelines", [])[after:] if t["kind"] == "takeover"]
            return bool(tls) and any(e in tls[-1]["events"] for e in ("done", "gave-up", "leader-elsewhere")) \
                and st.get("state") == "watching"
        st = await self.wait_status(done, timeout, "takeover")
        tl: dict[str, Any] = [t for t in st["timelines"][after:] if t["kind"] == "takeover"][-1]
        return tl

    async def failback(self, host: str = "dc1-m") -> dict[str, Any]:
        from hvsim.control.client import ManagerClient
        async with ManagerClient(f"unix:{self.controller_cfg.socket}", self.spec.token, timeout=300) as c:
            out: dict[str, Any] = await c.request("POST", "/v1/failback", json={"host": host})
            return out

    # -- writers -----------------------------------------------------------------------------------
    def start_writer(self, prefix: str, interval: float = 0.05) -> Writer:
        logp = self.base / f"writer-{prefix}.jsonl"
        argv = self.sites.argv_in("client", [sys.executable, "-m", "hvsim.failover.nsclient", "--spec",
                                             str(self.spec_path), "writer", "--log", str(logp), "--prefix", prefix,
                                             "--interval", str(interval)])
        with open(self.base / f"writer-{prefix}.log", "ab") as errf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,  # noqa: ASYNC220
                                    preexec_fn=die_with_parent())
        w = Writer(proc, logp, time.time())
        self.writers.append(w)
        return w

    async def missing(self, names: list[str]) -> list[str]:
        """Which of ``names`` (groups) the current manager does not have."""
        assert self.client is not None
        have: set[str] = set()
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if after:
                params["after"] = after
            r = await self.client.rpc({"method": "GET", "path": "/v1/groups", "params": params, "retry_for": 120})
            if not r["ok"]:
                raise FailoverError(f"list groups: {r.get('error')}")
            page = r["body"]
            have.update(i["name"] for i in page["items"])
            after = page.get("after")
            if not page.get("remaining") or not after:
                break
        return [n for n in names if n not in have]

    # -- guests ------------------------------------------------------------------------------------
    async def define_start(self, name: str, host: str, *, memory_mib: int = 256, protected: bool = False,
                           priority: int = 0) -> None:
        await self.api("POST", "/v1/vms", {"name": name, "memory_mib": memory_mib, "host": host,
                                           "protected": protected, "priority": priority})
        out = await self.api("POST", f"/v1/vms/{name}/start", retry_for=0, timeout=600)
        op = out.get("operation", out)
        if op.get("state") != "succeeded":
            raise FailoverError(f"start of {name}: {op}")

    def qemu_pids(self, host: str) -> set[int]:
        """Processes in ``host``'s power domain other than its agent (its guests' QEMUs)."""
        h = self.hosts[host]
        return set(h.pids()) - {h.agent_pid or -1}

    async def power_off_dc1(self) -> None:
        """Every dc1 host powered off at once: agents, guests, the manager, dc1's etcd member."""
        etcd_dc1 = self.etcd_member("dc1-e")
        await asyncio.gather(*(self.hosts[h].power_off() for h in ("dc1-m", "dc1-h1")),
                             self.etcd.kill(etcd_dc1))
        await self.manager.kill()           # it was in dc1-m's power domain: reap it

    def current_manager_pid(self) -> int:
        """The pid of the manager that leads now (started by the scene or by the controller)."""
        st = self.status()
        cur = st.get("current")
        if cur and cur.get("pid"):
            return int(cur["pid"])
        if self.manager.pid is not None:
            return self.manager.pid
        raise FailoverError(f"no manager process is known to lead: {st}")

    def kill_pid(self, pid: int) -> None:
        """SIGKILL a manager process of this scene (ours or the controller's child) by pid."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            if self.manager.proc is not None and self.manager.proc.pid == pid:
                self.manager.proc.poll()
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ", 1)[1].startswith("Z"):
                        break
            except OSError:
                break
            time.sleep(0.02)

    async def power_off_initiated(self, slot: str) -> list[int]:
        """Power off a host the controller initiated (its power domain: every process in it)."""
        ini = self.status().get("initiated", {}).get(slot)
        if not ini or not ini.get("cgroup"):
            raise FailoverError(f"slot {slot} is not initiated: {self.status().get('initiated')}")
        return await asyncio.to_thread(power.PowerDomain(Path(ini["cgroup"])).power_off)

    def ha_restarted(self) -> list[str]:
        """VMs the manager restarted after their host was lost (the only users of reserved capacity)."""
        return list(self._ha_restarted)

    async def refresh_ha_restarted(self) -> None:
        assert self.client is not None
        r = await self.client.rpc({"method": "GET", "path": "/v1/operations", "params": {"limit": 1000}})
        if not r["ok"]:
            raise FailoverError(f"list operations: {r.get('error')}")
        ops = r["body"]["items"]
        self._ha_restarted = {o["vm"] for o in ops if "restart" in str(o.get("kind", ""))}

    async def audit(self, since: float) -> dict[str, Any]:
        """B's fencing audit over every agent's command history and the store (run inside the client
        namespace: the store is only reachable there)."""
        assert self.client is not None
        histories = {h.name: str(h.dir / "state") for h in self.hosts.values()}
        for d in sorted((self.base / "initiated").glob("*/state")):
            histories[d.parent.name] = str(d)
        r = await self.client.rpc({"op": "audit", "histories": histories, "since": since}, timeout=120)
        if not r["ok"]:
            raise FailoverError(f"audit: {r.get('error')}")
        await self.refresh_ha_restarted()
        body: dict[str, Any] = r["body"]
        return body

    def etcd_member(self, host: str) -> str:
        ip = self.sites.ip(host)
        return next(n for n, m in self.etcd.members.items() if m.host == ip)


def controller_argv(sc: Scene, cfg_path: Path, ready: Path) -> list[str]:
    return sc.sites.argv_in("wit", [sys.executable, "-m", "hvsim.failover.controller", "--config", str(cfg_path),
                                    "--ready-file", str(ready), "--log-level", "INFO"])


@contextlib.asynccontextmanager
async def failover_scene(*, lease_ttl: float = 2.0, images: Path | None = None, lan_mbit: float = 1000.0,
                         wan_mbit: float = 100.0, host_memory_mib: int = 1536,
                         slot_memory_mib: int = 1024) -> AsyncIterator[Scene]:
    base = short_dir("hvsim-fo-")
    ca = CertificateAuthority.create(base / "pki", "failover")
    token_file = base / "token"
    ensure_token(token_file)
    datastore = base / "datastore"
    datastore.mkdir(mode=0o700)
    hosts: dict[str, EmulatedHost] = {}
    sc: Scene | None = None
    try:
        async with Sites(SITES, slots=SLOTS, lan_mbit=lan_mbit, wan_mbit=wan_mbit) as sites:
            async with EtcdCluster(addresses=[sites.ip(h) for h in ETCD_HOSTS],
                                   netns=[sites.ns(h) for h in ETCD_HOSTS], tls=ca) as etcd:
                tls = etcd.client_tls("hvsim-run")
                assert tls is not None
                spec = ControlSpec(store_url=etcd.store_url, store_tls=(str(tls.ca), str(tls.cert), str(tls.key)),
                                   ca_dir=str(base / "pki"), token_file=str(token_file),
                                   agent_networks=str(sites.subnet), lease_ttl=lease_ttl, datastore=str(datastore),
                                   images=str(images) if images else None)
                spec_path = base / "spec.json"
                spec_path.write_text(json.dumps(spec.to_json()))
                for h in AGENT_HOSTS:
                    slot = sites.slot(h)
                    hosts[h] = EmulatedHost(h, base, vcpus=4, memory_mib=host_memory_mib, datacenter=slot.site,
                                            datastore=datastore, netns=slot.ns, address=slot.ip, port=AGENT_PORT,
                                            ca=ca, images=images, tcp_only=True)
                for eh in hosts.values():
                    await eh.power_on()
                await asyncio.gather(*(h.start_agent() for h in hosts.values()))
                m1 = sites.slot("dc1-m")
                dom = hosts["dc1-m"].domain
                assert dom is not None
                manager = HostedManager(spec, host="dc1-m", datacenter="dc1", ns=m1.ns, ip=m1.ip, cgroup=dom.path,
                                        run_dir=base / "manager-dc1-m")
                cfg = ControllerConfig(
                    spec=spec, base_dir=str(base / "initiated"), socket=str(base / "ctl" / "controller.sock"),
                    status_file=str(base / "controller-status.json"),
                    slots=[SlotSpec(sites.slot(s), 4, slot_memory_mib) for s in SLOTS["dc2"]],
                    homes=[HomeHost(h, "dc1", sites.ns(h), sites.ip(h), str(hosts[h].domain.path))  # type: ignore[union-attr]
                           for h in ("dc1-m",)],
                    power_off_on_exit=True, protected_timeout_s=300.0)
                (base / "ctl").mkdir(mode=0o700)
                (base / "initiated").mkdir(mode=0o700)
                sc = Scene(base, sites, etcd, ca, spec, spec_path, hosts, manager, cfg)
                await manager.start()
                cfg_path = base / "controller.json"
                cfg_path.write_text(json.dumps(cfg.to_json()))
                ready = base / "controller.ready"
                with open(base / "controller.log", "ab") as logf:
                    sc.controller = subprocess.Popen(controller_argv(sc, cfg_path, ready),  # noqa: ASYNC220
                                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                                     preexec_fn=die_with_parent())
                await wait_ready(sc.controller, ready, base / "controller.log", "failover controller", 90)
                sc.client = NsClient(sites, "client", spec_path, base / "nsclient.log")
                await sc.client.start()
                await setup_inventory(sc, slot_memory_mib)
                try:
                    yield sc
                finally:
                    await teardown(sc)
    finally:
        for eh in hosts.values():
            with contextlib.suppress(Exception):
                await eh.close()
        await asyncio.to_thread(power.reclaim_stale)
        shutil.rmtree(base, ignore_errors=True)


async def setup_inventory(sc: Scene, slot_memory_mib: int) -> None:
    """Hosts registered by their agents, the reserved slots as placeholders held by the reserve rule."""
    for h in AGENT_HOSTS:
        await sc.api("POST", "/v1/hosts", {"name": h, "agent": sc.hosts[h].address})
    for s in SLOTS["dc2"]:
        await sc.api("POST", "/v1/hosts", {"name": s, "datacenter": "dc2", "vcpus": 4, "memory_mib": slot_memory_mib})
    await sc.api("POST", "/v1/rules", {"name": RESERVE_RULE, "spec": {"kind": "reserve_hosts", "name": RESERVE_RULE,
                                                                      "hosts": SLOTS["dc2"]}})


async def teardown(sc: Scene) -> None:
    for w in sc.writers:
        with contextlib.suppress(Exception):
            await w.stop()
    if sc.client is not None:
        with contextlib.suppress(Exception):
            await sc.client.close()
    if sc.controller is not None:
        await reap(sc.controller, signal.SIGTERM, timeout=60)
    for m in [sc.manager, *sc.extra_managers]:
        with contextlib.suppress(Exception):
            await m.stop()
    for h in sc.hosts.values():
        with contextlib.suppress(Exception):
            await h.close(keep_dir=True)


def keep_logs(sc: Scene, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for p in [*sc.base.rglob("*.log"), *sc.base.rglob("*.jsonl"), sc.base / "controller-status.json"]:
        if p.exists():
            target = dest / p.relative_to(sc.base)
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy2(p, target)
