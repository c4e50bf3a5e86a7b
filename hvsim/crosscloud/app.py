"""The guest application (images/src/writer.c) seen from the host: started on the data disk,
every acknowledged record kept with the host's receive time, quiesced, verified."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import AgentError
from .errors import VerificationError
from .guestproc import GuestProcess
from .provider import ProviderDriver

MOUNT = "/data"
LOG = "/data/log"
STATUS_PORT = 7700


@dataclass
class AckLog:
    """Every record the application acknowledged (seq -> xxh64), from whichever copy wrote it."""
    acked: dict[int, str] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)     # origin (cloud/vm) -> host time of its first ack
    last: dict[str, float] = field(default_factory=dict)      # origin -> host time of its last ack
    conflicts: list[str] = field(default_factory=list)

    def add(self, vm: str, seq: int, digest: str, t: float) -> None:
        old = self.acked.get(seq)
        if old is not None and old != digest:
            self.conflicts.append(f"record {seq} acknowledged as {old} and later as {digest} (by {vm})")
        self.acked[seq] = digest
        self.first.setdefault(vm, t)
        self.last[vm] = t

    @property
    def count(self) -> int:
        return len(self.acked)

    @property
    def last_seq(self) -> int:
        return max(self.acked, default=0)


class WriterApp:
    def __init__(self, provider: ProviderDriver, vm: str, device: str, acks: AckLog, rate_kib: float = 64.0,
                 record: int = 4096, service_ip: str = "") -> None:
        self.provider = provider
        self.vm = vm
        self.device = device
        self.acks = acks
        self.rate_kib = rate_kib
        self.record = record
        self.service_ip = service_ip
        self.origin = f"{provider.cloud}/{vm}"     # the same name may exist in both clouds
        self.proc: GuestProcess | None = None
        self.recovered: int | None = None

    def _line(self, line: str, t: float) -> None:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ACK" and parts[1].isdigit():
            self.acks.add(self.origin, int(parts[1]), parts[2], t)
        elif len(parts) == 3 and parts[0] == "RECOVER" and parts[1].isdigit():
            self.recovered = int(parts[1])

    async def mount(self) -> None:
        dev = shlex.quote(self.device)
        await self.provider.exec(self.vm, f"mkdir -p {MOUNT} && (grep -q ' {MOUNT} ' /proc/mounts || "
                                          f"mount -t ext4 {dev} {MOUNT})", timeout=60, check=True)

    async def start(self, timeout: float = 60.0) -> None:
        await self.mount()
        if self.service_ip:
            await self.provider.exec(self.vm, f"ip addr add {self.service_ip}/32 dev lo 2>/dev/null; true")
        cmd = f"exec hvsim-writer -f {LOG} -s {self.record} -r {self.rate_kib:g} -p {STATUS_PORT}"
        self.proc = GuestProcess(self.provider, self.vm, cmd, "writer", on_line=self._line, tail=50).start()
        await self.proc.wait_line(lambda s: s.startswith("RECOVER"), timeout)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: the record in flight is finished and acknowledged; returns the last seq."""
        if self.proc is None or not self.proc.running:
            return self.acks.last_seq
        await self.provider.exec(self.vm, "kill -TERM $(pidof hvsim-writer) 2>/dev/null; true")
        line = await self.proc.wait_line(lambda s: s.startswith("STOP"), timeout)
        await self.proc.wait(timeout)
        return int(line.split()[1])

    async def quiesce(self) -> float:
        """Stop writes, sync, freeze the file system; returns the host time writes stopped."""
        await self.stop()
        t = time.monotonic()
        await self.provider.exec(self.vm, f"sync && fsfreeze --freeze {MOUNT}", timeout=60, check=True)
        return t

    async def freeze(self) -> None:
        await self.provider.exec(self.vm, f"sync && fsfreeze --freeze {MOUNT}", timeout=60, check=True)

    async def thaw(self) -> None:
        await self.provider.exec(self.vm, f"fsfreeze --unfreeze {MOUNT} 2>/dev/null; true", timeout=60)

    async def status(self) -> str:
        r = await self.provider.exec(self.vm, f"echo | nc 127.0.0.1 {STATUS_PORT}", timeout=10)
        return r.stdout.strip()


async def verify_records(provider: ProviderDriver, vm: str, acks: AckLog, upto: int | None = None,
                         record: int = 4096) -> dict[str, Any]:
    """Read every record on ``vm``'s data disk and check that each acknowledged one (up to seq
    ``upto``) is there with the acknowledged checksum. VerificationError names the first failures."""
    seen: dict[int, str] = {}
    summary = ""
    try:
        cmd = f"hvsim-writer -V -f {LOG} -s {int(record)}"
        out, _ = await provider.exec_stream(vm, cmd, timeout=600).collect(limit=64 << 20)
    except AgentError as exc:
        raise VerificationError(f"vm {vm!r}: cannot read the records: {exc}") from exc
    for line in out.decode(errors="replace").splitlines():
        p = line.split()
        if len(p) == 3 and p[0] == "R":
            seen[int(p[1])] = p[2]
        elif p[:1] == ["VERIFY"]:
            summary = line
    wanted = {s: d for s, d in acks.acked.items() if upto is None or s <= upto}
    missing = [s for s in sorted(wanted) if s not in seen]
    changed = [s for s in sorted(wanted) if s in seen and seen[s] != wanted[s]]
    res = {"vm": vm, "acked": len(wanted), "on_disk": len(seen), "missing": len(missing), "changed": len(changed),
           "conflicts": len(acks.conflicts), "summary": summary}
    if missing or changed or acks.conflicts:
        raise VerificationError(f"vm {vm!r}: {len(missing)} acknowledged records missing (first {missing[:5]}), "
                                f"{len(changed)} changed (first {changed[:5]}), conflicts {acks.conflicts[:3]}")
    return res
