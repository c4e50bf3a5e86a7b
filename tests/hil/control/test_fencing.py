"""Fencing with real processes: two manager processes on one real 3-member etcd, one host agent
running a real guest. The leader is SIGSTOPped (in the middle of a command it sent: an exec still
running in the guest) past its lease TTL; the standby takes over with a newer token and re-adopts
the guest without stopping it (same QEMU pid). The old leader is SIGCONTed while a client keeps
sending it writes: every one is answered 503 "not leader" naming the new leader, and a stop of the
guest sent to it changes nothing. The audit over the agent's history and the store's fence journal
finds 0 stale accepted commands or writes and no overlap, and every acknowledged write (to either
manager) is present afterwards. The agent itself refuses the old token, and a call whose lease
deadline has passed (both recorded as refused)."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest

from hvsim.control.agent_client import AgentClient
from hvsim.control.agentrpc import StopRequest
from hvsim.control.client import ManagerClient
from hvsim.control.errors import ApiFencedError, ApiNotLeaderError, ApiUnavailableError
from hvsim.control.etcd_cluster import EtcdCluster
from hvsim.control.fencing import audit, audit_all, read_history, store_terms
from hvsim.control.launch import EmulatedHost, ManagerProcess
from hvsim.control.leader import find_leader
from hvsim.control.schema import ExecRequest, HostCreate, VMDefine
from hvsim.control.state import VMPower
from hvsim.control.store import EtcdStore
from hvsim.core.procfs import alive

from .conftest import ControlPlane

pytestmark = pytest.mark.hil
TTL = 3


async def test_leader_sigstopped_past_its_lease_never_acts_again(cp: ControlPlane) -> None:
    async with EtcdCluster(run_dir=cp.base / "etcd") as etcd, EtcdStore(etcd.client_urls) as store:
        h = await cp.host("h1", memory_mib=1024)
        shared = cp.base / "secret" / "token"
        m1 = ManagerProcess(cp.base / "m1", etcd.store_url, lease_ttl=TTL, name="m1", datacenter="dc1",
                            token_file=shared)
        m2 = ManagerProcess(cp.base / "m2", etcd.store_url, lease_ttl=TTL, name="m2", datacenter="dc2",
                            token_file=shared)
        cp.managers += [m1, m2]
        try:
            await scenario(cp, store, h, m1, m2)
        finally:                               # before etcd goes: a manager's last words are store calls
            for m in (m1, m2):
                if m.pid is not None:
                    m.proc.send_signal(signal.SIGCONT)      # type: ignore[union-attr]
                await m.stop()


async def scenario(cp: ControlPlane, store: EtcdStore, h: EmulatedHost, m1: ManagerProcess,
                   m2: ManagerProcess) -> None:
    await m1.start()
    await m2.start(wait="serving")
    assert m1.proc is not None
    c1 = ManagerClient(m1.address, m1.token, timeout=300, follow_leader=False)   # always the old leader
    cp.clients.append(c1)
    await c1.add_host(HostCreate(name="h1", agent=h.address))
    await c1.define_vm(VMDefine(name="web", memory_mib=256, host="h1"))
    await c1.start_vm("web")
    q = await cp.agent("h1").vm("web")
    pid = q.pid
    assert pid is not None and alive(pid)
    old = await find_leader(store)
    assert old is not None and old.manager == "m1"

    # a client that follows the leader (found in the store) writes all along
    acked: list[str] = []
    follower = await ManagerClient.from_store(store, token=m1.token, timeout=60)
    cp.clients.append(follower)
    stop_writing = asyncio.Event()

    async def keep_writing() -> None:
        i = 0
        while not stop_writing.is_set():
            i += 1
            try:
                await follower.add_host(HostCreate(name=f"f{i}", vcpus=1, memory_mib=256))
                acked.append(f"f{i}")
            except (ApiUnavailableError, ApiNotLeaderError):
                pass                                   # no leader for a moment: not acknowledged
            await asyncio.sleep(0.1)
    writer = asyncio.create_task(keep_writing())

    # m1 sends a command that takes a while (the exec runs in the guest), then freezes
    exec_task = asyncio.create_task(c1.exec_vm("web", ExecRequest(command="sleep 6; echo slept", timeout=60)))
    await asyncio.sleep(1.0)
    m1.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        await m2.wait_leading(timeout=120)
        while time.monotonic() - frozen_at < TTL + 2:  # well past the old lease
            await asyncio.sleep(0.2)
    finally:
        m1.proc.send_signal(signal.SIGCONT)
    new = await find_leader(store)
    assert new is not None and (new.manager, new.datacenter) == ("m2", "dc2") and new.token > old.token

    # the woken m1: every write is 503 not-leader naming m2; a stop of the guest is refused too
    answers: list[str] = []
    for i in range(30):
        try:
            if i % 5 == 0:
                await c1.stop_vm("web")
            else:
                await c1.add_host(HostCreate(name=f"late{i}", vcpus=1, memory_mib=256))
            answers.append("APPLIED")
        except ApiNotLeaderError as e:
            assert e.retry_safe, e.body
            answers.append(str((e.leader or {}).get("manager")))
        await asyncio.sleep(0.1)
    assert answers == ["m2"] * 30, answers
    with contextlib.suppress(Exception):
        await exec_task                                # whatever it answered, it was sent under m1's lease
    stop_writing.set()
    await writer

    # the guest: same QEMU, running, adopted by m2; nothing of m1's late writes exists
    c2 = cp.client(m2)
    assert alive(pid) and (await cp.agent("h1").vm("web")).pid == pid
    assert (await c2.get_vm("web")).power is VMPower.RUNNING
    names = {x.name async for x in c2.iter_hosts()}
    assert acked and set(acked) <= names, sorted(set(acked) - names)
    assert not any(n.startswith("late") for n in names)

    # the agent enforces the fence itself: the old token, and a passed lease deadline
    with pytest.raises(ApiFencedError):
        await cp.agent("h1").stop("web", StopRequest(timeout=5), old.token)
    late = AgentClient(h.address, fence_until=lambda: time.time() - 1.0)
    cp.clients.append(late)
    with pytest.raises(ApiFencedError, match="deadline"):
        await late.stop("web", StopRequest(timeout=5), new.token)
    assert alive(pid)

    # the audit: the agent's history (its file, and the RPC agrees) and the store's journal
    hist = read_history(h.dir / "state")
    rpc = await cp.agent("h1").history()
    assert [e.seq for e in hist] == [e.seq for e in rpc.items] and rpc.last == hist[-1].seq
    verbs = {(e.verb, e.token, e.accepted) for e in hist}
    assert ("start", old.token, True) in verbs and ("exec_", old.token, True) in verbs
    assert ("fence", new.token, True) in verbs                 # m2 announced itself
    assert ("stop", old.token, False) in verbs and ("stop", new.token, False) in verbs
    terms = await store_terms(store)
    a = audit({"h1": hist}, terms)
    assert a.stale_accepted == 0 and not a.overlaps and a.ok, a.summary()
    assert {old.token, new.token} <= set(a.tokens) and a.refused >= 2 and a.store_writes > len(acked)
    assert (await audit_all(store, {"h1": h.dir / "state"})).summary() == a.summary()
