"""Machine description -> QEMU argv. Pure logic, no processes."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hvbase.errors import InputError

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")

# The device and machine choices hvsim knows how to build (and whose guest drivers the image has).
MACHINE_TYPES = ("q35", "pc")                    # pc = i440FX + PIIX3 (no PCIe), q35 = ICH9 + PCIe
DISK_BUSES = ("virtio-blk", "scsi", "nvme")      # virtio-blk-pci; virtio-scsi-pci + scsi-hd; nvme
NIC_MODELS = ("virtio-net-pci", "e1000")
CPU_MODELS = ("qemu64", "Nehalem", "Westmere", "SandyBridge", "max")   # TCG runs these (checked in the HIL test)


class MachineSpecError(InputError):
    """A machine description that QEMU could not run."""


@dataclass(frozen=True)
class Drive:
    """A block device on ``bus``: "virtio-blk" (virtio-blk-pci), "scsi" (a scsi-hd on one
    virtio-scsi-pci controller shared by the machine's SCSI disks) or "nvme" (one NVMe controller
    per disk, namespace 1).

    kind "file": ``path`` is an image (format ``fmt``); kind "nbd": ``path`` is the unix socket of
    an NBD server, ``export`` its export name, ``reconnect_delay`` seconds QEMU keeps retrying.
    """
    id: str
    path: str
    kind: Literal["file", "nbd"] = "file"
    fmt: Literal["raw", "qcow2"] = "raw"
    export: str = ""
    reconnect_delay: int = 0
    readonly: bool = False
    cache: Literal["none", "writeback", "unsafe", "directsync"] = "writeback"
    bus: Literal["virtio-blk", "scsi", "nvme"] = "virtio-blk"


@dataclass(frozen=True)
class Nic:
    """A NIC of ``model`` (virtio-net-pci or e1000). backend "tap": an existing tap device
    ``ifname``; "user": SLIRP with restrict=on (no route outside); "none": a NIC with no backend
    traffic (for mobility tests)."""
    id: str
    mac: str
    backend: Literal["tap", "user", "none"] = "user"
    ifname: str = ""
    model: Literal["virtio-net-pci", "e1000"] = "virtio-net-pci"


@dataclass(frozen=True)
class SerialPort:
    """A virtio-serial port named ``name`` in the guest, exposed on the host as a unix socket."""
    id: str
    name: str
    socket: str


@dataclass(frozen=True)
class MachineSpec:
    name: str
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str
    console_log: str
    append: str = ""
    drives: tuple[Drive, ...] = ()
    nics: tuple[Nic, ...] = ()
    serial_ports: tuple[SerialPort, ...] = ()
    balloon: bool = True
    accel: Literal["tcg", "kvm"] = "tcg"
    machine_type: str = "q35"
    cpu_model: str = "qemu64"
    incoming: str | None = None           # e.g. "defer" for a migration destination
    qmp_fd: int | None = None             # fd number inherited by QEMU for the QMP monitor
    qmp_socket: str | None = None         # or: a unix socket path QEMU listens on for QMP (re-attachable)
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if not _ID.match(self.name):
            raise MachineSpecError(f"machine name {self.name!r}: use letters, digits, '-', '_' (max 32)")
        if self.memory_mib < 16:
            raise MachineSpecError(f"machine {self.name}: memory_mib must be >= 16, got {self.memory_mib}")
        if self.vcpus < 1:
            raise MachineSpecError(f"machine {self.name}: vcpus must be >= 1, got {self.vcpus}")
        for p, what in ((self.kernel, "kernel"), (self.initrd, "initrd")):
            if not Path(p).is_file():
                raise MachineSpecError(f"machine {self.name}: {what} {p!r} does not exist (run `make images`)")
        ids = [d.id for d in self.drives] + [n.id for n in self.nics] + [s.id for s in self.serial_ports]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise MachineSpecError(f"machine {self.name}: duplicate device ids {sorted(dup)}")
        for i in ids:
            if not _ID.match(i):
                raise MachineSpecError(f"machine {self.name}: bad device id {i!r}")
        paths = [self.kernel, self.initrd, self.console_log] + [d.path for d in self.drives] + \
            [s.socket for s in self.serial_ports] + ([self.qmp_socket] if self.qmp_socket else [])
        for p in paths:
            if "," in p:
                raise MachineSpecError(f"machine {self.name}: path {p!r} contains ',' which QEMU options cannot carry")
        for n in self.nics:
            if not re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", n.mac):
                raise MachineSpecError(f"machine {self.name}: NIC {n.id} has bad MAC {n.mac!r}")
            if n.backend == "tap" and not n.ifname:
                raise MachineSpecError(f"machine {self.name}: tap NIC {n.id} needs ifname")
        for d in self.drives:
            if d.kind == "nbd" and d.fmt != "raw":
                raise MachineSpecError(f"machine {self.name}: NBD drive {d.id} must be raw")
            if d.bus not in DISK_BUSES:
                raise MachineSpecError(f"machine {self.name}: drive {d.id} has bus {d.bus!r}; known: "
                                       f"{', '.join(DISK_BUSES)}")
        for n in self.nics:
            if n.model not in NIC_MODELS:
                raise MachineSpecError(f"machine {self.name}: NIC {n.id} has model {n.model!r}; known: "
                                       f"{', '.join(NIC_MODELS)}")
        if self.machine_type not in MACHINE_TYPES:
            raise MachineSpecError(f"machine {self.name}: machine type {self.machine_type!r}; known: "
                                   f"{', '.join(MACHINE_TYPES)}")
        if self.cpu_model not in CPU_MODELS:
            raise MachineSpecError(f"machine {self.name}: CPU model {self.cpu_model!r}; known: "
                                   f"{', '.join(CPU_MODELS)}")


def build_argv(spec: MachineSpec, qemu_binary: str = "qemu-system-x86_64") -> list[str]:
    """Return the full QEMU argv for ``spec``. Raises MachineSpecError on a bad spec."""
    spec.validate()
    append = " ".join(filter(None, [
        "console=ttyS0", "zswap.enabled=0", "panic=-1", "loglevel=4",
        f"hvsim.name={spec.name}", spec.append]))
    argv = [
        qemu_binary,
        "-name", f"{spec.name},debug-threads=on",
        "-machine", f"{spec.machine_type},accel={spec.accel}",
        "-cpu", "host" if spec.accel == "kvm" else spec.cpu_model,
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", spec.kernel, "-initrd", spec.initrd, "-append", append,
        "-chardev", f"file,id=console0,path={spec.console_log}",
        "-serial", "chardev:console0",
    ]
    if spec.qmp_fd is not None and spec.qmp_socket is not None:
        raise MachineSpecError(f"machine {spec.name}: QMP on an inherited fd or on a socket path, not both")
    if spec.qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp0,fd={spec.qmp_fd}", "-mon", "chardev=qmp0,mode=control"]
    elif spec.qmp_socket is not None:
        argv += ["-chardev", f"socket,id=qmp0,path={spec.qmp_socket},server=on,wait=off",
                 "-mon", "chardev=qmp0,mode=control"]
    for d in spec.drives:
        ro = ",read-only=on" if d.readonly else ""
        if d.kind == "file":
            direct = "on" if d.cache in ("none", "directsync") else "off"
            argv += ["-blockdev",
                     f"driver=file,node-name={d.id}-file,filename={d.path},cache.direct={direct}{ro}",
                     "-blockdev", f"driver={d.fmt},node-name={d.id},file={d.id}-file{ro}"]
        else:
            argv += ["-blockdev",
                     f"driver=nbd,node-name={d.id},server.type=unix,server.path={d.path},"
                     f"export={d.export},reconnect-delay={d.reconnect_delay}{ro}"]
        if d.bus == "virtio-blk":
            argv += ["-device", f"virtio-blk-pci,drive={d.id},id={d.id}-dev,serial={d.id}"]
        elif d.bus == "scsi":
            if not any(a.startswith("virtio-scsi-pci,id=scsi0") for a in argv):
                argv += ["-device", "virtio-scsi-pci,id=scsi0"]
            argv += ["-device", f"scsi-hd,drive={d.id},id={d.id}-dev,bus=scsi0.0,serial={d.id}"]
        else:
            argv += ["-device", f"nvme,drive={d.id},id={d.id}-dev,serial={d.id}"]
    for n in spec.nics:
        if n.backend == "tap":
            argv += ["-netdev", f"tap,id={n.id},ifname={n.ifname},script=no,downscript=no"]
        elif n.backend == "user":
            argv += ["-netdev", f"user,id={n.id},restrict=on"]
        else:
            argv += ["-netdev", f"hubport,id={n.id},hubid=0"]
        argv += ["-device", f"{n.model},netdev={n.id},mac={n.mac},id={n.id}-dev"]
    if spec.serial_ports:
        argv += ["-device", "virtio-serial-pci,id=vser0"]
        for s in spec.serial_ports:
            argv += ["-chardev", f"socket,id={s.id},path={s.socket},server=on,wait=off",
                     "-device", f"virtserialport,bus=vser0.0,chardev={s.id},name={s.name},id={s.id}-port"]
    if spec.balloon:
        argv += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=off"]
    if spec.incoming:
        argv += ["-incoming", spec.incoming]
    argv += list(spec.extra_args)
    return argv


def live_migration_blockers(src: MachineSpec, dst: MachineSpec) -> list[str]:
    """Why QEMU cannot live-migrate a guest from machine ``src`` to machine ``dst`` (empty: it can).

    QEMU's migration stream carries device state for the exact device tree of the source; the
    destination must be started with the same machine type, CPU model and devices on the same
    buses (docs/devel/migration.rst: "the destination must be started with the same command line").
    Each entry names one difference, e.g. ``"machine pc vs q35"``, ``"disk bus virtio-blk vs scsi"``."""
    out: list[str] = []
    if src.machine_type != dst.machine_type:
        out.append(f"machine {src.machine_type} vs {dst.machine_type}")
    if src.cpu_model != dst.cpu_model:
        out.append(f"cpu {src.cpu_model} vs {dst.cpu_model}")
    if len(src.drives) != len(dst.drives):
        out.append(f"{len(src.drives)} vs {len(dst.drives)} drives")
    for a, b in zip(src.drives, dst.drives):
        if a.bus != b.bus:
            out.append(f"disk bus {a.bus} vs {b.bus}" + ("" if len(src.drives) == 1 else f" ({a.id})"))
    if len(src.nics) != len(dst.nics):
        out.append(f"{len(src.nics)} vs {len(dst.nics)} NICs")
    for na, nb in zip(src.nics, dst.nics):
        if na.model != nb.model:
            out.append(f"nic model {na.model} vs {nb.model}" + ("" if len(src.nics) == 1 else f" ({na.id})"))
    if src.memory_mib != dst.memory_mib:
        out.append(f"memory {src.memory_mib} vs {dst.memory_mib} MiB")
    if src.vcpus != dst.vcpus:
        out.append(f"{src.vcpus} vs {dst.vcpus} vCPUs")
    return out
