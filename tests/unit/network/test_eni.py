"""ENI and tenant-network definitions, validation and the binding state machine (pure logic)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvbase.errors import HvsimError, InputError, StateError
from hvsim.network.eni import (BINDING_TRANSITIONS, Binding, BindingState, Eni, EniSpec, NetworkSpec, PortKind,
                               PortSpec, SecurityRule, guest_nic_arg, parse_mac, validate_eni)
from hvsim.network.errors import (AddressConflictError, BindingStateError, NetworkError, TenantInputError,
                                  UnknownNetworkError)

BLUE = NetworkSpec("blue", 100, "10.77.0.0/24", gateway="10.77.0.254")
RED = NetworkSpec("red", 200, "10.77.0.0/24")          # same CIDR: networks are isolated
NETS = {"blue": BLUE, "red": RED}


def eni(i: int = 1, net: str = "blue", mac: str | None = None, ips: tuple[str, ...] | None = None) -> EniSpec:
    return EniSpec(f"eni-{i}", net, mac or f"52:54:00:00:00:{i:02x}", ips or (f"10.77.0.{i}",))


# ---- errors are rooted where the project says --------------------------------------------------------
def test_error_tree() -> None:
    assert issubclass(TenantInputError, InputError) and issubclass(TenantInputError, NetworkError)
    assert issubclass(NetworkError, HvsimError)
    assert issubclass(BindingStateError, StateError)
    assert issubclass(UnknownNetworkError, TenantInputError) and issubclass(AddressConflictError, TenantInputError)


# ---- MAC ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, why", [
    ("52:54:00:00:00", "malformed"), ("52:54:00:00:00:zz", "malformed"), ("5254.0000.0001", "malformed"),
    ("01:00:5e:00:00:01", "multicast"), ("ff:ff:ff:ff:ff:ff", "multicast"), ("00:00:00:00:00:00", "all-zero"),
    (52540000, "string"), ("", "malformed"),
])
def test_bad_macs_are_refused_with_the_reason(bad: object, why: str) -> None:
    with pytest.raises(TenantInputError, match=why):
        parse_mac(bad)


def test_mac_is_normalised() -> None:
    assert parse_mac("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"
    assert eni(mac="52:54:00:AA:00:01").mac == "52:54:00:aa:00:01"


@given(st.binary(min_size=6, max_size=6))
def test_any_unicast_nonzero_mac_parses_and_round_trips(raw: bytes) -> None:
    text = ":".join(f"{b:02x}" for b in raw)
    if raw[0] & 1 or raw == bytes(6):
        with pytest.raises(TenantInputError):
            parse_mac(text)
    else:
        assert parse_mac(text.upper()) == text


# ---- networks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    ({"vni": 0}, "vni"), ({"vni": 2 ** 24}, "vni"), ({"vni": True}, "vni"),
    ({"cidr": "10.77.0.1/24"}, "not an IPv4 network"), ({"cidr": "8.8.8.0/24"}, "private"),
    ({"cidr": "127.0.0.0/8"}, "private"), ({"cidr": "10.0.0.0/31"}, "too small"),
    ({"cidr": "fd00::/64"}, "not an IPv4 network"),
    ({"gateway": "10.78.0.1"}, "not a host address"), ({"gateway": "10.77.0.0"}, "not a host address"),
    ({"mtu": 1500}, "mtu"), ({"mtu": 100}, "mtu"),
    ({"name": "Blue"}, "name"),
])
def test_bad_networks_are_refused(kw: dict[str, object], msg: str) -> None:
    args: dict[str, object] = {"name": "blue", "vni": 100, "cidr": "10.77.0.0/24"} | kw
    with pytest.raises(TenantInputError, match=msg):
        NetworkSpec(**args)  # type: ignore[arg-type]


def test_network_devices_and_round_trip() -> None:
    assert (BLUE.bridge, BLUE.vxlan, BLUE.mtu, BLUE.prefixlen) == ("hvb100", "hvx100", 1450, 24)
    assert NetworkSpec.from_dict(BLUE.to_dict()) == BLUE
    with pytest.raises(TenantInputError, match="unknown field"):
        NetworkSpec.from_dict({**BLUE.to_dict(), "vlan": 3})


# ---- ENI validation -------------------------------------------------------------------------------------------
def test_valid_eni_passes_and_returns_its_network() -> None:
    assert validate_eni(eni(1), NETS, []) is BLUE


def test_unknown_network_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(UnknownNetworkError, match=r"'green'.*blue, red"):
        validate_eni(eni(1, net="green"), NETS, [])


@pytest.mark.parametrize("ip, msg", [
    ("10.78.0.1", "outside network 'blue'"), ("10.77.0.0", "network or broadcast"),
    ("10.77.0.255", "network or broadcast"), ("10.77.0.254", "gateway"),
])
def test_ip_outside_or_reserved_is_refused(ip: str, msg: str) -> None:
    with pytest.raises(TenantInputError, match=msg):
        validate_eni(eni(1, ips=(ip,)), NETS, [])


def test_duplicate_mac_ip_and_id_are_refused_in_the_same_network() -> None:
    existing = [eni(1)]
    with pytest.raises(AddressConflictError, match="MAC 52:54:00:00:00:01 is already used by ENI 'eni-1'"):
        validate_eni(EniSpec("eni-9", "blue", "52:54:00:00:00:01", ("10.77.0.9",)), NETS, existing)
    with pytest.raises(AddressConflictError, match="IP 10.77.0.1 already used by ENI 'eni-1'"):
        validate_eni(EniSpec("eni-9", "blue", "52:54:00:00:00:09", ("10.77.0.9", "10.77.0.1")), NETS, existing)
    with pytest.raises(AddressConflictError, match="already defined"):
        validate_eni(EniSpec("eni-1", "red", "52:54:00:00:00:09", ("10.77.0.9",)), NETS, existing)


def test_same_mac_and_ip_in_another_network_is_allowed() -> None:
    validate_eni(EniSpec("eni-r1", "red", "52:54:00:00:00:01", ("10.77.0.1",)), NETS, [eni(1)])


@pytest.mark.parametrize("kw, msg", [
    ({"id": "ENI_1"}, "ENI id"), ({"ips": ()}, "at least one IP"), ({"ips": ("10.77.0.1", "10.77.0.1")}, "twice"),
    ({"ips": ("10.77.0.300",)}, "not an IPv4"), ({"ips": "10.77.0.1"}, "list"), ({"mac": "nope"}, "malformed"),
])
def test_malformed_eni_fields_are_refused(kw: dict[str, object], msg: str) -> None:
    args: dict[str, object] = {"id": "eni-1", "network": "blue", "mac": "52:54:00:00:00:01",
                               "ips": ("10.77.0.1",)} | kw
    with pytest.raises(TenantInputError, match=msg):
        EniSpec(**args)  # type: ignore[arg-type]


def test_security_rules_are_validated() -> None:
    assert SecurityRule("tcp", (22, 22), "10.0.0.0/8").to_dict() == {"proto": "tcp", "ports": [22, 22],
                                                                     "source": "10.0.0.0/8"}
    for kw, msg in [({"proto": "sctp"}, "proto"), ({"proto": "icmp", "ports": (1, 2)}, "only apply"),
                    ({"proto": "udp", "ports": (10, 5)}, "first <= last"), ({"source": "10.0.0.1/8"}, "not an IPv4")]:
        with pytest.raises(TenantInputError, match=msg):
            SecurityRule(**kw)  # type: ignore[arg-type]


def test_eni_round_trip_and_port_names() -> None:
    spec = EniSpec("eni-1", "blue", "52:54:00:00:00:01", ("10.77.0.1", "10.77.0.2"),
                   rules=(SecurityRule("udp", (7777, 7777)),))
    assert EniSpec.from_dict(spec.to_dict()) == spec
    assert spec.port_name.startswith("hvp") and len(spec.port_name) <= 15
    assert spec.port_name == EniSpec.from_dict(spec.to_dict()).port_name        # same on every host
    assert spec.peer_name("a") != spec.peer_name("b") and len(spec.peer_name("a")) <= 15


def test_guest_kernel_argument() -> None:
    assert guest_nic_arg(eni(5), BLUE) == "hvsim.nic=52:54:00:00:00:05,10.77.0.5/24,gw=10.77.0.254,mtu=1450"
    assert guest_nic_arg(eni(5, net="red"), RED) == "hvsim.nic=52:54:00:00:00:05,10.77.0.5/24,mtu=1450"


def test_port_spec_validation() -> None:
    assert PortSpec.veth("hvs-123-e-x").kind is PortKind.VETH
    with pytest.raises(TenantInputError, match="hvs-"):
        PortSpec.veth("default")
    with pytest.raises(TenantInputError, match="only applies to veth"):
        PortSpec(PortKind.TAP, "hvs-x")


# ---- binding state machine ---------------------------------------------------------------------------------------
def test_binding_happy_path_and_illegal_changes() -> None:
    b = Binding("eni-1", "vm", "a", PortSpec.tap(), "hvp0")
    assert b.state is BindingState.DETACHED
    with pytest.raises(BindingStateError, match="detached -> active"):
        b.activated()
    b.staged()
    b.activated()
    with pytest.raises(BindingStateError):
        b.staged()
    b.releasing()
    b.detached()
    assert [t.new for t in b.fsm.history] == [BindingState.STAGED, BindingState.ACTIVE, BindingState.RELEASING,
                                              BindingState.DETACHED]


def test_binding_table_is_the_documented_one() -> None:
    B = BindingState
    assert BINDING_TRANSITIONS == {B.DETACHED: {B.STAGED}, B.STAGED: {B.ACTIVE, B.RELEASING},
                                   B.ACTIVE: {B.RELEASING}, B.RELEASING: {B.DETACHED, B.ACTIVE}}


def test_eni_allows_one_staged_binding_and_one_vm() -> None:
    e = Eni(eni(1), BLUE)
    a = e.new_binding("vm1", "a", PortSpec.tap())
    a.staged()
    a.activated()
    assert e.active is a and e.vm == "vm1"
    with pytest.raises(BindingStateError, match="bound to vm 'vm1'"):
        e.new_binding("vm2", "b", PortSpec.tap())
    with pytest.raises(BindingStateError, match="already has a active binding on host 'a'"):
        e.new_binding("vm1", "a", PortSpec.tap())
    b = e.new_binding("vm1", "b", PortSpec.tap())
    b.staged()
    with pytest.raises(BindingStateError, match="staged binding on host 'b'"):
        e.new_binding("vm1", "c", PortSpec.tap())
    with pytest.raises(BindingStateError, match="forget"):
        e.forget(b)
    b.releasing()
    b.detached()
    e.forget(b)
    assert e.bindings == [a]
