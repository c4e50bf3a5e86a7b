"""The conformance, hostile-input, receive-path and export suites again, with the in-process shim on uvloop.

The shim process runs on uvloop by default (``HVSIM_SHIM_LOOP=auto``); the suites next door run it
on asyncio's own loop (the fallback). The test functions are the same objects, imported here."""
from __future__ import annotations

import asyncio

import uvloop

from ..test_cache import *  # noqa: F403
from ..test_conformance import *  # noqa: F403
from ..test_hostile import *  # noqa: F403
from ..test_recv_path import *  # noqa: F403


async def test_this_directory_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
