"""Run benchmarks: `python -m bench [--quick] [--only NAME]`.

Each benchmark is a module bench/NAME.py exposing `main(quick: bool) -> None` that writes
bench/results/NAME.json. Without --only, every benchmark runs in turn; a failing benchmark is
reported and the others still run, and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def discover() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def reclaim() -> None:
    """Reclaim what dead earlier runs left (namespaces, records, run dirs, processes) before measuring."""
    from hvsim.network.reclaim import reclaim_stale

    report = asyncio.run(reclaim_stale())
    if report.removed or report.failed:
        print(f"[bench] reclaimed leftovers of dead runs: {report.summary()}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="reduced matrix for a fast check")
    ap.add_argument("--only", help="run only this benchmark (module name under bench/)")
    args = ap.parse_args()
    names = discover()
    if args.only:
        if args.only not in names:
            print(f"unknown benchmark {args.only!r}; known: {', '.join(names)}", file=sys.stderr)
            return 2
        names = [args.only]
    reclaim()
    failed = []
    for name in names:
        print(f"=== bench {name} ({'quick' if args.quick else 'full'}) ===", flush=True)
        t0 = time.monotonic()
        try:
            importlib.import_module(f"bench.{name}").main(quick=args.quick)
        except Exception:  # report and carry on with the other benchmarks
            traceback.print_exc()
            failed.append(name)
        print(f"=== bench {name}: {time.monotonic() - t0:.1f}s ===", flush=True)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
