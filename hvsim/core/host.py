"""Emulated hypervisor hosts: capacity accounting (with overcommit) and the VMs placed there."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CapacityError
from .model import HostSpec, VMSpec


@dataclass
class Host:
    spec: HostSpec
    netns: str | None = None                   # network namespace its QEMU processes run in
    allocations: dict[str, tuple[int, int]] = field(default_factory=dict)  # vm -> (vcpus, MiB)

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
