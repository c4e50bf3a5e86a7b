"""CP-SAT model of a placement problem.

VMs of one group with the same demand are interchangeable, so the model does not decide "VM v on
host h" (400k booleans at 2000 VMs x 200 hosts) but "how many VMs of class k on host h": one
bounded integer per (class, allowed host). Names are given back to VMs after solving, keeping
VMs that may move on their current host where the count allows.

Two ways to build:

- normal: VMs that may not move are constants; rules that touch no variable VM are not encoded
  (a preferred one adds its violations, counted on the fixed VMs, as a constant to the penalty;
  callers check required ones with the independent checker); required domain rules and host
  reservations prune the hosts a class may use. This is the fast, incremental path: placing one
  new group into a cluster builds variables for that group only.
- explain: every VM is a variable and every required rule (plus ``keep:GROUP`` for VMs that may
  not move and ``move-limit``) is guarded by an assumption literal, so the solver can name a
  set of rules that cannot hold together.

Objective (lexicographic, as one weighted sum with multipliers that keep the levels apart):
preferred penalty, then moves, then balance (total load above the cluster average, per-mille
of each host's capacity, summed over hosts and resources) or packing (hosts used).

Building honours a deadline (``ModelTimeout``); every CP-SAT call is given the time left minus
an estimate of its own loading time (which it does not count), so a solve ends by its deadline.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ortools.sat.python import cp_model as cp

from .check import check
from .errors import PlacementError
from .model import (HOST_LEVEL, Affinity, AntiAffinity, DomainAntiAffinity, DomainRule, MaxPerDomain, Problem,
                    ReserveAmount, ReserveHosts, Rule, Spread, eligible_map)

KEEP_PREFIX = "keep:"
MOVE_LIMIT = "move-limit"
SCALE = 1000  # balance weights: one unit of load weighs its per-mille share of an average host
SMALL_MODEL_VARS = 5000
BALANCE_STEPS = 2 ** 20  # balance counts at most this many units per host (coarser units beyond)
# CP-SAT loads and checks a model before its time limit starts to count: about this much per
# variable and constraint on the development machine (2 shared cores), with a 2x margin
LOAD_S_PER_ITEM = 3e-6
INT_SAFE = 2 ** 62

Expr = cp.LinearExpr | int  # (an IntVar is a LinearExpr)
Presence = cp.IntVar | int
CountKey = tuple[tuple[str, ...], str]


class ModelTimeout(PlacementError):
    """The deadline passed while the model was being built (caught by the solver: status
    unknown, the time limit reached)."""


@dataclass
class SolverOptions:
    time_limit_s: float = 10.0
    seed: int = 0
    workers: int = 2
    log: bool = False


@dataclass
class _Class:
    group: str
    demand: dict[str, int]
    vms: list[str]                     # names, in group order
    cur: dict[int, int] = field(default_factory=dict)      # host -> VMs currently there (movable ones)
    keep: dict[int, int] = field(default_factory=dict)     # host -> VMs that must stay (explain mode)
    hosts: list[int] = field(default_factory=list)
    vars: list[cp.IntVar] = field(default_factory=list)
    ubs: list[int] = field(default_factory=list)
    at: dict[int, cp.IntVar] = field(default_factory=dict)  # host -> variable


@dataclass
class _Count:
    vars: list[cp.IntVar]
    const: int
    ub: int
    ubs: list[int] = field(default_factory=list)  # per variable
    cap: int | None = None  # a bound the required rules imply (for big-M only, never to skip a rule)
    parts: list[tuple[list[cp.IntVar], int]] = field(default_factory=list)  # per class: (its variables, bound)

    def expr(self) -> Expr:
        return cp.LinearExpr.sum(self.vars) + self.const if self.vars else self.const


def _no_solution(m: cp.CpModel) -> cp.Constraint:
    """A constraint that cannot hold (an empty clause)."""
    return m.add_bool_or([])


class PlacementModel:
    def __init__(self, problem: Problem, *, explain: bool = False, hint: Mapping[str, str] | None = None,
                 deadline: float | None = None, constants: dict[str, int] | None = None) -> None:
        """``constants``: rule name -> penalty already counted for a preferred rule whose groups
        are all fixed (as here); missing ones are counted and added (the controller keeps them
        between placements)."""
        self.p = problem
        self._constants = constants
        self.topo = problem.topology
        self.explain = explain
        self.deadline = deadline
        self.m = cp.CpModel()
        self.lits: dict[str, cp.IntVar] = {}      # explain: rule name -> assumption literal
        self.penalty: list[tuple[int, cp.IntVar]] = []
        self.penalty_ub = 0                       # most the penalty variables can add up to
        self.penalty_const = 0
        self.skipped: list[str] = []              # normal mode: rules touching no variable VM
        self._cache: dict[CountKey, dict[str, _Count]] = {}
        self._pres: dict[tuple[tuple[str, ...], str, str], Presence] = {}
        self._caps: dict[CountKey, int] = {}
        self._elig: dict[str, set[int]] = {}
        self._build_vms()
        if not explain:
            self._elig = {g: hs for g, (hs, _) in eligible_map(problem).items()}
            self._caps = self._required_caps()
        self._build_vars()
        self._build_capacity()
        self._build_moves()
        for r in problem.rules:
            self._tick()
            self._rule(r)
        if not explain:
            self._skipped_penalty()
            self._build_objective()
            if hint:
                self._hint(hint)

    def _tick(self) -> None:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise ModelTimeout("the time limit was reached while the model was being built")

    @property
    def size(self) -> int:
        """Variables + constraints."""
        return len(self.m.proto.variables) + len(self.m.proto.constraints)

    @property
    def load_s(self) -> float:
        """Estimated seconds CP-SAT takes to load this model before its time limit counts."""
        return LOAD_S_PER_ITEM * self.size

    # ------------------------------------------------------------------ VMs and classes
    def _build_vms(self) -> None:
        p, topo = self.p, self.topo
        hidx = topo.host_index
        H = len(p.hosts)
        self.fixed: dict[str, int] = {}                        # vm -> host (normal mode)
        self.fixed_count: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.fixed_load: list[dict[str, int]] = [defaultdict(int) for _ in range(H)]
        self.classes: list[_Class] = []
        self.classes_of: dict[str, list[_Class]] = defaultdict(list)
        self.group_size: dict[str, int] = {}
        self.total_demand: dict[str, int] = defaultdict(int)
        may_move = p.moves.allowed
        for g in p.groups:
            self._tick()
            self.group_size[g.name] = len(g.vms)
            by_key: dict[tuple[tuple[str, int], ...], _Class] = {}
            for vm in g.vms:
                for r, a in vm.demand.items():
                    self.total_demand[r] += a
                h = p.current.get(vm.name)
                hi = hidx.get(h) if h is not None else None
                if hi is not None and not may_move and not self.explain:
                    self.fixed[vm.name] = hi
                    self.fixed_count[g.name][hi] += 1
                    fl = self.fixed_load[hi]
                    for r, a in vm.demand.items():
                        fl[r] += a
                    continue
                key = tuple(sorted(vm.demand.items()))
                c = by_key.get(key)
                if c is None:
                    c = by_key[key] = _Class(g.name, dict(vm.demand), [])
                    self.classes.append(c)
                    self.classes_of[g.name].append(c)
                c.vms.append(vm.name)
                if hi is not None:
                    if may_move:
                        c.cur[hi] = c.cur.get(hi, 0) + 1
                    else:
                        c.keep[hi] = c.keep.get(hi, 0) + 1
        self.variable_groups = {c.group for c in self.classes}

    def _allowed(self, group: str) -> set[int]:
        if self.explain:
            return set(range(len(self.p.hosts)))
        return self._elig[group]

    def _build_vars(self) -> None:
        m = self.m
        eff = self.topo.effective
        self.host_terms: list[list[tuple[_Class, cp.IntVar, int]]] = [[] for _ in self.p.hosts]
        per_host: dict[str, int] = {}  # normal mode: required per-host caps tighten the bounds
        if not self.explain:
            for rule in self.p.rules:
                if not rule.required or rule.level_named != HOST_LEVEL:
                    continue
                if isinstance(rule, AntiAffinity) and len(rule.groups) == 1:
                    per_host[rule.groups[0]] = 1
                elif isinstance(rule, MaxPerDomain):
                    for g in rule.groups:
                        per_host[g] = min(per_host.get(g, rule.max), rule.max)
        for ci, c in enumerate(self.classes):
            self._tick()
            allowed = self._allowed(c.group)
            n = len(c.vms)
            cap_g = per_host.get(c.group)  # a required per-host cap on the whole group, if any
            dem = [(r, a) for r, a in c.demand.items() if a > 0]
            for h in sorted(allowed | set(c.keep)):
                ub = n
                fl = self.fixed_load[h]
                for r, a in dem:
                    ub = min(ub, (eff[h].get(r, 0) - fl.get(r, 0)) // a)
                if cap_g is not None:
                    ub = min(ub, cap_g - self.fixed_count.get(c.group, {}).get(h, 0))
                if h in c.keep:
                    ub = max(ub, c.keep[h])
                if ub <= 0:
                    continue
                v = m.new_int_var(0, ub, f"n{ci}_{h}")
                c.hosts.append(h)
                c.vars.append(v)
                c.ubs.append(ub)
                c.at[h] = v
                self.host_terms[h].append((c, v, ub))
            if c.vars:
                m.add(cp.LinearExpr.sum(c.vars) == n)
            else:
                _no_solution(m)  # no host at all: infeasible

    def _enf(self, ct: cp.Constraint, rule: Rule | str) -> None:
        name = rule if isinstance(rule, str) else rule.name
        if self.explain and (isinstance(rule, str) or rule.required):
            lit = self.lits.get(name)
            if lit is None:
                lit = self.lits[name] = self.m.new_bool_var(f"rule:{name}")
            ct.only_enforce_if(lit)

    def _build_capacity(self) -> None:
        eff = self.topo.effective
        for h, terms in enumerate(self.host_terms):
            if not terms:
                continue
            for r in {r for c, _, _ in terms for r, a in c.demand.items() if a > 0}:
                rhs = eff[h].get(r, 0) - self.fixed_load[h].get(r, 0)
                coeffs = [c.demand.get(r, 0) for c, _, _ in terms]
                if sum(a * u for a, (_, _, u) in zip(coeffs, terms, strict=True)) <= rhs:
                    continue
                self.m.add(cp.LinearExpr.weighted_sum([v for _, v, _ in terms], coeffs) <= rhs)

    def _build_moves(self) -> None:
        m = self.m
        self.moves_ub = 0
        stays: list[cp.IntVar] = []
        total_cur = 0
        for c in self.classes:
            if c.keep:
                for h, k in c.keep.items():
                    ct = m.add(c.at[h] >= k) if h in c.at else _no_solution(m)
                    self._enf(ct, KEEP_PREFIX + c.group)
            for h, k in c.cur.items():
                total_cur += k
                if h not in c.at:
                    continue
                s = m.new_int_var(0, k, "")
                m.add(s <= c.at[h])
                stays.append(s)
        self.moves_ub = total_cur
        self.moves_expr: Expr = total_cur - cp.LinearExpr.sum(stays) if stays else total_cur
        if self.p.moves.allowed and self.p.moves.max is not None and total_cur:
            self._enf(m.add(self.moves_expr <= self.p.moves.max), MOVE_LIMIT)

    # ------------------------------------------------------------------ counts
    def _counts(self, groups: tuple[str, ...], level: str) -> dict[str, _Count]:
        key = (groups, level)
        got = self._cache.get(key)
        if got is not None:
            return got
        dom_of = self.topo.domain_of[level]
        vs: dict[str, list[cp.IntVar]] = defaultdict(list)
        vub: dict[str, list[int]] = defaultdict(list)
        ub: dict[str, int] = defaultdict(int)
        const: dict[str, int] = defaultdict(int)
        parts: dict[str, list[tuple[list[cp.IntVar], int]]] = defaultdict(list)
        total = 0
        for g in groups:
            for c in self.classes_of.get(g, ()):
                total += len(c.vms)
                mine: dict[str, list[tuple[cp.IntVar, int]]] = defaultdict(list)
                for h, v, u in zip(c.hosts, c.vars, c.ubs, strict=True):
                    d = dom_of[h]
                    vs[d].append(v)
                    vub[d].append(u)
                    ub[d] += u
                    mine[d].append((v, u))
                for d, vu in mine.items():
                    parts[d].append(([v for v, _ in vu], min(len(c.vms), sum(u for _, u in vu))))
            for h, k in self.fixed_count.get(g, {}).items():
                const[dom_of[h]] += k
        cap = self._caps.get(key)
        out = {d: _Count(vs.get(d, []), const.get(d, 0), min(ub.get(d, 0), total) + const.get(d, 0), vub.get(d, []),
                         cap, parts.get(d, []))
               for d in set(vs) | set(const)}
        self._cache[key] = out
        return out

    def _group_hosts(self, groups: Iterable[str]) -> set[int]:
        """Hosts any of ``groups`` may use (required domain rules and host reservations)."""
        hosts: set[int] = set()
        for g in groups:
            got = self._elig.get(g)
            if got is None:
                got = self._elig[g] = eligible_map(self.p, [g])[g][0]
            hosts |= got
        return hosts

    def _required_caps(self) -> dict[CountKey, int]:
        """(groups, level) -> most VMs of the groups any one domain may hold under the required
        rules: 1 for a one-group anti-affinity, ``max`` for max_per_domain, average + max_skew for
        a spread. Used to tighten big-M terms only."""
        caps: dict[CountKey, int] = {}

        def put(key: CountKey, v: int) -> None:
            caps[key] = min(caps.get(key, v), v)

        for r in self.p.rules:
            if not r.required or not self.variable_groups.intersection(r.groups_named):
                continue  # (caps only matter for counts over variables)
            if isinstance(r, AntiAffinity) and len(r.groups) == 1:
                put((tuple(r.groups), r.level), 1)
            elif isinstance(r, MaxPerDomain):
                put((tuple(r.groups), r.level), r.max)
            elif isinstance(r, Spread):
                total = sum(len(self.p.group(g).vms) for g in r.groups)
                dom_of = self.topo.domain_of[r.level]
                n_dom = len({dom_of[h] for h in self._group_hosts(r.groups)})
                if n_dom:
                    put((tuple(r.groups), r.level), total // n_dom + r.max_skew)
        return caps

    def _touches_vars(self, rule: Rule) -> bool:
        groups = rule.groups_named
        if not groups:  # reservations apply to every VM
            return bool(self.classes)
        return any(g in self.variable_groups for g in groups)

    def _presence(self, c: _Count, lit: cp.IntVar | None = None,
                  key: tuple[tuple[str, ...], str, str] | None = None) -> Presence:
        """1 if the count is surely positive, else a boolean that is 1 exactly when it is
        (``lit``: use that boolean). One big-M per variable plus one over the sum (with the
        domain's own bound): a tighter LP than either alone. With ``key`` (groups, level,
        domain) the boolean is shared by every rule asking for the same count."""
        if c.const > 0 and lit is None:
            return 1
        if key is not None and lit is None:
            got = self._pres.get(key)
            if got is not None:
                return got
        b = lit if lit is not None else self.m.new_bool_var("")
        if c.const > 0:
            self.m.add(b == 1)
        else:
            cap = c.ub if c.cap is None else min(c.ub, c.cap)
            for v, u in zip(c.vars, c.ubs, strict=True):
                u = min(u, cap)
                if u > 1:
                    self.m.add(v <= u * b)
                else:
                    self.m.add(v <= b)
            if len(c.vars) > 1:
                self.m.add(cp.LinearExpr.sum(c.vars) <= cap * b)
            if len(c.parts) > 1:  # several classes: each within its own bound (a tighter LP when
                for pv, pu in c.parts:  # the groups may use different domains)
                    pu = min(pu, cap)
                    if len(pv) > 1 and pu > 1:
                        self.m.add(cp.LinearExpr.sum(pv) <= pu * b)
            if c.vars:
                self.m.add(cp.LinearExpr.sum(c.vars) >= b)
            else:
                self.m.add(b == 0)
        if key is not None and lit is None:
            self._pres[key] = b
        return b

    def _pen(self, weight: int, v: cp.IntVar, ub: int) -> None:
        self.penalty.append((weight, v))
        self.penalty_ub += weight * max(ub, 0)

    def _soft(self, rule: Rule, ub: int) -> cp.IntVar:
        v = self.m.new_int_var(0, max(ub, 0), "") if ub > 1 else self.m.new_bool_var("")
        self._pen(rule.weight, v, max(ub, 1))
        return v

    # ------------------------------------------------------------------ rules
    def _rule(self, r: Rule) -> None:
        if not self.explain and not self._touches_vars(r):
            self.skipped.append(r.name)
            return
        if isinstance(r, AntiAffinity):
            self._r_anti_affinity(r)
        elif isinstance(r, Affinity):
            self._r_affinity(r)
        elif isinstance(r, DomainRule):
            self._domain_rule(r, not isinstance(r, DomainAntiAffinity))
        elif isinstance(r, Spread):
            self._r_spread(r)
        elif isinstance(r, MaxPerDomain):
            self._r_max_per_domain(r)
        elif isinstance(r, ReserveHosts):
            self._r_reserve_hosts(r)
        elif isinstance(r, ReserveAmount):
            self._r_reserve_amount(r)
        else:
            raise TypeError(f"no encoding for rule kind {r.kind!r}")

    def _skipped_penalty(self) -> None:
        """Preferred rules that touch only VMs that cannot move are not in the model, but their
        violations (a constant, counted by the rule definitions on the fixed VMs) are part of
        the penalty: without them the reported objective would be below what the placement
        costs, and below the proven optimum."""
        by_name = {r.name: r for r in self.p.rules}
        soft = [n for n in self.skipped if not by_name[n].required]
        known = self._constants if self._constants is not None else {}
        missing = [n for n in soft if n not in known]
        if missing:
            names = [h.name for h in self.p.hosts]
            fixed = {vm: names[h] for vm, h in self.fixed.items()}
            counted = {rc.name: rc.penalty for rc in check(self.p, fixed, rules=missing, hosts=()).rules}
            if self._constants is not None:
                self._constants.update(counted)
            known = {**known, **counted}
        self.penalty_const += sum(known[n] for n in soft)

    def _r_anti_affinity(self, r: AntiAffinity) -> None:
        m = self.m
        if len(r.groups) == 1:
            for c in self._counts(tuple(r.groups), r.level).values():
                if c.ub <= 1:
                    continue
                if r.required:
                    self._enf(m.add(c.expr() <= 1), r)
                else:
                    e = self._soft(r, c.ub - 1)
                    m.add(e >= c.expr() - 1)
            return
        per = [(g, self._counts((g,), r.level)) for g in r.groups]
        domains: set[str] = set()
        for _, cg in per:
            domains.update(cg)
        for d in domains:
            pres: list[Presence] = []
            for g, cg in per:
                cnt = cg.get(d)
                if cnt is None or cnt.ub == 0:
                    continue
                pres.append(self._presence(cnt, key=((g,), r.level, d)))
            if len(pres) < 2:
                continue
            if r.required:
                self._enf(m.add(cp.LinearExpr.sum(pres) <= 1), r)
            else:
                v = self._soft(r, 1)
                m.add(cp.LinearExpr.sum(pres) <= 1 + (len(pres) - 1) * v)

    def _r_affinity(self, r: Affinity) -> None:
        m = self.m
        cs = {d: c for d, c in self._counts(tuple(r.groups), r.level).items() if c.ub > 0}
        sel: list[Presence] = []
        for d, c in sorted(cs.items()):
            b: Presence
            if r.required and self.explain:
                b = m.new_bool_var("")
                self._enf(m.add(c.expr() <= c.ub * b), r)
            else:
                b = self._presence(c, key=(tuple(r.groups), r.level, d))
                if not r.required:
                    if isinstance(b, int):
                        self.penalty_const += r.weight * b
                    else:
                        self._pen(r.weight, b, 1)
            sel.append(b)
        if r.required:
            self._enf(m.add(cp.LinearExpr.sum(sel) <= 1), r)
        else:
            self.penalty_const -= r.weight

    def _domain_rule(self, r: DomainRule, inside_ok: bool) -> None:
        m = self.m
        inside = self.topo.hosts_in(r.domains)

        def bad(h: int) -> bool:
            return (h in inside) != inside_ok

        if r.required and not self.explain:
            return  # pruned from the hosts the classes may use
        for g in r.groups:
            for c in self.classes_of.get(g, ()):
                vs = [(v, u) for h, v, u in zip(c.hosts, c.vars, c.ubs, strict=True) if bad(h)]
                if not vs:
                    continue
                if r.required:
                    self._enf(m.add(cp.LinearExpr.sum([v for v, _ in vs]) == 0), r)
                else:
                    for v, u in vs:
                        self._pen(r.weight, v, u)
            if not r.required:
                self.penalty_const += r.weight * sum(k for h, k in self.fixed_count.get(g, {}).items() if bad(h))

    def _r_spread(self, r: Spread) -> None:
        m = self.m
        cs = self._counts(tuple(r.groups), r.level)
        hosts = self._group_hosts(r.groups)  # (the rule's domains: docs/placement.md)
        dom_of = self.topo.domain_of[r.level]
        domains = sorted({dom_of[h] for h in hosts} | set(cs))
        total = sum(self.group_size.get(g, 0) for g in r.groups)
        zero = _Count([], 0, 0)
        counts = [cs.get(d, zero) for d in domains]
        if len(domains) > 1:
            # every VM of the groups is in one of the domains: min <= average <= max
            mx = m.new_int_var(-(-total // len(domains)), total, "")
            mn = m.new_int_var(0, total // len(domains), "")
            for c in counts:
                e = c.expr()
                m.add(mx >= e)
                m.add(mn <= e)
            if r.required:
                self._enf(m.add(mx - mn <= r.max_skew), r)
                avg = total // len(domains)
                if not self.explain and len(domains) <= 64 and avg <= 3:
                    # a domain left empty forces min = 0, so every used one holds <= max_skew:
                    # count <= max_skew * present + min, and min >= 1 makes every domain present.
                    # Same solutions, a much tighter LP where other rules push domains empty.
                    for d, c in zip(domains, counts, strict=True):
                        if c.const > 0 or not c.vars:
                            continue
                        pb = self._presence(c, key=(tuple(r.groups), r.level, d))
                        m.add(c.expr() <= r.max_skew * pb + mn)
                        if avg:
                            m.add(avg * pb >= mn)
            else:
                s = self._soft(r, total)
                m.add(s >= mx - mn - r.max_skew)
        if r.min_domains > 1:
            used: list[Presence] = []
            for d, c in zip(domains, counts, strict=True):
                if c.const > 0:
                    used.append(1)
                elif c.ub > 0:
                    used.append(self._presence(c, key=(tuple(r.groups), r.level, d)))
            if r.required:
                self._enf(m.add(cp.LinearExpr.sum(used) >= r.min_domains) if used else _no_solution(m), r)
            else:
                t = self._soft(r, r.min_domains)
                if used:
                    m.add(t >= r.min_domains - cp.LinearExpr.sum(used))
                else:
                    m.add(t >= r.min_domains)

    def _r_max_per_domain(self, r: MaxPerDomain) -> None:
        for c in self._counts(tuple(r.groups), r.level).values():
            if c.ub <= r.max:
                continue
            if r.required:
                self._enf(self.m.add(c.expr() <= r.max), r)
            else:
                e = self._soft(r, c.ub - r.max)
                self.m.add(e >= c.expr() - r.max)

    def _r_reserve_hosts(self, r: ReserveHosts) -> None:
        if r.required and not self.explain:
            return  # pruned
        for name in r.hosts:
            h = self.topo.host_index[name]
            vs = [v for _, v, _ in self.host_terms[h]]
            busy = any(fc.get(h, 0) for fc in self.fixed_count.values())
            if r.required:
                if vs:
                    self._enf(self.m.add(cp.LinearExpr.sum(vs) == 0), r)
            elif busy:
                self.penalty_const += r.weight
            elif vs:
                b = self._soft(r, 1)
                self.m.add(cp.LinearExpr.sum(vs) <= sum(u for _, _, u in self.host_terms[h]) * b)

    def _r_reserve_amount(self, r: ReserveAmount) -> None:
        topo = self.topo
        eff = topo.effective
        doms = topo.members[r.level]
        names = sorted(doms) if not r.domains else [topo.resolve(d)[1] for d in r.domains]
        for d in names:
            hs = doms[d]
            for res, amt in r.amount.items():
                cap = sum(eff[h].get(res, 0) for h in hs)
                fixed = sum(self.fixed_load[h].get(res, 0) for h in hs)
                vs: list[cp.IntVar] = []
                co: list[int] = []
                mx = fixed
                for h in hs:
                    for c, v, u in self.host_terms[h]:
                        a = c.demand.get(res, 0)
                        if a:
                            vs.append(v)
                            co.append(a)
                            mx += a * u
                rhs = cap - amt
                if mx <= rhs:
                    continue
                load = cp.LinearExpr.weighted_sum(vs, co) + fixed if vs else fixed
                if r.required:
                    self._enf(self.m.add(load <= rhs), r)
                else:
                    b = self._soft(r, 1)
                    self.m.add(load <= rhs + (mx - rhs) * b)

    # ------------------------------------------------------------------ objective
    def _build_objective(self) -> None:
        m = self.m
        eff = self.topo.effective
        obj = self.p.objective
        bal_vars: list[cp.IntVar] = []
        bal_weights: list[int] = []
        bal_ub = 0
        if obj.mode == "pack":
            for h, terms in enumerate(self.host_terms):
                if not terms or any(self.fixed_load[h].values()):
                    continue
                u = m.new_bool_var("")
                m.add(cp.LinearExpr.sum([v for _, v, _ in terms]) <= sum(ub for _, _, ub in terms) * u)
                bal_vars.append(u)
                bal_weights.append(1)
            bal_ub = len(bal_vars)
        else:
            # load above the cluster-average utilisation, host by host; counted in units of the
            # gcd of the demands (small coefficients keep CP-SAT's propagation and LP sharp) and
            # weighted so that one unit weighs its share of an average host. Units are coarser
            # where a host holds more than BALANCE_STEPS of them (huge capacities), so that the
            # objective's multipliers stay far from integer overflow.
            res = obj.resources or tuple(sorted(r for r, a in self.total_demand.items() if a > 0))
            H = len(eff)
            for r in res:
                self._tick()
                total_cap = sum(e.get(r, 0) for e in eff)
                unit = 0
                for c in self.classes:
                    unit = math.gcd(unit, c.demand.get(r, 0))
                if total_cap <= 0 or unit <= 0:
                    continue
                max_cap = max(e.get(r, 0) for e in eff)
                coarse = max_cap // unit > BALANCE_STEPS
                step = -(-max_cap // BALANCE_STEPS) if coarse else unit
                weight = max(1, round(SCALE * step * H / total_cap))
                frac = self.total_demand.get(r, 0) / total_cap
                for h, terms in enumerate(self.host_terms):
                    cap = eff[h].get(r, 0)
                    vs = [(v, c.demand.get(r, 0)) for c, v, _ in terms if c.demand.get(r, 0)]
                    if cap <= 0 or not vs:
                        continue
                    fixed = self.fixed_load[h].get(r, 0)
                    target = int(frac * cap) - fixed
                    if coarse:  # step * e >= load - target
                        ub = max(0, -(-(cap - fixed - target) // step))
                    else:
                        ub = max(0, (cap - fixed) // unit - target // unit)
                    if ub == 0:
                        continue
                    e = m.new_int_var(0, ub, "")
                    if coarse:
                        m.add(step * e >= cp.LinearExpr.weighted_sum([v for v, _ in vs], [a for _, a in vs]) - target)
                    else:
                        m.add(e >= cp.LinearExpr.weighted_sum([v for v, _ in vs], [a // unit for _, a in vs])
                              - target // unit)
                    bal_vars.append(e)
                    bal_weights.append(weight)
                    bal_ub += weight * ub
        self.balance_expr: Expr = cp.LinearExpr.weighted_sum(bal_vars, bal_weights) if bal_vars else 0
        w2 = bal_ub + 1
        self.weights = (w2 * (self.moves_ub + 1), w2)
        self.secondary_ub = w2 * self.moves_ub + bal_ub
        self.penalty_expr: Expr = cp.LinearExpr.weighted_sum([v for _, v in self.penalty],
                                                             [w for w, _ in self.penalty]) if self.penalty else 0
        # stage 2 objective: moves above balance, kept apart by the multiplier
        has_moves = not isinstance(self.moves_expr, int)
        has_bal = not isinstance(self.balance_expr, int)
        self.secondary_expr: Expr = (w2 * self.moves_expr if has_moves else 0) + \
            (self.balance_expr if has_bal else 0) if has_moves or has_bal else 0
        # stage 1 first (also the objective the hint is completed under)
        if self.penalty:
            m.minimize(self.penalty_expr)
        elif not isinstance(self.secondary_expr, int):
            m.minimize(self.secondary_expr)

    @property
    def combinable(self) -> bool:
        """Whether the one-solve weighted sum of both objective levels stays clear of integer
        overflow (its multiplier grows with the balance and moves bounds)."""
        w1, _ = self.weights
        return w1 * self.penalty_ub + self.secondary_ub < INT_SAFE

    def _hint(self, hint: Mapping[str, str]) -> None:
        """Warm start from a placement. The auxiliary variables (penalties, presence, balance)
        are completed by solving a copy with the counts fixed, so the hint is a whole solution
        CP-SAT can start improving at once; a hint that breaks a rule is given as counts only."""
        hidx = self.topo.host_index
        pairs: list[tuple[cp.IntVar, int]] = []
        complete = True
        for c in self.classes:
            want: dict[int, int] = defaultdict(int)
            for vm in c.vms:
                h = hidx.get(hint.get(vm, ""))
                if h is not None and h in c.at:
                    want[h] += 1
                else:
                    complete = False
            for h, v in zip(c.hosts, c.vars, strict=True):
                pairs.append((v, want.get(h, 0)))
        left = 2.0 if self.deadline is None else min(2.0, self.deadline - time.perf_counter() - self.load_s)
        if not complete or left < 0.05:
            # a partial placement (greedy got stuck): hint where it put VMs, leave the rest to
            # the solver (hinting zeros there would steer it away from completing the placement)
            for v, k in pairs:
                if k > 0 or complete:
                    self.m.add_hint(v, k)
            return
        fixed = self.m.clone()
        for v, k in pairs:
            fixed.add(fixed.get_int_var_from_proto_index(v.index) == k)
        s = cp.CpSolver()
        s.parameters.num_workers = 1
        s.parameters.max_time_in_seconds = left
        if s.solve(fixed) in (cp.OPTIMAL, cp.FEASIBLE):
            sol = s.response_proto.solution
            hp = self.m.proto.solution_hint
            hp.vars.extend(range(len(sol)))
            hp.values.extend(sol)
        else:
            for v, k in pairs:
                self.m.add_hint(v, k)

    # ------------------------------------------------------------------ solving
    def solver(self, opts: SolverOptions) -> cp.CpSolver:
        s = cp.CpSolver()
        prm = s.parameters
        prm.max_time_in_seconds = max(0.01, opts.time_limit_s)
        prm.random_seed = opts.seed
        # small models (an incremental placement) solve faster on one worker, which is also
        # fully deterministic; big ones get the configured portfolio
        small = len(self.m.proto.variables) < SMALL_MODEL_VARS
        prm.num_workers = 1 if small else max(1, opts.workers)
        if small:
            prm.linearization_level = 2  # proves preferred-rule bounds that level 1 leaves open
        else:
            # big models: probing in presolve costs seconds and finds little here; search sooner
            prm.cp_model_probing_level = 0
        prm.log_search_progress = opts.log
        return s

    def invalid_reason(self) -> str:
        """Why CP-SAT calls the model invalid (an internal error: limits keep numbers in range)."""
        return self.m.validate() or "model invalid"

    def assignment(self, s: cp.CpSolver) -> dict[str, str]:
        names = [h.name for h in self.p.hosts]
        out = {vm: names[h] for vm, h in self.fixed.items()}
        for c in self.classes:
            left = {h: int(s.value(v)) for h, v in zip(c.hosts, c.vars, strict=True)}
            rest = []
            cur = {vm: self.topo.host_index[self.p.current[vm]] for vm in c.vms
                   if self.p.current.get(vm) in self.topo.host_index}
            for vm in c.vms:  # stay where possible
                h = cur.get(vm)
                if h is not None and left.get(h, 0) > 0:
                    out[vm] = names[h]
                    left[h] -= 1
                else:
                    rest.append(vm)
            slots = (h for h in c.hosts for _ in range(left[h]))
            for vm, h in zip(rest, slots, strict=False):
                out[vm] = names[h]
        return out

    def components(self, s: cp.CpSolver) -> dict[str, int]:
        """The objective's parts for the solver's placement; the penalty includes the constant
        part (preferred rules broken by VMs that cannot move)."""
        def value(e: Expr) -> int:
            return e if isinstance(e, int) else int(s.value(e))
        return {"preferred_penalty": value(self.penalty_expr) + self.penalty_const,
                "moves": value(self.moves_expr),
                ("hosts_used" if self.p.objective.mode == "pack" else "balance"): value(self.balance_expr)}

    def assume(self, names: Iterable[str]) -> None:
        self.m.clear_assumptions()
        self.m.add_assumptions([self.lits[n] for n in names])


@dataclass
class Staged:
    """Outcome of ``solve_staged``: ``solver`` holds the placement (when status is optimal or
    feasible). ``gaps``: relative gap per stage that ran; ``gap``: the gap of the most important
    stage whose optimum is not proven (0.0 when every stage is proven optimal). ``limit_hit``:
    a stage stopped at the time limit (or had no time left to start)."""
    status: str
    solver: cp.CpSolver | None
    gap: float | None = None
    gaps: dict[str, float] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    limit_hit: bool = False


def _stage_gap(s: cp.CpSolver, status: str, offset: int = 0) -> float:
    obj, bound = s.objective_value + offset, s.best_objective_bound + offset
    if status == "optimal" or math.isclose(obj, bound):
        return 0.0
    return max(0.0, (obj - bound) / max(1.0, abs(obj)))


def solve_staged(pm: PlacementModel, opts: SolverOptions, deadline: float, *,
                 stage2_share: float = 0.2, combined_share: float = 0.0, combined_max_s: float = 0.5) -> Staged:
    """Lexicographic optimisation in stages on one model: (1) the weighted preferred-rule
    penalty, alone, so that its bound is proven on its own scale; (2) with the penalty fixed at
    its best value, moves then balance/packing (one weighted sum), warm-started from stage 1's
    solution. Stage 1 may use the time up to ``deadline`` minus ``stage2_share`` of what is left
    (all of it when stage 2 has nothing to do); stage 2 gets the rest. When stage 2 finds
    nothing better in time, stage 1's placement stands. ``combined_share`` > 0: first try both
    levels in one weighted solve for that share of the time, at most ``combined_max_s``.

    The penalty's gap counts its constant part (``pm.penalty_const``). Every CP-SAT call gets
    its share minus the model's estimated loading time (``pm.load_s``), so the last one ends by
    ``deadline``; a stage with no time left is not started (status unknown, ``limit_hit``)."""
    out = Staged("unknown", None)
    m = pm.m
    has_pen = bool(pm.penalty)
    has_sec = not isinstance(pm.secondary_expr, int)
    load = pm.load_s

    def run(budget: float, second: bool = False) -> tuple[str, cp.CpSolver | None, float]:
        """One CP-SAT call within ``budget`` seconds, its loading time included."""
        t = time.perf_counter()
        limit = min(budget, deadline - t) - load
        if limit < 0.01:
            out.limit_hit = True
            return "unknown", None, 0.0
        sv = pm.solver(SolverOptions(limit, opts.seed, opts.workers, opts.log))
        if second and sv.parameters.num_workers > 1:
            # big model, complete hint from stage 1: a second presolve would eat the short
            # stage-2 budget before the hint is even loaded
            sv.parameters.cp_model_presolve = False
        st = STATUS[sv.solve(m)]
        if st in ("feasible", "unknown"):
            out.limit_hit = True
        return st, sv, time.perf_counter() - t

    first: cp.CpSolver | None = None
    if has_pen and has_sec and combined_share > 0 and pm.combinable:
        # small models: one solve of both levels as a weighted sum (the multiplier makes its
        # optimum the lexicographic one); proven optimal at once in the usual case, and one
        # CP-SAT call is cheaper than two. Otherwise its placement starts the stages.
        w1, _ = pm.weights
        m.minimize(w1 * pm.penalty_expr + pm.secondary_expr)
        st, sv, dt = run(min((deadline - time.perf_counter()) * combined_share, combined_max_s + load))
        out.stage_s["combined"] = dt
        if st == "optimal" and sv is not None:
            out.status, out.solver, out.gap = "optimal", sv, 0.0
            out.gaps = {"preferred_penalty": 0.0, "secondary": 0.0}
            out.limit_hit = False
            return out
        if st in ("infeasible", "invalid"):
            out.status = st
            return out
        out.limit_hit = False  # (a short first try: only the stages' limits count)
        m.minimize(pm.penalty_expr)
        if st == "feasible" and sv is not None:
            sol = list(sv.response_proto.solution)
            m.clear_hints()
            m.proto.solution_hint.vars.extend(range(len(sol)))
            m.proto.solution_hint.values.extend(sol)
    if has_pen:
        left = deadline - time.perf_counter()
        st, sv, dt = run(load + max(0.0, left - 2 * load) * (1 - stage2_share) if has_sec else left)
        out.stage_s["preferred_penalty"] = dt
        if st not in ("optimal", "feasible") or sv is None:
            out.status = st
            return out
        first = sv
        out.gaps["preferred_penalty"] = _stage_gap(sv, st, pm.penalty_const)
        out.status, out.solver = st, sv
        if not has_sec:
            out.gap = out.gaps["preferred_penalty"]
            return out
        best = int(round(sv.objective_value))
        sol = list(sv.response_proto.solution)
        m.add(pm.penalty_expr <= best)
        m.minimize(pm.secondary_expr)
        m.clear_hints()
        hp = m.proto.solution_hint
        hp.vars.extend(range(len(sol)))
        hp.values.extend(sol)
    if has_sec:
        st, sv, dt = run(deadline - time.perf_counter(), second=first is not None)
        out.stage_s["secondary"] = dt
        if st in ("optimal", "feasible") and sv is not None:
            out.gaps["secondary"] = _stage_gap(sv, st)
            out.solver = sv
            out.status = "optimal" if st == "optimal" and (first is None or out.gaps["preferred_penalty"] == 0) \
                else "feasible"
        elif first is None:
            out.status = st
            return out
        else:  # keep stage 1's placement; its secondary objective is not optimised
            out.status = "feasible"
            out.gaps["secondary"] = 1.0
    if not has_pen and not has_sec:  # nothing to optimise: a feasibility problem
        st, sv, dt = run(deadline - time.perf_counter())
        out.stage_s["feasibility"] = dt
        out.status, out.solver = st, (sv if st in ("optimal", "feasible") else None)
        if out.solver is None:
            return out
    out.gap = next((g for g in out.gaps.values() if g > 0), 0.0)
    return out


STATUS = {cp.OPTIMAL: "optimal", cp.FEASIBLE: "feasible", cp.INFEASIBLE: "infeasible",
          cp.UNKNOWN: "unknown", cp.MODEL_INVALID: "invalid"}


def gap(s: cp.CpSolver) -> float:
    obj, bound = s.objective_value, s.best_objective_bound
    return 0.0 if math.isclose(obj, bound) else max(0.0, (obj - bound) / max(1.0, abs(obj)))


__all__ = ["PlacementModel", "SolverOptions", "Staged", "solve_staged", "STATUS", "KEEP_PREFIX", "MOVE_LIMIT",
           "ModelTimeout", "gap", "HOST_LEVEL"]
