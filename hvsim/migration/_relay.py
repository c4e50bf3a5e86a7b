"""One end of a ULD state link: a dumb, authenticated byte pipe over TCP, run inside a host's network
namespace (``python -I _relay.py recv|send ...``; standard library only, no hvsim import, so it starts
in a few tens of milliseconds). The framing and every check of what crosses the link are done by the
hvsim process (:mod:`hvsim.migration.statelink`), which writes into the sender and reads the
receiver.

``recv --bind ADDR``: reads the 64-hex-digit token from the first stdin line, listens on ADDR (an
ephemeral port), prints ``READY <port>`` on stdout, accepts one connection within 30 s whose first 65
bytes must be the token and a newline (else it exits 3), then copies the connection to stdout.

``send --connect ADDR:PORT``: reads the token from the first stdin line, connects, sends the token
line, then copies stdin to the connection (a small send buffer, so little sits in the kernel
beyond what the link is carrying) until stdin ends.
"""
from __future__ import annotations

import argparse
import hmac
import os
import socket
import sys

CHUNK = 64 * 1024
TOKEN_LEN = 64


def _token() -> bytes:
    # byte by byte from the descriptor: a buffered readline would swallow the data behind the line
    fd = sys.stdin.fileno()
    line = b""
    while len(line) <= TOKEN_LEN and not line.endswith(b"\n"):
        c = os.read(fd, 1)
        if not c:
            break
        line += c
    line = line.strip()
    if len(line) != TOKEN_LEN:
        print("relay: no token on stdin", file=sys.stderr)
        sys.exit(2)
    return line


def recv(bind: str) -> int:
    token = _token()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, 0))
    srv.listen(1)
    out = sys.stdout.buffer
    out.write(f"READY {srv.getsockname()[1]}\n".encode())
    out.flush()
    srv.settimeout(30)
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        print("relay: nobody connected within 30 s", file=sys.stderr)
        return 4
    srv.close()
    conn.settimeout(5)
    got = b""
    while len(got) < TOKEN_LEN + 1:
        part = conn.recv(TOKEN_LEN + 1 - len(got))
        if not part:
            break
        got += part
    if not hmac.compare_digest(got, token + b"\n"):
        print("relay: the peer did not present the token", file=sys.stderr)
        return 3
    conn.settimeout(None)
    fd = out.fileno()
    while True:
        data = conn.recv(CHUNK)
        if not data:
            return 0
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def send(target: str) -> int:
    token = _token()
    host, _, port = target.rpartition(":")
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(10)
    conn.connect((host, int(port)))
    conn.settimeout(None)
    conn.sendall(token + b"\n")
    fd = sys.stdin.fileno()
    while True:
        data = os.read(fd, CHUNK)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return 0
        conn.sendall(data)


def main() -> int:
    ap = argparse.ArgumentParser(prog="hvsim-relay")
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    s = sub.add_parser("send")
    s.add_argument("--connect", required=True)
    a = ap.parse_args()
    try:
        return recv(a.bind) if a.mode == "recv" else send(a.connect)
    except (OSError, ValueError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
