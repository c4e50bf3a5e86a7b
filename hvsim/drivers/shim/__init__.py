"""The swap-prefetch shim: an NBD server process backing a guest's swap disk (a user-level block
driver, ``python -m hvsim.drivers.shim serve``), and its VM component in
:mod:`hvsim.drivers.shim.component` (``ShimDriver``, ``ShimOptions``, ``ShimComponent``).

Nothing is imported here, so the shim process itself starts without loading hvsim's core."""
