"""nftables rule text for tenant ports, and parsing the table back (pure logic)."""
from __future__ import annotations

import json

from hvsim.network import nft
from hvsim.network.eni import SecurityRule
from hvsim.network.tenant import bridge_mac


def test_port_chains_drop_forged_sources_and_count_them() -> None:
    lines = nft.port_rules("hvp1", "52:54:00:00:00:01", ["10.0.0.1", "10.0.0.2"], [], blocked=False)
    body = "\n".join(lines)
    assert 'in_hvp1 ether saddr != 52:54:00:00:00:01 counter name "hvp1_spoof" drop' in body
    assert 'arp saddr ip != { 10.0.0.1, 10.0.0.2 } counter name "hvp1_spoof" drop' in body
    assert 'ip saddr != { 10.0.0.1, 10.0.0.2 } counter name "hvp1_spoof" drop' in body
    assert lines[-1].endswith('in_hvp1 counter name "hvp1_other" drop')    # IPv6, VLAN tags, ...
    assert "blk_" not in body and "out_hvp1" not in body                      # no rules: all ingress allowed


def test_blocked_port_drops_first_in_both_directions() -> None:
    lines = nft.port_rules("hvp1", "52:54:00:00:00:01", ["10.0.0.1"], [], blocked=True)
    ins = [ln for ln in lines if " in_hvp1 " in ln]
    outs = [ln for ln in lines if " out_hvp1 " in ln]
    assert ins[0].endswith('counter name "hvp1_blk_in" drop')
    assert outs == ['add rule bridge hvsim out_hvp1 counter name "hvp1_blk_out" drop']


def test_security_rules_become_an_allow_list() -> None:
    rules = [SecurityRule("udp", (7777, 7777)), SecurityRule("tcp", (20, 30), "10.0.0.0/8"), SecurityRule("icmp")]
    outs = [ln.split("out_hvp1 ", 1)[1] for ln in nft.port_rules("hvp1", "52:54:00:00:00:01", ["10.0.0.1"],
                                                                 rules, blocked=False) if " out_hvp1 " in ln]
    assert outs == ["meta l4proto udp th dport 7777 accept",
                    "ip saddr 10.0.0.0/8 meta l4proto tcp th dport 20-30 accept",
                    "meta l4proto icmp accept",
                    'ether type ip counter name "hvp1_denied" drop']


def test_add_set_remove_batches() -> None:
    add = nft.add_port("hvp1", "52:54:00:00:00:01", ["10.0.0.1"], [], blocked=True)
    assert all(f"add counter bridge hvsim hvp1_{k}" in add for k in nft.COUNTERS)
    assert add.rstrip().splitlines()[-2:] == ['add element bridge hvsim port_in { "hvp1" : jump in_hvp1 }',
                                              'add element bridge hvsim port_out { "hvp1" : jump out_hvp1 }']
    s = nft.set_port("hvp1", "52:54:00:00:00:01", ["10.0.0.1"], [], blocked=False)
    assert s.startswith("flush chain bridge hvsim in_hvp1\nflush chain bridge hvsim out_hvp1\n")
    rm = nft.remove_port("hvp1")
    assert rm.index("delete element") < rm.index("delete chain") < rm.index("delete counter")


def test_parse_table() -> None:
    text = json.dumps({"nftables": [
        {"metainfo": {}}, {"table": {"name": "hvsim"}},
        {"counter": {"name": "hvp1_spoof", "packets": 7, "bytes": 420}},
        {"counter": {"name": "hvp1_blk_in", "packets": 2, "bytes": 100}},
        {"map": {"name": "port_in", "elem": [["hvp1", {"jump": {"target": "in_hvp1"}}]]}},
        {"map": {"name": "port_out"}},
        {"chain": {"name": "prerouting"}}, {"chain": {"name": "in_hvp1"}}]})
    view = nft.parse_table(text)
    assert view.ports == {"hvp1"} and "in_hvp1" in view.chains
    assert view.port_counters("hvp1") == nft.PortCounters(blk_in=2, spoof=7)
    assert not view.is_empty
    assert nft.parse_table(json.dumps({"nftables": [{"chain": {"name": "prerouting"}}]})).is_empty


def test_bridge_mac_is_local_unicast_and_distinct() -> None:
    macs = {bridge_mac(f"198.18.0.{h}", vni) for h in (1, 2) for vni in (100, 200)}
    assert len(macs) == 4
    for m in macs:
        first = int(m[:2], 16)
        assert first & 0x02 and not first & 0x01
