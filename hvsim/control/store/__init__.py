"""The control plane's store: one async interface (:class:`Store`), two backends.

``make_store("sqlite:///var/lib/hvsim/state.db")`` or ``make_store("etcd://127.0.0.1:2379,127.0.0.1:2479")``
(``etcds://`` for mutual TLS, with ``tls=TLSFiles(ca, cert, key)``). See :mod:`.base` for the model and the guarantees.
"""
from __future__ import annotations

from ..errors import ControlInputError
from .base import (
    FENCE_JOURNAL, LEASE_PREFIX, Cmp, Compare, Delete, EventKind, Fence, Get, KeptLease, KeyValue, Lease, Op, Page, Put,
    Store, Target, Txn, TxnResult, Watch, WatchEvent, journal_key,
)
from .etcd import EtcdStore, TLSFiles
from .sqlite import SQLiteStore

__all__ = ["FENCE_JOURNAL", "LEASE_PREFIX", "Cmp", "Compare", "Delete", "EtcdStore", "EventKind", "Fence", "Get",
           "KeptLease", "KeyValue", "Lease", "Op", "Page", "Put", "SQLiteStore", "Store", "TLSFiles", "Target", "Txn",
           "TxnResult", "Watch", "WatchEvent", "journal_key", "make_store"]


def make_store(url: str, *, tls: TLSFiles | None = None) -> Store:
    """A store from a URL: ``sqlite:///PATH`` (or a plain path), ``etcd://H:P[,H:P...]`` or
    ``etcds://H:P[,...]`` (mutual TLS with ``tls``). Not opened yet: ``async with``."""
    if not isinstance(url, str) or not url:
        raise ControlInputError("store", "give sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...]")
    for scheme, http in (("etcd://", "http://"), ("etcds://", "https://")):
        if url.startswith(scheme):
            members = [m for m in url[len(scheme):].split(",") if m]
            if not members:
                raise ControlInputError("store", f"{url!r} names no etcd member")
            if (scheme == "etcds://") != (tls is not None):
                raise ControlInputError("store", "etcds:// needs TLS files (CA, certificate, key); etcd:// none")
            return EtcdStore([http + m for m in members], tls=tls)
    if url.startswith("sqlite://"):
        url = url[len("sqlite://"):]
    if "://" in url:
        raise ControlInputError("store", f"unknown store URL {url!r} (sqlite:///PATH or etcd://HOST:PORT,...)")
    return SQLiteStore(url)
