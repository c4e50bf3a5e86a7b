"""Seeded problem generators for the benchmark and the tests.

- ``generate(hosts, vms, rules, seed)``: a cluster (datacenter > zone > rack > host) with mixed
  host sizes and overcommit, groups of 2-40 VMs from a few flavours, and about ``rules`` rules of
  every kind, roughly half required. Feasible by construction: a hidden placement is drawn first
  and every required rule is derived from it (so it holds there); preferred rules are random.
- ``hard_instances(n, seed)``: small instances where the one-at-a-time greedy scheduler gets
  stuck although a placement exists (fragmentation, an affinity domain chosen too early, hosts
  used up by a group that had other choices).
- ``infeasible_instances(n, seed)``: instances with no placement, each hiding a small set of
  conflicting rules among satisfiable noise rules; ``expected`` names that set.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .model import (Affinity, AntiAffinity, DomainAffinity, DomainAntiAffinity, Group, Host, MaxPerDomain,
                    MovePolicy, Problem, ReserveAmount, ReserveHosts, Rule, Spread)

LEVELS = ("datacenter", "zone", "rack", "host")
FLAVOURS = [(1, 2048), (2, 4096), (2, 8192), (4, 8192), (4, 16384), (8, 32768)]


@dataclass
class GeneratedProblem(Problem):
    """A generated problem with the hidden placement it was derived from (VM -> host)."""
    planted: dict[str, str] = field(default_factory=dict)


def topology(n_hosts: int, rng: random.Random, rack_size: int = 10, racks_per_zone: int = 5,
             zones_per_dc: int = 2) -> list[Host]:
    hosts = []
    for i in range(n_hosts):
        rack = i // rack_size
        zone = rack // racks_per_zone
        dc = zone // zones_per_dc
        size = rng.choice([(32, 131072), (48, 196608), (64, 262144)])
        oc = rng.choice([2.0, 3.0, 4.0])
        cap = {"vcpus": size[0], "memory_mib": size[1]}
        if i % 10 == 0:
            cap["gpu"] = 2
        hosts.append(Host(f"h{i:03d}", cap, {"vcpus": oc}, {"datacenter": f"dc{dc}", "zone": f"z{zone}",
                                                           "rack": f"r{rack:02d}"}))
    return hosts


def generate(n_hosts: int = 50, n_vms: int = 500, n_rules: int = 120, seed: int = 0,
             required_share: float = 0.6, conflicting_share: float = 0.2) -> GeneratedProblem:
    rng = random.Random(seed)
    # 200 hosts: 2 datacenters x 2 zones x 5 racks x 10 hosts; small clusters get smaller racks
    shape = (10, 5, 2) if n_hosts >= 100 else (5, 2, 2)
    hosts = topology(n_hosts, rng, *shape)
    probe = Problem(hosts, [], [], LEVELS)
    topo = probe.topology
    eff = [dict(e) for e in topo.effective]
    free = [dict(e) for e in eff]
    planted: dict[str, int] = {}
    groups: list[Group] = []
    spare = set(rng.sample(range(n_hosts), max(1, n_hosts // 50)))  # kept empty: reserve_hosts material
    left = n_vms
    gi = 0
    misses = 0
    while left > 0:
        size = min(left, rng.randint(2, 40))
        vc, mem = rng.choice(FLAVOURS)
        demand = {"vcpus": vc, "memory_mib": mem}
        if gi % 15 == 7:
            demand["gpu"] = 1
            size = min(size, 6)
        name = f"g{gi:03d}"
        g = Group.uniform(name, size, demand)
        # hidden placement: distinct hosts, inside a random datacenter when it can
        dcs = sorted(topo.members["datacenter"])
        pool = [h for h in topo.members["datacenter"][rng.choice(dcs)] if h not in spare] if rng.random() < 0.5 \
            else [h for h in range(n_hosts) if h not in spare]
        placed = _plant(g, pool, free, rng) or _plant(g, [h for h in range(n_hosts) if h not in spare], free, rng)
        if placed is None:
            misses += 1
            if misses > 50:
                break  # cluster full
            continue
        planted.update(placed)
        groups.append(g)
        left -= size
        gi += 1
    rules = _rules(probe, groups, planted, free, eff, spare, n_rules, rng, required_share, conflicting_share)
    p = GeneratedProblem(hosts, groups, rules, LEVELS)
    p.validate()
    p.planted = {vm: hosts[h].name for vm, h in planted.items()}
    return p


def _plant(g: Group, pool: list[int], free: list[dict], rng: random.Random) -> dict[str, int] | None:
    order = list(pool)
    rng.shuffle(order)
    out: dict[str, int] = {}
    used: list[int] = []
    for vm in g.vms:
        # distinct hosts when possible (so host anti-affinity can be required), shared otherwise
        for h in order + used:
            if h in used and len(used) < len(order):
                continue
            if all(free[h].get(r, 0) >= a for r, a in vm.demand.items()):
                for r, a in vm.demand.items():
                    free[h][r] -= a
                out[vm.name] = h
                used.append(h)
                if h in order:
                    order.remove(h)
                break
        else:
            for h2 in out.values():  # undo (the group's VMs all have this demand)
                for r, a in vm.demand.items():
                    free[h2][r] += a
            return None
    return out


def _rules(p: Problem, groups: list[Group], planted: dict[str, int], free: list[dict], eff: list[dict],
           spare: set[int], n_rules: int, rng: random.Random, required_share: float,
           conflicting_share: float) -> list[Rule]:
    topo = p.topology
    at = {g.name: [planted[v.name] for v in g.vms] for g in groups}
    doms = {lv: {g.name: Counter(topo.domain_of[lv][h] for h in at[g.name]) for g in groups} for lv in LEVELS}
    names = [g.name for g in groups]
    rules: list[Rule] = []
    k = 0

    def nm(kind: str) -> str:
        nonlocal k
        k += 1
        return f"{kind}-{k:03d}"

    def soft() -> dict:
        return {"required": False, "weight": rng.choice([1, 2, 5, 10])}

    # most rules hold in the hidden placement (required ones always); a share of preferred rules
    # is drawn at random and conflicts, so the preferred penalty has something to minimise
    consistent = ["anti_host", "anti_pair", "affinity", "dom_aff", "dom_anti", "spread", "max_per"]
    random_soft = ["soft_anti", "soft_aff", "soft_spread", "soft_dom"]
    tries = 0
    while len(rules) < n_rules - 3 and tries < n_rules * 50:
        tries += 1
        kind = rng.choice(random_soft) if rng.random() < conflicting_share else rng.choice(consistent)
        a = rng.choice(names)
        want_req = rng.random() < required_share
        if kind == "anti_host":
            lv = rng.choice(["host", "host", "rack"])
            if max(doms[lv][a].values()) > 1:
                continue
            rules.append(AntiAffinity(nm("anti"), groups=(a,), level=lv, **({} if want_req else soft())))
        elif kind == "anti_pair":
            b = rng.choice(names)
            lv = rng.choice(["rack", "host"])
            if a == b or set(doms[lv][a]) & set(doms[lv][b]):
                continue
            rules.append(AntiAffinity(nm("apart"), groups=(a, b), level=lv, **({} if want_req else soft())))
        elif kind == "affinity":
            b = rng.choice(names)
            lv = "datacenter"
            if a == b or len(set(doms[lv][a]) | set(doms[lv][b])) != 1:
                continue
            rules.append(Affinity(nm("together"), groups=(a, b), level=lv, **({} if want_req else soft())))
        elif kind == "dom_aff":
            lv = rng.choice(["datacenter", "zone"])
            ds = sorted(doms[lv][a])
            extra = rng.sample(sorted(topo.members[lv]), 1)
            refs = tuple(sorted({f"{lv}:{d}" for d in ds + extra}))
            rules.append(DomainAffinity(nm("in"), groups=(a,), domains=refs, **({} if want_req else soft())))
        elif kind == "dom_anti":
            lv = "rack"
            free_racks = sorted(set(topo.members[lv]) - set(doms[lv][a]))
            if not free_racks:
                continue
            refs = tuple(f"{lv}:{d}" for d in rng.sample(free_racks, min(2, len(free_racks))))
            rules.append(DomainAntiAffinity(nm("notin"), groups=(a,), domains=refs, **({} if want_req else soft())))
        elif kind == "spread":
            lv = rng.choice(["zone", "rack"])
            # skew over the domains the group may use is not known yet: keep it preferred unless loose
            c = doms[lv][a]
            skew = max(c.values())
            rules.append(Spread(nm("spread"), groups=(a,), level=lv, max_skew=skew, min_domains=min(len(c), 2),
                                **({} if want_req else soft())))
        elif kind == "max_per":
            lv = rng.choice(["rack", "host"])
            mx = max(doms[lv][a].values())
            rules.append(MaxPerDomain(nm("atmost"), groups=(a,), level=lv, max=mx, **({} if want_req else soft())))
        elif kind == "soft_anti":
            b = rng.choice(names)
            if a != b:
                rules.append(AntiAffinity(nm("apart"), groups=(a, b), level="rack", **soft()))
        elif kind == "soft_aff":
            b = rng.choice(names)
            if a != b:
                rules.append(Affinity(nm("near"), groups=(a, b), level=rng.choice(["zone", "rack"]), **soft()))
        elif kind == "soft_spread":
            rules.append(Spread(nm("spread"), groups=(a,), level="rack", max_skew=1, min_domains=2, **soft()))
        elif kind == "soft_dom":
            lv = "zone"
            refs = (f"{lv}:{rng.choice(sorted(topo.members[lv]))}",)
            rules.append(DomainAffinity(nm("prefer"), groups=(a,), domains=refs, **soft()))
    # reservations the hidden placement satisfies
    if spare:
        rules.append(ReserveHosts(nm("spare"), hosts=tuple(p.hosts[h].name for h in sorted(spare))))
    zfree: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for h in range(len(p.hosts)):
        for res in ("vcpus", "memory_mib"):
            zfree[topo.domain_of["zone"][h]][res] += free[h].get(res, 0)
    amt = {res: max(0, min(z[res] for z in zfree.values()) // 2) for res in ("vcpus", "memory_mib")}
    rules.append(ReserveAmount(nm("failover"), level="zone", amount=amt))
    rules.append(ReserveAmount(nm("headroom"), level="rack", amount={"vcpus": 4}, required=False, weight=3))
    # spread rules derived from the hidden placement may be too tight once other domains are
    # allowed: keep the required ones only where the hidden placement satisfies them
    from .check import check
    asg = {vm: p.hosts[h].name for vm, h in planted.items()}
    trial = Problem(p.hosts, groups, rules, LEVELS)
    rep = check(trial, asg)
    bad = {r.name for r in rep.rules if r.required and r.violations}
    out: list[Rule] = []
    for rule in rules:
        if rule.name in bad:
            rule.required, rule.weight = False, 1
        out.append(rule)
    return out


# ------------------------------------------------------------------------------------------ hard family


def _rack_hosts(n_racks: int, per_rack: int, vcpus: int, mem: int, prefix: str = "h") -> list[Host]:
    return [Host(f"{prefix}{r}{i}", {"vcpus": vcpus, "memory_mib": mem}, {}, {"datacenter": "dc0", "rack": f"r{r}"})
            for r in range(n_racks) for i in range(per_rack)]


def hard_instances(n: int = 6, seed: int = 0) -> list[tuple[str, Problem]]:
    """Instances with a placement that greedy (FIFO, least-allocated) does not find."""
    rng = random.Random(seed)
    out: list[tuple[str, Problem]] = []
    levels = ("datacenter", "rack", "host")
    for i in range(n):
        t = i % 3
        if t == 0:  # fragmentation: small VMs spread over every host leave no room for the big ones
            nh = rng.randint(4, 8)
            cap = 10
            hosts = _rack_hosts(1, nh, cap, 65536)
            small = Group.uniform("small", nh, {"vcpus": 3, "memory_mib": 1024})
            big = Group.uniform("big", nh // 2, {"vcpus": 8, "memory_mib": 1024})
            p = Problem(hosts, [small, big], [], levels)
        elif t == 1:  # affinity: the emptiest rack is chosen by the first VM, and it is too small
            per = rng.randint(2, 4)
            hosts = [Host("solo", {"vcpus": 16, "memory_mib": 65536}, {}, {"datacenter": "dc0", "rack": "r0"})]
            hosts += _rack_hosts(1, per, 16, 65536, prefix="b")
            for h in hosts[1:]:
                h.domain["rack"] = "r1"
            base = Group.uniform("base", per, {"vcpus": 8, "memory_mib": 1024})
            n_app = (per * 8) // 4
            app = Group.uniform("app", n_app, {"vcpus": 4, "memory_mib": 1024})
            rules = [DomainAffinity("base-in-r1", groups=("base",), domains=("rack:r1",)),
                     Affinity("app-together", groups=("app",), level="rack")]
            if n_app <= 4:
                app = Group.uniform("app", 5, {"vcpus": 4, "memory_mib": 1024})
                hosts += [Host(f"c{j}", {"vcpus": 16, "memory_mib": 65536}, {}, {"datacenter": "dc0", "rack": "r1"})
                          for j in range(1)]
            p = Problem(hosts, [base, app], rules, levels)
        else:  # a group free to go anywhere takes the only hosts a later, restricted group can use
            nr = rng.randint(2, 4)
            per = 2
            hosts = _rack_hosts(nr, per, 8, 32768)
            free_g = Group.uniform("free", nr * per - per, {"vcpus": 6, "memory_mib": 16384})
            pinned = Group.uniform("pinned", per, {"vcpus": 6, "memory_mib": 16384})
            rules = [DomainAffinity("pinned-in-r0", groups=("pinned",), domains=("rack:r0",))]
            # r0's hosts look emptiest (more memory), so least-allocated sends 'free' there first
            for h in hosts[:per]:
                h.capacity["memory_mib"] = 262144
            p = Problem(hosts, [free_g, pinned], rules, levels)
        p.validate()
        out.append((f"hard-{i:02d}-{['fragment', 'affinity', 'pinned'][t]}", p))
    return out


# ------------------------------------------------------------------------------------------ infeasible family


@dataclass
class Infeasible:
    name: str
    problem: Problem
    expected: set[str]  # the conflicting rules hidden in it


def infeasible_instances(n: int = 6, seed: int = 0, noise: int = 30) -> list[Infeasible]:
    rng = random.Random(seed)
    out: list[Infeasible] = []
    for i in range(n):
        base = generate(40, 200, noise, seed=seed * 1000 + i, )
        groups = list(base.groups)
        rules = list(base.rules)
        t = i % 4
        racks = sorted(base.topology.members["rack"])
        if t == 0:  # host anti-affinity for more VMs than the allowed rack has hosts
            rack = rng.choice(racks)
            nh = len(base.topology.members["rack"][rack])
            groups.append(Group.uniform("x", nh + 1, {"vcpus": 1, "memory_mib": 512}))
            extra = [AntiAffinity("x-apart", groups=("x",), level="host"),
                     DomainAffinity("x-in-rack", groups=("x",), domains=(f"rack:{rack}",))]
        elif t == 1:  # three groups pairwise apart per zone, confined to one datacenter of two zones
            for nmx in ("x", "y", "z"):
                groups.append(Group.uniform(nmx, 2, {"vcpus": 1, "memory_mib": 512}))
            dc = rng.choice(sorted(base.topology.members["datacenter"]))
            extra = [AntiAffinity("xy", groups=("x", "y"), level="zone"),
                     AntiAffinity("yz", groups=("y", "z"), level="zone"),
                     AntiAffinity("xz", groups=("x", "z"), level="zone"),
                     DomainAffinity("xyz-in-dc", groups=("x", "y", "z"), domains=(f"datacenter:{dc}",))]
        elif t == 2:  # even spread over racks, but at most 1 per rack and more VMs than racks
            nr = len(racks)
            groups.append(Group.uniform("x", nr + 1, {"vcpus": 1, "memory_mib": 512}))
            extra = [MaxPerDomain("x-one-per-rack", groups=("x",), level="rack", max=1),
                     Spread("x-spread", groups=("x",), level="rack", max_skew=1, min_domains=2)]
            extra = extra[:1] + [Spread("x-zones", groups=("x",), level="zone", max_skew=1)]
        else:  # together in a rack, but each VM needs its own host and the rack has too few
            rack = rng.choice(racks)
            nh = len(base.topology.members["rack"][rack])
            groups.append(Group.uniform("x", nh - 1, {"vcpus": 1, "memory_mib": 512}))
            groups.append(Group.uniform("y", 2, {"vcpus": 1, "memory_mib": 512}))
            extra = [Affinity("xy-rack", groups=("x", "y"), level="rack"),
                     AntiAffinity("xy-hosts", groups=("x", "y"), level="host"),
                     AntiAffinity("x-hosts", groups=("x",), level="host"),
                     AntiAffinity("y-hosts", groups=("y",), level="host"),
                     DomainAffinity("y-in-rack", groups=("y",), domains=(f"rack:{rack}",))]
        p = Problem(base.hosts, groups, rules + extra, base.levels, moves=MovePolicy(False))
        p.validate()
        expected = {"x-apart", "x-in-rack"} if t == 0 else {"xy", "yz", "xz", "xyz-in-dc"} if t == 1 else \
            {"x-one-per-rack"} if t == 2 else {"xy-rack", "xy-hosts", "x-hosts", "y-hosts"}
        out.append(Infeasible(f"infeasible-{i:02d}-{['hosts', 'zones', 'per-rack', 'rack-hosts'][t]}", p, expected))
    return out
