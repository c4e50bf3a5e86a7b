"""JSON problem and result documents (schema in docs/placement.md).

``load_problem`` accepts a path, a JSON text or a dict and raises ProblemError naming the
offending field (``rules[3] (web-db).groups[1]: unknown group 'dbx'``). Before anything is built
from a document, its size is checked (``limits.MAX_INPUT_BYTES``, read no further than that),
and so are the lengths of its lists and a group's ``count`` (``limits``), so that no document
makes the loader allocate more than a bounded amount of memory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import limits as L
from .errors import ProblemError, ProblemTooLargeError, show
from .model import HOST_LEVEL, RULE_KINDS, VM, Group, Host, MovePolicy, Objective, Problem, Rule

if TYPE_CHECKING:
    from .result import PlacementResult

SCHEMA_VERSION = 1

_MISSING: Any = object()


class _Errors(list[tuple[str, str]]):
    def add(self, where: str, msg: str) -> None:
        self.append((where, msg))


def _type_name(typ: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             dict: "an object", type(None): "null"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(v), type(v).__name__)


def _get(errs: _Errors, obj: Mapping[str, Any], key: str, where: str, typ: type | tuple[type, ...],
         default: Any = _MISSING) -> Any:
    if key not in obj:
        if default is _MISSING:
            errs.add(f"{where}.{key}" if where else key, "missing")
            return None
        return default
    v = obj[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
        errs.add(f"{where}.{key}" if where else key, f"must be {_type_name(typ)}, got {_json_type(v)} {show(v)}")
        return None
    return v


def _names(errs: _Errors, obj: Mapping[str, Any], key: str, where: str, default: Any = _MISSING,
           limit: int = L.MAX_RULE_REFS) -> tuple[str, ...]:
    v = _get(errs, obj, key, where, list, default)
    if v is None:
        return ()
    w = f"{where}.{key}" if where else key
    if len(v) > limit:
        errs.add(w, f"{len(v)} entries: at most {limit} (a documented limit)")
        return ()
    out = []
    for i, x in enumerate(v):
        if isinstance(x, Mapping) and set(x) == {"level", "name"}:  # domain ref object
            if not isinstance(x["level"], str) or not isinstance(x["name"], str):
                errs.add(f"{w}[{i}]", f"level and name must be strings, got {show(dict(x))}")
                continue
            x = f"{x['level']}:{x['name']}"
        if not isinstance(x, str):
            errs.add(f"{w}[{i}]", f"must be a string, got {show(x)}")
        else:
            out.append(x)
    return tuple(out)


def _mapping(errs: _Errors, obj: Mapping[str, Any], key: str, where: str, default: Any = _MISSING,
             limit: int = L.MAX_RESOURCES) -> dict[str, Any] | None:
    v = _get(errs, obj, key, where, dict, default)
    if v is None:
        return None
    if len(v) > limit:
        errs.add(f"{where}.{key}" if where else key, f"{len(v)} entries: at most {limit} (a documented limit)")
        return None
    return dict(v)


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


def _unknown(errs: _Errors, d: Mapping[str, Any], where: str, known: set[str], what: str) -> None:
    bad = [k for k in d if k not in known]
    for k in bad[:5]:
        key = k[:L.MAX_NAME_LEN] if isinstance(k, str) else show(k)
        errs.add(f"{where}.{key}" if where else key, f"unknown field for {what} (known: {', '.join(sorted(known))})")
    if len(bad) > 5:
        errs.add(where, f"{len(bad) - 5} more unknown fields")


def _rule(errs: _Errors, d: Any, where: str) -> Rule | None:
    if not isinstance(d, Mapping):
        errs.add(where, f"must be an object, got {show(d)}")
        return None
    kind = _get(errs, d, "kind", where, str)
    if kind is None:
        return None
    if kind not in RULE_KINDS:
        errs.add(f"{where}.kind", f"unknown rule kind {show(kind)} (known: {', '.join(RULE_KINDS)})")
        return None
    name = _get(errs, d, "name", where, str)
    where = f"{where} ({name[:L.MAX_NAME_LEN]})" if name else where
    _unknown(errs, d, where, _COMMON | _RULE_FIELDS[kind], f"a {kind} rule")
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
        kw["domains"] = _names(errs, d, "domains", where, [] if kind == "reserve_amount" else _MISSING)
    if kind == "spread":
        kw["max_skew"] = _get(errs, d, "max_skew", where, int, 1)
        kw["min_domains"] = _get(errs, d, "min_domains", where, int, 1)
    if kind == "max_per_domain":
        kw["max"] = _get(errs, d, "max", where, int)
    if kind == "reserve_hosts":
        kw["hosts"] = _names(errs, d, "hosts", where)
    if kind == "reserve_amount":
        kw["amount"] = _mapping(errs, d, "amount", where) or {}
    if name is None or any(v is None for v in kw.values()):
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
        errs.add(where, f"must be an object, got {show(h)}")
        return None
    _unknown(errs, h, where, {"name", "capacity", "overcommit", "domain"}, "a host")
    name = _get(errs, h, "name", where, str)
    cap = _mapping(errs, h, "capacity", where)
    oc = _get(errs, h, "overcommit", where, (dict, int, float), {})
    dom = _mapping(errs, h, "domain", where, {}, limit=L.MAX_LEVELS)
    if isinstance(oc, dict) and len(oc) > L.MAX_RESOURCES:
        errs.add(f"{where}.overcommit", f"{len(oc)} entries: at most {L.MAX_RESOURCES} (a documented limit)")
        oc = None
    if name is None or cap is None or oc is None or dom is None:
        return None
    if not isinstance(oc, dict):
        oc = {"vcpus": oc}  # a number means vCPUs (range-checked by the validator)
    return Host(name, cap, dict(oc), dom)


class _Budget:
    """VMs a document may still define (``limits.MAX_VMS`` over all groups); reported once."""

    def __init__(self, left: int = L.MAX_VMS) -> None:
        self.left = left
        self.exceeded = False

    def take(self, errs: _Errors, where: str, n: int) -> bool:
        if self.exceeded:
            return False
        if n > self.left:
            self.exceeded = True
            errs.add(where, f"{show(n)} VMs: the problem would have more than the {L.MAX_VMS} VMs it may have "
                            f"(a documented limit)")
            return False
        self.left -= n
        return True


def group_from_dict(g: Any, where: str = "group", budget: int = L.MAX_VMS) -> Group:
    errs = _Errors()
    b = _Budget(budget)
    out = _group(errs, g, where, b)
    if errs or out is None:
        raise (ProblemTooLargeError if b.exceeded else ProblemError)(errs or [(where, "invalid group")])
    return out


def _group(errs: _Errors, g: Any, where: str, budget: _Budget) -> Group | None:
    """``budget``: VMs the document may still define, checked before any VM is made."""
    if not isinstance(g, Mapping):
        errs.add(where, f"must be an object, got {show(g)}")
        return None
    _unknown(errs, g, where, {"name", "count", "demand", "vms"}, "a group")
    name = _get(errs, g, "name", where, str)
    if name is None:
        return None
    if "vms" in g:
        if "count" in g or "demand" in g:
            errs.add(where, "give either vms or count + demand, not both")
        raw = _get(errs, g, "vms", where, list) or []
        if not budget.take(errs, f"{where}.vms", len(raw)):
            return None
        vms = []
        for j, v in enumerate(raw):
            w = f"{where}.vms[{j}]"
            if not isinstance(v, Mapping):
                errs.add(w, f"must be an object, got {show(v)}")
                continue
            _unknown(errs, v, w, {"name", "demand"}, "a VM")
            vn = _get(errs, v, "name", w, str)
            dem = _mapping(errs, v, "demand", w)
            if vn is not None and dem is not None:
                vms.append(VM(vn, name, dem))
        return Group(name, vms)
    count = _get(errs, g, "count", where, int)
    dem = _mapping(errs, g, "demand", where)
    if count is None or dem is None:
        return None
    if count < 0:
        errs.add(f"{where}.count", f"negative count {show(count)}")
        return None
    if not budget.take(errs, f"{where}.count", count):
        return None
    return Group.uniform(name, count, dem)


def _list(errs: _Errors, d: Mapping[str, Any], key: str, limit: int, default: Any = _MISSING) -> list[Any]:
    v = _get(errs, d, key, "", list, default)
    if v is None:
        return []
    if len(v) > limit:
        raise ProblemTooLargeError([*errs, (key, f"{len(v)} entries: at most {limit} (a documented limit)")])
    return list(v)


def problem_from_dict(d: Any) -> Problem:
    """Parse and validate a problem document."""
    errs = _Errors()
    if not isinstance(d, Mapping):
        raise ProblemError([("", f"a problem must be a JSON object, got {_json_type(d)}")])
    known = {"version", "levels", "hosts", "groups", "rules", "current", "moves", "objective", "comment"}
    _unknown(errs, d, "", known, "a problem")
    ver = _get(errs, d, "version", "", int, SCHEMA_VERSION)
    if ver not in (None, SCHEMA_VERSION):
        errs.add("version", f"unsupported version {show(ver)} (this is {SCHEMA_VERSION})")
    _get(errs, d, "comment", "", str, "")
    levels = _names(errs, d, "levels", "", ["datacenter", "rack", HOST_LEVEL], limit=L.MAX_LEVELS)
    hosts = [host_from_dict(errs, h, f"hosts[{i}]") for i, h in enumerate(_list(errs, d, "hosts", L.MAX_HOSTS))]
    budget = _Budget()
    groups = [_group(errs, g, f"groups[{i}]", budget) for i, g in enumerate(_list(errs, d, "groups", L.MAX_GROUPS, []))]
    rules = [_rule(errs, r, f"rules[{i}]") for i, r in enumerate(_list(errs, d, "rules", L.MAX_RULES, []))]
    current = _mapping(errs, d, "current", "", {}, limit=L.MAX_VMS) or {}
    for vm, host in current.items():
        if not isinstance(host, str):
            errs.add(f"current.{vm[:L.MAX_NAME_LEN]}", f"must be a host name, got {show(host)}")
    mv = _mapping(errs, d, "moves", "", {}) or {}
    for k in mv:
        if k not in ("allowed", "max"):
            errs.add(f"moves.{k[:L.MAX_NAME_LEN]}", "unknown field (allowed, max)")
    moves = MovePolicy(bool(_get(errs, mv, "allowed", "moves", bool, False)),
                       _get(errs, mv, "max", "moves", (int, type(None)), None))
    ob = _mapping(errs, d, "objective", "", {}) or {}
    for k in ob:
        if k not in ("mode", "resources"):
            errs.add(f"objective.{k[:L.MAX_NAME_LEN]}", "unknown field (mode, resources)")
    objective = Objective(_get(errs, ob, "mode", "objective", str, "balance") or "balance",
                          _names(errs, ob, "resources", "objective", [], limit=L.MAX_RESOURCES))
    if errs:
        raise (ProblemTooLargeError if budget.exceeded else ProblemError)(errs)
    p = Problem(hosts=[h for h in hosts if h], groups=[g for g in groups if g], rules=[r for r in rules if r],
                levels=levels, current=dict(current), moves=moves, objective=objective)
    return p.validate()


def read_document(path: str | Path) -> bytes:
    """The bytes of a problem file, refused (ProblemTooLargeError) beyond ``limits.MAX_INPUT_BYTES``
    before reading more than that."""
    path = Path(path)
    src = str(path)
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > L.MAX_INPUT_BYTES:
                raise ProblemTooLargeError([("", f"the file has {st.st_size} bytes: at most {L.MAX_INPUT_BYTES} "
                                                 f"(a documented limit)")], source=src)
            data = f.read(L.MAX_INPUT_BYTES + 1)
    except IsADirectoryError as exc:
        raise ProblemError([("", "cannot read: it is a directory")], source=src) from exc
    except ValueError as exc:              # e.g. a NUL byte in the path (the OS cannot name such a file)
        raise ProblemError([("", f"cannot read: not a usable path ({exc})")], source=src[:200]) from exc
    except OSError as exc:
        raise ProblemError([("", f"cannot read: {exc.strerror or exc}")], source=src) from exc
    if len(data) > L.MAX_INPUT_BYTES:
        raise ProblemTooLargeError([("", f"more than {L.MAX_INPUT_BYTES} bytes (a documented limit)")], source=src)
    return data


def parse_document(text: str | bytes) -> Any:
    """JSON text -> document, with the size checked first and every parser failure (nesting
    deeper than the parser allows, integer literals longer than Python converts) a ProblemError."""
    if len(text) > L.MAX_INPUT_BYTES:
        raise ProblemTooLargeError([("", f"the document has more than {L.MAX_INPUT_BYTES} bytes "
                                         f"(a documented limit)")])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ProblemError([("", f"not UTF-8 text (byte {exc.start})")]) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProblemError([("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]) from exc
    except RecursionError as exc:
        raise ProblemError([("", "not a problem document: JSON nested deeper than the parser allows "
                                 "(a problem needs 5 levels)")]) from exc
    except ValueError as exc:  # an integer literal of more than 4300 digits
        raise ProblemError([("", f"not a problem document: {str(exc).split(';')[0]}")]) from exc


def load_problem(src: str | Path | bytes | Mapping[str, Any]) -> Problem:
    """Load a problem from a path, a JSON text (bytes, or a str starting with ``{`` or ``[``) or an
    already-parsed dict (any other parsed JSON value is refused as not a problem object)."""
    if isinstance(src, bytes):
        return problem_from_dict(parse_document(src))
    if isinstance(src, Path) or (isinstance(src, str) and src.lstrip()[:1] not in ("{", "[")):
        return problem_from_dict(parse_document(read_document(src)))
    if isinstance(src, str):
        return problem_from_dict(parse_document(src))
    return problem_from_dict(src)


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


def dump_result(result: PlacementResult, path: str | Path | None = None) -> str:
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text
