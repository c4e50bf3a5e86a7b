"""QemuProcess.launch() must not report RUNNING for a QEMU whose exit the watcher already saw."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from qmp_bridge import LaunchError, MachineSpec, ProcState, QemuProcess, QMPSession
from qmp_bridge.errors import ProcessStateError


def spec(tmp_path: Path) -> MachineSpec:
    for f in ("vmlinuz", "initrd.img"):
        (tmp_path / f).write_bytes(b"")
    return MachineSpec(name="race", memory_mib=64, vcpus=1, kernel=str(tmp_path / "vmlinuz"),
                       initrd=str(tmp_path / "initrd.img"), console_log=str(tmp_path / "console.log"))


async def test_exit_during_qmp_handshake_is_a_launch_error_not_running(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # /bin/true stands in for a QEMU that dies at once; the handshake "completes" only after the
    # exit watcher has marked the process EXITED: exactly the interleaving of the old bug, forced.
    proc = QemuProcess(spec(tmp_path), tmp_path / "run", binary="/bin/true")

    async def connect_after_exit(self: QMPSession, sock: socket.socket, timeout: float = 30.0) -> None:
        await asyncio.shield(proc.exited)
        sock.close()
    monkeypatch.setattr(QMPSession, "connect", connect_after_exit)
    with pytest.raises(LaunchError, match="exited right after it started") as ei:
        await proc.launch()
    assert proc.state is ProcState.EXITED
    assert ei.value.exit_code == 0 and ei.value.argv[0] == "/bin/true"
    assert [t.new for t in proc.fsm.history] == [ProcState.STARTING, ProcState.EXITED]
    with pytest.raises(ProcessStateError, match="cannot launch"):
        await proc.launch()
