"""Guest-side swap helpers, run through the guest agent: find a disk by its virtio serial, set up swap
on it, read the guest's swap counters, have the guest swap everything back in."""
from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass

from ..core.agent import ExecResult
from ..core.errors import AgentError, SpecError, VMError
from ..core.vm import VM


class GuestSwapError(VMError):
    """Setting up or reading the guest's swap failed."""


@dataclass(frozen=True)
class GuestSwap:
    device: str        # e.g. /dev/vda
    size_bytes: int
    page_cluster: int


async def find_guest_disk(vm: VM, serial: str, timeout: float = 30.0) -> str:
    """The guest block device (``/dev/vdX``) whose virtio serial is ``serial``."""
    script = ("for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = " + shlex.quote(serial) +
              " ] && echo ${d##*/}; done; true")
    res = await _exec(vm, script, timeout)
    names = res.stdout.split()
    if len(names) != 1:
        raise GuestSwapError(f"vm {vm.name!r}: expected one disk with serial {serial!r}, found {names or 'none'}")
    return f"/dev/{names[0]}"


async def setup_guest_swap(vm: VM, disk: str = "swap", page_cluster: int = 0, serial: str | None = None,
                           timeout: float = 60.0) -> GuestSwap:
    """mkswap + swapon on the VM's disk ``disk`` (found by its serial ``disk-<name>``)."""
    if isinstance(page_cluster, bool) or not isinstance(page_cluster, int) or not 0 <= page_cluster <= 10:
        raise SpecError(f"page_cluster must be an integer 0..10 (log2 pages per swap read), got {page_cluster!r}")
    dev = await find_guest_disk(vm, serial or f"disk-{disk}", timeout)
    q = shlex.quote(dev)
    res = await _exec(vm, f"mkswap {q} >/dev/null && swapon {q} && echo {page_cluster} > /proc/sys/vm/page-cluster"
                          f" && cat /proc/swaps", timeout)
    if res.exit_code != 0:
        raise GuestSwapError(f"vm {vm.name!r}: swap setup on {dev} failed ({res.exit_code}): "
                             f"{(res.stderr or res.stdout).strip()[-300:]}")
    size = 0
    for line in res.stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == dev:
            size = int(parts[2]) * 1024
    if not size:
        raise GuestSwapError(f"vm {vm.name!r}: swapon {dev} did not show up in /proc/swaps:\n{res.stdout}")
    return GuestSwap(dev, size, page_cluster)


_VMSTAT = re.compile(r"^(pswpin|pswpout) (\d+)$", re.M)


async def guest_swap_stats(vm: VM, timeout: float = 30.0) -> dict[str, int]:
    """``swap_used_bytes`` (all swap areas), ``swap_cached_bytes`` (swapped pages still resident),
    ``pswpin``/``pswpout`` (pages, since boot)."""
    res = await _exec(vm, "cat /proc/swaps; grep -E '^pswp(in|out) ' /proc/vmstat; grep '^SwapCached:' /proc/meminfo",
                      timeout)
    used = 0
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].startswith("/") and parts[3].isdigit():
            used += int(parts[3]) * 1024
    out = {"swap_used_bytes": used}
    cached = re.search(r"^SwapCached:\s+(\d+) kB", res.stdout, re.M)
    if cached:
        out["swap_cached_bytes"] = int(cached.group(1)) * 1024
    for name, value in _VMSTAT.findall(res.stdout):
        out[name] = int(value)
    if "pswpin" not in out:
        raise GuestSwapError(f"vm {vm.name!r}: no pswpin in /proc/vmstat:\n{res.stdout[-300:]}")
    return out


async def guest_swap_back(vm: VM, device: str, page_cluster: int | None = 5, restore_page_cluster: int = 0,
                          timeout: float = 300.0) -> float:
    """Have the guest pull its swapped pages back in (swapoff), then re-enable the swap area.

    Used after a restore: the reads hit the shim's prefetched cache. ``page_cluster`` raises the
    guest's swap readahead for the swapoff only (5: 32 pages, one 128 KiB request instead of 32
    round trips; swap slots were allocated in sequential clusters), then ``restore_page_cluster``
    is set again. ``None`` keeps the current setting. Returns the host-measured seconds."""
    for v in (page_cluster, restore_page_cluster):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10):
            raise SpecError(f"page cluster must be an integer 0..10, got {v!r}")
    q = shlex.quote(device)
    pc = "/proc/sys/vm/page-cluster"
    cmd = f"swapoff {q} && swapon {q}"
    if page_cluster is not None:
        cmd = f"echo {page_cluster} > {pc} && {cmd}; rc=$?; echo {restore_page_cluster} > {pc}; exit $rc"
    t0 = time.monotonic()
    res = await _exec(vm, cmd, timeout)
    if res.exit_code != 0:
        raise GuestSwapError(f"vm {vm.name!r}: swapoff/swapon {device} failed: {(res.stderr or res.stdout).strip()}")
    return time.monotonic() - t0


async def _exec(vm: VM, cmd: str, timeout: float) -> ExecResult:
    try:
        return await vm.exec(cmd, timeout=timeout)
    except AgentError as exc:
        raise GuestSwapError(f"vm {vm.name!r}: guest command failed: {exc}") from exc
