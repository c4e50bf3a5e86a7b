"""Shared test plumbing. The fixtures come from hvsim's own pytest plugin (``hvsim.testing.plugin``,
loaded through its ``pytest11`` entry point): ``hvsim_cluster``, ``hvsim_underlay``, ``hvsim_vm``,
``hvsim_artifacts``. Here only what is particular to this repository:

- HIL tests (marker ``hil``) need QEMU and the guest images. Outside CI they are skipped when
  those are missing; with HVSIM_REQUIRE_HIL=1 (set by .ci/run) a missing prerequisite or any
  skipped HIL test fails the run: a skipped HIL test is not a pass.
- ``cluster``: one cluster from the plugin's factory (torn down and checked for leftovers by it).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hvsim.core.cluster import INITRD_FILE, KERNEL_FILE, Cluster, images_dir

REPO = Path(__file__).resolve().parent.parent
REQUIRE_HIL = os.environ.get("HVSIM_REQUIRE_HIL") == "1" or os.environ.get("CI") == "true"
_skipped_hil: list[str] = []


def hil_missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (run `make setup`)"
    for f in (KERNEL_FILE, INITRD_FILE):
        if not (images_dir() / f).is_file():
            return f"guest image {images_dir() / f} missing (run `make images`)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = hil_missing()
    if not missing:
        return
    if REQUIRE_HIL and any("hil" in item.keywords for item in items):
        raise pytest.UsageError(f"HVSIM_REQUIRE_HIL=1 but the HIL prerequisites are missing: {missing}")
    for item in items:
        if "hil" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"HIL prerequisite missing: {missing}"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "hil" in report.keywords:
        _skipped_hil.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_HIL and _skipped_hil:
        print(f"\nERROR: {len(_skipped_hil)} HIL test(s) were skipped under HVSIM_REQUIRE_HIL=1:")
        for n in _skipped_hil:
            print(f"  {n}")
        session.exitstatus = 1


@pytest.fixture
async def cluster(hvsim_cluster: Callable[..., Awaitable[Cluster]]) -> Cluster:
    return await hvsim_cluster("test")
