"""nftables for tenant ports: the rules (pure text renderers) and a libnftables context per namespace.

One table per host namespace, ``bridge hvsim``::

    table bridge hvsim {
        map port_in  { type ifname : verdict; }        # "hv0123..." : jump in_hv0123...
        map port_out { type ifname : verdict; }
        chain prerouting { type filter hook prerouting priority filter; iifname vmap @port_in }
        chain forward    { type filter hook forward priority filter;    oifname vmap @port_out }
        chain in_<port>  { [blocked: drop]  anti-spoofing: only the ENI's MAC and IPs leave the port }
        chain out_<port> { [blocked: drop]  the ENI's ingress security rules }
        counter <port>_blk_in, <port>_blk_out, <port>_spoof, <port>_other, <port>_denied
    }

Frames a port sends are checked at bridge *prerouting*, before the bridge learns or answers ARP:
a forged Ethernet source, an ARP sender MAC or IP that is not the ENI's, or an IPv4 source that is
not one of its IPs are dropped and counted in ``_spoof``; other ethertypes (IPv6, VLAN tags, ...)
in ``_other``. IPv4, ARP and RARP (what QEMU's ``announce-self`` sends) are the only ethertypes a
port may send. A port's chains are re-rendered as a whole (flush + add in one transaction) when it
is blocked or unblocked; the named counters survive that.

The context (:class:`NftContext`) is libnftables (the library behind ``nft``) through ctypes,
created in a thread that entered the host's namespace: its netlink socket stays in that namespace,
and a change is one in-process netlink transaction (about 1 ms) instead of an ``nft`` process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .eni import SecurityRule
from .errors import NetworkError

TABLE = "hvsim"
FAMILY = "bridge"
COUNTERS = ("blk_in", "blk_out", "spoof", "other", "denied")


class NftError(NetworkError):
    """libnftables refused a command; ``commands`` is the batch, ``error`` its message."""

    def __init__(self, commands: str, error: str) -> None:
        self.commands = commands
        self.error = error
        super().__init__(f"nftables: {error.strip()}\nbatch:\n{commands.rstrip()}")


# ---- rendering (pure) --------------------------------------------------------------------------------
def _q(name: str) -> str:
    return f'"{name}"'


def base_table() -> str:
    """Create the table, maps and hook chains (idempotent: ``add`` of existing objects is a no-op)."""
    t = f"{FAMILY} {TABLE}"
    return "\n".join([
        f"add table {t}",
        f"add map {t} port_in {{ type ifname : verdict; }}",
        f"add map {t} port_out {{ type ifname : verdict; }}",
        f"add chain {t} prerouting {{ type filter hook prerouting priority filter; policy accept; }}",
        f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
        f"flush chain {t} prerouting",
        f"flush chain {t} forward",
        f"add rule {t} prerouting iifname vmap @port_in",
        f"add rule {t} forward oifname vmap @port_out",
    ]) + "\n"


def delete_table() -> str:
    return f"delete table {FAMILY} {TABLE}\n"


def counter_name(port: str, which: str) -> str:
    return f"{port}_{which}"


def _ipset(ips: Sequence[str]) -> str:
    return "{ " + ", ".join(ips) + " }"


def _rule_match(r: SecurityRule) -> str:
    parts = [] if r.source == "0.0.0.0/0" else [f"ip saddr {r.source}"]
    if r.proto == "any":
        parts.append("ether type ip")
    elif r.proto == "icmp":
        parts.append("meta l4proto icmp")
    else:
        parts.append(f"meta l4proto {r.proto}")
        if r.ports is not None:
            lo, hi = r.ports
            parts.append(f"th dport {lo}" if lo == hi else f"th dport {lo}-{hi}")
    return " ".join(parts)


def port_rules(port: str, mac: str, ips: Sequence[str], rules: Sequence[SecurityRule], *, blocked: bool) -> list[str]:
    """The two chains of one port, as rule bodies: ``in`` (what the port sends) then ``out``."""
    t = f"{FAMILY} {TABLE}"
    c = {k: _q(counter_name(port, k)) for k in COUNTERS}
    ins = f"add rule {t} in_{port}"
    outs = f"add rule {t} out_{port}"
    lines: list[str] = []
    if blocked:
        lines.append(f"{ins} counter name {c['blk_in']} drop")
    lines += [
        f"{ins} ether saddr != {mac} counter name {c['spoof']} drop",
        f"{ins} ether type arp arp saddr ether != {mac} counter name {c['spoof']} drop",
        f"{ins} ether type arp arp saddr ip != {_ipset(ips)} counter name {c['spoof']} drop",
        f"{ins} ether type ip ip saddr != {_ipset(ips)} counter name {c['spoof']} drop",
        f"{ins} ether type {{ ip, arp, 0x8035 }} accept",
        f"{ins} counter name {c['other']} drop",
    ]
    if blocked:
        lines.append(f"{outs} counter name {c['blk_out']} drop")
    if rules:
        lines += [f"{outs} {_rule_match(r)} accept" for r in rules]
        lines.append(f"{outs} ether type ip counter name {c['denied']} drop")
    return lines


def add_port(port: str, mac: str, ips: Sequence[str], rules: Sequence[SecurityRule], *, blocked: bool) -> str:
    t = f"{FAMILY} {TABLE}"
    lines = [f"add counter {t} {counter_name(port, k)}" for k in COUNTERS]
    lines += [f"add chain {t} in_{port}", f"add chain {t} out_{port}",
              f"flush chain {t} in_{port}", f"flush chain {t} out_{port}"]
    lines += port_rules(port, mac, ips, rules, blocked=blocked)
    lines += [f"add element {t} port_in {{ {_q(port)} : jump in_{port} }}",
              f"add element {t} port_out {{ {_q(port)} : jump out_{port} }}"]
    return "\n".join(lines) + "\n"


def set_port(port: str, mac: str, ips: Sequence[str], rules: Sequence[SecurityRule], *, blocked: bool) -> str:
    """Re-render a port's chains (block/unblock) in one transaction."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"flush chain {t} in_{port}", f"flush chain {t} out_{port}"]
    lines += port_rules(port, mac, ips, rules, blocked=blocked)
    return "\n".join(lines) + "\n"


def remove_port(port: str) -> str:
    t = f"{FAMILY} {TABLE}"
    lines = [f"delete element {t} port_in {{ {_q(port)} }}", f"delete element {t} port_out {{ {_q(port)} }}",
             f"delete chain {t} in_{port}", f"delete chain {t} out_{port}"]
    lines += [f"delete counter {t} {counter_name(port, k)}" for k in COUNTERS]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PortCounters:
    """Packets dropped at one port: while blocked (in: sent by the guest, out: towards it), as
    spoofed (forged MAC or IP), as another ethertype, and denied by the ENI's security rules."""
    blk_in: int = 0
    blk_out: int = 0
    spoof: int = 0
    other: int = 0
    denied: int = 0

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in COUNTERS}


@dataclass(frozen=True)
class TableView:
    """What the table holds: port names in the maps, chain names, counters by name."""
    exists: bool
    ports: frozenset[str]
    chains: frozenset[str]
    counters: dict[str, int]

    def port_counters(self, port: str) -> PortCounters:
        return PortCounters(**{k: self.counters.get(counter_name(port, k), 0) for k in COUNTERS})

    @property
    def is_empty(self) -> bool:
        return not self.ports and not self.counters and self.chains <= {"prerouting", "forward"}


def parse_table(text: str) -> TableView:
    """Parse ``nft -j list table bridge hvsim`` output."""
    data = json.loads(text)
    ports: set[str] = set()
    chains: set[str] = set()
    counters: dict[str, int] = {}
    for item in data.get("nftables", []):
        if "chain" in item:
            chains.add(item["chain"]["name"])
        elif "counter" in item:
            counters[item["counter"]["name"]] = int(item["counter"].get("packets", 0))
        elif "map" in item and item["map"]["name"] in ("port_in", "port_out"):
            for elem in item["map"].get("elem", []) or []:
                key = elem[0] if isinstance(elem, list) else elem
                if isinstance(key, str):
                    ports.add(key)
    return TableView(exists=True, ports=frozenset(ports), chains=frozenset(chains), counters=counters)


# ---- libnftables -----------------------------------------------------------------------------------------------
NFT_CTX_OUTPUT_JSON = 1 << 4


@functools.cache
def _libnftables() -> Any:
    """The loaded C library (a process-wide handle, like any shared object)."""
    path = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        raise NetworkError(f"libnftables not found ({exc}): install the Debian package nftables") from exc
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    return lib


class NftContext:
    """A libnftables context. Create it (and call it) on a thread inside the target namespace."""

    def __init__(self) -> None:
        self._lib = _libnftables()
        ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise NetworkError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)

    def run(self, commands: str, *, json_output: bool = False) -> str:
        """Run ``commands`` as one transaction; return the output. :raise NftError: on refusal."""
        if self._ctx is None:
            raise NetworkError("nftables context is closed")
        flags = self._lib.nft_ctx_output_get_flags(self._ctx)
        want = (flags | NFT_CTX_OUTPUT_JSON) if json_output else (flags & ~NFT_CTX_OUTPUT_JSON)
        self._lib.nft_ctx_output_set_flags(self._ctx, want)
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftError(commands, err or f"exit {rc}")
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
