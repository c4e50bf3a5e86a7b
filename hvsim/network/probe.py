"""TCP throughput probe between two underlay hosts.

Run as a module inside a namespace::

    python -m hvsim.network.probe recv --bind IP [--port 0] [--warmup 0.3]
        prints "READY <port>", accepts one connection, reads to EOF, prints a JSON result
    python -m hvsim.network.probe send --to IP --port P --seconds S

:func:`measure_throughput` does both through an Underlay and returns the receiver's
goodput (payload bytes, so about 95% of the link rate at MTU 1500) after a warm-up that
skips TCP slow start and the tbf bucket's initial burst.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ProbeError

if TYPE_CHECKING:
    from .underlay import Underlay

CHUNK = 64 * 1024


def _recv(bind: str, port: int, warmup: float, accept_timeout: float) -> dict[str, float]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(1)
    srv.settimeout(accept_timeout)
    print(f"READY {srv.getsockname()[1]}", flush=True)
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(accept_timeout)
    buf = bytearray(256 * 1024)
    total = 0
    t_first = t_last = 0.0
    win_start: float | None = None
    win_bytes = 0
    while True:
        n = conn.recv_into(buf)
        now = time.monotonic()
        if n == 0:
            break
        if total == 0:
            t_first = now
        total += n
        t_last = now
        if win_start is None:
            if now - t_first >= warmup:
                win_start = now
        else:
            win_bytes += n
    conn.close()
    win_s = (t_last - win_start) if win_start is not None else 0.0
    return {"bytes": total, "seconds": t_last - t_first, "window_bytes": win_bytes, "window_seconds": win_s}


def _send(to: str, port: int, seconds: float) -> dict[str, float]:
    s = socket.create_connection((to, port), timeout=10)
    payload = b"\xa5" * CHUNK
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        s.sendall(payload)
        sent += CHUNK
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the receiver to close: all data delivered
    s.close()
    return {"bytes": sent, "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hvsim.network.probe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, default=0)
    r.add_argument("--warmup", type=float, default=0.3)
    r.add_argument("--accept-timeout", type=float, default=15.0)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    if a.cmd == "recv":
        out = _recv(a.bind, a.port, a.warmup, a.accept_timeout)
    else:
        out = _send(a.to, a.port, a.seconds)
    print(json.dumps(out), flush=True)
    return 0


@dataclass(frozen=True)
class Throughput:
    src: str
    dst: str
    mbit: float            # goodput over the measurement window
    window_bytes: int
    window_seconds: float
    total_bytes: int


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def measure_throughput(underlay: Underlay, src: str, dst: str, *, seconds: float = 2.0,
                             warmup: float = 0.3, timeout: float = 30.0) -> Throughput:
    """Send TCP from ``src`` to ``dst`` for ``seconds``; return goodput measured at ``dst``."""
    if seconds <= warmup:
        raise ProbeError(f"seconds ({seconds}) must exceed warmup ({warmup})")
    py = [sys.executable, "-m", "hvsim.network.probe"]
    recv = await asyncio.create_subprocess_exec(
        *underlay.argv_in(dst, [*py, "recv", "--bind", underlay.host_ip(dst), "--warmup", str(warmup)]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    send: asyncio.subprocess.Process | None = None
    try:
        async with asyncio.timeout(timeout):
            line = (await recv.stdout.readline()).decode()  # type: ignore[union-attr]
            if not line.startswith("READY "):
                err = (await recv.stderr.read()).decode()  # type: ignore[union-attr]
                raise ProbeError(f"receiver in {dst} did not start: {line!r} {err}")
            port = line.split()[1]
            send = await asyncio.create_subprocess_exec(
                *underlay.argv_in(src, [*py, "send", "--to", underlay.host_ip(dst), "--port", port,
                                        "--seconds", str(seconds)]),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            (r_out, r_err), (s_out, s_err) = await asyncio.gather(recv.communicate(), send.communicate())
    except TimeoutError as exc:
        raise ProbeError(f"throughput probe {src}->{dst} timed out after {timeout}s") from exc
    finally:
        await _kill(recv)
        if send is not None:
            await _kill(send)
    if recv.returncode != 0 or send.returncode != 0:
        raise ProbeError(f"probe {src}->{dst} failed: recv rc={recv.returncode} {r_err.decode()!r}; "
                         f"send rc={send.returncode} {s_err.decode()!r}")
    res = json.loads(r_out.decode().strip().splitlines()[-1])
    if res["window_seconds"] <= 0:
        raise ProbeError(f"probe {src}->{dst} got no data after warm-up: {res}")
    return Throughput(src=src, dst=dst, mbit=res["window_bytes"] * 8 / res["window_seconds"] / 1e6,
                      window_bytes=int(res["window_bytes"]), window_seconds=float(res["window_seconds"]),
                      total_bytes=int(res["bytes"]))


if __name__ == "__main__":
    sys.exit(main())
