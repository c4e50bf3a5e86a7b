"""Link shaping with ``tc`` token-bucket filters (tbf); netem is not available in this kernel.

A link is shaped by a tbf root qdisc on the *egress* of each veth end: the host-side end
limits what the host sends, the switch-side end limits what the host receives. This
module only builds tc command lines and parses tc output; it runs nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import TopologyError

MAX_MBIT = 100_000.0
#: tbf lets a packet through only if it fits in the bucket; veth hands tbf GSO
#: super-packets of up to 64 KiB, so a bucket below that forces software segmentation.
MIN_BURST_BYTES = 96 * 1024
DEFAULT_BURST_MS = 4.0
DEFAULT_LATENCY_MS = 50.0


def check_mbit(mbit: object, what: str = "bandwidth") -> float:
    """Validate a bandwidth in Mbit/s; returns it as float or raises TopologyError."""
    if isinstance(mbit, bool) or not isinstance(mbit, (int, float)):
        raise TopologyError(f"{what} must be a number of Mbit/s, got {mbit!r}")
    value = float(mbit)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise TopologyError(f"{what} must be > 0 Mbit/s, got {mbit!r}")
    if value > MAX_MBIT:
        raise TopologyError(f"{what} {mbit!r} Mbit/s exceeds the {MAX_MBIT:g} Mbit/s maximum")
    return value


@dataclass(frozen=True)
class LinkShape:
    """Shaping of one host link, applied to both directions unless set separately.

    ``burst_bytes=None`` picks max(rate x 4 ms, 96 KiB). ``latency_ms`` bounds the tbf
    queue (how long a packet may wait before it is dropped).
    """

    mbit: float
    burst_bytes: int | None = None
    latency_ms: float = DEFAULT_LATENCY_MS

    def __post_init__(self) -> None:
        object.__setattr__(self, "mbit", check_mbit(self.mbit))
        if self.burst_bytes is not None:
            if isinstance(self.burst_bytes, bool) or not isinstance(self.burst_bytes, int) or self.burst_bytes < 1600:
                raise TopologyError(f"burst_bytes must be an int >= 1600 (one MTU), got {self.burst_bytes!r}")
        lat = self.latency_ms
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not (0 < float(lat) <= 10_000):
            raise TopologyError(f"latency_ms must be in (0, 10000], got {lat!r}")

    @property
    def rate_bit(self) -> int:
        return int(round(self.mbit * 1_000_000))

    @property
    def effective_burst(self) -> int:
        if self.burst_bytes is not None:
            return self.burst_bytes
        return max(MIN_BURST_BYTES, int(self.rate_bit / 8 * DEFAULT_BURST_MS / 1000))

    def with_mbit(self, mbit: float) -> LinkShape:
        return LinkShape(mbit=mbit, burst_bytes=self.burst_bytes, latency_ms=self.latency_ms)

    def tbf_args(self) -> list[str]:
        return ["tbf", "rate", f"{self.rate_bit}bit", "burst", str(self.effective_burst),
                "latency", f"{float(self.latency_ms):g}ms"]


def coerce_shape(value: float | int | LinkShape, what: str) -> LinkShape:
    if isinstance(value, LinkShape):
        return value
    return LinkShape(mbit=check_mbit(value, what))


def tbf_replace_line(dev: str, shape: LinkShape) -> str:
    """One ``tc -batch`` line that installs or live-changes the root tbf of ``dev``."""
    return " ".join(["qdisc", "replace", "dev", dev, "root", "handle", "1:", *shape.tbf_args()])


@dataclass(frozen=True)
class QdiscStats:
    kind: str
    rate_bit: int | None
    sent_bytes: int
    sent_packets: int
    drops: int
    overlimits: int
    backlog_bytes: int


def parse_qdisc_json(entries: Sequence[Mapping[str, Any]]) -> QdiscStats | None:
    """Parse ``tc -j -s qdisc show dev X`` output; returns the root qdisc or None."""
    for e in entries:
        if e.get("root") or e.get("parent") in (None, "root"):
            opts = e.get("options") or {}
            rate = opts.get("rate")
            return QdiscStats(
                kind=str(e.get("kind", "")),
                rate_bit=int(rate) * 8 if isinstance(rate, (int, float)) else None,  # tc -j gives bytes/s
                sent_bytes=int(e.get("bytes", 0)),
                sent_packets=int(e.get("packets", 0)),
                drops=int(e.get("drops", 0)),
                overlimits=int(e.get("overlimits", 0)),
                backlog_bytes=int(e.get("backlog", 0)),
            )
    return None
