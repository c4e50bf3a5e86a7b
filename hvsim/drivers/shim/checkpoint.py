"""The shim's device checkpoint: everything a shim holds that its successor needs, as bytes.

Pure logic (no I/O, no event loop): :class:`ShimCheckpoint` is one checkpoint, full or a delta since
an earlier one; :func:`encode` / :func:`decode` turn it into the wire format and back, refusing
anything truncated, corrupted, oversized or of another format version with a
:class:`CheckpointFormatError` that says why; :func:`apply_delta` applies a delta to a full
checkpoint (what a restore does to a live shim, on plain data).

What is in it (format version 2):

- the swap map (``tracker``): every page the guest wrote, with its write sequence number, in
  recency order, and the swap-header facts (Linux ``SWAPSPACE2``, version, last page);
- the cache: its budget, the index of cached pages in LRU order (oldest first) and, unless the
  checkpoint is *index-only*, the cached pages themselves (4096 bytes each);
- the counters (hits, misses, prefetched pages, ...), so hit rate and accuracy carry over;
- the in-flight state: pages the running prefetch still has to fetch (``planned``, including
  reads in flight when it was taken), pages it skipped as guest-resident (``skipped``), prefetched
  pages not used yet (``unused``, for the accuracy accounting), and the prefetch state.

A *delta* (``base_seq`` set) carries the scalars and the in-flight state in full (they are small),
and for the swap map and the cache only what changed after checkpoint ``base_seq`` was taken:
entries set or updated (``tracker`` / ``cache_pages`` + ``cache_data``) and entries removed
(``tracker_del`` / ``cache_del``). Applying it to the state of ``base_seq`` gives the state of
``seq``.

Wire layout (little-endian)::

    8 bytes   magic b"HVSHIMCK"
    u16       format version
    u16       flags (bit 0: delta, bit 1: index-only)
    u32       header length H (at most MAX_HEADER)
    H bytes   header: a JSON object (scalars and the length of every section)
    sections  tracker (u64 page, u64 seq pairs), tracker_del, cache_pages, cache_data
              (4096 bytes per cached page unless index-only), cache_del, planned, skipped, unused
              (u64 page numbers)
    32 bytes  sha256 of everything before it
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ShimConfigError

PAGE = 4096
MAGIC = b"HVSHIMCK"
VERSION = 2
SUPPORTED_VERSIONS = frozenset({VERSION})
FLAG_DELTA = 1
FLAG_INDEX_ONLY = 2
_PREFIX = struct.Struct("<8sHHI")
_DIGEST = 32
MAX_HEADER = 1 << 20
SECTIONS = ("tracker", "tracker_del", "cache_pages", "cache_data", "cache_del", "planned", "skipped", "unused")
_PAGE_LISTS = ("tracker_del", "cache_pages", "cache_del", "planned", "skipped", "unused")
PREFETCH_STATES = frozenset({"idle", "running", "done", "cancelled"})
MAX_COUNTER = (1 << 63) - 1


class CheckpointFormatError(ShimConfigError):
    """A checkpoint that cannot be used: truncated, corrupted, of another format version, or not
    matching the export it is restored into. The message says which."""


def _u64(values: Iterable[int] = ()) -> array[int]:
    a = array("Q", values)
    assert a.itemsize == 8
    return a


def _le(a: array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover - the wire format is little-endian
        a = array("Q", a)
        a.byteswap()
    return a.tobytes()


def _from_le(data: bytes | memoryview) -> array[int]:
    a = array("Q")
    a.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        a.byteswap()
    return a


@dataclass
class ShimCheckpoint:
    """One checkpoint of one export (see the module docstring). Page lists are ``array('Q')``;
    ``tracker`` interleaves (page, seq) pairs; ``cache_data`` is the cached pages' bytes in
    ``cache_pages`` order (empty when ``index_only``)."""
    export: str
    size: int
    seq: int
    base_seq: int | None = None
    index_only: bool = False
    budget_bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    tracker_seq: int = 0
    swap_header: bool = False
    swap_version: int | None = None
    swap_last_page: int | None = None
    prefetch_state: str = "idle"
    tracker: array[int] = field(default_factory=_u64)
    tracker_del: array[int] = field(default_factory=_u64)
    cache_pages: array[int] = field(default_factory=_u64)
    cache_data: bytes = b""
    cache_del: array[int] = field(default_factory=_u64)
    planned: array[int] = field(default_factory=_u64)
    skipped: array[int] = field(default_factory=_u64)
    unused: array[int] = field(default_factory=_u64)

    @property
    def is_delta(self) -> bool:
        return self.base_seq is not None

    @property
    def pages(self) -> int:
        """Pages of the export."""
        return self.size // PAGE

    def tracker_items(self) -> list[tuple[int, int]]:
        t = self.tracker
        return list(zip(t[0::2], t[1::2]))

    def cached(self) -> dict[int, bytes]:
        """Cached pages -> data (LRU order); empty values when index-only."""
        if self.index_only:
            return {p: b"" for p in self.cache_pages}
        d = memoryview(self.cache_data)
        return {p: bytes(d[i * PAGE:(i + 1) * PAGE]) for i, p in enumerate(self.cache_pages)}

    @property
    def nbytes(self) -> int:
        """Size on the wire, without encoding it."""
        return (_PREFIX.size + _DIGEST + 1024 + 8 * (len(self.tracker) + len(self.tracker_del) + len(self.cache_pages)
                + len(self.cache_del) + len(self.planned) + len(self.skipped) + len(self.unused))
                + len(self.cache_data))

    def summary(self) -> dict[str, Any]:
        return {"seq": self.seq, "base_seq": self.base_seq, "index_only": self.index_only,
                "tracker": len(self.tracker) // 2, "tracker_del": len(self.tracker_del),
                "cache_pages": len(self.cache_pages), "cache_del": len(self.cache_del),
                "planned": len(self.planned), "bytes": self.nbytes}


def encode(ck: ShimCheckpoint) -> bytes:
    """The wire form of ``ck`` (see the module docstring)."""
    _check(ck)
    sections = {"tracker": _le(ck.tracker), "tracker_del": _le(ck.tracker_del), "cache_pages": _le(ck.cache_pages),
                "cache_data": ck.cache_data, "cache_del": _le(ck.cache_del), "planned": _le(ck.planned),
                "skipped": _le(ck.skipped), "unused": _le(ck.unused)}
    header = {"export": ck.export, "size": ck.size, "seq": ck.seq, "base_seq": ck.base_seq,
              "budget_bytes": ck.budget_bytes, "counters": ck.counters, "tracker_seq": ck.tracker_seq,
              "swap_header": ck.swap_header, "swap_version": ck.swap_version, "swap_last_page": ck.swap_last_page,
              "prefetch_state": ck.prefetch_state, "lengths": {k: len(v) for k, v in sections.items()}}
    hdr = json.dumps(header, separators=(",", ":")).encode()
    flags = (FLAG_DELTA if ck.is_delta else 0) | (FLAG_INDEX_ONLY if ck.index_only else 0)
    h = hashlib.sha256()
    parts = [_PREFIX.pack(MAGIC, VERSION, flags, len(hdr)), hdr, *(sections[k] for k in SECTIONS)]
    for part in parts:
        h.update(part)
    parts.append(h.digest())
    return b"".join(parts)


def _int(header: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_COUNTER, none: bool = False) -> Any:
    v = header.get(key)
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointFormatError(f"header field {key!r} must be an integer within {lo}..{hi}, got {v!r}")
    return v


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> ShimCheckpoint:
    """Parse and verify a checkpoint; CheckpointFormatError saying why it is refused."""
    view = memoryview(data)
    n = len(view)
    if max_bytes is not None and n > max_bytes:
        raise CheckpointFormatError(f"checkpoint of {n} bytes exceeds the limit of {max_bytes} bytes")
    if n < _PREFIX.size + _DIGEST:
        raise CheckpointFormatError(f"truncated: {n} bytes is shorter than the fixed header")
    magic, version, flags, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CheckpointFormatError(f"not a shim checkpoint (magic {bytes(magic)!r})")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointFormatError(f"format version {version} is not supported (supported: "
                                    f"{sorted(SUPPORTED_VERSIONS)})")
    if flags & ~(FLAG_DELTA | FLAG_INDEX_ONLY):
        raise CheckpointFormatError(f"unknown flags {flags:#x}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen + _DIGEST > n:
        raise CheckpointFormatError(f"truncated or corrupt: header length {hlen} does not fit {n} bytes")
    if hashlib.sha256(view[:n - _DIGEST]).digest() != bytes(view[n - _DIGEST:]):
        raise CheckpointFormatError("checksum mismatch: the checkpoint is corrupted or truncated")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"corrupt header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError("corrupt header: not a JSON object")
    size = _int(header, "size", PAGE, 1 << 50)
    if size % PAGE:
        raise CheckpointFormatError(f"export size {size} is not a multiple of {PAGE}")
    lengths = header.get("lengths")
    if not isinstance(lengths, dict) or set(lengths) != set(SECTIONS):
        raise CheckpointFormatError(f"header must give the length of every section {list(SECTIONS)}")
    pos = _PREFIX.size + hlen
    body: dict[str, memoryview] = {}
    for k in SECTIONS:
        ln = lengths[k]
        if isinstance(ln, bool) or not isinstance(ln, int) or ln < 0 or (k != "cache_data" and ln % 8):
            raise CheckpointFormatError(f"section {k!r} has a bad length {ln!r}")
        body[k] = view[pos:pos + ln]
        pos += ln
    if pos != n - _DIGEST:
        raise CheckpointFormatError(f"section lengths add up to {pos - _PREFIX.size - hlen} bytes, "
                                    f"the body has {n - _DIGEST - _PREFIX.size - hlen}")
    counters = header.get("counters")
    if not isinstance(counters, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNTER
            for k, v in counters.items()):
        raise CheckpointFormatError("header field 'counters' must map names to integers >= 0")
    export = header.get("export")
    if not isinstance(export, str) or len(export.encode()) > 4096:
        raise CheckpointFormatError(f"header field 'export' must be a name, got {export!r}")
    state = header.get("prefetch_state")
    if state not in PREFETCH_STATES:
        raise CheckpointFormatError(f"header field 'prefetch_state' must be one of {sorted(PREFETCH_STATES)}, "
                                    f"got {state!r}")
    ck = ShimCheckpoint(
        export=export, size=size, seq=_int(header, "seq"),
        base_seq=_int(header, "base_seq", none=True), index_only=bool(flags & FLAG_INDEX_ONLY),
        budget_bytes=_int(header, "budget_bytes", 0, 1 << 50), counters=dict(counters),
        tracker_seq=_int(header, "tracker_seq"), swap_header=bool(header.get("swap_header")),
        swap_version=_int(header, "swap_version", 0, (1 << 32) - 1, none=True),
        swap_last_page=_int(header, "swap_last_page", 0, (1 << 32) - 1, none=True),
        prefetch_state=state, tracker=_from_le(body["tracker"]), cache_data=bytes(body["cache_data"]),
        **{k: _from_le(body[k]) for k in _PAGE_LISTS})
    if bool(flags & FLAG_DELTA) != ck.is_delta:
        raise CheckpointFormatError("the delta flag and the header's base_seq disagree")
    _check(ck)
    return ck


def _check(ck: ShimCheckpoint) -> None:
    """Structural limits: every page number inside the export, no duplicates, data sizes match."""
    npages = ck.pages
    if ck.size <= 0 or ck.size % PAGE:
        raise CheckpointFormatError(f"export size {ck.size} is not a positive multiple of {PAGE}")
    if ck.is_delta and ck.base_seq is not None and ck.base_seq >= ck.seq:
        raise CheckpointFormatError(f"a delta must go forward: base_seq {ck.base_seq} >= seq {ck.seq}")
    if ck.prefetch_state not in PREFETCH_STATES:
        raise CheckpointFormatError(f"unknown prefetch state {ck.prefetch_state!r}")
    if len(ck.tracker) % 2:
        raise CheckpointFormatError("tracker section must hold (page, seq) pairs")
    if ck.index_only:
        if ck.cache_data:
            raise CheckpointFormatError("an index-only checkpoint carries no cache data")
    elif len(ck.cache_data) != len(ck.cache_pages) * PAGE:
        raise CheckpointFormatError(f"cache data has {len(ck.cache_data)} bytes for {len(ck.cache_pages)} pages "
                                    f"({len(ck.cache_pages) * PAGE} expected)")
    if not ck.is_delta and (ck.tracker_del or ck.cache_del):
        raise CheckpointFormatError("a full checkpoint has no removals")
    lists: dict[str, Sequence[int]] = {"tracker": ck.tracker[0::2], "tracker_del": ck.tracker_del,
                                       "cache_pages": ck.cache_pages, "cache_del": ck.cache_del,
                                       "planned": ck.planned, "skipped": ck.skipped, "unused": ck.unused}
    for name, pages in lists.items():
        if len(pages) > npages:
            raise CheckpointFormatError(f"section {name!r} lists {len(pages)} pages, the export has {npages}")
        if pages and max(pages) >= npages:
            raise CheckpointFormatError(f"section {name!r} names page {max(pages)} beyond the export's "
                                        f"{npages} pages")
        if len(set(pages)) != len(pages):
            raise CheckpointFormatError(f"section {name!r} lists a page twice")
    if ck.budget_bytes < 0 or (ck.budget_bytes // PAGE) < len(ck.cache_pages) and not ck.is_delta:
        raise CheckpointFormatError(f"{len(ck.cache_pages)} cached pages do not fit the budget of "
                                    f"{ck.budget_bytes} bytes")


def apply_delta(base: ShimCheckpoint, delta: ShimCheckpoint) -> ShimCheckpoint:
    """The full checkpoint ``delta`` describes, applied on top of ``base`` (a full checkpoint of
    seq ``delta.base_seq`` of the same export). Pure: neither argument changes."""
    if base.is_delta:
        raise CheckpointFormatError(f"a delta applies to a full checkpoint, not to the delta {base.seq}")
    if not delta.is_delta:
        raise CheckpointFormatError(f"checkpoint {delta.seq} is full, not a delta")
    if delta.base_seq != base.seq:
        raise CheckpointFormatError(f"delta {delta.seq} applies on top of checkpoint {delta.base_seq}, "
                                    f"not {base.seq}")
    if (delta.export, delta.size) != (base.export, base.size):
        raise CheckpointFormatError(f"delta is for export {delta.export!r} of {delta.size} bytes, the base for "
                                    f"{base.export!r} of {base.size}")
    if delta.index_only != base.index_only:
        raise CheckpointFormatError("cannot mix index-only and full-data checkpoints")
    tracker = dict(base.tracker_items())
    for p in delta.tracker_del:
        tracker.pop(p, None)
    for p, s in delta.tracker_items():
        tracker.pop(p, None)
        tracker[p] = s
    order = sorted(tracker.items(), key=lambda ps: ps[1])
    cache = base.cached()
    for p in delta.cache_del:
        cache.pop(p, None)
    for p, d in delta.cached().items():
        if p in cache:
            cache[p] = d         # patched in place: keeps its LRU position
        else:
            cache[p] = d
    pages = list(cache)
    return ShimCheckpoint(
        export=base.export, size=base.size, seq=delta.seq, base_seq=None, index_only=base.index_only,
        budget_bytes=delta.budget_bytes, counters=dict(delta.counters), tracker_seq=delta.tracker_seq,
        swap_header=delta.swap_header, swap_version=delta.swap_version, swap_last_page=delta.swap_last_page,
        prefetch_state=delta.prefetch_state, tracker=_u64(x for ps in order for x in ps),
        cache_pages=_u64(pages), cache_data=b"" if base.index_only else b"".join(cache[p] for p in pages),
        planned=_u64(delta.planned), skipped=_u64(delta.skipped), unused=_u64(delta.unused))


def page_array(pages: Iterable[int]) -> array[int]:
    """Page numbers as the checkpoint's array type."""
    return _u64(pages)
