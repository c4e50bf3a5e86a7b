"""Command line of the shim process: ``serve`` with its options, parsed and validated here."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .daemon import DEFAULT_EXPORT, ShimConfig, main
from .errors import ShimConfigError


def build_parser(prog: str = "python -m hvsim.drivers.shim") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="NBD block-device shim (swap tracking + prefetch cache)")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve BACKING over NBD on SOCKET until SIGTERM")
    s.add_argument("--socket", type=Path, required=True, help="unix socket to serve NBD on (its directory must be 0700)")
    s.add_argument("--backing", type=Path, required=True, help="backing file (created with --size if missing)")
    s.add_argument("--size", type=int, default=None, help="export size in bytes (default: backing file size)")
    s.add_argument("--latency-ms", type=float, default=0.0, help="emulated datastore latency per request")
    s.add_argument("--bandwidth-mib-s", type=float, default=None, help="emulated datastore bandwidth")
    s.add_argument("--control", type=Path, default=None, help="JSON control socket")
    s.add_argument("--name", default=DEFAULT_EXPORT, help="export name (also served as the default export)")
    s.add_argument("--prefetch-concurrency", type=int, default=4, help="parallel prefetch reads")
    s.add_argument("--verbose", "-v", action="store_true")
    return ap


def run_cli(argv: Sequence[str], prog: str = "python -m hvsim.drivers.shim") -> int:
    """Parse ``argv`` and run the shim; 2 (with one line on stderr) for a bad option."""
    args = build_parser(prog).parse_args(list(argv))
    cfg = ShimConfig(socket=args.socket, backing=args.backing, size=args.size, latency_ms=args.latency_ms,
                     bandwidth_mib_s=args.bandwidth_mib_s, control=args.control, export_name=args.name,
                     prefetch_concurrency=args.prefetch_concurrency)
    try:
        return main(cfg, args.verbose)
    except ShimConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
