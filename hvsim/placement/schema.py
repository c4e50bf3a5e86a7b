"""JSON problem and result documents (schema in docs/placement.md).

``load_problem`` accepts a path, a JSON string or a dict and raises ProblemError naming the
offending field (``rules[3] (web-db).groups[1]: unknown group 'dbx'``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from .model import (HOST_LEVEL, RULE_KINDS, Group, Host, MovePolicy, Objective, Problem, ProblemError, Rule, VM)

SCHEMA_VERSION = 1


class _Errors(list):
    def add(self, where: str, msg: str) -> None:
        self.append((where, msg))


def _get(errs: _Errors, obj: Mapping, key: str, where: str, typ: type | tuple, default: Any = ..., ) -> Any:
    if key not in obj:
        if default is ...:
            errs.add(f"{where}.{key}" if where else key, "missing")
            return None
        return default
    v = obj[key]
    if (typ is int and isinstance(v, bool)) or not isinstance(v, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        errs.add(f"{where}.{key}" if where else key, f"must be {name}, got {type(v).__name__} {v!r}")
        return None
    return v


def _names(errs: _Errors, obj: Mapping, key: str, where: str, default: Any = ...) -> tuple[str, ...]:
    v = _get(errs, obj, key, where, list, default)
    if v is None:
        return ()
    out = []
    for i, x in enumerate(v):
        if isinstance(x, Mapping) and "level" in x and "name" in x:  # domain ref object
            x = f"{x['level']}:{x['name']}"
        if not isinstance(x, str):
            errs.add(f"{where}.{key}[{i}]", f"must be a string, got {x!r}")
        else:
            out.append(x)
    return tuple(out)


_RULE_FIELDS = {
    "affinity": {"groups", "level"},
    "anti_affinity": {"groups", "level"},
    "domain_affinity": {"groups", "domains"},
    "domain_anti_affinity": {"groups", "domains"},
    "spread": {"groups", "level", "max_skew", "min_domains"},
    "max_per_domain": {"groups", "level", "max"},
    "reserve_hosts": {"hosts"},
    "reserve_amount": {"level", "amount", "domains"},
}
_COMMON = {"name", "kind", "required", "weight"}


def rule_from_dict(d: Any, where: str = "rule") -> Rule:
    errs = _Errors()
    r = _rule(errs, d, where)
    if errs or r is None:
        raise ProblemError(errs or [(where, "invalid rule")])
    return r


def _rule(errs: _Errors, d: Any, where: str) -> Rule | None:
    if not isinstance(d, Mapping):
        errs.add(where, f"must be an object, got {d!r}")
        return None
    kind = _get(errs, d, "kind", where, str)
    if kind is None:
        return None
    if kind not in RULE_KINDS:
        errs.add(f"{where}.kind", f"unknown rule kind {kind!r} (known: {', '.join(RULE_KINDS)})")
        return None
    name = _get(errs, d, "name", where, str)
    where = f"{where} ({name})" if name else where
    for k in d:
        if k not in _COMMON | _RULE_FIELDS[kind]:
            errs.add(f"{where}.{k}", f"unknown field for a {kind} rule")
    required = _get(errs, d, "required", where, bool, True)
    weight = _get(errs, d, "weight", where, int, 1)
    if required and "weight" in d:
        errs.add(f"{where}.weight", "only preferred rules (required: false) have a weight")
    kw: dict[str, Any] = {}
    f = _RULE_FIELDS[kind]
    if "groups" in f:
        kw["groups"] = _names(errs, d, "groups", where)
    if "level" in f:
        kw["level"] = _get(errs, d, "level", where, str, HOST_LEVEL)
    if "domains" in f:
        kw["domains"] = _names(errs, d, "domains", where, [] if kind == "reserve_amount" else ...)
    if kind == "spread":
        kw["max_skew"] = _get(errs, d, "max_skew", where, int, 1)
        kw["min_domains"] = _get(errs, d, "min_domains", where, int, 1)
    if kind == "max_per_domain":
        kw["max"] = _get(errs, d, "max", where, int)
    if kind == "reserve_hosts":
        kw["hosts"] = _names(errs, d, "hosts", where)
    if kind == "reserve_amount":
        kw["amount"] = _get(errs, d, "amount", where, dict) or {}
    if name is None:
        return None
    return RULE_KINDS[kind](name=name, required=bool(required), weight=weight if weight is not None else 1, **kw)


def rule_to_dict(r: Rule) -> dict[str, Any]:
    d: dict[str, Any] = {"name": r.name, "kind": r.kind, "required": r.required}
    if not r.required:
        d["weight"] = r.weight
    for k in ("groups", "level", "domains", "max_skew", "min_domains", "max", "hosts", "amount"):
        if k in _RULE_FIELDS[r.kind]:
            v = getattr(r, k)
            d[k] = list(v) if isinstance(v, tuple) else v
    return d


def host_from_dict(errs: _Errors, h: Any, where: str) -> Host | None:
    if not isinstance(h, Mapping):
        errs.add(where, f"must be an object, got {h!r}")
        return None
    for k in h:
        if k not in {"name", "capacity", "overcommit", "domain"}:
            errs.add(f"{where}.{k}", "unknown field for a host")
    name = _get(errs, h, "name", where, str)
    cap = _get(errs, h, "capacity", where, dict)
    oc = _get(errs, h, "overcommit", where, (dict, int, float), {})
    dom = _get(errs, h, "domain", where, dict, {})
    if name is None or cap is None:
        return None
    if isinstance(oc, (int, float)) and not isinstance(oc, bool):
        oc = {"vcpus": float(oc)}
    return Host(name, dict(cap), dict(oc or {}), {str(k): v for k, v in (dom or {}).items()})


def group_from_dict(g: Any, where: str = "group") -> Group:
    errs = _Errors()
    out = _group(errs, g, where)
    if errs or out is None:
        raise ProblemError(errs or [(where, "invalid group")])
    return out


def _group(errs: _Errors, g: Any, where: str) -> Group | None:
    if not isinstance(g, Mapping):
        errs.add(where, f"must be an object, got {g!r}")
        return None
    for k in g:
        if k not in {"name", "count", "demand", "vms"}:
            errs.add(f"{where}.{k}", "unknown field for a group")
    name = _get(errs, g, "name", where, str)
    if name is None:
        return None
    if "vms" in g:
        if "count" in g or "demand" in g:
            errs.add(where, "give either vms or count + demand, not both")
        vms = []
        for j, v in enumerate(_get(errs, g, "vms", where, list) or []):
            w = f"{where}.vms[{j}]"
            if not isinstance(v, Mapping):
                errs.add(w, f"must be an object, got {v!r}")
                continue
            vn = _get(errs, v, "name", w, str)
            dem = _get(errs, v, "demand", w, dict)
            if vn is not None and dem is not None:
                vms.append(VM(vn, name, dict(dem)))
        return Group(name, vms)
    count = _get(errs, g, "count", where, int)
    dem = _get(errs, g, "demand", where, dict)
    if count is not None and count < 0:
        errs.add(f"{where}.count", f"negative count {count}")
        return None
    if count is None or dem is None:
        return None
    return Group.uniform(name, count, dem)


def problem_from_dict(d: Any) -> Problem:
    """Parse and validate a problem document."""
    errs = _Errors()
    if not isinstance(d, Mapping):
        raise ProblemError([("", f"a problem must be a JSON object, got {type(d).__name__}")])
    known = {"version", "levels", "hosts", "groups", "rules", "current", "moves", "objective", "comment"}
    for k in d:
        if k not in known:
            errs.add(k, f"unknown top-level field (known: {', '.join(sorted(known))})")
    ver = _get(errs, d, "version", "", int, SCHEMA_VERSION)
    if ver not in (None, SCHEMA_VERSION):
        errs.add("version", f"unsupported version {ver} (this is {SCHEMA_VERSION})")
    levels = _names(errs, d, "levels", "", ["datacenter", "rack", HOST_LEVEL])
    hosts = [host_from_dict(errs, h, f"hosts[{i}]") for i, h in enumerate(_get(errs, d, "hosts", "", list) or [])]
    groups = [_group(errs, g, f"groups[{i}]") for i, g in enumerate(_get(errs, d, "groups", "", list, []) or [])]
    rules = [_rule(errs, r, f"rules[{i}]") for i, r in enumerate(_get(errs, d, "rules", "", list, []) or [])]
    current = _get(errs, d, "current", "", dict, {}) or {}
    for vm, host in current.items():
        if not isinstance(host, str):
            errs.add(f"current.{vm}", f"must be a host name, got {host!r}")
    mv = _get(errs, d, "moves", "", dict, {}) or {}
    for k in mv:
        if k not in ("allowed", "max"):
            errs.add(f"moves.{k}", "unknown field (allowed, max)")
    moves = MovePolicy(bool(_get(errs, mv, "allowed", "moves", bool, False)), _get(errs, mv, "max", "moves",
                                                                                   (int, type(None)), None))
    ob = _get(errs, d, "objective", "", dict, {}) or {}
    for k in ob:
        if k not in ("mode", "resources"):
            errs.add(f"objective.{k}", "unknown field (mode, resources)")
    objective = Objective(_get(errs, ob, "mode", "objective", str, "balance") or "balance",
                          _names(errs, ob, "resources", "objective", []))
    if errs:
        raise ProblemError(errs)
    p = Problem(hosts=[h for h in hosts if h], groups=[g for g in groups if g], rules=[r for r in rules if r],
                levels=levels, current=dict(current), moves=moves, objective=objective)
    return p.validate()


def load_problem(src: str | Path | Mapping) -> Problem:
    """Load a problem from a path, a JSON text or an already-parsed dict."""
    if isinstance(src, Mapping):
        return problem_from_dict(src)
    text = str(src)
    if isinstance(src, Path) or not text.lstrip().startswith("{"):
        path = Path(src)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ProblemError([("", f"cannot read {path}: {exc.strerror}")]) from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProblemError([("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]) from exc
    return problem_from_dict(doc)


def problem_to_dict(p: Problem) -> dict[str, Any]:
    def group(g: Group) -> dict[str, Any]:
        dem = g.vms[0].demand if g.vms else {}
        if g.vms and all(v.demand == dem and v.name == f"{g.name}-{i}" for i, v in enumerate(g.vms)):
            return {"name": g.name, "count": len(g.vms), "demand": dict(dem)}
        return {"name": g.name, "vms": [{"name": v.name, "demand": dict(v.demand)} for v in g.vms]}

    d: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "levels": list(p.levels),
        "hosts": [{"name": h.name, "capacity": dict(h.capacity), "overcommit": dict(h.overcommit),
                   "domain": dict(h.domain)} for h in p.hosts],
        "groups": [group(g) for g in p.groups],
        "rules": [rule_to_dict(r) for r in p.rules],
    }
    if p.current:
        d["current"] = dict(p.current)
    d["moves"] = {"allowed": p.moves.allowed, "max": p.moves.max}
    d["objective"] = {"mode": p.objective.mode, "resources": list(p.objective.resources)}
    return d


def dump_problem(p: Problem, path: str | Path | None = None) -> str:
    text = json.dumps(problem_to_dict(p), indent=2) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def dump_result(result: Any, path: str | Path | None = None) -> str:
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text
