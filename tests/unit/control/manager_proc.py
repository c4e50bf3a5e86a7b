"""Start the manager as a real process (``python -m hvsim.control.api``) for the API tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Manager:
    proc: subprocess.Popen[bytes]
    token: str
    address: str           # unix:/PATH or http://127.0.0.1:PORT
    socket: Path | None
    token_file: Path
    log: Path


@contextmanager
def manager_process(run_dir: Path, store_url: str, *, tcp: str | None = None) -> Iterator[Manager]:
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_file = run_dir / "token"
    ready = run_dir / "ready"
    sock = run_dir / "sock" / "manager.sock"
    where = ["--tcp", tcp] if tcp else ["--socket", str(sock)]
    log = run_dir / "manager.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "hvsim.control.api", "--store", store_url,
                                 "--token-file", str(token_file), "--ready-file", str(ready), *where],
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"manager exited {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"manager not ready: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        address = f"http://{tcp}" if tcp else f"unix:{sock}"
        yield Manager(proc, token_file.read_text().strip(), address, None if tcp else sock, token_file, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
