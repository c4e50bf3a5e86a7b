"""The agent-based transfer strategy: migration agents in the guests copy the data disk over TLS
(images/src/migrate.c). Beside QEMU's live migration (:class:`hvsim.migration.transfer.QemuLiveTransfer`)
it follows the same phases (prepare, start, poll, apply a throttle, cancel, finish, discard), but
between two VMs of two clouds rather than two QEMUs of one VM, so it has its own signatures: the
engine's ``TransferStrategy`` takes a same-cluster ``MigrationLease`` and finishes with a QEMU
process, neither of which exists across providers.

``prepare``: a CA for this migration (hvsim.control.pki), a server certificate for the destination
guest's address and a client certificate for the source, the agent binary and the credentials
pushed into both guests through the guest agent; the destination agent listens, the source agent
starts its write log (tracefs). ``round``/``final``: the source agent copies one round / the last
delta. The destination agent is watched and restarted if it dies (it resumes from its state file).
``discard``: both agents killed, their files and the trace instance removed.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvbase.aio import all_or_first_error, wait_for
from ..control.pki import CertificateAuthority, Issued
from ..core.cluster import images_dir
from ..core.errors import AgentError
from .criterion import RoundRecord
from .errors import AgentFailedError, ReplicationError, VerificationError
from .guestproc import GuestProcess, fields
from .provider import ProviderDriver

log = logging.getLogger("hvsim.crosscloud.transfer")

GUEST_DIR = "/run/hvmig"
RESYNC_CHUNK = 65536             # the granularity of the hash comparison after a resume
AGENT = f"{GUEST_DIR}/hvsim-migrate"
PORT = 7400


def agent_binary() -> Path:
    p = images_dir() / "agents" / "hvsim-migrate"
    if not p.is_file():
        raise AgentFailedError(f"migration agent {p} is missing (run `make images`)")
    return p


@dataclass
class Endpoint:
    provider: ProviderDriver
    vm: str
    device: str


@dataclass
class TransferStats:
    rounds: list[RoundRecord] = field(default_factory=list)
    round_cut_t: dict[int, float] = field(default_factory=dict)    # host time each round was cut
    stat: dict[str, str] = field(default_factory=dict)             # the source agent's last STAT
    events: list[tuple[float, str]] = field(default_factory=list)  # LINK/RESUME/REFUSED/... lines
    final: dict[str, str] = field(default_factory=dict)
    dest: dict[str, str] = field(default_factory=dict)             # the destination agent's last RECV
    dest_restarts: int = 0
    sent_total: int = 0
    sent_base: int = 0                     # bytes sent by agents of earlier lives (before a resume)
    resyncs: list[dict[str, Any]] = field(default_factory=list)   # one per resume: what differed

    @property
    def pending(self) -> int:
        return int(self.stat.get("pending", 0)) + int(self.stat.get("dirty", 0))


class AgentTransfer:
    name = "guest-agents"

    def __init__(self, source: Endpoint, dest: Endpoint, workdir: Path, *, rate_bps: float = 0.0,
                 port: int = PORT, corrupt_seq: int | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.source = source
        self.dest = dest
        self.workdir = workdir
        self.rate_bps = float(rate_bps)
        self.port = port
        self.corrupt_seq = corrupt_seq
        self.session = secrets.token_hex(16)
        self.stats = TransferStats()
        self.on_event = on_event
        self.src_proc: GuestProcess | None = None
        self.dst_proc: GuestProcess | None = None
        self._watch: asyncio.Task[None] | None = None
        self._round_done = asyncio.Event()
        self._closing = False
        self.installed: list[Endpoint] = []

    # -- output of the agents ------------------------------------------------------------------------
    def _src_line(self, line: str, t: float) -> None:
        kv = fields(line)
        if line.startswith("STAT "):
            self.stats.stat = kv
            self.stats.sent_total = self.stats.sent_base + int(kv.get("sent", 0))
            self._emit("stat", kv)
        elif line.startswith("ROUND ") and " start " in line:
            self.stats.round_cut_t[int(line.split()[1])] = t
        elif line.startswith("ROUND ") and " done " in line:
            n = int(line.split()[1])
            rec = RoundRecord(round=n, bytes=int(kv["bytes"]), secs=float(kv["secs"]), dirty_after=int(kv["dirty"]))
            self.stats.rounds.append(rec)
            # the round's own blocks are all sent now: what is pending is what was written during
            # it (the last STAT may be up to 0.5 s old and still count the round's unsent blocks,
            # zero ones included: the one-pass prediction made right after its round was ~6x off)
            self.stats.stat = {**self.stats.stat, "pending": "0", "dirty": str(rec.dirty_after)}
            self._round_done.set()
            self._emit("round", {"round": n, "bytes": rec.bytes, "secs": rec.secs, "dirty": rec.dirty_after})
        elif line.startswith("FINAL "):
            self.stats.final = kv
            self._round_done.set()
        elif line.split(" ", 1)[0] in ("LINK", "RESUME", "REFUSED", "ERROR", "OVERRUN", "RESCAN", "CORRUPTED", "RATE",
                                       "DIRTY"):
            self.stats.events.append((t, line))
            self._emit("agent", {"line": line})

    def _dst_line(self, line: str, t: float) -> None:
        if line.startswith("RECV "):
            self.stats.dest = fields(line)
        elif line.split(" ", 1)[0] in ("REFUSED", "PROTOCOL", "LINK"):
            self.stats.events.append((t, "dest: " + line))

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)

    # -- phases -----------------------------------------------------------------------------------------
    async def prepare(self, *, resume: bool = False) -> None:
        """Install and start both agents. ``resume`` (after the orchestrator's restart): whatever
        an earlier life left in the guests is removed first, the source agent counts the rounds
        done (:meth:`restore`) as done, and its next round copies only the chunks whose hashes
        differ between the two disks (:meth:`_mark_differences`)."""
        if resume:
            for ep in (self.source, self.dest):
                await self._remove_agents(ep, keep_binary=True)
        binary = agent_binary()
        digest = await asyncio.to_thread(lambda: hashlib.sha256(binary.read_bytes()).hexdigest())
        pki = self.workdir / "pki"
        ca = CertificateAuthority.create(pki, f"xcloud-{self.session[:8]}")
        dst_ip = await self.dest.provider.guest_address(self.dest.vm)
        srv = ca.issue_server("dest-agent", ips=[dst_ip])
        cli = ca.issue_client("source-agent")

        async def install(ep: Endpoint, issued: Issued) -> None:
            await ep.provider.exec(ep.vm, f"mkdir -p {GUEST_DIR} && chmod 700 {GUEST_DIR}", check=True)
            self.installed.append(ep)
            await self._push_binary(ep, binary, digest)
            await ep.provider.push_file(ep.vm, issued.cert_path, f"{GUEST_DIR}/cert.pem")
            await ep.provider.push_file(ep.vm, issued.key_path, f"{GUEST_DIR}/key.pem")
            await ep.provider.push_file(ep.vm, ca.cert_path, f"{GUEST_DIR}/ca.pem")
        # both guests at once (each push is round trips to its own guest agent)
        await all_or_first_error(install(self.dest, srv), install(self.source, cli))
        await self._start_dest()
        await self.source.provider.exec(self.source.vm, f"rm -f {GUEST_DIR}/ctl && mkfifo -m 600 {GUEST_DIR}/ctl",
                                        check=True)
        cmd = (f"exec {AGENT} send --dev {self.source.device} --connect {dst_ip}:{self.port} "
               f"--cert {GUEST_DIR}/cert.pem --key {GUEST_DIR}/key.pem --ca {GUEST_DIR}/ca.pem "
               f"--ctl {GUEST_DIR}/ctl --rate {self.rate_bps:.0f} --session {self.session}"
               + (f" --corrupt-seq {self.corrupt_seq}" if self.corrupt_seq else "")
               + (f" --resume {len(self.stats.rounds)}" if resume else ""))
        self.src_proc = GuestProcess(self.source.provider, self.source.vm, cmd, "source agent",
                                     on_line=self._src_line, tail=1000).start()
        await self.src_proc.wait_line(lambda s: s.startswith("READY") or s.startswith("ERROR"), 60)
        if any(s.startswith("ERROR") for s in self.src_proc.lines):
            raise AgentFailedError("the source agent could not start", self.src_proc.tail())
        if resume:
            await self._mark_differences()
        self._watch = asyncio.create_task(self._watch_dest(), name="xcloud-dest-agent-watch")

    async def _hash_list(self, ep: Endpoint) -> tuple[int, dict[int, str]]:
        out, _ = await ep.provider.exec_stream(ep.vm, f"{AGENT} hash --dev {ep.device} --chunk {RESYNC_CHUNK} --list",
                                               timeout=600).collect(limit=16 << 20)
        chunks: dict[int, str] = {}
        size = -1
        for line in out.decode(errors="replace").splitlines():
            p = line.split()
            if len(p) == 3 and p[0] == "C" and p[1].isdigit():
                chunks[int(p[1])] = p[2]
            elif p[:1] == ["HASH"]:
                size = int(fields(line).get("size", -1))
        if size < 0 or len(chunks) != -(-size // RESYNC_CHUNK):
            raise ReplicationError(f"vm {ep.vm!r}: the chunk hashes of {ep.device} are incomplete "
                                   f"({len(chunks)} chunks, size {size})")
        return size, chunks

    async def _mark_differences(self) -> None:
        """After a resume: hash both disks by chunk (the source agent is READY, so every write from
        now on is in its log; every earlier one is in the source's hashes), and mark each chunk
        that differs for the next round. What both disks already hold is not sent again."""
        t0 = time.monotonic()
        (ssize, src), (dsize, dst) = await asyncio.gather(self._hash_list(self.source), self._hash_list(self.dest))
        if ssize != dsize:
            raise ReplicationError(f"the disks differ in size: source {ssize}, destination {dsize}")
        ranges: list[list[int]] = []
        differ_chunks = 0
        for off in sorted(src):
            if dst.get(off) == src[off]:
                continue
            differ_chunks += 1
            length = min(RESYNC_CHUNK, ssize - off)
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1][1] += length
            else:
                ranges.append([off, length])
        differ = sum(r[1] for r in ranges)
        local = self.workdir / f"dirty-{len(self.stats.resyncs)}"
        local.write_text("".join(f"{o} {n}\n" for o, n in ranges))
        os.chmod(local, 0o600)
        await self.source.provider.push_file(self.source.vm, local, f"{GUEST_DIR}/dirty")
        assert self.src_proc is not None
        await self._ctl(f"dirty {GUEST_DIR}/dirty")       # once per agent life: its one DIRTY answer
        line = await self.src_proc.wait_line(lambda s: s.startswith("DIRTY"), 60)
        kv = fields(line)
        if kv.get("bad", "1") != "0" or "error" in kv:
            raise ReplicationError(f"the source agent refused the list of differing chunks: {line}")
        res = {"chunks": len(src), "differ_chunks": differ_chunks,
               "differ_bytes": differ, "marked_bytes": int(kv.get("marked_bytes", 0)), "ranges": len(ranges),
               "secs": round(time.monotonic() - t0, 3)}
        self.stats.resyncs.append(res)
        self._emit("resync", res)

    async def _start_dest(self) -> None:
        cmd = (f"exec {AGENT} recv --dev {self.dest.device} --listen {self.port} --cert {GUEST_DIR}/cert.pem "
               f"--key {GUEST_DIR}/key.pem --ca {GUEST_DIR}/ca.pem --state {GUEST_DIR}/state "
               f"--session {self.session}")
        self.dst_proc = GuestProcess(self.dest.provider, self.dest.vm, cmd, "destination agent",
                                     on_line=self._dst_line, tail=1000).start()
        await self.dst_proc.wait_line(lambda s: s.startswith("LISTEN") or s.startswith("ERROR"), 60)
        if any(s.startswith("ERROR") for s in self.dst_proc.lines):
            raise AgentFailedError("the destination agent could not start", self.dst_proc.tail())

    async def _watch_dest(self) -> None:
        """Restart the destination agent if it dies before the end (it resumes from its state file)."""
        while not self._closing:
            assert self.dst_proc is not None
            await self.dst_proc.wait()
            if self._closing or self.stats.final or any(ln.startswith("RECV done") for ln in self.dst_proc.lines):
                return
            if await self.dest.provider.vm_state(self.dest.vm) != "running":
                return
            self.stats.dest_restarts += 1
            self.stats.events.append((time.monotonic(), f"dest agent exited ({self.dst_proc.exit_code}); restarting"))
            log.warning("destination agent exited (%s); restarting it", self.dst_proc.exit_code)
            await asyncio.sleep(0.5)
            try:
                await self._start_dest()
            except (AgentError, AgentFailedError) as exc:
                log.error("restarting the destination agent failed: %s", exc)
                return

    async def _ctl(self, line: str) -> None:
        await self.source.provider.exec(self.source.vm, f"echo '{line}' > {GUEST_DIR}/ctl", timeout=30, check=True)

    def _check_source(self) -> None:
        p = self.src_proc
        if p is None or not p.running:
            raise ReplicationError(f"the source agent is gone (exit {p.exit_code if p else None}, "
                                   f"{p.error if p else ''}); last output:\n{p.tail() if p else ''}")

    async def run_round(self, timeout: float = 600.0) -> RoundRecord:
        """Cut and copy one round; returns its record once the destination acknowledged its end."""
        self._check_source()
        n = len(self.stats.rounds)
        self._round_done.clear()
        await self._ctl("round")
        return await self._wait_rounds(n + 1, timeout)

    async def _wait_rounds(self, count: int, timeout: float) -> RoundRecord:
        deadline = time.monotonic() + timeout
        while len(self.stats.rounds) < count:
            self._check_source()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplicationError(f"round {count} did not finish in {timeout:g} s")
            self._round_done.clear()
            with contextlib.suppress(TimeoutError):
                await wait_for(self._round_done.wait(), min(1.0, left))
        return self.stats.rounds[count - 1]

    async def final(self, timeout: float = 600.0) -> RoundRecord:
        """The application is quiesced: copy the rest; the agents end."""
        self._check_source()
        n = len(self.stats.rounds)
        await self._ctl("final")
        rec = await self._wait_rounds(n + 1, timeout)
        assert self.src_proc is not None
        await self.src_proc.wait_line(lambda s: s.startswith("FINAL"), 60)
        return rec

    async def set_rate(self, bps: float) -> None:
        self.rate_bps = float(bps)
        await self._ctl(f"rate {bps:.0f}")

    async def _hash_both(self) -> tuple[dict[str, str], dict[str, str]]:
        cmd = f"{AGENT} hash --dev {{dev}} --chunk 1048576"
        rs, rd = await asyncio.gather(
            self.source.provider.exec(self.source.vm, cmd.format(dev=self.source.device), timeout=600, check=True),
            self.dest.provider.exec(self.dest.vm, cmd.format(dev=self.dest.device), timeout=600, check=True))
        return fields(rs.stdout.strip().splitlines()[-1]), fields(rd.stdout.strip().splitlines()[-1])

    async def hash_time(self) -> float:
        """Seconds one verification takes (both disks hashed in parallel), measured."""
        t0 = time.monotonic()
        await self._hash_both()
        return time.monotonic() - t0

    async def verify(self) -> dict[str, Any]:
        """Hash both whole disks in their guests, in parallel; VerificationError if they differ."""
        t0 = time.monotonic()
        a, b = await self._hash_both()
        res = {"source": a, "destination": b, "secs": round(time.monotonic() - t0, 3)}
        if a.get("digest") != b.get("digest") or a.get("size") != b.get("size"):
            raise VerificationError(f"the disks differ: source {a} vs destination {b}")
        return res

    async def kill_dest_agent(self) -> None:
        """Fault injection: SIGKILL the destination agent (the watch restarts it)."""
        await self.dest.provider.exec(self.dest.vm, "kill -KILL $(pidof hvsim-migrate) 2>/dev/null; true")

    async def discard(self) -> None:
        """Stop both agents and remove them, their credentials and the trace instance. Never raises."""
        await self.abandon()
        for ep in self.installed:
            await self._remove_agents(ep)
        self.installed.clear()

    async def _push_binary(self, ep: Endpoint, binary: Path, digest: str) -> None:
        """The agent binary (SHA-256 ``digest``) into the guest, unless the very same one is there
        (an earlier life's, after a resume; pushing 5 MB through the guest agent takes seconds)."""
        r = await ep.provider.exec(ep.vm, f"sha256sum {AGENT} 2>/dev/null; true", timeout=60)
        if r.stdout.split()[:1] == [digest]:
            await ep.provider.exec(ep.vm, f"chmod 700 {AGENT}", check=True)
            return
        await ep.provider.push_file(ep.vm, binary, AGENT, 0o700)

    async def _remove_agents(self, ep: Endpoint, keep_binary: bool = False) -> None:
        """Kill any agent in ``ep``'s guest, remove its files (all but the binary, with
        ``keep_binary``) and the trace instance. Never raises."""
        rm = (f"for f in {GUEST_DIR}/*; do [ \"$f\" = {AGENT} ] || rm -rf \"$f\"; done" if keep_binary
              else f"rm -rf {GUEST_DIR}")
        try:
            if await ep.provider.vm_state(ep.vm) == "running":
                await ep.provider.exec(ep.vm, f"kill -KILL $(pidof hvsim-migrate) 2>/dev/null; "
                                              "t=/sys/kernel/tracing/instances/hvmig; "
                                              "[ -d $t ] && { echo 0 > $t/tracing_on; "
                                              "echo 0 > $t/events/block/block_rq_complete/enable; rmdir $t; }; "
                                              f"{rm}; true", timeout=30)
        except Exception as exc:  # a guest that is gone or broken: nothing left to remove there
            log.warning("removing the agents from %s: %s", ep.vm, exc)

    async def abandon(self) -> None:
        """Close the agents' streams (the guests kill both agents) and stop watching, removing
        nothing: what the orchestrator's crash does (the tests of a manager restart), and the
        first half of :meth:`discard`."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for p in (self.src_proc, self.dst_proc):
            if p is not None:
                await p.stop()

    def restore(self, record: dict[str, Any]) -> None:
        """The rounds and bytes of an earlier life (:meth:`to_dict`), before a resumed prepare."""
        self.stats.rounds = [RoundRecord(**r) for r in record.get("rounds", [])]
        self.stats.sent_base = self.stats.sent_total = int(record.get("sent_total", 0))
        self.stats.dest_restarts = int(record.get("dest_restarts", 0))
        self.stats.resyncs = list(record.get("resyncs", []))

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "session": self.session, "rate_bps": self.rate_bps,
                "rounds": [r.__dict__ for r in self.stats.rounds], "sent_total": self.stats.sent_total,
                "resyncs": self.stats.resyncs,
                "dest_restarts": self.stats.dest_restarts, "events": [e for _, e in self.stats.events][-50:],
                "final": self.stats.final, "dest": self.stats.dest, "pid": os.getpid()}
