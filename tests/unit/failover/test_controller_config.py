"""The controller's configuration survives the trip through its file (another process reads it),
and its state machine refuses what it must (no takeover while failing back)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvbase.errors import StateError
from hvbase.fsm import StateMachine
from hvsim.failover.controller import TABLE, ControllerConfig, ControllerState, HomeHost, SlotSpec
from hvsim.failover.hosted import ControlSpec
from hvsim.failover.sites import Sites


def test_config_round_trip(tmp_path: Path) -> None:
    s = Sites({"dc1": ["m"], "dc2": ["h"]}, slots={"dc2": ["r1", "r2"]})
    spec = ControlSpec(store_url="etcds://198.18.0.9:2379", store_tls=("ca", "c", "k"), ca_dir="/x", token_file="/t",
                       agent_networks="198.18.0.0/24", lease_ttl=2.0, datastore="/d", images=None)
    cfg = ControllerConfig(spec=spec, base_dir="/b", socket="/s", status_file="/f",
                           slots=[SlotSpec(s.slot(n), 4, 1024) for n in ("r1", "r2")],
                           homes=[HomeHost("m", "dc1", s.ns("m"), s.ip("m"), "/sys/fs/cgroup/hvsim/1.2.m")],
                           power_off_on_exit=True)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg.to_json()))
    back = ControllerConfig.load(p)
    assert back.spec == spec and back.slots == cfg.slots and back.homes == cfg.homes
    assert [sl.slot.slot for sl in back.slots] == [True, True] and back.slots[0].slot.ip != back.slots[1].slot.ip
    assert back.power_off_on_exit


def test_no_takeover_while_failing_back() -> None:
    fsm = StateMachine("ctl", ControllerState.NEW, TABLE)
    fsm.set(ControllerState.WATCHING)
    fsm.set(ControllerState.FAILING_BACK)
    with pytest.raises(StateError):
        fsm.set(ControllerState.TAKING_OVER)
