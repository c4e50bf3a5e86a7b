"""Auditing fencing: did any host agent, or the store, accept something from a manager whose lease
had already been superseded?

Two records feed the audit, both written by the parties that *enforce* the fence (never by the
manager that may be stale):

- **agent histories**: every host agent appends every mutating command it receives, accepted or
  refused, to ``history.jsonl`` in its state directory (:class:`HistoryEntry`: ``seq, wall, verb,
  vm, token, accepted, reason``); append-only, fsynced, kept across agent restarts, served at
  ``GET /v1/history?since=SEQ`` (:func:`read_history` reads the file);
- **the store's journal**: every fenced transaction also puts ``/_fence/NAME/TOKEN`` in the same
  transaction (:meth:`hvsim.control.store.Store.fenced_txn`), so per token the store knows the
  revision of its last write (``mod_revision``), how many writes there were (``version``), and when
  the token was acquired (its create revision *is* the token). :func:`store_terms` reads it.

:func:`audit` checks, and counts as ``stale_accepted``:

1. per agent, in its own order (no clock): an accepted command whose token is older than one that
   agent had accepted before it;
2. across parties (wall clocks of one machine, or synchronised ones): an accepted command made with
   token T1 after a newer token T2 was in force (T2's acquisition time from the store journal, or
   else the first time any agent accepted T2);
3. in the store (revisions, no clock): a term T1 whose last write has a revision after T2's
   acquisition revision (T2 > T1). With fenced transactions that cannot happen; the audit is what
   shows it did not.

``overlaps`` lists every pair of tokens whose activity windows (acquisition or first accepted
command .. last accepted command or write) intersect: two managers acting at once.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ControlInputError, StoreError
from .store import FENCE_JOURNAL, Store

log = logging.getLogger("hvsim.control.fencing")
HISTORY_FILE = "history.jsonl"


@dataclass(frozen=True)
class HistoryEntry:
    """One mutating command a host agent received."""
    seq: int
    wall: float
    verb: str
    vm: str | None
    token: int | None
    accepted: bool
    reason: str = ""

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> HistoryEntry:
        try:
            seq, wall, verb, token, accepted = d["seq"], d["wall"], d["verb"], d.get("token"), d["accepted"]
        except (KeyError, TypeError) as e:
            raise ControlInputError("history", f"entry {str(d)[:80]} lacks {e}") from e
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ControlInputError("history.seq", f"{seq!r} is not a non-negative integer")
        if not isinstance(wall, int | float) or isinstance(wall, bool):
            raise ControlInputError("history.wall", f"{wall!r} is not a number")
        if token is not None and (not isinstance(token, int) or isinstance(token, bool) or token < 0):
            raise ControlInputError("history.token", f"{token!r} is not a non-negative integer")
        if not isinstance(accepted, bool) or not isinstance(verb, str):
            raise ControlInputError("history", "accepted must be a boolean and verb a string")
        vm = d.get("vm")
        return cls(seq=seq, wall=float(wall), verb=verb, vm=vm if isinstance(vm, str) else None, token=token,
                   accepted=accepted, reason=str(d.get("reason") or ""))

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "wall": self.wall, "verb": self.verb, "vm": self.vm, "token": self.token,
                "accepted": self.accepted, "reason": self.reason}


def read_history(state_dir: Path | str, since: int = 0) -> list[HistoryEntry]:
    """A host agent's history from its state directory (entries with ``seq > since``). An
    unterminated last line (the agent died mid-append) is skipped; any other malformed line is an
    error."""
    p = Path(state_dir) / HISTORY_FILE
    try:
        lines = p.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    if lines[-1]:
        log.warning("%s: torn last line skipped", p)
    out: list[HistoryEntry] = []
    for i, line in enumerate(lines[:-1]):
        try:
            e = HistoryEntry.parse(json.loads(line))
        except (ValueError, ControlInputError) as err:
            raise ControlInputError("history", f"{p} line {i + 1}: {err}") from err
        if e.seq > since:
            out.append(e)
    return out


class HistoryLog:
    """The append-only history file of one host agent (``state_dir/history.jsonl``, 0600). Each
    append is one ``write`` on an ``O_APPEND`` descriptor followed by ``fsync``: an entry is on
    disk before the command it records is answered (or carried out). ``seq`` continues across
    restarts (read back from the file when opened)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / HISTORY_FILE
        prior = read_history(state_dir)
        self.seq = prior[-1].seq if prior else 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.chmod(self.path, 0o600)
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):       # a torn append (the agent died in it): cut it off
            os.truncate(self.path, data.rfind(b"\n") + 1)
            os.fsync(self._fd)

    def append(self, verb: str, vm: str | None, token: int | None, accepted: bool, reason: str = "") -> HistoryEntry:
        self.seq += 1
        e = HistoryEntry(seq=self.seq, wall=time.time(), verb=verb, vm=vm, token=token, accepted=accepted,
                         reason=reason[:300])
        os.write(self._fd, json.dumps(e.to_dict(), separators=(",", ":")).encode() + b"\n")
        os.fsync(self._fd)
        return e

    def since(self, seq: int, limit: int = 1000) -> list[HistoryEntry]:
        return read_history(self.path.parent, since=seq)[:limit]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class StoreTerm:
    """What the store's journal says about one holder of a named lease."""
    token: int                 # = the revision at which it was acquired
    holder: str
    since: float               # wall clock just before it was acquired
    last_write_revision: int   # revision of its last fenced write
    writes: int                # number of fenced writes
    last_wall: float           # wall clock of its last fenced write (as the writer stamped it)


async def store_terms(store: Store, name: str = "manager") -> list[StoreTerm]:
    """Every holder of lease ``name`` that wrote anything, from the store's journal, by token."""
    prefix = f"{FENCE_JOURNAL}{name}/"
    out: list[StoreTerm] = []
    after: str | None = None
    while True:
        page = await store.list(prefix, limit=500, after=after)
        for kv in page.items:
            try:
                d = json.loads(kv.value)
                out.append(StoreTerm(token=int(d["token"]), holder=str(d["holder"]), since=float(d["since"]),
                                     last_write_revision=kv.mod_revision, writes=kv.version,
                                     last_wall=float(d["wall"])))
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"journal record {kv.key} is malformed: {e}") from e
        if page.after is None:
            break
        after = page.after
    return sorted(out, key=lambda t: t.token)


@dataclass(frozen=True)
class Overlap:
    older: int
    newer: int
    start: float               # the newer token's first activity
    end: float                 # the older token's last activity (after start)


@dataclass
class FenceAudit:
    commands: int = 0                               # mutating commands the agents received
    accepted: int = 0
    refused: int = 0
    store_writes: int = 0
    stale_accepted: int = 0                         # agent commands + store writes
    tokens: list[int] = field(default_factory=list)
    overlaps: list[Overlap] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # what was stale, one line each

    @property
    def ok(self) -> bool:
        return self.stale_accepted == 0 and not self.overlaps

    def summary(self) -> dict[str, Any]:
        return {"commands": self.commands, "accepted": self.accepted, "refused": self.refused,
                "store_writes": self.store_writes, "stale_accepted": self.stale_accepted, "tokens": self.tokens,
                "overlaps": [vars(o) for o in self.overlaps], "stale": self.stale[:50]}


def _entries(raw: Iterable[HistoryEntry | Mapping[str, Any]]) -> list[HistoryEntry]:
    return sorted((e if isinstance(e, HistoryEntry) else HistoryEntry.parse(e) for e in raw), key=lambda e: e.seq)


def audit(agent_histories: Mapping[str, Iterable[HistoryEntry | Mapping[str, Any]]],
          terms: Sequence[StoreTerm] = ()) -> FenceAudit:
    """Audit ``agent_histories`` (host -> its entries) and the store journal ``terms``; see the
    module docstring for the rules."""
    out = FenceAudit()
    hist = {h: _entries(es) for h, es in agent_histories.items()}
    terms = sorted(terms, key=lambda t: t.token)
    # when each token came into force: its acquisition (store), else its first accepted command
    in_force: dict[int, float] = {t.token: t.since for t in terms}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for es in hist.values():
        for e in es:
            if e.accepted and e.token is not None:
                first[e.token] = min(first.get(e.token, e.wall), e.wall)
                last[e.token] = max(last.get(e.token, e.wall), e.wall)
    for tok, w in first.items():
        in_force[tok] = min(in_force.get(tok, w), w)
    forced = sorted(in_force.items())

    for host, es in hist.items():
        newest = 0
        for e in es:
            out.commands += 1
            if not e.accepted:
                out.refused += 1
                continue
            out.accepted += 1
            tok = e.token if e.token is not None else 0
            why = None
            if tok < newest:
                why = f"after it had accepted token {newest}"
            else:
                newer = [(t, w) for t, w in forced if t > tok and w < e.wall]
                if newer:
                    why = f"{e.wall - newer[0][1]:.3f} s after token {newer[0][0]} was in force"
            if why is not None:
                out.stale_accepted += 1
                out.stale.append(f"host {host} seq {e.seq}: {e.verb} {e.vm or ''} with token {tok} accepted {why}")
            newest = max(newest, tok)

    for i, t in enumerate(terms):
        out.store_writes += t.writes
        later = [n for n in terms[i + 1:] if t.last_write_revision > n.token]
        if later:
            out.stale_accepted += 1
            out.stale.append(f"store: token {t.token} ({t.holder}) wrote at revision {t.last_write_revision}, after "
                             f"token {later[0].token} was acquired at revision {later[0].token}")
        last[t.token] = max(last.get(t.token, t.last_wall), t.last_wall)

    out.tokens = sorted(set(in_force) | set(last))
    starts = {tok: in_force.get(tok, last.get(tok, 0.0)) for tok in out.tokens}
    for i, a in enumerate(out.tokens):
        for b in out.tokens[i + 1:]:
            if a in last and last[a] > starts[b]:
                out.overlaps.append(Overlap(older=a, newer=b, start=starts[b], end=last[a]))
    return out


async def audit_all(store: Store, state_dirs: Mapping[str, Path | str], name: str = "manager") -> FenceAudit:
    """:func:`audit` over the histories in host agents' state directories (host -> directory; an
    emulated host's is ``EmulatedHost.dir / "state"``) and the store's journal of lease ``name``."""
    return audit({h: read_history(d) for h, d in state_dirs.items()}, await store_terms(store, name))
