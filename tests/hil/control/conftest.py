"""Fixtures of the control-plane HIL tests: a :class:`ControlPlane` per test (emulated hosts with
their host agents, a manager, clients), torn down on every path; on failure every agent, manager
and guest console log is kept under ``test-results/<test id>/``; the test fails if any process of
an emulated host survived its power-off."""
from __future__ import annotations

import asyncio
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
from hvsim.core.procfs import alive
from hvsim.guest.heartbeat import HeartbeatMonitor
from hvsim.testing.plugin import Artifacts


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
