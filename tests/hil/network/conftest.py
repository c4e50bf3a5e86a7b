from __future__ import annotations

import os
import shutil

import pytest

from hvsim.network.underlay import Underlay


@pytest.fixture(autouse=True)
async def _network_prereqs() -> None:
    # CI runs as root; fail loudly rather than skip (hil tests are never skipped)
    assert os.geteuid() == 0, "hvsim.network HIL tests need root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        assert shutil.which(tool), f"{tool} missing: install iproute2"
    # leftovers of killed earlier runs (dead owner pid only)
    await Underlay.cleanup_stale("hvs-")
