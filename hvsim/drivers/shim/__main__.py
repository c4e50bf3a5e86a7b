"""``python -m hvsim.drivers.shim serve ...``: the shim process itself (what ShimProcess runs).

The option parser lives here, in the driver, so ``hvsim shim serve`` and the process launched by
:class:`~hvsim.drivers.shim.process.ShimProcess` accept exactly the same options."""
import sys

from .entry import run_cli

sys.exit(run_cli(sys.argv[1:]))
