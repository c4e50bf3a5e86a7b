"""Emulated hypervisor hosts: capacity accounting (with overcommit) and the VMs placed there; and
the physical machine's own memory, which every guest of every emulated host really uses.

A host may have a *power domain* (:class:`~hvsim.core.power.PowerDomain`, a cgroup): then its QEMUs
start detached in it, with QMP on a socket path, so they outlive the process that manages them (a
host agent that restarts re-attaches to them) but never the host (powering the domain off kills
them all). Without one, QEMUs die with the process that started them (the embedded library mode).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmp_bridge import MachineSpec, QemuProcess

from .errors import CapacityError
from .model import HostSpec, VMSpec
from .power import PowerDomain

QMP_SOCKET = "qmp.sock"        # a detached QEMU's QMP socket, in its instance directory

QEMU_OVERHEAD_MIB = 64        # what one TCG QEMU takes beyond guest RAM (measured: 40-60 MiB)


@dataclass(frozen=True)
class HostNetwork:
    """Where an emulated host lives on the (emulated) network: the namespace its processes run in
    and its address there (what a migration destination listens on)."""
    netns: str
    address: str


def machine_memory_available_mib() -> int:
    """MemAvailable of the physical machine (MiB)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise CapacityError("cannot read MemAvailable from /proc/meminfo")


def check_machine_memory(vm: VMSpec) -> None:
    """CapacityError before any process starts if the physical machine cannot hold the guest."""
    need = vm.memory_mib + QEMU_OVERHEAD_MIB
    avail = machine_memory_available_mib()
    if need > avail:
        raise CapacityError(f"vm {vm.name!r} needs about {need} MiB of real memory ({vm.memory_mib} MiB guest + "
                            f"{QEMU_OVERHEAD_MIB} MiB QEMU) but the machine running hvsim has only {avail} MiB "
                            "available")


@dataclass
class Host:
    spec: HostSpec
    network: HostNetwork | None = None         # None: the hvsim process's own namespace, loopback
    allocations: dict[str, tuple[int, int]] = field(default_factory=dict)  # vm -> (vcpus, MiB)
    power: PowerDomain | None = None           # None: QEMUs die with us; else detached in this cgroup

    @property
    def detached(self) -> bool:
        """Whether this host's QEMUs outlive the process that starts them (they run in its power domain)."""
        return self.power is not None

    def qemu_process(self, spec: MachineSpec, run_dir: Path) -> QemuProcess:
        """A (not yet launched) QEMU for this host, files in ``run_dir``: in its namespace; embedded
        (dies with us) without a power domain, else detached in the domain with QMP on
        ``run_dir/qmp.sock`` (see :meth:`QemuProcess.reattach`)."""
        if self.power is None:
            return QemuProcess(spec, run_dir, netns=self.netns)
        return QemuProcess(spec, run_dir, netns=self.netns, qmp_socket=Path(run_dir) / QMP_SOCKET, detached=True,
                           cgroup=self.power.path)

    @property
    def netns(self) -> str | None:
        """Network namespace its QEMU and driver processes run in (None: ours)."""
        return self.network.netns if self.network else None

    @property
    def address(self) -> str:
        """Its address for incoming connections (migration streams): loopback without a network."""
        return self.network.address if self.network else "127.0.0.1"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def used_vcpus(self) -> int:
        return sum(v for v, _ in self.allocations.values())

    @property
    def used_memory_mib(self) -> int:
        return sum(m for _, m in self.allocations.values())

    @property
    def free_vcpus(self) -> int:
        return self.spec.vcpu_capacity - self.used_vcpus

    @property
    def free_memory_mib(self) -> int:
        return self.spec.memory_capacity_mib - self.used_memory_mib

    def check_fit(self, vm: VMSpec) -> None:
        """Raise CapacityError naming the short resource if ``vm`` does not fit here."""
        problems = []
        held_v, held_m = self.allocations.get(vm.name, (0, 0))
        if vm.memory_mib > self.free_memory_mib + held_m:
            problems.append(
                f"needs {vm.memory_mib} MiB memory but only {self.free_memory_mib + held_m} of "
                f"{self.spec.memory_capacity_mib} MiB is free (overcommit {self.spec.mem_overcommit:g})")
        if vm.vcpus > self.free_vcpus + held_v:
            problems.append(
                f"needs {vm.vcpus} vCPUs but only {self.free_vcpus + held_v} of {self.spec.vcpu_capacity} "
                f"are free (overcommit {self.spec.cpu_overcommit:g})")
        if problems:
            raise CapacityError(f"host {self.name!r} cannot take vm {vm.name!r}: " + "; ".join(problems))

    def reserve(self, vm: VMSpec) -> None:
        self.check_fit(vm)
        self.allocations[vm.name] = (vm.vcpus, vm.memory_mib)

    def release(self, vm_name: str) -> None:
        self.allocations.pop(vm_name, None)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "netns": self.netns, "address": self.address,
                "allocations": {k: list(v) for k, v in self.allocations.items()},
                "power_domain": str(self.power.path) if self.power else None}
