"""QEMU's own ``qemu-storage-daemon`` as a VM component: a second kind of user-level driver (ULD),
serving a data disk (``DiskSpec(kind="qsd")``) to the guest, with checkpoints and migration.

    cluster.add_driver(QsdDriver(QsdOptions(reconnect_delay=10)))
    vm = await cluster.define_vm(VMSpec("db", disks=(DiskSpec("data", 64, kind="qsd"),)), "h1")

How it serves: an NBD export over a unix socket in a private ``<run dir>/qsd`` (0700), the raw image
on the datastore both hosts reach (the VM's directory), the daemon's QMP monitor on a socketpair we
own (no socket path, no connect race), in the host's network namespace, dying with hvsim. QEMU
attaches with ``reconnect-delay``. Why NBD and not vhost-user-blk: a TCG guest on a
vhost-user-blk export of this qemu-storage-daemon (7.2) boots and migrates while the disk is idle,
but a guest reading the disk during the migration arrived corrupted (kernel Oops on the
destination): the daemon's vhost-user server does not offer ``VHOST_USER_PROTOCOL_F_LOG_SHMFD``, so
its writes into guest memory (read data, used rings) are not in QEMU's dirty log (docs/multiprocess.md).

What it holds that a destination needs (its checkpoint, format ``hvsim-qsd`` version 1, JSON in
the core's envelope): the export configuration (name, size, writability, image, format) and its
dirty bitmap ``hvsim-dirty`` (writes since the component started: what an incremental backup
copies) as extents read over NBD with ``nbdinfo --map=qemu:dirty-bitmap:...`` plus QEMU's sha256 of
it. Restoring it into a daemon started on the destination checks the configuration and recreates
the bitmap bit for bit without touching the data: the extents are written as zeroes to a scratch
``null-co`` node's bitmap (``qemu-io`` over NBD), merged into ``hvsim-dirty``, and the sha256 must
match. Every checkpoint is full (it is small). Quiesce: nothing to hold: QEMU stops the guest and
drains every drive before the switch-over; the checkpoint is taken after that.

Supervision: a daemon that dies is restarted on the same socket (QEMU reconnects); its bitmap is
in memory only, so after a restart it is marked all dirty (an incremental backup then copies
everything: conservative, never silently incomplete).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvbase.aio import wait_for
from qmp_bridge import Drive, QEMUBridgeError, QMPSession
from qmp_bridge.process import die_with_parent

from ..core.components import Attachment, Checkpoint, Component, ComponentContext, RestartPolicy
from ..core.errors import CheckpointError, ComponentError, SpecError
from ..core.host import Host
from ..core.model import DiskSpec

log = logging.getLogger(__name__)

EXPORT = "data"
BITMAP = "hvsim-dirty"
FORMAT = "hvsim-qsd"
GRANULARITY = 64 * 1024
MAX_EXTENTS = 1 << 20


@dataclass(frozen=True)
class QsdOptions:
    reconnect_delay: int = 10
    granularity: int = GRANULARITY
    restart: RestartPolicy | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reconnect_delay, int) or not 0 <= self.reconnect_delay <= 3600:
            raise SpecError(f"qsd reconnect_delay must be an integer within 0..3600 s, got {self.reconnect_delay!r}")
        g = self.granularity
        if not isinstance(g, int) or g < 512 or g > (1 << 31) or g & (g - 1):
            raise SpecError(f"qsd bitmap granularity must be a power of two within 512..2^31, got {g!r}")


class QsdDriver:
    kind = "qsd"

    def __init__(self, options: QsdOptions = QsdOptions()) -> None:
        if not isinstance(options, QsdOptions):
            raise SpecError(f"options must be QsdOptions, got {type(options).__name__}")
        self.options = options

    def create(self, disk: DiskSpec, ctx: ComponentContext) -> QsdComponent:
        if disk.format != "raw":
            raise SpecError(f"qsd disk {disk.name!r} of vm {ctx.vm!r} must be raw, not {disk.format}")
        comp = QsdComponent(disk, ctx, self.options)
        if self.options.restart is not None:
            comp.supervise(self.options.restart)
        return comp


class QsdComponent(Component):
    """One qemu-storage-daemon serving one data disk of one VM over NBD."""

    kind = "qsd"
    CHECKPOINT_VERSIONS = frozenset({1})

    def __init__(self, disk: DiskSpec, ctx: ComponentContext, options: QsdOptions,
                 run_dir: Path | None = None) -> None:
        super().__init__(disk.name, ctx)
        self.disk, self.options = disk, options
        self.size = disk.size_mib * 1024 * 1024
        self.image = Path(disk.path) if disk.path else ctx.vm_dir / f"{disk.name}.img"
        self.dir = (run_dir or ctx.vm_dir) / "qsd"
        self.socket_path = self.dir / f"{disk.name}.sock"
        self.log_path = self.dir / f"{disk.name}.qsd.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: QMPSession | None = None
        self._exited: asyncio.Future[int] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._seq = 0
        self._n_snap = 0
        self.restored: dict[str, Any] | None = None    # what the last restore loaded (tests, reports)

    def nbd_uri(self, export: str = EXPORT) -> str:
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    # -- process -------------------------------------------------------------------------------------
    def argv(self, netns: str | None, qmp_fd: int) -> list[str]:
        base = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={self.image},locking=off,cache.direct=off",
                "--blockdev", "driver=raw,node-name=disk0,file=file0",
                "--nbd-server", f"addr.type=unix,addr.path={self.socket_path}",
                "--chardev", f"socket,id=mon0,fd={qmp_fd}", "--monitor", "chardev=mon0"]
        return (["ip", "netns", "exec", netns] if netns else []) + base

    async def _do_prepare(self, host: Host, timeout: float = 20.0) -> Attachment:
        if shutil.which("qemu-storage-daemon") is None:
            raise ComponentError("qemu-storage-daemon is not installed (Debian package qemu-system-common)")
        for p in (self.image, self.socket_path, self.log_path):
            if "," in str(p):
                raise SpecError(f"{self.fsm.obj}: path {p} contains ',' which QEMU options cannot carry")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.image.exists():
            fd = os.open(self.image, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
        self.socket_path.unlink(missing_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        logf = open(self.log_path, "ab")
        old_umask = os.umask(0o177)      # the NBD socket qsd creates: 0600
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(host.netns, theirs.fileno()), stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                stderr=logf, pass_fds=(theirs.fileno(),), preexec_fn=die_with_parent())
        finally:
            os.umask(old_umask)
            theirs.close()
            logf.close()
        self.proc = proc
        self.ctx.track_process(proc.pid, f"qemu-storage-daemon {self.ctx.vm}/{self.name}")
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        exited = self._exited
        waiter = asyncio.ensure_future(proc.wait())

        def _exited(t: asyncio.Future[int]) -> None:
            if not exited.done() and not t.cancelled():
                exited.set_result(t.result())
        waiter.add_done_callback(_exited)
        self.qmp = QMPSession(f"qsd-{self.ctx.vm}-{self.name}", log_path=self.dir / f"{self.name}.qmp.log",
                              exited=self._exited, console_tail=self.log_tail)
        try:
            await self.qmp.connect(ours, timeout=timeout)
            g = self.options.granularity
            await self.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": BITMAP, "granularity": g})
            await self.qmp.execute("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "disk0",
                                                        "name": EXPORT, "writable": True})
            deadline = time.monotonic() + timeout
            while not self.socket_path.exists():
                if time.monotonic() > deadline:
                    raise ComponentError(f"{self.fsm.obj}: no NBD socket after {timeout:g} s")
                await asyncio.sleep(0.02)
            if self.restarts or self.failures:
                # a restart: whatever the bitmap held died with the old process; mark everything dirty
                await self._set_bits([(0, self.size)])
        except QEMUBridgeError as exc:
            raise ComponentError(f"{self.fsm.obj}: qemu-storage-daemon did not come up: {exc}\n{self.log_tail()}") \
                from exc
        self._watcher = asyncio.create_task(self._watch(proc), name=f"qsd-watch-{self.ctx.vm}-{self.name}")
        return Attachment(drives=(Drive(id=f"disk-{self.name}", path=str(self.socket_path), kind="nbd",
                                        export=EXPORT, reconnect_delay=self.options.reconnect_delay),))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.report_failure(f"qemu-storage-daemon pid {proc.pid} exited with {code}\n{self.log_tail()}")

    async def _do_stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        qmp, self.qmp = self.qmp, None
        proc, self.proc = self.proc, None
        if qmp is not None and proc is not None and proc.returncode is None:
            with contextlib.suppress(QEMUBridgeError):
                await qmp.execute("quit", timeout=5)
        if proc is not None and proc.returncode is None:
            try:
                await wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if qmp is not None:
            await qmp.close()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.returncode is None else []

    def files(self) -> list[Path]:
        return ([] if self.disk.path else [self.image]) + [self.log_path]

    async def _do_remove(self) -> None:
        await super()._do_remove()
        await self._do_retire()

    async def _do_retire(self) -> None:
        for p in (self.socket_path, self.log_path, self.dir / f"{self.name}.qmp.log"):
            p.unlink(missing_ok=True)
        if self.dir.exists() and not any(self.dir.iterdir()):
            self.dir.rmdir()

    # -- device state ----------------------------------------------------------------------------------
    def _q(self) -> QMPSession:
        if self.qmp is None:
            raise ComponentError(f"{self.fsm.obj}: no qemu-storage-daemon running (state {self.state.value})")
        return self.qmp

    async def _tool(self, *argv: str, timeout: float = 30.0) -> str:
        """Run an external client (nbdinfo, qemu-io) against our socket; its stdout."""
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await wait_for(proc.communicate(), timeout)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            raise ComponentError(f"{self.fsm.obj}: {argv[0]} failed ({proc.returncode}): "
                                 f"{err.decode(errors='replace').strip()[:500]}")
        return out.decode()

    async def dirty_extents(self) -> tuple[list[tuple[int, int]], str]:
        """The dirty bitmap as (offset, length) extents and its sha256, from one consistent copy:
        ``hvsim-dirty`` is merged into a disabled snapshot bitmap, which is exported read-only just for
        ``nbdinfo --map`` to read over NBD (an exported bitmap cannot change, so neither the guest's
        export nor the live bitmap is involved), then removed."""
        q = self._q()
        self._n_snap += 1
        snap, eid, name = f"snap{self._n_snap}", f"bm{self._n_snap}", f"{EXPORT}-bitmap{self._n_snap}"
        g = self.options.granularity
        await q.execute("block-dirty-bitmap-add", {"node": "disk0", "name": snap, "granularity": g, "disabled": True})
        try:
            await q.execute("block-dirty-bitmap-merge", {"node": "disk0", "target": snap, "bitmaps": [BITMAP]})
            sha = str((await q.execute("x-debug-block-dirty-bitmap-sha256", {"node": "disk0", "name": snap}))["sha256"])
            await q.execute("block-export-add", {"type": "nbd", "id": eid, "node-name": "disk0", "name": name,
                                                 "writable": False, "bitmaps": [snap]})
            try:
                out = await self._tool("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{snap}", self.nbd_uri(name))
            finally:
                with contextlib.suppress(QEMUBridgeError):
                    await q.execute("block-export-del", {"id": eid, "mode": "hard"})
        finally:
            for _ in range(50):
                try:
                    await q.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": snap})
                    break
                except QEMUBridgeError:
                    await asyncio.sleep(0.02)   # still held by the export on its way out
        return [(int(e["offset"]), int(e["length"])) for e in json.loads(out) if int(e["type"]) & 1], sha

    async def bitmap_sha256(self) -> str:
        r = await self._q().execute("x-debug-block-dirty-bitmap-sha256", {"node": "disk0", "name": BITMAP})
        return str(r["sha256"])

    async def _set_bits(self, extents: list[tuple[int, int]]) -> None:
        """Mark ``extents`` dirty in the bitmap without touching the data: write them as zeroes to a
        scratch null-co node's bitmap over NBD, merge that into ours."""
        q = self._q()
        g = self.options.granularity
        await q.execute("blockdev-add", {"driver": "null-co", "node-name": "scratch", "size": self.size})
        try:
            await q.execute("block-dirty-bitmap-add", {"node": "scratch", "name": "tmp", "granularity": g})
            await q.execute("block-export-add", {"type": "nbd", "id": "scratch-exp", "node-name": "scratch",
                                                 "name": "scratch", "writable": True})
            try:
                cmds: list[str] = []
                for off, ln in extents:
                    cmds += ["-c", f"write -z {off} {ln}"]
                for i in range(0, len(cmds), 2000):
                    await self._tool("qemu-io", "-f", "raw", *cmds[i:i + 2000], self.nbd_uri("scratch"))
                await q.execute("block-dirty-bitmap-merge", {"node": "disk0", "target": BITMAP,
                                                             "bitmaps": [{"node": "scratch", "name": "tmp"}]})
            finally:
                with contextlib.suppress(QEMUBridgeError):
                    await q.execute("block-export-del", {"id": "scratch-exp", "mode": "hard"})
        finally:
            for _ in range(50):
                try:
                    await q.execute("blockdev-del", {"node-name": "scratch"})
                    break
                except QEMUBridgeError:
                    await asyncio.sleep(0.05)   # the export is still going away

    async def _do_quiesce(self) -> None:
        return None    # QEMU drained and flushed the drive when it stopped the guest

    async def _do_resume(self) -> None:
        return None

    async def _do_checkpoint(self, since: int | None) -> Checkpoint:
        extents, sha = await self.dirty_extents()
        state = {"format": FORMAT, "version": 1,
                 "export": {"name": EXPORT, "size": self.size, "writable": True, "image": str(self.image),
                            "format": "raw"},
                 "bitmaps": [{"name": BITMAP, "granularity": self.options.granularity, "sha256": sha,
                              "extents": extents}]}
        self._seq += 1
        return Checkpoint(component=self.id, kind=self.kind, version=1, seq=self._seq,
                          payload=json.dumps(state).encode(), base_seq=None,
                          meta={"extents": len(extents), "dirty_bytes": sum(n for _, n in extents)})

    def _parse(self, checkpoint: Checkpoint) -> dict[str, Any]:
        who = f"{self.fsm.obj}: checkpoint {checkpoint.seq}"
        try:
            state = json.loads(checkpoint.payload)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} checkpoint")
            if state.get("version") not in self.CHECKPOINT_VERSIONS:
                raise ValueError(f"format version {state.get('version')} is not supported "
                                 f"(supported: {sorted(self.CHECKPOINT_VERSIONS)})")
            exp = state["export"]
            mine = {"name": EXPORT, "size": self.size, "writable": True, "image": str(self.image), "format": "raw"}
            if exp != mine:
                raise ValueError(f"export configuration {exp} does not match this daemon's {mine}")
            bm = state["bitmaps"]
            if not isinstance(bm, list) or len(bm) != 1 or bm[0]["name"] != BITMAP \
                    or bm[0]["granularity"] != self.options.granularity:
                raise ValueError(f"bitmaps {[b.get('name') for b in bm] if isinstance(bm, list) else bm} do not "
                                 f"match ({BITMAP}, granularity {self.options.granularity})")
            ext = bm[0]["extents"]
            if not isinstance(ext, list) or len(ext) > MAX_EXTENTS:
                raise ValueError("too many extents")
            for e in ext:
                if (not isinstance(e, list) or len(e) != 2 or not all(isinstance(x, int) for x in e)
                        or e[0] < 0 or e[1] <= 0 or e[0] + e[1] > self.size):
                    raise ValueError(f"extent {e!r} is outside the {self.size}-byte disk")
            if not isinstance(bm[0]["sha256"], str) or len(bm[0]["sha256"]) != 64:
                raise ValueError("bitmap sha256 missing")
            return state
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{who} refused: {exc}") from exc

    async def _do_restore(self, checkpoint: Checkpoint) -> None:
        state = self._parse(checkpoint)
        bm = state["bitmaps"][0]
        try:
            await self._q().execute("block-dirty-bitmap-clear", {"node": "disk0", "name": BITMAP})
            if bm["extents"]:
                await self._set_bits([(int(o), int(n)) for o, n in bm["extents"]])
            got = await self.bitmap_sha256()
        except QEMUBridgeError as exc:
            raise CheckpointError(f"{self.fsm.obj}: restoring checkpoint {checkpoint.seq} failed: {exc}") from exc
        if got != bm["sha256"]:
            raise CheckpointError(f"{self.fsm.obj}: checkpoint {checkpoint.seq}: the restored dirty bitmap's sha256 "
                                  f"{got[:12]}... differs from the source's {bm['sha256'][:12]}...")
        self.restored = {"seq": checkpoint.seq, "extents": len(bm["extents"]), "sha256": got}

    # -- MigratableComponent -----------------------------------------------------------------------------
    def migration_peer(self, run_dir: Path) -> QsdComponent:
        peer = QsdComponent(self.disk, self.ctx, self.options, run_dir=run_dir)
        peer.image = self.image
        peer.supervise(self.restart_policy)
        return peer

    async def state_size(self, since: int | None = None) -> int:
        return 4096

    async def stats(self) -> dict[str, Any]:
        if self.qmp is None:
            return {}
        try:
            exports = await self.qmp.execute("query-block-exports")
            return {"exports": exports, "bitmap_sha256": await self.bitmap_sha256()}
        except QEMUBridgeError as exc:
            return {"error": str(exc)}

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"image": str(self.image), "export": EXPORT,
                                    "reconnect_delay": self.options.reconnect_delay}

