"""The failover controller: its own process (in dc2 or the witness site) that watches the manager
lease in the store and, when it is lost, restarts the management process in dc2 from reserved
capacity (US20220027244: determine whether the management process executes at the first
datacenter; if not, initiate a host at the second datacenter from reserved capacity and execute the
management process on it).

On loss of the lease (the key ``/_lease/manager`` vanishes: the holder's etcd lease expired, so no
manager may act any more: fencing) it

1. picks a reserved host slot in dc2 and **initiates a host** there: plugs its namespace into dc2's
   bridge, powers on its power domain and starts its host agent (an ``EmulatedHost``),
2. **starts the manager on it** (in the same namespace and power domain) at the same time; the
   manager takes the lease with a newer fencing token, loads the state from the store, resolves the
   in-flight operations and serves,
3. waits until it answers a **read and a write** through its API (mTLS + bearer token),
4. registers the initiated host (the reservation's placeholder record replaced by one with its
   agent), so the manager reaches it,
5. waits until every running guest on a reachable host is **re-adopted**: an exec through the new
   manager reaches it (its QEMU never stopped: agents own their guests),
6. waits until the **protected VMs of lost hosts** run again (the manager's HA restarts them, in
   priority order within the reservation).

If the initiated host dies during the takeover (its manager exits or never serves) the slot is
powered off and the next slot is tried: a second failover. Every step is timestamped in the
timeline (``GET /v1/status``; also written to the status file).

**Fail back** (``POST /v1/failback {"host": "dc1-m"}``, or ``hvsim failover failback``): a manager
started on the named healthy dc1 host campaigns, the dc2 manager is stopped (SIGTERM: it releases
the lease), the dc1 manager takes the lease with a newer token, is checked to serve reads and
writes, guests are re-adopted; the dc2 management host is powered off and its placeholder put back
in the reservation if no guest runs on it.

The controller serves its own small API on a unix socket (0600, in a 0700 directory; the run's
bearer token). It owns the hosts it initiates (their power domains carry its pid): stopping it with
``--power-off-on-exit`` (tests, lab) powers them off.

State machine::

    NEW -> WATCHING <-> TAKING_OVER          (on loss; back to WATCHING once done or given up)
           WATCHING <-> FAILING_BACK         (on request)
    any  -> STOPPING -> STOPPED
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvbase.fsm import StateMachine
from hvsim.control.api import serving, unix_listener
from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiError, ApiNotFoundError, ControlError, StoreError
from hvsim.control.launch import EmulatedHost, LaunchError
from hvsim.control.pki import client_context
from hvsim.control.schema import ExecRequest, HostCreate
from hvsim.control.state import GroupRecord, HostStatus, VMPower
from hvsim.control.store import TLSFiles, make_store
from hvsim.control.store.base import Store

from .errors import FailoverInputError, TakeoverError
from .hosted import ControlSpec, HostedManager, write_json
from .sites import HostSlot, plug_host, unplug_host

log = logging.getLogger("hvsim.failover.controller")
LEASE = "manager"


class ControllerState(enum.Enum):
    NEW = "new"
    WATCHING = "watching"
    TAKING_OVER = "taking-over"
    FAILING_BACK = "failing-back"
    STOPPING = "stopping"
    STOPPED = "stopped"


TABLE = {
    ControllerState.NEW: {ControllerState.WATCHING, ControllerState.STOPPING},
    ControllerState.WATCHING: {ControllerState.TAKING_OVER, ControllerState.FAILING_BACK, ControllerState.STOPPING},
    ControllerState.TAKING_OVER: {ControllerState.WATCHING, ControllerState.STOPPING},
    ControllerState.FAILING_BACK: {ControllerState.WATCHING, ControllerState.STOPPING},
    ControllerState.STOPPING: {ControllerState.STOPPED},
    ControllerState.STOPPED: set(),
}


@dataclass(frozen=True)
class SlotSpec:
    """A reserved host slot: where it plugs in and the capacity it brings."""
    slot: HostSlot
    vcpus: int
    memory_mib: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SlotSpec:
        return cls(HostSlot.from_json(d["slot"]), int(d["vcpus"]), int(d["memory_mib"]))

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot.to_json(), "vcpus": self.vcpus, "memory_mib": self.memory_mib}


@dataclass(frozen=True)
class HomeHost:
    """A host a manager can fail back to: its namespace, address and power domain."""
    name: str
    site: str
    ns: str
    ip: str
    cgroup: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HomeHost:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class ControllerConfig:
    spec: ControlSpec
    base_dir: str                   # initiated hosts' dirs
    socket: str                     # the controller's own API (unix socket)
    status_file: str
    slots: list[SlotSpec]
    homes: list[HomeHost] = field(default_factory=list)
    poll_s: float = 0.1
    takeover_timeout_s: float = 90.0
    protected_timeout_s: float = 120.0
    power_off_on_exit: bool = False

    @classmethod
    def load(cls, path: Path) -> ControllerConfig:
        d = json.loads(path.read_text())
        return cls(spec=ControlSpec.from_json(d["spec"]), base_dir=d["base_dir"], socket=d["socket"],
                   status_file=d["status_file"], slots=[SlotSpec.from_json(s) for s in d["slots"]],
                   homes=[HomeHost.from_json(h) for h in d.get("homes", [])], poll_s=float(d.get("poll_s", 0.1)),
                   takeover_timeout_s=float(d.get("takeover_timeout_s", 90.0)),
                   protected_timeout_s=float(d.get("protected_timeout_s", 120.0)),
                   power_off_on_exit=bool(d.get("power_off_on_exit", False)))

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "base_dir": self.base_dir, "socket": self.socket,
                "status_file": self.status_file, "slots": [s.to_json() for s in self.slots],
                "homes": [h.__dict__ for h in self.homes], "poll_s": self.poll_s,
                "takeover_timeout_s": self.takeover_timeout_s, "protected_timeout_s": self.protected_timeout_s,
                "power_off_on_exit": self.power_off_on_exit}


@dataclass
class Initiated:
    spec: SlotSpec
    host: EmulatedHost
    manager: HostedManager


class Controller:
    def __init__(self, cfg: ControllerConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.fsm: StateMachine[ControllerState] = StateMachine("failover controller", ControllerState.NEW, TABLE,
                                                               log=log)
        self.timelines: list[dict[str, Any]] = []       # one per takeover / fail back
        self.initiated: dict[str, Initiated] = {}       # slot name -> what runs there
        self.homed: dict[str, HostedManager] = {}       # managers started on home hosts (fail back)
        self.current: HostedManager | None = None       # the manager this controller started last
        self.leader: tuple[str, int] | None = None
        self.attempts = 0
        self._free = [s.slot.name for s in cfg.slots]
        self._ours = {f"manager@{s.slot.name}" for s in cfg.slots}      # names of the managers we start
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()
        ca = cfg.spec.ca
        self._client_cert = ca.issue_client("failover-controller")
        self._ca_path = ca.cert_path

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"state": self.fsm.state.value, "leader": list(self.leader) if self.leader else None,
                "timelines": self.timelines, "attempts": self.attempts, "free_slots": list(self._free),
                "initiated": {n: {"host": i.host.name, "ns": i.spec.slot.ns, "ip": i.spec.slot.ip,
                                  "cgroup": str(i.host.domain.path) if i.host.domain else None,
                                  "agent_pid": i.host.agent_pid, "manager_pid": i.manager.pid}
                              for n, i in self.initiated.items()},
                "current": self.current.describe() if self.current else None}

    def _publish(self) -> None:
        write_json(Path(self.cfg.status_file), self.status())

    def _mark(self, tl: dict[str, Any], event: str, **extra: Any) -> None:
        tl["events"][event] = time.time()
        tl.update(extra)
        log.warning("%s: %s %s", tl["kind"], event, extra or "")
        self._publish()

    # -- the API client ----------------------------------------------------------------------------
    def client(self, address: str) -> ManagerClient:
        return ManagerClient(address, self.cfg.spec.token, timeout=10,
                             ssl_context=client_context(self._client_cert, self._ca_path))

    # -- watching ----------------------------------------------------------------------------------
    async def run(self) -> None:
        self.fsm.set(ControllerState.WATCHING, "start")
        self._publish()
        seen = False
        while True:
            try:
                h = await self.store.holder(LEASE)
            except StoreError as e:
                log.warning("store: %s", e)
                await asyncio.sleep(self.cfg.poll_s)
                continue
            if h is not None:
                if h != self.leader:
                    self.leader = h
                    self._publish()
                seen = True
            elif seen and not self._busy.locked():
                detected = time.time()
                lost = self.leader
                self.leader = None
                async with self._busy:
                    await self._takeover(detected, lost)
                continue
            await asyncio.sleep(self.cfg.poll_s)

    # -- takeover ----------------------------------------------------------------------------------
    async def _takeover(self, detected: float, lost: tuple[str, int] | None) -> None:
        self.fsm.set(ControllerState.TAKING_OVER, f"lease of {lost[0] if lost else '?'} lost")
        tl: dict[str, Any] = {"kind": "takeover", "lost": list(lost) if lost else None, "events": {},
                              "attempts": []}
        self.timelines.append(tl)
        self._mark(tl, "detected")
        try:
            while True:
                # the lease may have been taken meanwhile (a manager we did not start): nothing to do
                h = await self.store.holder(LEASE)
                if h is not None and h[0] in self._ours and (self.current is None or h[0] != self.current.name):
                    # a manager of ours that died after it took the lease: wait for its lease to run out
                    await asyncio.sleep(self.cfg.poll_s)
                    continue
                if h is not None and h[0] not in self._ours:
                    self._mark(tl, "leader-elsewhere", leader=list(h))
                    return
                try:
                    await self._attempt(tl)
                    return
                except (TakeoverError, LaunchError, ControlError, OSError) as e:
                    tl["attempts"].append({"error": str(e).splitlines()[0][:300], "at": time.time()})
                    log.error("takeover attempt failed: %s", e)
                    self._publish()
                    if len(tl["attempts"]) >= 2 * max(1, len(self.cfg.slots)):
                        self._mark(tl, "gave-up")
                        return
        finally:
            self.fsm.set(ControllerState.WATCHING, "takeover ended")
            self._publish()

    def _pick_slot(self) -> SlotSpec:
        for name in self._free:
            spec = next(s for s in self.cfg.slots if s.slot.name == name)
            self._free.remove(name)
            return spec
        raise TakeoverError("no reserved host slot is free in dc2")

    async def _attempt(self, tl: dict[str, Any]) -> None:
        self.attempts += 1
        spec = self._pick_slot()
        slot = spec.slot
        cs = self.cfg.spec
        tl["slot"] = slot.name
        self._mark(tl, "host-initiating", slot=slot.name)
        await plug_host(slot)
        host = EmulatedHost(slot.name, Path(self.cfg.base_dir), vcpus=spec.vcpus, memory_mib=spec.memory_mib,
                            datacenter=slot.site, datastore=Path(cs.datastore), netns=slot.ns, address=slot.ip,
                            port=cs.agent_port, ca=cs.ca, images=Path(cs.images) if cs.images else None,
                            tcp_only=True)
        mgr = HostedManager(cs, host=slot.name, datacenter=slot.site, ns=slot.ns, ip=slot.ip, cgroup=None,
                            run_dir=Path(self.cfg.base_dir) / slot.name / "manager")
        self.initiated[slot.name] = Initiated(spec, host, mgr)
        try:
            await host.power_on()
            assert host.domain is not None
            mgr.cgroup = host.domain.path
            mgr.launch()                              # campaigns while the agent starts
            self.current = mgr
            await host.start_agent(timeout=self.cfg.takeover_timeout_s)
            self._mark(tl, "host-initiated")
            await self._wait_manager(mgr, tl)
            await self._register(spec, mgr)
            self._mark(tl, "host-registered")
            await self._readopt(mgr, tl)
            await self._protected(mgr, tl)
            self._mark(tl, "done", manager=mgr.describe())
        except BaseException:
            await self._discard(slot.name)
            raise

    async def _wait_manager(self, mgr: HostedManager, tl: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.cfg.takeover_timeout_s
        while not mgr.ready:
            if mgr.proc is not None and mgr.proc.poll() is not None:
                raise TakeoverError(f"the manager on {mgr.host} exited with {mgr.proc.returncode} before it served")
            if time.monotonic() > deadline:
                raise TakeoverError(f"the manager on {mgr.host} did not serve within "
                                    f"{self.cfg.takeover_timeout_s:g} s")
            await asyncio.sleep(0.05)
        self._mark(tl, "manager-leading")
        await self._check_rw(mgr, tl, deadline)

    async def _check_rw(self, mgr: HostedManager, tl: dict[str, Any], deadline: float) -> None:
        """A read and a write answered correctly by ``mgr`` (its token is the lease's)."""
        probe = f"fo-probe-{int(time.time() * 1000) % 10**9}-{self.attempts}"
        async with self.client(mgr.address) as c:
            while True:
                try:
                    health = await c.health()
                    await c.add_group(GroupRecord(name=probe, description="failover controller probe"))
                    got = await c.get_group(probe)
                    if got.name != probe:
                        raise TakeoverError(f"the manager on {mgr.host} read back {got.name!r}, wrote {probe!r}")
                    await c.remove_group(probe)
                    break
                except ApiError as e:
                    if mgr.proc is not None and mgr.proc.poll() is not None:
                        raise TakeoverError(f"the manager on {mgr.host} died while being checked") from e
                    if time.monotonic() > deadline:
                        raise TakeoverError(f"the manager on {mgr.host} does not serve reads and writes: {e}") from e
                    await asyncio.sleep(0.1)
        self._mark(tl, "manager-serving", token=health.get("token") or health.get("fencing_token"))

    async def _register(self, spec: SlotSpec, mgr: HostedManager) -> None:
        """The initiated host in the inventory with its agent (the reservation's placeholder replaced)."""
        addr = f"https://{spec.slot.ip}:{self.cfg.spec.agent_port}"
        async with self.client(mgr.address) as c:
            try:
                rec = await c.get_host(spec.slot.name)
                if rec.agent == addr and rec.status is HostStatus.UP:
                    return
                await c.remove_host(spec.slot.name)
            except ApiNotFoundError:
                pass
            await c.add_host(HostCreate(name=spec.slot.name, datacenter=spec.slot.site, agent=addr))

    async def _vms(self, c: ManagerClient) -> list[Any]:
        return [v async for v in c.iter_vms()]

    async def _readopt(self, mgr: HostedManager, tl: dict[str, Any]) -> None:
        """Every running guest on a reachable host answers an exec through the new manager."""
        deadline = time.monotonic() + self.cfg.takeover_timeout_s
        async with self.client(mgr.address) as c:
            pending: set[str] = {v.name for v in await self._vms(c) if v.power is VMPower.RUNNING}
            adopted: list[str] = []
            while pending and time.monotonic() < deadline:
                hosts = {h.name: h async for h in c.iter_hosts()}
                for name in sorted(pending):
                    vm = await c.get_vm(name)
                    h = hosts.get(vm.host or "")
                    if vm.power is not VMPower.RUNNING or h is None or h.status is not HostStatus.UP:
                        continue                  # on a lost host: the HA restart's business
                    try:
                        r = await c.exec_vm(name, ExecRequest(command="true", timeout=10))
                    except ApiError as e:
                        log.info("re-adopt %s: %s", name, e)
                        continue
                    if r.exit_code == 0:
                        pending.discard(name)
                        adopted.append(name)
                lost_hosts = {n for n, h in hosts.items() if h.status is HostStatus.UNREACHABLE}
                waiting = [n for n in pending if (await c.get_vm(n)).host not in lost_hosts]
                if not waiting:
                    break
                await asyncio.sleep(0.25)
        self._mark(tl, "guests-readopted", readopted=sorted(adopted), not_readopted=sorted(pending))

    async def _protected(self, mgr: HostedManager, tl: dict[str, Any]) -> None:
        """Protected VMs whose host is lost run again elsewhere (the manager's HA restarts them)."""
        deadline = time.monotonic() + self.cfg.protected_timeout_s
        async with self.client(mgr.address) as c:
            hosts = {h.name: h async for h in c.iter_hosts()}
            lost = {n for n, h in hosts.items() if h.status is HostStatus.UNREACHABLE}
            wanted = {v.name: v.host for v in await self._vms(c) if v.protected and v.host in lost}
            if not wanted:
                self._mark(tl, "protected-restarted", protected=[])
                return
            while time.monotonic() < deadline:
                back = {}
                for name, old in wanted.items():
                    vm = await c.get_vm(name)
                    if vm.power is VMPower.RUNNING and vm.host != old:
                        back[name] = vm.host
                if len(back) == len(wanted):
                    self._mark(tl, "protected-restarted", protected=sorted(back.items()))
                    return
                await asyncio.sleep(0.5)
        self._mark(tl, "protected-timeout", protected=sorted(wanted))

    async def _discard(self, slot: str) -> None:
        """Power off an initiated host and unplug it; the slot is free again."""
        ini = self.initiated.pop(slot, None)
        if ini is None:
            return
        if self.current is ini.manager:
            self.current = None
        with contextlib.suppress(Exception):
            await ini.manager.kill()
        try:
            await ini.host.power_off()
            await ini.host.close(keep_dir=True)    # its disk (history, records) stays
        finally:
            await unplug_host(ini.spec.slot)
            if slot not in self._free:
                self._free.append(slot)

    # -- fail back ---------------------------------------------------------------------------------
    async def failback(self, host: str) -> dict[str, Any]:
        home = next((h for h in self.cfg.homes if h.name == host), None)
        if home is None:
            raise FailoverInputError("host", f"{host!r} is not a host to fail back to "
                                             f"({', '.join(h.name for h in self.cfg.homes)})")
        if self._busy.locked():
            raise TakeoverError("a takeover or fail back is in progress")
        async with self._busy:
            old = self.current
            if old is None or old.pid is None:
                raise TakeoverError("the current manager was not started by this controller: nothing to move back")
            self.fsm.set(ControllerState.FAILING_BACK, f"to {host}")
            tl: dict[str, Any] = {"kind": "failback", "to": host, "from": old.host, "events": {}}
            self.timelines.append(tl)
            self._mark(tl, "requested")
            try:
                async with self.client(old.address) as c:
                    deadline = time.monotonic() + 30
                    rec = await c.get_host(host)
                    while rec.status is not HostStatus.UP and time.monotonic() < deadline:
                        await asyncio.sleep(0.5)     # a host whose link just came back: the monitor's next poll
                        rec = await c.get_host(host)
                if rec.status is not HostStatus.UP:
                    raise TakeoverError(f"host {host} is {rec.status.value}: not healthy, not failing back")
                self._ours.add(f"manager@{home.name}")
                mgr = HostedManager(self.cfg.spec, host=home.name, datacenter=home.site, ns=home.ns, ip=home.ip,
                                    cgroup=Path(home.cgroup),
                                    run_dir=Path(self.cfg.base_dir) / f"home-{home.name}-{len(self.timelines)}")
                mgr.launch()                     # campaigns: the lease is still held by the dc2 manager
                self.homed[home.name] = mgr
                await asyncio.sleep(0.5)
                self._mark(tl, "standby-started")
                # SIGTERM: it stops its drivers and releases the lease; its HTTP server may wait for
                # clients' keep-alive connections, so SIGKILL after 5 s (safe: fencing; the lease
                # then runs out within its TTL)
                await old.stop(timeout=5.0)
                self._mark(tl, "old-stopped")
                self.current = mgr
                await self._wait_manager(mgr, tl)
                await self._readopt(mgr, tl)
                await self._release_slot(old.host, mgr)
                self._mark(tl, "done", manager=mgr.describe())
                return tl
            finally:
                self.fsm.set(ControllerState.WATCHING, "fail back ended")
                self._publish()

    async def _release_slot(self, slot: str, mgr: HostedManager) -> None:
        """The dc2 management host back into the reservation, if no guest runs on it."""
        ini = self.initiated.get(slot)
        if ini is None:
            return
        async with self.client(mgr.address) as c:
            on_it = [v.name for v in await self._vms(c) if v.host == slot]
            if on_it:
                log.warning("fail back: %s keeps running (guests %s on it)", slot, on_it)
                return
            with contextlib.suppress(ApiNotFoundError):
                await c.remove_host(slot)
            await c.add_host(HostCreate(name=slot, datacenter=ini.spec.slot.site, vcpus=ini.spec.vcpus,
                                        memory_mib=ini.spec.memory_mib))
        await self._discard(slot)

    async def close(self) -> None:
        self.fsm.set(ControllerState.STOPPING)
        if self.cfg.power_off_on_exit:
            for m in list(self.homed.values()):
                await m.stop()
            for slot in list(self.initiated):
                with contextlib.suppress(Exception):
                    await self._discard(slot)
        self.fsm.set(ControllerState.STOPPED)
        with contextlib.suppress(OSError):
            self._publish()


def create_app(ctl: Controller, token: str) -> Any:
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    bearer = HTTPBearer(auto_error=False)

    async def auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        import hmac
        if cred is None or not hmac.compare_digest(cred.credentials, token):
            raise HTTPException(401, "missing or wrong bearer token")

    app = FastAPI(title="hvsim failover controller", dependencies=[Depends(auth)])

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return ctl.status()

    @app.post("/v1/failback")
    async def failback(body: dict[str, Any]) -> dict[str, Any]:
        host = body.get("host")
        if not isinstance(host, str):
            raise HTTPException(422, "body.host: give the name of a dc1 host")
        try:
            return await ctl.failback(host)
        except FailoverInputError as e:
            raise HTTPException(422, str(e)) from e
        except ControlError as e:
            raise HTTPException(409, str(e)) from e
    return app


async def amain(cfg: ControllerConfig, ready: Path | None) -> None:
    spec = cfg.spec
    async with make_store(spec.store_url, tls=TLSFiles(*map(Path, spec.store_tls))) as store:
        ctl = Controller(cfg, store)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sock = unix_listener(Path(cfg.socket))
        watcher = asyncio.create_task(ctl.run(), name="failover-watch")
        try:
            async with serving(create_app(ctl, spec.token), sock):
                if ready is not None:
                    ready.write_text("ready\n")  # noqa: ASYNC240
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({stopper, watcher}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if watcher.done():
                    watcher.result()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await ctl.close()


def main(argv: list[str] | None = None, prog: str = "python -m hvsim.failover.controller") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="the failover controller (watches the manager lease)")
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--ready-file", type=Path)
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(amain(ControllerConfig.load(a.config), a.ready_file))
    except (ControlError, OSError) as e:
        print(f"hvsim failover controller: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
