"""Accelerator choice: TCG unless a short probe boot proves KVM works (or HVSIM_ACCEL says).

HVSIM_ACCEL=tcg|kvm|auto (default auto). ``auto`` probes once per machine: it boots the guest
kernel under KVM and requires the guest init's readiness line on the console within a few
seconds; the verdict is cached in ~/.cache/hvsim/accel.json keyed by kernel and QEMU binary.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import AccelProbeError
from .process import die_with_parent

_CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "hvsim" / "accel.json"


def _probe_kvm(kernel: str, initrd: str, timeout: float) -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not accessible"
    with tempfile.TemporaryDirectory(prefix="hvsim-kvmprobe-") as d:
        console = Path(d) / "console.log"
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "128",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", kernel, "-initrd", initrd,
                "-append", "console=ttyS0 panic=-1 hvsim.name=kvmprobe",
                "-chardev", f"file,id=c0,path={console}", "-serial", "chardev:c0"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    return False, f"KVM QEMU exited with {proc.returncode}: {err.strip()[:200]}"
                if console.exists() and "HVSIM-READY" in console.read_text(errors="replace"):
                    return True, "guest reached readiness under KVM"
                time.sleep(0.2)
            return False, f"guest not ready under KVM within {timeout:g}s"
        finally:
            proc.kill()
            proc.wait()


def choose_accel(kernel: str, initrd: str, probe_timeout: float = 20.0) -> str:
    """Return "tcg" or "kvm"."""
    want = os.environ.get("HVSIM_ACCEL", "auto").strip().lower()
    if want in ("tcg", "kvm"):
        return want
    if want != "auto":
        raise AccelProbeError(f"HVSIM_ACCEL={want!r}: expected tcg, kvm or auto")
    key = f"{os.path.realpath(kernel)}:{os.stat(kernel).st_mtime_ns}:{os.stat(initrd).st_mtime_ns}"
    try:
        cached = json.loads(_CACHE.read_text())
        if cached.get("key") == key:
            return str(cached["accel"])
    except (OSError, ValueError, KeyError):
        pass
    ok, why = _probe_kvm(kernel, initrd, probe_timeout)
    accel = "kvm" if ok else "tcg"
    try:
        _CACHE.parent.mkdir(parents=True, exist_ok=True)
        _CACHE.write_text(json.dumps({"key": key, "accel": accel, "why": why}))
    except OSError:
        pass
    return accel
