"""User-level drivers: processes that back a VM's devices, each a core component."""
