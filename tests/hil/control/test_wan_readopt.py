"""A host agent on the inter-cloud network (``--wan``) SIGKILLed (then SIGTERMed) and restarted keeps every running
VM's WAN address (the guests were configured with them: the agent's records hold each VM's /30, it
does not derive them again in record order) and routes the service address to the VM that held it.
The VMs are defined so that record order differs from assignment order: a, b started, a undefined
(its /30 handed out again), c started (a's /30, recorded after b)."""
from __future__ import annotations

import asyncio
import time

import pytest

from hvsim.control.client import ManagerClient
from hvsim.control.schema import ExecRequest, HostCreate, VMDefine
from hvsim.crosscloud.network import SERVICE_IP, WanConfig
from hvsim.network import netns as nsutil
from hvsim.network.underlay import Underlay

from .conftest import ControlPlane

pytestmark = pytest.mark.hil


async def _ping(ns: str, ip: str) -> bool:
    try:
        await nsutil.run(nsutil.argv_in(ns, ["ping", "-c", "1", "-W", "3", ip]), timeout=15)
    except Exception:  # unreachable: an answer in itself
        return False
    return True


async def _wait_up(c: ManagerClient) -> None:
    """The manager sees h1 up (its host monitor asks every second; a restarted agent may have been
    seen unreachable meanwhile)."""
    deadline = time.monotonic() + 30
    while (await c.get_host("h1")).status.value != "up":
        assert time.monotonic() < deadline, "h1 never came back up"
        await asyncio.sleep(0.2)


async def test_restarted_agent_keeps_wan_addresses_and_the_service_route(cp: ControlPlane) -> None:
    async with Underlay(["h1", "client"], mbit=1000.0) as ul:
        try:
            h = await cp.host("h1", vcpus=4, memory_mib=1024, netns=ul.host_ns("h1"),
                              wan=WanConfig.of_underlay(ul, "h1", pool="198.19.0.0/20").to_json())
            m = await cp.manager(lease_ttl=3)
            c = cp.client(m)
            await c.add_host(HostCreate(name="h1", agent=h.address))
            client_ns, host_ns = ul.host_ns("client"), ul.host_ns("h1")

            for name in ("a", "b"):
                await c.define_vm(VMDefine(name=name, memory_mib=128, host="h1", network="wan"))
                await c.start_vm(name)
            first_a = (await c.vm_address("a")).ip
            await c.stop_vm("a")
            await c.undefine_vm("a")
            await c.define_vm(VMDefine(name="c", memory_mib=128, host="h1", network="wan"))
            await c.start_vm("c")
            addr = {n: await c.vm_address(n) for n in ("b", "c")}
            assert addr["b"].ip != addr["c"].ip, addr
            for n, a in addr.items():
                got = await c.exec_vm(n, ExecRequest(command="ip -4 -o addr show"))
                assert f"{a.ip}/30" in got.stdout, (n, got.stdout)
                assert await _ping(client_ns, a.ip), f"{n} ({a.ip}) unreachable from the client"
            # the service address: only c answers for it, so a reply comes from c
            await c.exec_vm("c", ExecRequest(command=f"ip addr add {SERVICE_IP}/32 dev lo"))
            svc = await c.route_service("c")
            assert (svc.vm, svc.service_ip) == ("c", SERVICE_IP)
            assert await _ping(client_ns, SERVICE_IP)
            pids = {q.vm: q.pid for q in (await cp.agent("h1").qemus()).items}

            await h.kill_agent()                                   # SIGKILL (by pid): nothing cleaned up
            t0 = time.monotonic()
            await h.start_agent()
            print(f"agent restarted in {time.monotonic() - t0:.1f} s")
            again = {q.vm: q for q in (await cp.agent("h1").qemus()).items}
            assert {n: q.pid for n, q in again.items()} == pids and all(q.state == "running" for q in again.values())
            await _wait_up(c)
            for n, a in addr.items():
                now = await c.vm_address(n)
                assert (now.ip, now.gateway) == (a.ip, a.gateway), (n, now, a)
                got = await c.exec_vm(n, ExecRequest(command="ip -4 -o addr show"))
                assert f"{a.ip}/30" in got.stdout, (n, got.stdout)
                assert await _ping(client_ns, a.ip), f"{n} ({a.ip}) unreachable from the client after the restart"
            route = await nsutil.ip("route", "show", f"{SERVICE_IP}/32", netns=host_ns)
            assert f"via {addr['c'].ip} " in route + " ", route
            assert await _ping(client_ns, SERVICE_IP), "the service address no longer reaches c"

            assert addr["c"].ip == first_a, addr        # a's /30 was handed out again, to c (recorded after b)

            # a graceful stop (SIGTERM) lets the NICs go (their taps and routes stay); the next agent adopts them
            assert await h.stop_agent() == 0
            await h.start_agent()
            assert {q.vm: q.pid for q in (await cp.agent("h1").qemus()).items} == pids
            await _wait_up(c)
            for n, a in addr.items():
                assert (await c.vm_address(n)).ip == a.ip
                assert await _ping(client_ns, a.ip), f"{n} ({a.ip}) unreachable after the graceful restart"
            assert await _ping(client_ns, SERVICE_IP), "the service address no longer reaches c"

            # a VM started after the restart gets a /30 none of the re-adopted VMs holds
            await c.define_vm(VMDefine(name="d", memory_mib=128, host="h1", network="wan"))
            await c.start_vm("d")
            d = await c.vm_address("d")
            assert d.ip not in (addr["b"].ip, addr["c"].ip), d
            assert await _ping(client_ns, d.ip)
            assert await _ping(client_ns, addr["b"].ip) and await _ping(client_ns, SERVICE_IP)
            for n in ("b", "c", "d"):
                await c.destroy_vm(n)
                await c.undefine_vm(n)
        finally:
            cp.note_pids()
            for host in cp.hosts.values():     # power off inside the namespaces' lifetime
                await host.close(keep_dir=True)
