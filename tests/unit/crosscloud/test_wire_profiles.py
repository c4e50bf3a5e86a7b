"""The agents' wire format as the destination checks it (lengths, offsets, types, checksum bound to
seq and offset), the provider profiles and their compatibility check, the ack log."""
from __future__ import annotations

import dataclasses

import pytest

from hvsim.core.model import DiskSpec, NicSpec, VMSpec
from hvsim.crosscloud import wire
from hvsim.crosscloud.app import AckLog
from hvsim.crosscloud.errors import CrossCloudInputError, NativeMigrationRefusedError
from hvsim.crosscloud.guestproc import fields
from hvsim.crosscloud.profiles import PROFILE_A, PROFILE_B, ProviderProfile, check_native_migration, native_blockers

DISK = 64 << 20


def hdr(m: wire.Message, **change: int) -> wire.Header:
    h = wire.parse_header(m.encode()[:wire.HEADER.size])
    return dataclasses.replace(h, **change)


def test_a_good_block_passes() -> None:
    m = wire.data(7, 8192, b"x" * 4096)
    raw = m.encode()
    h = wire.parse_header(raw[:wire.HEADER.size])
    wire.validate(h, DISK)
    assert wire.verify_payload(h, raw[wire.HEADER.size:])


def test_a_corrupted_block_is_refused() -> None:
    raw = bytearray(wire.data(7, 8192, b"x" * 4096).encode())
    raw[wire.HEADER.size + 100] ^= 0x01
    h = wire.parse_header(bytes(raw[:wire.HEADER.size]))
    wire.validate(h, DISK)                      # the header is fine ...
    assert not wire.verify_payload(h, bytes(raw[wire.HEADER.size:]))   # ... the payload is not


def test_a_block_replayed_at_another_offset_or_seq_fails_the_check() -> None:
    m = wire.data(7, 8192, b"y" * 4096)
    payload = m.encode()[wire.HEADER.size:]
    assert not wire.verify_payload(hdr(m, offset=12288), payload)
    assert not wire.verify_payload(hdr(m, seq=8), payload)
    assert not wire.verify_payload(hdr(m), payload[:-1])     # short


@pytest.mark.parametrize(("change", "why"), [
    ({"magic": 0x41414141}, "bad magic"),
    ({"version": 2}, "unsupported version"),
    ({"flags": 1}, "nonzero"),
    ({"reserved": 3}, "nonzero"),
    ({"length": wire.MAX_PAYLOAD + 4096}, "over 1 MiB"),      # oversized
    ({"type": 42}, "unknown message type"),
    ({"offset": 100}, "not block aligned"),
    ({"length": 4095}, "not block aligned"),
    ({"length": 0}, "not block aligned"),
    ({"offset": DISK}, "beyond"),                              # out of range
    ({"offset": DISK - 4096, "length": 8192}, "beyond"),       # straddles the end
    ({"offset": 2**64 - 4096}, "beyond"),                      # would overflow offset+length
])
def test_malformed_data_headers_are_refused(change: dict[str, int], why: str) -> None:
    with pytest.raises(wire.WireError, match=why):
        wire.validate(hdr(wire.data(1, 0, b"z" * 4096), **change), DISK)


@pytest.mark.parametrize(("msg", "change"), [
    (wire.zero(1, 0, 4096), {"length": 16}),
    (wire.round_end(1, 1), {"length": 8}),
    (wire.Message(wire.MsgType.PING), {"length": 4}),
    (wire.hello(DISK, b"s" * 16), {"length": 16}),
    (wire.Message(wire.MsgType.ACK), {}),               # never sent to the destination
])
def test_other_types_have_fixed_lengths(msg: wire.Message, change: dict[str, int]) -> None:
    with pytest.raises(wire.WireError):
        wire.validate(hdr(msg, **change), DISK)


@pytest.mark.parametrize(("off", "n"), [(0, 0), (0, 100), (100, 4096), (DISK, 4096), (0, DISK + 4096),
                                        (0, wire.MAX_ZERO + 4096)])
def test_bad_zero_extents_are_refused(off: int, n: int) -> None:
    with pytest.raises(wire.WireError):
        wire.validate_zero(off, n, max(DISK, wire.MAX_ZERO * 2) if n > wire.MAX_ZERO else DISK)


def test_header_of_the_wrong_size() -> None:
    with pytest.raises(wire.WireError, match="40 bytes"):
        wire.parse_header(b"\0" * 39)


def spec() -> VMSpec:
    return VMSpec("app1", disks=(DiskSpec("data", size_mib=64),), nics=(NicSpec("wan0", network="wan"),))


def test_the_two_profiles_are_refused_native_migration_with_every_reason() -> None:
    a, b = PROFILE_A.apply(spec()), PROFILE_B.apply(spec())
    assert (a.machine, a.disks[0].bus, a.nics[0].model) == ("pc", "virtio-blk", "virtio-net-pci")
    assert (b.machine, b.disks[0].bus, b.nics[0].model) == ("q35", "scsi", "e1000")
    with pytest.raises(NativeMigrationRefusedError) as ei:
        check_native_migration(a, b)
    assert ei.value.blockers == ["machine pc vs q35", "cpu qemu64 vs Westmere", "disk bus virtio-blk vs scsi",
                                 "nic model virtio-net-pci vs e1000"]
    assert "machine pc vs q35" in str(ei.value) and "disk bus virtio-blk vs scsi" in str(ei.value)


def test_one_profile_to_itself_has_no_blocker() -> None:
    assert native_blockers(PROFILE_B.apply(spec()), PROFILE_B.apply(spec())) == []
    check_native_migration(PROFILE_A.apply(spec()), PROFILE_A.apply(spec()))


@pytest.mark.parametrize("fld", ["machine", "cpu_model", "disk_bus", "nic_model"])
def test_a_profile_with_an_unknown_part_is_refused(fld: str) -> None:
    kw = PROFILE_A.to_dict() | {fld: "bogus"}
    with pytest.raises(CrossCloudInputError, match=f"{fld} 'bogus'"):
        ProviderProfile(**kw)


def test_ack_log_flags_a_record_acknowledged_twice_with_different_content() -> None:
    acks = AckLog()
    acks.add("cloud-a/app1", 1, "aa", 1.0)
    acks.add("cloud-a/app1", 2, "bb", 2.0)
    acks.add("cloud-b/app1", 3, "cc", 5.0)
    assert acks.count == 3 and acks.last_seq == 3 and not acks.conflicts
    assert acks.last["cloud-a/app1"] == 2.0 and acks.first["cloud-b/app1"] == 5.0
    acks.add("cloud-b/app1", 2, "zz", 6.0)
    assert acks.conflicts and "record 2" in acks.conflicts[0]


def test_agent_line_fields() -> None:
    assert fields('LINK down reason="connection reset by peer" acked=5 next=9') == {
        "reason": "connection reset by peer", "acked": "5", "next": "9"}
    assert fields("ROUND 3 done bytes=4096 secs=0.1") == {"bytes": "4096", "secs": "0.1"}


def test_host_machine_profiles_and_the_engines_compatibility_check() -> None:
    from hvsim.core.errors import SpecError
    from hvsim.core.model import DiskSpec, HostSpec, MachineProfile, NicSpec, VMSpec, native_migration_blockers

    a, b = PROFILE_A.machine_profile(), PROFILE_B.machine_profile()
    h = HostSpec("b1", profile=b)
    assert HostSpec.from_dict(h.to_dict()) == h                      # serialisable, as a manager stores it
    vm = a.apply(VMSpec("v", disks=(DiskSpec("d0"),), nics=(NicSpec("n0"),)))
    assert native_migration_blockers(vm, a.apply(vm)) == []
    assert native_migration_blockers(vm, b.apply(vm)) == ["machine pc vs q35", "cpu qemu64 vs Westmere",
                                                          "disk bus virtio-blk vs scsi",
                                                          "nic model virtio-net-pci vs e1000"]
    with pytest.raises(SpecError):
        MachineProfile("x", "pc", "qemu64", "floppy", "e1000")
    with pytest.raises(SpecError):
        HostSpec("h", profile="B")  # type: ignore[arg-type]
