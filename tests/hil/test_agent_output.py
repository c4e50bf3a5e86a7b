"""A real guest's agent (issue 9): buffered output over 8 MiB is flagged as truncated (with what
the command really wrote), and streamed output larger than that arrives intact."""
from __future__ import annotations

import hashlib

import pytest

from hvsim.core.agent import MAX_OUTPUT
from hvsim.core.cluster import Cluster
from hvsim.core.model import HostSpec, VMSpec

pytestmark = pytest.mark.hil

MIB = 1 << 20


async def test_truncation_is_flagged_and_streaming_returns_more_than_8mib_intact(cluster: Cluster) -> None:
    cluster.add_host(HostSpec("h1", vcpus=2, memory_mib=1024))
    vm = await cluster.define_vm(VMSpec("agent-out", memory_mib=256), "h1")
    await vm.start(wait_ready=True)

    small = await vm.exec("head -c 1000 /dev/zero; echo -n oops >&2", timeout=60)
    assert not small.truncated and len(small.stdout) == 1000 and small.stdout_bytes == 1000
    assert small.stderr == "oops" and small.stderr_bytes == 4

    # 10 MiB + 5 on stdout: the guest keeps 8 MiB and says so, with the real total
    big = await vm.exec("head -c 10485765 /dev/zero", timeout=120)
    assert big.exit_code == 0
    assert big.truncated and big.stdout_truncated and not big.stderr_truncated
    assert len(big.stdout) == MAX_OUTPUT and big.stdout_bytes == 10 * MIB + 5

    # 24 MiB of random data streamed: the host's digest equals the guest's
    size = 24 * MIB
    await vm.exec(f"dd if=/dev/urandom of=/tmp/big bs=1M count={size // MIB} 2>/dev/null", timeout=120, check=True)
    guest_sum = (await vm.exec("sha256sum /tmp/big", timeout=120, check=True)).stdout.split()[0]
    h, n, err = hashlib.sha256(), 0, bytearray()
    stream = vm.agent.exec_stream("cat /tmp/big; echo -n done >&2", timeout=300)
    async with stream:
        async for chunk in stream:
            if chunk.fd == 1:
                h.update(chunk.data)
                n += len(chunk.data)
            else:
                err.extend(chunk.data)
    assert n == size and h.hexdigest() == guest_sum
    assert bytes(err) == b"done"
    assert stream.result is not None and stream.result.exit_code == 0 and not stream.result.truncated
    assert stream.result.stdout_bytes == size

    # a stream abandoned early is killed in the guest; the agent keeps serving
    async with vm.agent.exec_stream("cat /dev/zero", timeout=60) as s:
        async for _ in s:
            break
    left = await vm.exec("ps -o pid,args | grep '[c]at /dev/zero' || true", timeout=30)
    assert left.stdout.strip() == ""
    assert (await vm.exec("echo ok", timeout=30)).stdout == "ok\n"
