"""hvsim: an emulated hypervisor layer and lab testbed driving real QEMU guests over QMP."""
