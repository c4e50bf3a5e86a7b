"""What a SIGKILLed run leaves (its namespaces with their tbf qdiscs, its underlay record, its run
dir, processes in its namespaces and helpers that escaped PDEATHSIG) is reclaimed by `hvsim
cleanup` and by every entry point, while a live owner's resources are never touched (issue 9)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hvsim.network import netns as nsutil

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parents[2]
HVSIM = [sys.executable, "-c", "import sys; from hvsim.cli import main; sys.argv[0] = 'hvsim'; main()"]

OWNER = textwrap.dedent("""
    import asyncio, json, os, signal, subprocess, sys
    from hvsim.core.cluster import Cluster
    from hvsim.core.model import HostSpec, VMSpec
    from hvsim.network import Underlay, records

    async def main():
        ul = Underlay(["host-a", "host-b"], mbit=50)
        await ul.start()
        cl = Cluster("reclaim")
        cl.add_host(HostSpec("host-a", vcpus=2, memory_mib=1024), netns=ul.host_ns("host-a"))
        info = {"pid": os.getpid(), "namespaces": ul.namespaces, "run_dir": str(cl.run_dir),
                "record": str(records.record_path(records.run_dir(), ul.prefix, ul.runid)), "qemu": None}
        if sys.argv[1] == "guest":
            vm = await cl.define_vm(VMSpec("g1", memory_mib=128), "host-a")
            await vm.start(wait_ready=True, ready_timeout=120)
            info["qemu"] = vm.pid
        # outlive us if we are killed: a process inside a namespace, and a helper using the run dir
        # that escaped PDEATHSIG
        inside = subprocess.Popen(["ip", "netns", "exec", ul.host_ns("host-b"), "sleep", "3600"],
                                  start_new_session=True)
        helper = subprocess.Popen(["sleep", "3600"], cwd=cl.run_dir, start_new_session=True)
        info["processes"] = [inside.pid, helper.pid]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(json.dumps(info), flush=True)
        await stop.wait()
        for p in (inside, helper):
            p.kill()
            p.wait()
        await cl.close()
        await ul.close()

    asyncio.run(main())
""")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tbf_count(ns: str) -> int:
    out = subprocess.run(["tc", "-n", ns, "-j", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
    return sum(1 for q in json.loads(out or "[]") if q.get("kind") == "tbf")


class Owner:
    def __init__(self, with_guest: bool, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", OWNER, "guest" if with_guest else "none"],
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line, "the owner process did not come up"
        self.info: dict[str, Any] = json.loads(line)

    def resources_exist(self) -> None:
        existing = set(nsutil.list_netns())
        assert all(n in existing for n in self.info["namespaces"]), "namespaces missing"
        assert Path(self.info["record"]).exists() and Path(self.info["run_dir"]).exists()
        assert not any(gone(p) for p in self.info["processes"]), "a process died"

    def resources_gone(self) -> None:
        existing = set(nsutil.list_netns())
        assert not any(n in existing for n in self.info["namespaces"]), "namespaces left behind"
        assert not Path(self.info["record"]).exists(), "record left behind"
        assert not Path(self.info["run_dir"]).exists(), "run dir left behind"
        for p in self.info["processes"] + ([self.info["qemu"]] if self.info["qemu"] else []):
            assert gone(p), f"process {p} left behind"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.info["qemu"]:
            deadline = time.monotonic() + 10
            while not gone(self.info["qemu"]):
                assert time.monotonic() < deadline, "QEMU outlived its owner"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in self.info["processes"]:
            if not gone(p):
                os.kill(p, signal.SIGKILL)


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    """A private TMPDIR (run dirs) and underlay record directory for the owners and the entry points:
    other runs on this machine reclaim only what their own directories record, so they cannot race
    this test for its leftovers (and it cannot touch theirs)."""
    d = Path(tempfile.mkdtemp(prefix="hvs-rc-", dir="/tmp"))
    (d / "tmp").mkdir()
    e = dict(os.environ, TMPDIR=str(d / "tmp"), HVSIM_NET_RUN_DIR=str(d / "net"))
    try:
        yield e
    finally:
        subprocess.run([*HVSIM, "cleanup"], capture_output=True, cwd=REPO, timeout=120, env=e)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def owners(env: dict[str, str]) -> Iterator[list[Owner]]:
    made: list[Owner] = []
    try:
        yield made
    finally:
        for o in made:
            o.stop()


ENTRY_POINTS = {
    "hvsim cleanup": [*HVSIM, "cleanup", "--json"],
    "hvsim vm run": [*HVSIM, "vm", "run", "true"],
    "the lab": [sys.executable, "-c", "import hvsim.lab as lab; lab.SCENARIOS.clear(); raise SystemExit(lab.main())"],
    "the benchmarks": [sys.executable, "-c", "from bench.__main__ import reclaim; reclaim()"],
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_killed_run_is_reclaimed_and_live_one_untouched(owners: list[Owner], env: dict[str, str],
                                                        entry: str) -> None:
    live = Owner(with_guest=False, env=env)
    owners.append(live)
    dead = Owner(with_guest=True, env=env)
    owners.append(dead)
    dead.kill()
    existing = set(nsutil.list_netns())
    assert all(n in existing for n in dead.info["namespaces"]), "a killed run leaves its namespaces"
    host_a, host_b, switch = dead.info["namespaces"]
    assert (tbf_count(host_a), tbf_count(host_b), tbf_count(switch)) == (1, 1, 2), "and its tbf qdiscs"
    assert Path(dead.info["record"]).exists() and Path(dead.info["run_dir"]).exists()
    assert not any(gone(p) for p in dead.info["processes"])

    r = subprocess.run(ENTRY_POINTS[entry], capture_output=True, text=True, cwd=REPO, timeout=240, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr

    dead.resources_gone()
    live.resources_exist()
    if entry == "hvsim cleanup":
        report = json.loads(r.stdout)
        removed = {(x["kind"], x["name"]) for x in report["removed"]}
        for ns in dead.info["namespaces"]:
            assert ("namespace", ns) in removed
        assert ("record", dead.info["record"]) in removed
        assert ("run dir", dead.info["run_dir"]) in removed
        for p in dead.info["processes"]:
            assert ("process", str(p)) in removed
        owned = {x["name"] for x in report["removed"] + report["failed"]}
        assert not owned & {*live.info["namespaces"], live.info["record"], live.info["run_dir"]}
        assert all(x["owner_pid"] == dead.info["pid"] for x in report["removed"]
                   if x["name"] in {*dead.info["namespaces"], dead.info["record"], dead.info["run_dir"]})
    else:
        assert "reclaimed leftovers of dead runs" in r.stdout + r.stderr


def test_cleanup_table_says_what_it_removed(owners: list[Owner], env: dict[str, str]) -> None:
    dead = Owner(with_guest=False, env=env)
    owners.append(dead)
    dead.kill()
    r = subprocess.run([*HVSIM, "cleanup"], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    for ns in dead.info["namespaces"]:
        assert ns in r.stdout
    assert "run dir" in r.stdout and "namespace" in r.stdout and str(dead.info["pid"]) in r.stdout
    dead.resources_gone()
    again = subprocess.run([*HVSIM, "cleanup", "--json"], capture_output=True, text=True, cwd=REPO, timeout=120,
                           env=env)
    assert not {x["name"] for x in json.loads(again.stdout)["removed"]} & set(dead.info["namespaces"])


POWER_OWNER = textwrap.dedent("""
    import json, subprocess, time
    from hvsim.core.power import PowerDomain
    dom = PowerDomain.create("reclaim-h")
    sleeper = subprocess.Popen(["sleep", "3600"], start_new_session=True)
    (dom.path / "cgroup.procs").write_text(str(sleeper.pid))      # a process of this emulated host
    print(json.dumps({"domain": str(dom.path), "pid": sleeper.pid}), flush=True)
    time.sleep(3600)
""")


def test_power_domain_of_a_dead_owner_is_powered_off_and_removed(env: dict[str, str]) -> None:
    from hvsim.core.power import PowerDomain

    live = PowerDomain.create("reclaim-live")
    child = subprocess.Popen([sys.executable, "-c", POWER_OWNER], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        info = json.loads(child.stdout.readline() if child.stdout else "{}")
        child.kill()
        child.wait(10)
        assert Path(info["domain"]).exists() and not gone(info["pid"]), "a killed owner leaves its host running"
        r = subprocess.run([*HVSIM, "cleanup", "--json"], capture_output=True, text=True, cwd=REPO, timeout=120,
                           env=env)
        assert r.returncode == 0, r.stderr
        assert not Path(info["domain"]).exists() and gone(info["pid"])
        mine = [x for x in json.loads(r.stdout)["removed"] if x["name"] == info["domain"]]
        assert all(x["kind"] == "power domain" and x["owner_pid"] == child.pid for x in mine)
        assert live.path.exists(), "a live owner's power domain must be untouched"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        live.remove()
