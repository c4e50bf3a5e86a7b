"""Command line of the shim process: ``serve`` with its options, parsed here and validated by
:meth:`~hvsim.drivers.shim.daemon.ShimConfig.validate` before anything is created.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for a bad option (one line on stderr naming
it; nothing created), 1 when serving failed (one line; ``--verbose`` adds the traceback).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .daemon import (DEFAULT_EXPORT, MAX_BANDWIDTH_MIB_S, MAX_LATENCY_MS, MAX_PREFETCH_CONCURRENCY, MAX_SIZE,
                     MIN_BANDWIDTH_MIB_S, SIZE_ALIGN, ShimConfig, main)
from .errors import ShimConfigError, ShimError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _one_line(text: str) -> str:
    """The first line of ``text``, printable: control characters from the input are shown escaped."""
    first = text.strip().partition("\n")[0]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in first)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (``PROG: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def build_parser(prog: str = "python -m hvsim.drivers.shim") -> argparse.ArgumentParser:
    ap = _Parser(prog=prog, description="NBD block-device shim (swap tracking + prefetch cache)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("serve", help="serve BACKING over NBD on SOCKET until SIGTERM")
    s.add_argument("--socket", type=Path, required=True,
                   help="unix socket to serve NBD on (its directory must be 0700)")
    s.add_argument("--backing", type=Path, required=True, help="backing file (created with --size if missing)")
    s.add_argument("--size", type=int, default=None,
                   help=f"export size in bytes, a positive multiple of {SIZE_ALIGN} up to {MAX_SIZE} and what the "
                        "backing file system allows (default: the backing file's size)")
    s.add_argument("--latency-ms", type=float, default=0.0,
                   help=f"emulated datastore latency per request, 0..{MAX_LATENCY_MS:g} ms")
    s.add_argument("--bandwidth-mib-s", type=float, default=None,
                   help=f"emulated datastore bandwidth, {MIN_BANDWIDTH_MIB_S:g}..{MAX_BANDWIDTH_MIB_S:g} MiB/s "
                        "(default: unlimited)")
    s.add_argument("--control", type=Path, default=None, help="JSON control socket")
    s.add_argument("--name", default=DEFAULT_EXPORT, help="export name (also served as the default export)")
    s.add_argument("--prefetch-concurrency", type=int, default=4,
                   help=f"parallel prefetch reads, 1..{MAX_PREFETCH_CONCURRENCY}")
    s.add_argument("--state-file", type=Path, default=None,
                   help="keep an index-only checkpoint here (every --state-interval s); restore it at start")
    s.add_argument("--state-interval", type=float, default=1.0, help="seconds between state-file saves, 0.05..3600")
    s.add_argument("--verbose", "-v", action="store_true")
    return ap


def run_cli(argv: Sequence[str], prog: str = "python -m hvsim.drivers.shim") -> int:
    """Parse and validate ``argv``, then run the shim (see the module docstring for exit codes)."""
    try:
        args = build_parser(prog).parse_args(list(argv))
    except SystemExit as exc:           # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    where = f"{prog} {args.command}"
    try:
        cfg = ShimConfig(socket=args.socket, backing=args.backing, size=args.size, latency_ms=args.latency_ms,
                         bandwidth_mib_s=args.bandwidth_mib_s, control=args.control, export_name=args.name,
                         prefetch_concurrency=args.prefetch_concurrency, state_file=args.state_file,
                         state_interval=args.state_interval).validate()
        return main(cfg, args.verbose)
    except ShimConfigError as exc:
        print(f"{where}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ShimError as exc:
        logging.getLogger(__name__).debug("shim failed", exc_info=True)
        if args.verbose:
            traceback.print_exc()
        print(f"{where}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
