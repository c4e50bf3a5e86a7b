"""Shared test plumbing.

- HIL tests (marker ``hil``) need QEMU and the guest images. Outside CI they are skipped when
  those are missing; with HVSIM_REQUIRE_HIL=1 (set by .ci/run) a missing prerequisite or any
  skipped HIL test fails the run: a skipped HIL test is not a pass.
- The ``cluster`` fixture always tears down what it made; when the test fails it first copies
  every guest console, QEMU and QMP log into test-results/<test id>/.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hvsim.core.cluster import Cluster, images_dir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "test-results"
REQUIRE_HIL = os.environ.get("HVSIM_REQUIRE_HIL") == "1" or os.environ.get("CI") == "true"
_skipped_hil: list[str] = []


def hil_missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (run `make setup`)"
    for f in ("vmlinuz", "initrd.img"):
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
    if "hil" in item.keywords and rep.skipped:
        _skipped_hil.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_HIL and _skipped_hil:
        print(f"\nERROR: {len(_skipped_hil)} HIL test(s) were skipped under HVSIM_REQUIRE_HIL=1:")
        for n in _skipped_hil:
            print(f"  {n}")
        session.exitstatus = 1


def results_dir(request: pytest.FixtureRequest) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
    return RESULTS / safe


def test_failed(request: pytest.FixtureRequest) -> bool:
    for when in ("setup", "call"):
        rep = getattr(request.node, f"rep_{when}", None)
        if rep is not None and rep.failed:
            return True
    return False


@pytest.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    cl = Cluster("test")
    try:
        yield cl
    finally:
        if test_failed(request):
            cl.keep_logs(results_dir(request))
        await cl.close()
