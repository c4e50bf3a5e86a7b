"""NBD server comparison: `qemu-img bench` 4 KiB reads at queue depth 1 and 64 on one file served by
the hvsim shim (no emulated latency), qemu-nbd and nbdkit's file plugin.

Writes bench/results/nbd_shim.json: {"runs": [{"server", "depth", "iops", "samples"}], "ratios": ...}.
Target: shim IOPS >= 50% of qemu-nbd's at both depths. Each configuration runs `repeats` times
and reports the median; the raw samples are kept.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench._common import print_table, write_result
from hvsim.core.aio import stop_process
from hvsim.drivers.shim.process import ShimProcess

NAME = "nbd_shim"
EXPORT = "bench"
_RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds")


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



async def _run(quick: bool) -> dict[str, Any]:
    size = (32 if quick else 64) * 1024 * 1024
    counts = {1: 5000 if quick else 20000, 64: 30000 if quick else 100000}
    repeats = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="hvsb-", dir="/tmp"))
    os.chmod(work, 0o700)
    img = work / "disk.img"
    with open(img, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    runs: list[dict[str, Any]] = []
    try:
        for server in ("shim", "qemu-nbd", "nbdkit"):
            sock = work / f"{server}.sock"
            shim: ShimProcess | None = None
            proc: asyncio.subprocess.Process | None = None
            if server == "shim":
                shim = ShimProcess(sock, img, export_name=EXPORT, log_path=work / "shim.log")
                await shim.start()
            elif server == "qemu-nbd":
                proc = await _external(["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", EXPORT, "-t", str(img)], sock)
            else:
                proc = await _external(["nbdkit", "-f", "-U", str(sock), "file", f"file={img}"], sock)
            try:
                await _qemu_img_bench(sock, 64, 2000)  # warm-up: page cache, code paths
                for depth in (1, 64):
                    samples = [await _qemu_img_bench(sock, depth, counts[depth]) for _ in range(repeats)]
                    runs.append({"server": server, "depth": depth, "iops": statistics.median(samples),
                                 "samples": samples, "requests": counts[depth]})
            finally:
                if shim is not None:
                    await shim.stop()
                if proc is not None:
                    await stop_process(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    iops = {(r["server"], r["depth"]): r["iops"] for r in runs}
    ratios = {f"shim/{peer}": {str(d): iops[("shim", d)] / iops[(peer, d)] for d in (1, 64)}
              for peer in ("qemu-nbd", "nbdkit")}
    target = {str(d): ratios["shim/qemu-nbd"][str(d)] >= 0.5 for d in (1, 64)}
    return {"block_size": 4096, "file_bytes": size, "repeats": repeats, "quick": quick, "runs": runs,
            "ratios": ratios, "target_shim_ge_half_qemu_nbd": target, "cpus": os.cpu_count()}


def main(quick: bool) -> None:
    result = asyncio.run(_run(quick))
    write_result(NAME, result)
    rows = []
    for r in result["runs"]:
        ratio = result["ratios"]["shim/qemu-nbd"][str(r["depth"])] if r["server"] == "shim" else ""
        rows.append([r["server"], r["depth"], round(r["iops"]), ratio])
    print_table(["server", "depth", "IOPS (4 KiB read)", "shim/qemu-nbd"], rows)
    print("target shim >= 50% of qemu-nbd:", result["target_shim_ge_half_qemu_nbd"])
