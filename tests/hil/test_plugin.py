"""The pytest plugin itself (run on real guests through pytester): a failing test keeps its
artefacts, and a test that leaks a process is failed by the plugin's teardown check."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.hil

FAILING = '''
import pytest
from hvsim.core.model import HostSpec

@pytest.mark.asyncio
async def test_fails_after_boot(hvsim_cluster, hvsim_vm):
    cl = await hvsim_cluster("keeper")
    cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    vm = await hvsim_vm(cl, "kept", host="h1", memory_mib=160)
    assert (await vm.exec("echo hi")).stdout == "bye\\n"
'''

LEAKY = '''
import subprocess
import pytest

@pytest.mark.asyncio
async def test_leaks_a_process(hvsim_cluster):
    cl = await hvsim_cluster("leaky")
    p = subprocess.Popen(["sleep", "60"])
    cl.track_process(p.pid, "a sleeper the test forgot")
'''

SHARED = '''
import subprocess
import pytest
import pytest_asyncio
from hvsim.core.model import HostSpec, VMSpec
from hvsim.testing.plugin import Shared

@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared():
    s = Shared()
    cl = await s.cluster("sharer")
    cl.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    yield s, cl
    problems = await s.close()
    if problems:
        pytest.fail("survived the class: " + "; ".join(problems))

@pytest_asyncio.fixture(loop_scope="class")
async def one(shared, hvsim_artifacts):
    yield shared
    if hvsim_artifacts.failed:
        await shared[0].keep(hvsim_artifacts.dir)

@pytest.mark.asyncio(loop_scope="class")
class TestShared:
    async def test_a_boots_and_fails(self, one):
        _, cl = one
        vm = await cl.define_vm(VMSpec("kept", memory_mib=160), "h1")
        await vm.start(wait_ready=True, ready_timeout=120)
        assert (await vm.exec("echo hi")).stdout == "bye\\n"

    async def test_b_the_same_guest_answers_and_a_process_leaks(self, one):
        _, cl = one
        assert (await cl.vms["kept"].exec("echo hi")).stdout == "hi\\n"
        p = subprocess.Popen(["sleep", "60"])
        cl.track_process(p.pid, "a sleeper the class forgot")
'''


def _ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
                     "asyncio_default_test_loop_scope = function\n")


def test_a_failing_hil_test_keeps_consoles_logs_and_qemu_state(pytester: pytest.Pytester) -> None:
    _ini(pytester)
    pytester.makepyfile(test_failing=FAILING)
    out_dir = pytester.path / "results"
    res = _run(pytester, out_dir)
    res.assert_outcomes(failed=1)
    kept = list(out_dir.rglob("console.log"))
    assert kept and "HVSIM-READY kept" in kept[0].read_text(errors="replace")
    assert list(out_dir.rglob("qmp.log")) and list(out_dir.rglob("qemu.log"))
    state = json.loads(next(out_dir.rglob("state.json")).read_text())
    assert state["vms"]["kept"]["query-status"]["status"] == "running"
    assert "query-migrate" in state["vms"]["kept"]
    assert state["inventory"]["vms"]["kept"]["host"] == "h1"
    assert "VMStateChanged" in next(out_dir.rglob("events.txt")).read_text()


def test_a_test_that_leaks_a_process_is_failed_by_the_plugin(pytester: pytest.Pytester) -> None:
    _ini(pytester)
    pytester.makepyfile(test_leaky=LEAKY)
    res = _run(pytester, pytester.path / "results")
    res.assert_outcomes(passed=1, errors=1)
    assert "a sleeper the test forgot" in res.stdout.str() and "survived the test" in res.stdout.str()


def test_a_shared_cluster_keeps_the_failed_tests_artefacts_and_fails_the_class_on_a_leak(
        pytester: pytest.Pytester) -> None:
    """plugin.Shared (what tests/hil/shared.py builds on): the second test of the class uses the guest
    the first one booted, only the failed test's folder gets the artefacts, and a process that
    survives the class's teardown fails it."""
    _ini(pytester)
    pytester.makepyfile(test_shared=SHARED)
    out_dir = pytester.path / "results"
    res = _run(pytester, out_dir)
    res.assert_outcomes(failed=1, passed=1, errors=1)
    kept = list(out_dir.rglob("console.log"))
    assert kept and all("test_a_boots_and_fails" in str(p) for p in kept), kept
    assert "HVSIM-READY kept" in kept[0].read_text(errors="replace")
    state = json.loads(next(out_dir.rglob("state.json")).read_text())
    assert state["vms"]["kept"]["query-status"]["status"] == "running"
    assert "a sleeper the class forgot" in res.stdout.str() and "survived the class" in res.stdout.str()


def _run(pytester: pytest.Pytester, out_dir: Path) -> pytest.RunResult:
    """Run the inner suite in a subprocess (it boots real guests), artefacts under ``out_dir``."""
    old = os.environ.get("HVSIM_TEST_RESULTS")
    os.environ["HVSIM_TEST_RESULTS"] = str(out_dir)
    try:
        return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=300)
    finally:
        if old is None:
            os.environ.pop("HVSIM_TEST_RESULTS", None)
        else:
            os.environ["HVSIM_TEST_RESULTS"] = old
