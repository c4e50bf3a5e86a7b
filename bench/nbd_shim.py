"""NBD server comparison: `qemu-img bench` 4 KiB reads at queue depth 1 and 64 on one file served by
the hvsim shim (no emulated latency) on its default loop (uvloop) and on asyncio's own
(``shim-asyncio``: ``HVSIM_SHIM_LOOP=asyncio``, the fallback), qemu-nbd and nbdkit's file plugin.

Every (server, depth) runs ``repeats`` times (full 3, quick 2), interleaved (bench/_common.py): each
round starts the servers in a shuffled order, each one afresh and warmed up, and runs its depths
in a shuffled order.

Writes bench/results/nbd_shim.json: {"runs": [{"server", "depth", "iops" (median), "samples" (=
"iops_samples", every round), "requests"}], "ratios" (shim/peer, ratio of medians per depth),
"comparisons" (the same with their range and verdict), "target_shim_ge_half_qemu_nbd" (on the
medians), "target_verdict" ("met" when the whole ratio range is >= 0.5, "missed" when none of it is,
"within noise" otherwise), "target_shim_ge_0.8_nbdkit" and "moonshot_shim_ge_nbdkit" (verdicts on
the shim/nbdkit range), "context", "schedule"}. Targets: shim IOPS >= 50% of qemu-nbd's at both
depths; issue 16: >= 0.8x nbdkit's at both depths (moonshot >= 1x). Comparisons also give
shim-asyncio/nbdkit and shim/shim-asyncio (what uvloop brings).
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bench._common import (
    Samples,
    compare,
    context,
    fmt_stat,
    meets,
    plan,
    print_context,
    print_table,
    repeats,
    run_grouped,
    write_result,
)
from hvbase.aio import stop_process
from hvsim.drivers.shim.process import ShimProcess

NAME = "nbd_shim"
EXPORT = "bench"
_RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds")
SERVERS = ("shim", "shim-asyncio", "qemu-nbd", "nbdkit")
# the shim on its default loop (uvloop) and on asyncio's own (HVSIM_SHIM_LOOP=asyncio, the fallback)
SHIM_LOOPS = {"shim": "auto", "shim-asyncio": "asyncio"}
DEPTHS = (1, 64)
Config = tuple[str, int]   # (server, queue depth)


async def _wait_socket(path: Path, proc: asyncio.subprocess.Process, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {path}")
        try:
            _, w = await asyncio.open_unix_connection(str(path))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        return
    raise RuntimeError(f"server did not listen on {path} within {timeout}s")


async def _qemu_img_bench(sock: Path, depth: int, count: int) -> float:
    opts = f"driver=nbd,server.type=unix,server.path={sock},export={EXPORT}"
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "bench", "-c", str(count), "-d", str(depth), "-s", "4096", "--image-opts", opts,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode()
    m = _RUN_RE.search(text)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"qemu-img bench failed ({proc.returncode}): {text}")
    return count / float(m.group(1))


async def _external(argv: list[str], sock: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    await _wait_socket(sock, proc)
    return proc



def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))


@asynccontextmanager
async def serve(server: str, work: Path, img: Path) -> AsyncIterator[Path]:
    """One NBD server on a unix socket, warmed up (page cache, code paths), stopped on exit."""
    sock = work / f"{server}.sock"
    sock.unlink(missing_ok=True)   # the previous round's server left it (nbdkit refuses to bind over it)
    shim: ShimProcess | None = None
    proc: asyncio.subprocess.Process | None = None
    try:
        if server in SHIM_LOOPS:
            saved = os.environ.get("HVSIM_SHIM_LOOP")
            os.environ["HVSIM_SHIM_LOOP"] = SHIM_LOOPS[server]   # the child inherits it
            try:
                shim = ShimProcess(sock, img, export_name=EXPORT, log_path=work / f"{server}.log")
                await shim.start()
            finally:
                if saved is None:
                    os.environ.pop("HVSIM_SHIM_LOOP", None)
                else:
                    os.environ["HVSIM_SHIM_LOOP"] = saved
        elif server == "qemu-nbd":
            proc = await _external(["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", EXPORT, "-t", str(img)], sock)
        else:
            proc = await _external(["nbdkit", "-f", "-U", str(sock), "file", f"file={img}"], sock)
        await _qemu_img_bench(sock, 64, 2000)
        yield sock
    finally:
        if shim is not None:
            await shim.stop()
        if proc is not None:
            await stop_process(proc)


async def _run(quick: bool) -> tuple[dict[str, Any], Samples[Config, float]]:
    size = (32 if quick else 64) * 1024 * 1024
    counts = {1: 5000 if quick else 20000, 64: 30000 if quick else 100000}
    n = repeats(quick)
    configs: list[Config] = [(server, depth) for server in SERVERS for depth in DEPTHS]
    # per round: the servers in a shuffled order, each started afresh, its depths shuffled too
    sched = plan(configs, n, group=lambda c: c[0])
    work = Path(tempfile.mkdtemp(prefix="hvsb-", dir="/tmp"))
    os.chmod(work, 0o700)
    img = work / "disk.img"
    try:
        _random_file(img, size)

        async def one(cfg: Config, _rnd: int, sock: Path) -> float:
            iops = await _qemu_img_bench(sock, cfg[1], counts[cfg[1]])
            print(f"  {cfg[0]:8s} depth {cfg[1]:2d}: {iops:8.0f} IOPS", flush=True)
            return iops

        samples = await run_grouped(sched, lambda server, _rnd: serve(str(server), work, img), one)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = []
    for server, depth in configs:
        s = samples.of((server, depth))
        runs.append({"server": server, "depth": depth, "iops": statistics.median(s), "iops_samples": s,
                     "samples": s, "requests": counts[depth]})
    iops = {(server, depth): samples.of((server, depth)) for server, depth in configs}
    pairs = [("shim", "qemu-nbd"), ("shim", "nbdkit"), ("shim-asyncio", "nbdkit"), ("shim", "shim-asyncio")]
    cmps = {f"{a}/{b}": {str(d): compare(iops[(a, d)], iops[(b, d)], better="higher") for d in DEPTHS}
            for a, b in pairs}
    ratios = {k: {d: c.ratio for d, c in v.items()} for k, v in cmps.items()}
    target = {d: meets(c, at_least=0.5) for d, c in cmps["shim/qemu-nbd"].items()}
    # issue 16: shim >= 0.8x nbdkit at both depths (moonshot >= 1x)
    target_nbdkit = {d: meets(c, at_least=0.8) for d, c in cmps["shim/nbdkit"].items()}
    moonshot_nbdkit = {d: meets(c, at_least=1.0) for d, c in cmps["shim/nbdkit"].items()}
    return {"block_size": 4096, "file_bytes": size, "repeats": n, "quick": quick, "runs": runs,
            "ratios": ratios, "comparisons": {k: {d: c.to_json() for d, c in v.items()} for k, v in cmps.items()},
            "target_shim_ge_half_qemu_nbd": {d: (r or 0.0) >= 0.5 for d, r in ratios["shim/qemu-nbd"].items()},
            "target_verdict": target, "target_shim_ge_0.8_nbdkit": target_nbdkit,
            "moonshot_shim_ge_nbdkit": moonshot_nbdkit, "cpus": os.cpu_count()}, samples


def main(quick: bool) -> None:
    ctx = context(quick)
    print_context(ctx)
    result, samples = asyncio.run(_run(quick))
    write_result(NAME, result, ctx, samples)
    base = {r["depth"]: r["samples"] for r in result["runs"] if r["server"] == "qemu-nbd"}
    rows = []
    for r in result["runs"]:
        if r["server"] == "qemu-nbd":
            rows.append([r["server"], r["depth"], fmt_stat(r["samples"]), "(baseline)", "", ""])
            continue
        cmp = compare(r["samples"], base[r["depth"]], better="higher")
        target = result["target_verdict"][str(r["depth"])] if r["server"] == "shim" else ""
        rows.append([r["server"], r["depth"], fmt_stat(r["samples"]), cmp.fmt(), cmp.verdict, target])
    print_table(["server", "depth", "IOPS (4 KiB read)", "/qemu-nbd", "verdict", "target >= 0.5"], rows)
    print("IOPS: median (min-max) of the rounds; /qemu-nbd: ratio of medians (range); verdict 'win' = more IOPS"
          " than qemu-nbd with non-overlapping ranges")
    print()
    rows = [[k, d, c["ratio"], f"{c['lo']:.2f}-{c['hi']:.2f}" if c["lo"] is not None else "", c["verdict"]]
            for k, v in result["comparisons"].items() if k != "shim/qemu-nbd" for d, c in v.items()]
    print_table(["pair", "depth", "ratio of medians", "range", "verdict"], rows)
    print("target shim >= 0.8x nbdkit:", result["target_shim_ge_0.8_nbdkit"],
          "moonshot >= 1x:", result["moonshot_shim_ge_nbdkit"])
