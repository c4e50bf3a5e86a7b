"""Host agents whose only link is TCP with mutual TLS over the underlay (each in its emulated host's
network namespace, no unix socket), driven by a manager in a third namespace of the same underlay:
hosts registered, a real guest started, exec'd, live-migrated from one agent to the other (the
source agent reaches the destination agent over TCP+mTLS too) and stopped, all through the manager
API. An agent with a certificate of another CA is refused (never registered), and the good agent
refuses a client with a foreign certificate while it answers the manager's (checked with curl from
inside the namespace). Nothing here connects to an underlay address from the root namespace."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from hvsim.control.errors import ApiConflictError, ApiNotFoundError
from hvsim.control.ops import OpState
from hvsim.control.pki import CertificateAuthority
from hvsim.control.schema import ExecRequest, HostCreate, MigrateRequest, VMDefine
from hvsim.control.state import HostStatus, VMPower
from hvsim.core.procfs import alive
from hvsim.network import Underlay

from .conftest import ControlPlane

pytestmark = pytest.mark.hil
PORT = 7443
UNDERLAY = "198.18.0.0/24"      # the underlay's default subnet (only inside our namespaces)


def curl(ns: str, url: str, ca: str, cert: str, key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "10", "--cacert", ca,
                           "--cert", cert, "--key", key, "-o", "/dev/null", "-w", "%{http_code}", url],
                          capture_output=True, text=True, timeout=30)


async def test_tcp_mtls_only_agents_over_the_underlay(cp: ControlPlane) -> None:
    names = ["mgr", "h1", "h2", "h3"]
    async with Underlay(names, mbit=1000) as ul:
        foreign = CertificateAuthority.create(cp.base / "foreign", "intruder")
        for h in ("h1", "h2"):
            await cp.host(h, memory_mib=1024, netns=ul.host_ns(h), address=ul.host_ip(h), port=PORT, ca=cp.ca,
                          tcp_only=True)
        await cp.host("h3", memory_mib=1024, netns=ul.host_ns("h3"), address=ul.host_ip("h3"), port=PORT,
                      ca=foreign, tcp_only=True)                       # a server certificate we do not trust
        m = await cp.manager(netns=ul.host_ns("mgr"), ca=cp.ca, agent_networks=UNDERLAY)
        c = cp.client(m)                                              # the manager's API: its unix socket
        for h in ("h1", "h2"):
            addr = cp.hosts[h].address
            assert addr == f"https://{ul.host_ip(h)}:{PORT}"
            rec = await c.add_host(HostCreate(name=h, agent=addr))
            assert rec.status is HostStatus.UP and rec.memory_mib == 1024

        # the agent with a foreign certificate: refused, not recorded
        with pytest.raises(ApiConflictError, match="does not answer"):
            await c.add_host(HostCreate(name="h3", agent=cp.hosts["h3"].address))
        with pytest.raises(ApiNotFoundError):
            await c.get_host("h3")

        # the agent accepts the manager's client certificate and refuses a foreign one (curl, in a namespace)
        assert m.client_cert is not None
        url = f"https://{ul.host_ip('h1')}:{PORT}/v1/agent"
        ok = curl(ul.host_ns("mgr"), url, str(cp.ca.cert_path), str(m.client_cert.cert_path),
                  str(m.client_cert.key_path))
        assert ok.stdout == "200", ok
        intruder = foreign.issue_client("manager")
        bad = curl(ul.host_ns("mgr"), url, str(cp.ca.cert_path), str(intruder.cert_path), str(intruder.key_path))
        assert bad.returncode != 0 and bad.stdout in ("", "000"), bad

        # a real guest through the manager, migrated between the two TCP-only agents
        await c.define_vm(VMDefine(name="web", memory_mib=256, host="h1"))
        assert (await c.start_vm("web")).state is OpState.SUCCEEDED
        r = await c.exec_vm("web", ExecRequest(command="memfill 16 --seed 5 --sock /run/mf.sock", timeout=90))
        assert "FILLED" in r.stdout, r
        src_pids = set(cp.hosts["h1"].pids())
        op = await c.migrate_vm("web", MigrateRequest(destination="h2", policy="stepwise"))
        done = await c.wait_op(op.id, timeout=300)
        assert done.state is OpState.SUCCEEDED, done
        vm = await c.get_vm("web")
        assert (vm.host, vm.power) == ("h2", VMPower.RUNNING)
        chk = await c.exec_vm("web", ExecRequest(command="retouch seq --sock /run/mf.sock", timeout=90))
        assert chk.exit_code == 0 and "bad=0" in chk.stdout, chk
        agent1 = cp.hosts["h1"].agent_pid
        await asyncio.sleep(0.5)
        assert all(not alive(p) for p in src_pids if p != agent1), "a QEMU of the source host still runs"
        assert (await c.stop_vm("web")).state is OpState.SUCCEEDED
        await cp.close()                                            # power off inside the underlay's lifetime
