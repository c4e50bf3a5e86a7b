"""Validated, serialisable specs: cloud, datacenter, host, VM, disk, NIC."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from qmp_bridge.machine import (CPU_MODELS, DISK_BUSES, MACHINE_TYPES, NIC_MODELS, Drive, MachineSpec, Nic,
                                live_migration_blockers)

from .errors import SpecError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{kind} name {name!r} is invalid: use 1-32 lowercase letters, digits and '-', "
                        "starting with a letter and not ending with '-'")
    return name


def _positive(kind: str, name: str, fld: str, value: object, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise SpecError(f"{kind} {name!r}: {fld} must be a number >= {minimum:g}, got {value!r}")


def _choice(kind: str, name: str, fld: str, value: object, known: tuple[str, ...]) -> None:
    if value not in known:
        raise SpecError(f"{kind} {name!r}: {fld} {value!r} is not supported; known: {', '.join(known)}")


def check_unique(kind: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SpecError(f"duplicate {kind} name {n!r}")
        seen.add(n)


class _Spec:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class CloudSpec(_Spec):
    name: str
    provider: str = "hvsim"

    def __post_init__(self) -> None:
        check_name("cloud", self.name)


@dataclass(frozen=True)
class DatacenterSpec(_Spec):
    name: str
    cloud: str = "default"

    def __post_init__(self) -> None:
        check_name("datacenter", self.name)
        check_name("cloud", self.cloud)


@dataclass(frozen=True)
class MachineProfile(_Spec):
    """The machine a host's hypervisor gives every guest (a provider's instance profile): machine
    type, CPU model, disk bus and NIC model. A host without one runs any VM spec as given."""
    name: str
    machine: str
    cpu_model: str
    disk_bus: str
    nic_model: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"machine profile name must be a non-empty string, got {self.name!r}")
        _choice("machine profile", self.name, "machine", self.machine, MACHINE_TYPES)
        _choice("machine profile", self.name, "cpu_model", self.cpu_model, CPU_MODELS)
        _choice("machine profile", self.name, "disk_bus", self.disk_bus, DISK_BUSES)
        _choice("machine profile", self.name, "nic_model", self.nic_model, NIC_MODELS)

    def apply(self, spec: VMSpec) -> VMSpec:
        """``spec`` as an instance of this profile: its machine, CPU, disk buses and NIC models."""
        return dataclasses.replace(
            spec, machine=self.machine, cpu_model=self.cpu_model,
            disks=tuple(dataclasses.replace(d, bus=self.disk_bus) for d in spec.disks),
            nics=tuple(dataclasses.replace(n, model=self.nic_model) for n in spec.nics))


@dataclass(frozen=True)
class HostSpec(_Spec):
    """A hypervisor host. Capacity = physical x overcommit ratio. ``profile``: the machine its
    hypervisor gives every guest (None: any spec as given)."""
    name: str
    vcpus: int = 4
    memory_mib: int = 2048
    cpu_overcommit: float = 4.0
    mem_overcommit: float = 1.0
    datacenter: str = "dc1"
    labels: dict[str, str] = field(default_factory=dict)
    profile: MachineProfile | None = None

    def __post_init__(self) -> None:
        check_name("host", self.name)
        if isinstance(self.profile, dict):
            object.__setattr__(self, "profile", MachineProfile.from_dict(self.profile))
        if self.profile is not None and not isinstance(self.profile, MachineProfile):
            raise SpecError(f"host {self.name!r}: profile must be a MachineProfile, got {self.profile!r}")
        check_name("datacenter", self.datacenter)
        _positive("host", self.name, "vcpus", self.vcpus)
        _positive("host", self.name, "memory_mib", self.memory_mib, 64)
        _positive("host", self.name, "cpu_overcommit", self.cpu_overcommit, 0.1)
        _positive("host", self.name, "mem_overcommit", self.mem_overcommit, 0.1)

    @property
    def vcpu_capacity(self) -> int:
        return int(self.vcpus * self.cpu_overcommit)

    @property
    def memory_capacity_mib(self) -> int:
        return int(self.memory_mib * self.mem_overcommit)


@dataclass(frozen=True)
class DiskSpec(_Spec):
    """A disk on ``bus`` ("virtio-blk", "scsi" or "nvme"). kind "file": a raw/qcow2 image created in
    the VM's run dir (or an existing image at ``path``); any other kind is served by a component
    that the cluster's driver for that kind creates, e.g. "shim" (hvsim's NBD swap shim) or "nbdkit"."""
    name: str
    size_mib: int = 64
    kind: str = "file"
    format: Literal["raw", "qcow2"] = "raw"
    path: str = ""
    bus: str = "virtio-blk"

    def __post_init__(self) -> None:
        check_name("disk", self.name)
        _choice("disk", self.name, "bus", self.bus, DISK_BUSES)
        _positive("disk", self.name, "size_mib", self.size_mib)
        if not isinstance(self.kind, str) or not NAME_RE.match(self.kind):
            raise SpecError(f"disk {self.name!r}: kind must be 'file' or the name of a driver (e.g. 'shim'), "
                            f"got {self.kind!r}")
        if self.format not in ("raw", "qcow2"):
            raise SpecError(f"disk {self.name!r}: format must be 'raw' or 'qcow2', got {self.format!r}")


@dataclass(frozen=True)
class NicSpec(_Spec):
    """A NIC of ``model`` (virtio-net-pci or e1000); ``mac`` is derived from the VM and NIC names when empty."""
    name: str
    network: str = "default"
    mac: str = ""
    ip: str = ""   # guest address with prefix, e.g. "10.77.0.5/24", set by guest init
    model: str = "virtio-net-pci"

    def __post_init__(self) -> None:
        check_name("nic", self.name)
        _choice("nic", self.name, "model", self.model, NIC_MODELS)
        if self.mac and not re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", self.mac):
            raise SpecError(f"nic {self.name!r}: bad MAC {self.mac!r} (want lowercase aa:bb:cc:dd:ee:ff)")


def derive_mac(vm: str, nic: str) -> str:
    h = hashlib.sha256(f"{vm}/{nic}".encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


@dataclass(frozen=True)
class VMSpec(_Spec):
    name: str
    vcpus: int = 1
    memory_mib: int = 256
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    balloon: bool = True
    kernel_args: str = ""
    qemu_args: tuple[str, ...] = ()   # appended to QEMU's argv as given (libvirt's <qemu:commandline>)
    machine: str = "q35"              # QEMU machine type: "q35" or "pc" (i440FX)
    cpu_model: str = "qemu64"         # under TCG; KVM guests get -cpu host

    def __post_init__(self) -> None:
        check_name("vm", self.name)
        _choice("vm", self.name, "machine", self.machine, MACHINE_TYPES)
        _choice("vm", self.name, "cpu_model", self.cpu_model, CPU_MODELS)
        _positive("vm", self.name, "vcpus", self.vcpus)
        _positive("vm", self.name, "memory_mib", self.memory_mib, 64)
        object.__setattr__(self, "disks", tuple(
            d if isinstance(d, DiskSpec) else DiskSpec.from_dict(d) for d in self.disks))
        if isinstance(self.qemu_args, str) or not all(isinstance(a, str) for a in self.qemu_args):
            raise SpecError(f"vm {self.name!r}: qemu_args must be a sequence of strings, got {self.qemu_args!r}")
        object.__setattr__(self, "qemu_args", tuple(self.qemu_args))
        object.__setattr__(self, "nics", tuple(
            n if isinstance(n, NicSpec) else NicSpec.from_dict(n) for n in self.nics))
        check_unique(f"disk (in vm {self.name!r})", [d.name for d in self.disks])
        check_unique(f"nic (in vm {self.name!r})", [n.name for n in self.nics])


def _machine_of(spec: VMSpec) -> MachineSpec:
    return MachineSpec(name=spec.name, memory_mib=spec.memory_mib, vcpus=spec.vcpus, kernel="", initrd="",
                       console_log="", machine_type=spec.machine, cpu_model=spec.cpu_model,
                       drives=tuple(Drive(f"disk-{d.name}", "", bus=d.bus) for d in spec.disks),  # type: ignore[arg-type]
                       nics=tuple(Nic(f"nic-{n.name}", "52:54:00:00:00:00", model=n.model)  # type: ignore[arg-type]
                                  for n in spec.nics))


def native_migration_blockers(src: VMSpec, dst: VMSpec) -> list[str]:
    """What keeps QEMU from live-migrating a guest of spec ``src`` into one of spec ``dst`` (its
    stream needs the same machine, CPU and device tree), e.g. ``["machine pc vs q35", "disk bus
    virtio-blk vs scsi"]``; empty: nothing."""
    return live_migration_blockers(_machine_of(src), _machine_of(dst))
