"""pytest plugin for hardware-in-the-loop tests on hvsim (registered as the ``pytest11`` entry point
``hvsim``, so installing hvsim makes its fixtures available to any test suite).

Factory fixtures that always clean up, keep artefacts when the test fails, and **fail the test** if
anything it made survived its teardown:

``hvsim_underlay``  ``await hvsim_underlay(["a", "b"], mbit=200)`` -> a shaped :class:`Underlay`
                    (namespaces per host). Torn down after every cluster of the test (fixture order),
                    then checked: no namespace of it left.
``hvsim_cluster``   ``await hvsim_cluster(drivers=(ShimDriver(),))`` -> a :class:`Cluster`. Closed at
                    teardown, then checked: no QEMU or component process it started alive, its run
                    directory (sockets, disks, logs) gone.
``hvsim_vm``        ``await hvsim_vm(cluster, "web", host="h1", memory_mib=256)`` -> a running,
                    agent-ready VM (the host is created if the cluster has none of that name).
``hvsim_artifacts`` the per-test folder (``test-results/<test id>/``) and whether the test failed.

:class:`Shared` is the same for underlays and clusters that several tests share (a class- or
module-scoped fixture makes one; boots are what HIL tests spend their time on): ``keep(dest)`` after a
failed test copies the same artefacts into that test's folder, ``close()`` at the end of the scope tears
everything down and returns what survived (the fixture fails on it); ``adopt()`` brings clusters and
underlays made by something else (``hvsim.crosscloud.scene.two_clouds``) under the same rules.

On failure, before anything is torn down, each cluster's consoles, QEMU and QMP logs, component logs,
``query-status``/``query-migrate`` of every QEMU, component stats, the inventory, the event history,
and each underlay's ``tc -s qdisc`` output are copied into the test's folder.

A ten-line test::

    import pytest
    from hvsim.core.model import HostSpec

    @pytest.mark.asyncio
    async def test_guest_answers(hvsim_cluster, hvsim_vm):
        cl = await hvsim_cluster()
        cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
        vm = await hvsim_vm(cl, "web", host="h1")
        assert (await vm.exec("echo hi")).stdout == "hi\\n"
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..core.cluster import Cluster
from ..core.components import ComponentDriver
from ..core.model import HostSpec, VMSpec
from ..core.vm import VM
from ..network.underlay import Underlay

try:
    import pytest_asyncio
    _async_fixture: Callable[..., Any] = pytest_asyncio.fixture
except ImportError:  # pragma: no cover - the plugin still loads; its async fixtures cannot run
    _async_fixture = pytest.fixture

RESULTS_ENV = "HVSIM_TEST_RESULTS"


@dataclass
class Artifacts:
    """Where a test's artefacts go, and whether it failed (setup or call)."""
    request: pytest.FixtureRequest

    @property
    def dir(self) -> Path:
        base = Path(os.environ.get(RESULTS_ENV, Path(str(self.request.config.rootpath)) / "test-results"))
        return base / re.sub(r"[^A-Za-z0-9_.-]+", "_", self.request.node.nodeid)

    @property
    def failed(self) -> bool:
        for when in ("setup", "call"):
            rep = getattr(self.request.node, f"rep_{when}", None)
            if rep is not None and rep.failed:
                return True
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def hvsim_artifacts(request: pytest.FixtureRequest) -> Artifacts:
    return Artifacts(request)


def _ns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


async def _keep_underlay(ul: Underlay, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for ns in ul.namespaces:
        out = await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show"],
                                      capture_output=True, text=True, timeout=10)
        lines.append(f"== {ns}\n{out.stdout}{out.stderr}")
    (dest / f"underlay-{ul.runid}-tc.txt").write_text("\n".join(lines))


async def keep_cluster(cl: Cluster, dest: Path) -> None:
    """Copy what a failed test needs to be understood: logs, QEMU state, components, events."""
    root = dest / f"cluster-{cl.name}-{cl.run_dir.name}"
    cl.keep_logs(root)
    state: dict[str, Any] = {}
    for vm in cl.vms.values():
        entry: dict[str, Any] = {"vm": vm.to_dict(), "busy_with": vm.busy_with}
        if vm.has_process:
            for cmd in ("query-status", "query-migrate"):
                try:
                    entry[cmd] = await vm.qmp.execute(cmd, timeout=3)
                except Exception as exc:  # a dead or hung QEMU is what we are recording
                    entry[cmd] = f"error: {exc}"
        entry["components"] = {c.id: await c.stats() for c in vm.components.values()}
        state[vm.name] = entry
    root.mkdir(parents=True, exist_ok=True)
    (root / "state.json").write_text(json.dumps({"inventory": cl.to_dict(), "vms": state}, indent=1, default=str))
    (root / "events.txt").write_text("\n".join(repr(e) for e in cl.events.history()))


class _Underlays:
    def __init__(self) -> None:
        self.made: list[Underlay] = []

    async def __call__(self, hosts: Sequence[str], mbit: float = 400, **kwargs: Any) -> Underlay:
        await Underlay.cleanup_stale("hvs-")
        ul = Underlay(list(hosts), mbit=mbit, **kwargs)
        await ul.start()
        self.made.append(ul)
        return ul


class _Clusters:
    def __init__(self) -> None:
        self.made: list[Cluster] = []

    async def __call__(self, name: str = "test", drivers: Iterable[ComponentDriver] = (), **kwargs: Any) -> Cluster:
        cl = Cluster(name, drivers=tuple(drivers), **kwargs)
        self.made.append(cl)
        return cl


class Shared:
    """Underlays and clusters that outlive one test: made through the same factories as the fixtures',
    their artefacts kept per failed test (``keep``), torn down and checked once (``close``)."""

    def __init__(self) -> None:
        self.underlays = _Underlays()
        self.clusters = _Clusters()

    async def underlay(self, hosts: Sequence[str], mbit: float = 400, **kwargs: Any) -> Underlay:
        return await self.underlays(hosts, mbit=mbit, **kwargs)

    async def cluster(self, name: str = "test", drivers: Iterable[ComponentDriver] = (), **kwargs: Any) -> Cluster:
        return await self.clusters(name, drivers=drivers, **kwargs)

    def adopt(self, *made: Cluster | Underlay) -> None:
        """Clusters and underlays made elsewhere (a scene's context manager): their artefacts kept and
        their survivors checked like those made here. Closing them here first is harmless (both
        ``close()`` are idempotent), so the scene's own teardown may still run after ``close()``."""
        for m in made:
            if isinstance(m, Cluster):
                self.clusters.made.append(m)
            else:
                self.underlays.made.append(m)

    async def keep(self, dest: Path) -> None:
        """Copy every cluster's and underlay's artefacts into ``dest`` (a failed test's folder)."""
        await _keep_clusters(self.clusters.made, dest)
        for ul in self.underlays.made:
            await _keep_underlay(ul, dest)

    async def close(self) -> list[str]:
        """Clusters first (their QEMUs live in the underlays' namespaces), then underlays; what survived."""
        problems = await _close_clusters(self.clusters.made)
        left = await _close_underlays(self.underlays.made)
        return problems + ([f"network namespaces survived: {left}"] if left else [])


async def _keep_clusters(clusters: Iterable[Cluster], dest: Path) -> None:
    for cl in clusters:
        try:
            await keep_cluster(cl, dest)
        except Exception as exc:  # never let artefact collection hide the test's own failure
            print(f"hvsim: keeping artefacts of cluster {cl.name} failed: {exc!r}")


async def _close_clusters(clusters: Iterable[Cluster]) -> list[str]:
    problems: list[str] = []
    for cl in clusters:
        await cl.close()
        problems += [f"cluster {cl.name}: {s}" for s in cl.survivors()]
        if cl.run_dir.exists() and not cl.keep_run_dir:
            problems.append(f"cluster {cl.name}: run directory {cl.run_dir} survived")
    return problems


async def _close_underlays(underlays: Iterable[Underlay]) -> list[str]:
    """Close each underlay; the names of its namespaces that are still there."""
    left: list[str] = []
    for ul in underlays:
        await ul.close()
        left += sorted(set(ul.namespaces) & _ns_list())
    return left


@_async_fixture
async def hvsim_underlay(hvsim_artifacts: Artifacts) -> AsyncIterator[Callable[..., Awaitable[Underlay]]]:
    """Factory of shaped underlays (root needed: namespaces, tc)."""
    made = _Underlays()
    yield made
    if hvsim_artifacts.failed:
        for ul in made.made:
            await _keep_underlay(ul, hvsim_artifacts.dir)
    left = await _close_underlays(made.made)
    if left:
        pytest.fail(f"network namespaces survived the test: {left}")


@_async_fixture
async def hvsim_cluster(hvsim_artifacts: Artifacts,
                        hvsim_underlay: Any) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """Factory of clusters; depends on ``hvsim_underlay`` so clusters close before underlays."""
    made = _Clusters()
    yield made
    if hvsim_artifacts.failed:
        await _keep_clusters(made.made, hvsim_artifacts.dir)
    problems = await _close_clusters(made.made)
    if problems:
        pytest.fail("processes or files survived the test: " + "; ".join(problems))


@pytest.fixture
def hvsim_vm() -> Callable[..., Awaitable[VM]]:
    """``await hvsim_vm(cluster, name, host="h1", memory_mib=256, ready=True, **VMSpec fields)``."""
    async def make(cluster: Cluster, name: str, host: str = "h1", memory_mib: int = 256, ready: bool = True,
                   ready_timeout: float = 120.0, **spec: Any) -> VM:
        if host not in cluster.hosts:
            cluster.add_host(HostSpec(host, vcpus=2, memory_mib=2048))
        vm = await cluster.define_vm(VMSpec(name, memory_mib=memory_mib, **spec), host)
        await vm.start(wait_ready=ready, ready_timeout=ready_timeout)
        return vm
    return make
