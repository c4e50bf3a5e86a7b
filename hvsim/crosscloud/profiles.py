"""Provider profiles: the machine a cloud gives every instance, and the check that refuses QEMU's
native live migration between profiles it cannot cross (before anything starts).

Two built-in profiles that QEMU cannot live-migrate between (its migration stream carries the state
of the source's exact device tree; the destination must be started with the same machine, CPU model
and devices on the same buses):

========  =======  ========  ==========  ===============
profile   machine  CPU       disk bus    NIC model
========  =======  ========  ==========  ===============
``A``     pc       qemu64    virtio-blk  virtio-net-pci
``B``     q35      Westmere  scsi        e1000
========  =======  ========  ==========  ===============
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qmp_bridge.machine import CPU_MODELS, DISK_BUSES, MACHINE_TYPES, NIC_MODELS

from ..core.model import MachineProfile, VMSpec, native_migration_blockers
from .errors import CrossCloudInputError, NativeMigrationRefusedError

# where each bus puts the first data disk in the guest (no udev in the initramfs: the kernel's names)
GUEST_DISK = {"virtio-blk": "/dev/vda", "scsi": "/dev/sda", "nvme": "/dev/nvme0n1"}


@dataclass(frozen=True)
class ProviderProfile:
    name: str
    machine: str
    cpu_model: str
    disk_bus: str
    nic_model: str

    def __post_init__(self) -> None:
        for fld, value, known in (("machine", self.machine, MACHINE_TYPES), ("cpu_model", self.cpu_model, CPU_MODELS),
                                  ("disk_bus", self.disk_bus, DISK_BUSES), ("nic_model", self.nic_model, NIC_MODELS)):
            if value not in known:
                raise CrossCloudInputError(f"profile {self.name!r}: {fld} {value!r} is not supported; known: "
                                           f"{', '.join(known)}")

    def apply(self, spec: VMSpec) -> VMSpec:
        """``spec`` as an instance of this profile: its machine, CPU, disk buses and NIC models."""
        return self.machine_profile().apply(spec)

    def machine_profile(self) -> MachineProfile:
        """The core's description of it: the profile of the cloud's hosts (the migration engine
        refuses a native live migration to a host whose profile differs)."""
        return MachineProfile(self.name, self.machine, self.cpu_model, self.disk_bus, self.nic_model)

    @property
    def guest_disk(self) -> str:
        return GUEST_DISK[self.disk_bus]

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


PROFILE_A = ProviderProfile("A", machine="pc", cpu_model="qemu64", disk_bus="virtio-blk", nic_model="virtio-net-pci")
PROFILE_B = ProviderProfile("B", machine="q35", cpu_model="Westmere", disk_bus="scsi", nic_model="e1000")


def native_blockers(src: VMSpec, dst: VMSpec) -> list[str]:
    """What keeps QEMU from live-migrating an instance of ``src`` into one of ``dst`` (empty: nothing)."""
    return native_migration_blockers(src, dst)


def check_native_migration(src: VMSpec, dst: VMSpec) -> None:
    """Raise NativeMigrationRefusedError naming every difference, e.g.
    ``machine pc vs q35, cpu qemu64 vs Westmere, disk bus virtio-blk vs scsi``."""
    blockers = native_blockers(src, dst)
    if blockers:
        raise NativeMigrationRefusedError(
            f"native live migration of vm {src.name!r} refused before anything started: QEMU cannot migrate "
            f"between these machines ({', '.join(blockers)}); use the agent-based cross-cloud migration", blockers)
