"""Fixtures of the control-plane HIL tests: a :class:`ControlPlane` per test (emulated hosts with
their host agents, a manager, clients), torn down on every path; on failure every agent, manager
and guest console log is kept under ``test-results/<test id>/``; the test fails if any process of
an emulated host survived its power-off.

``shared_cp`` is one plane for the tests of a class (mark it ``@pytest.mark.asyncio(loop_scope="class")``):
after a test that passed its VMs are destroyed and undefined through the manager, its clients and
heartbeat monitors closed, and the plane is re-checked before the next one (the manager leading and
answering, every agent alive and reporting no QEMU, every host up, no VM record); a test that failed,
or a plane that is not so, is torn down there and then (its survivors fail that test's teardown) and
the next test gets a new one. Every process seen in any test of the plane is checked at its end."""
from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from hvsim.control.agent_client import AgentClient
from hvsim.control.client import ManagerClient
from hvsim.control.launch import EmulatedHost, ManagerProcess, short_dir
from hvsim.control.pki import CertificateAuthority
from hvsim.control.state import HostStatus, VMPower
from hvsim.core.procfs import alive
from hvsim.guest.heartbeat import HeartbeatMonitor
from hvsim.testing.plugin import Artifacts

log = logging.getLogger("hvsim.testing.control")


class ControlPlane:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.hosts: dict[str, EmulatedHost] = {}
        self.managers: list[ManagerProcess] = []
        self.clients: list[Any] = []
        self.monitors: list[HeartbeatMonitor] = []
        self.seen_pids: set[int] = set()
        self._ca: CertificateAuthority | None = None

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = CertificateAuthority.create(self.base / "pki", "hil")
        return self._ca

    async def host(self, name: str, **kw: Any) -> EmulatedHost:
        kw.setdefault("accel", None)
        h = EmulatedHost(name, self.base, **kw)
        self.hosts[name] = h
        await h.power_on()
        await h.start_agent()
        return h

    async def manager(self, store_url: str | None = None, **kw: Any) -> ManagerProcess:
        m = ManagerProcess(self.base / f"manager{len(self.managers)}",
                           store_url or f"sqlite://{self.base / 'state.db'}", **kw)
        self.managers.append(m)
        await m.start()
        return m

    def client(self, m: ManagerProcess) -> ManagerClient:
        c = ManagerClient(m.address, m.token, timeout=300)
        self.clients.append(c)
        return c

    def agent(self, name: str) -> AgentClient:
        h = self.hosts[name]
        c = AgentClient(h.address, tls=None, timeout=120)
        self.clients.append(c)
        return c

    async def heartbeat(self, socket_path: str) -> HeartbeatMonitor:
        hb = HeartbeatMonitor()
        await hb.attach(Path(socket_path))
        self.monitors.append(hb)
        return hb

    def note_pids(self) -> None:
        for h in self.hosts.values():
            self.seen_pids.update(h.pids())

    def keep(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for p in self.base.rglob("*.log"):
            target = dest / p.relative_to(self.base)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(p, target)
            except OSError:
                pass

    async def close_clients(self) -> None:
        """Close the clients and heartbeat monitors made so far (a test's, on a shared plane)."""
        for hb in self.monitors:
            await hb.close()
        for c in self.clients:
            await c.close()
        self.monitors.clear()
        self.clients.clear()

    async def close(self) -> list[str]:
        self.note_pids()
        for hb in self.monitors:
            await hb.close()
        for c in self.clients:
            await c.close()
        for m in self.managers:
            await m.stop()
        for h in self.hosts.values():
            await h.close()
        await asyncio.sleep(0.2)
        return [f"pid {p}" for p in sorted(self.seen_pids) if alive(p)]


@pytest_asyncio.fixture
async def cp(request: pytest.FixtureRequest) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(short_dir("hvsim-hil-cp-"))
    art = Artifacts(request)
    try:
        yield plane
    finally:
        if art.failed:
            plane.keep(art.dir)
        survivors = await plane.close()
        shutil.rmtree(plane.base, ignore_errors=True)
        assert not survivors, f"processes of the emulated hosts survived their power-off: {survivors}"


class SharedPlane:
    """The plane of a class; ``begin()`` hands it to a test, ``end()`` resets it or tears it down."""

    def __init__(self) -> None:
        self.plane: ControlPlane | None = None

    async def begin(self) -> ControlPlane:
        if self.plane is not None and not await self._known_state(self.plane):
            await self.teardown()
        if self.plane is None:
            self.plane = ControlPlane(short_dir("hvsim-hil-cp-"))
        else:
            log.info("shared plane: reused (re-checked: no VM, no QEMU, every host up)")
        return self.plane

    @staticmethod
    async def _known_state(plane: ControlPlane) -> bool:
        if len(plane.managers) != 1 or plane.managers[0].pid is None or not plane.hosts:
            return False
        c = plane.client(plane.managers[0])
        try:
            if not (await c.health())["token"] > 0 or (await c.list_vms())[0]:
                return False
            for name, h in plane.hosts.items():
                if h.agent_pid is None or (await c.get_host(name)).status is not HostStatus.UP:
                    return False
                if (await plane.agent(name).qemus(timeout=30)).items:
                    return False
            return True
        except Exception as exc:   # an answer that is not there is not a known state: a new plane is made
            log.warning("shared plane: not reused (%r)", exc)
            return False
        finally:
            await plane.close_clients()

    async def end(self, failed: bool) -> None:
        plane = self.plane
        assert plane is not None
        plane.note_pids()
        await plane.close_clients()
        if not failed and plane.managers and plane.managers[0].pid is not None:
            c = plane.client(plane.managers[0])
            try:
                # clones first: a VM whose frozen disk a clone stands on is refused until the clone is gone
                for vm in sorted((await c.list_vms())[0], key=lambda v: v.clone_of is None):
                    if vm.power is not VMPower.SHUTOFF:
                        await c.wait_op((await c.destroy_vm(vm.name)).id, timeout=120)
                    await c.wait_op((await c.undefine_vm(vm.name)).id, timeout=120)
            except Exception as exc:   # not resettable: torn down below, the next test gets a new plane
                log.warning("shared plane: reset failed (%r), torn down", exc)
                failed = True
            finally:
                await plane.close_clients()
        if failed:
            log.warning("shared plane: torn down after the test (failed or not resettable)")
            await self.teardown()

    async def teardown(self) -> None:
        plane, self.plane = self.plane, None
        if plane is None:
            return
        survivors = await plane.close()
        shutil.rmtree(plane.base, ignore_errors=True)
        assert not survivors, f"processes of the emulated hosts survived their power-off: {survivors}"


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared_cp_class() -> AsyncIterator[SharedPlane]:
    holder = SharedPlane()
    try:
        yield holder
    finally:
        await holder.teardown()


@pytest_asyncio.fixture(loop_scope="class")
async def shared_cp(shared_cp_class: SharedPlane, request: pytest.FixtureRequest) -> AsyncIterator[ControlPlane]:
    art = Artifacts(request)
    plane = await shared_cp_class.begin()
    try:
        yield plane
    finally:
        if art.failed:
            plane.keep(art.dir)
        await shared_cp_class.end(art.failed)
