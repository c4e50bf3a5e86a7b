"""Placement benchmark: CP-SAT against the greedy one-at-a-time scheduler.

Seeded generated instances (hvsim/placement/generate.py): 50 hosts x 500 VMs (150 rules) and
200 hosts x 2000 VMs (500 rules) of every kind; the "hard" family, where greedy gets stuck though
a placement exists; the infeasible family, whose explanations are timed. Then a 200-host
cluster already holding about 1800 VMs takes new 20-VM groups one after the other through
PlacementController (end-to-end wall time per group).

Writes bench/results/placement.json:
  instances:    name, hosts, vms, rules, solver, status, required_violations (independent
                checker; null when no placement was returned), preferred_penalty, solve_s, gap
                (of the preferred-penalty stage unless that is proven optimal, see
                docs/placement.md), gaps (per solver stage)
  incremental:  group_vms, median_ms, p95_ms (+ groups, samples_ms)
  explanations: name, core_size, minimal, solve_s (+ core)
`--quick` runs the 50 x 500 size, the hard family and the infeasible family.

Targets (issue 5): 200 x 2000 x 500 optimal or gap <= 2% in <= 10 s; a 20-VM group into a
200-host placement <= 100 ms median; zero required violations ever; CP-SAT places every hard
instance greedy cannot; explanations minimal within 2 s.
"""
from __future__ import annotations

import asyncio
import statistics
import time

from bench._common import print_table, write_result
from hvsim.placement import PlacementController
from hvsim.placement.check import check
from hvsim.placement.cpsat import SolverOptions
from hvsim.placement.generate import generate, hard_instances, infeasible_instances
from hvsim.placement.solver import explain_infeasible, solve

TIME_LIMIT_S = 10.0


def _row(name, p, res) -> dict:
    rep = check(p, res.assignment) if res.ok else None
    return {"name": name, "hosts": len(p.hosts), "vms": sum(len(g.vms) for g in p.groups), "rules": len(p.rules),
            "solver": res.solver, "status": res.status,
            "required_violations": rep.required_violations if rep else None,
            "preferred_penalty": rep.preferred_penalty if rep else None,
            "solve_s": round(res.solve_s, 3), "gap": None if res.gap is None else round(res.gap, 4),
            "gaps": {k: round(v, 4) for k, v in res.gaps.items()}}


def instances(quick: bool) -> list[dict]:
    sizes = [(50, 500, 150, s) for s in (1, 2)] + ([] if quick else [(200, 2000, 500, s) for s in (1, 2)])
    if quick:
        sizes = sizes[:1]
    rows = []
    opts = SolverOptions(time_limit_s=TIME_LIMIT_S, seed=0, workers=2)
    for h, v, r, seed in sizes:
        p = generate(h, v, r, seed=seed)
        for solver in ("cpsat", "greedy"):
            res = solve(p, solver, options=opts, explain=False)
            rows.append(_row(f"gen-{h}x{v}-s{seed}", p, res))
            print(f"  {rows[-1]}", flush=True)
    for name, p in hard_instances(6, seed=0):
        for solver in ("cpsat", "greedy"):
            res = solve(p, solver, options=opts, explain=False)
            rows.append(_row(name, p, res))
    for inf in infeasible_instances(4, seed=0):
        for solver in ("cpsat", "greedy"):
            res = solve(inf.problem, solver, options=opts, explain=False)
            rows.append(_row(inf.name, inf.problem, res))
    return rows


def explanations() -> list[dict]:
    out = []
    for inf in infeasible_instances(8, seed=0):
        t = time.perf_counter()
        ex = explain_infeasible(inf.problem, SolverOptions(time_limit_s=TIME_LIMIT_S), budget_s=2.0)
        dt = time.perf_counter() - t
        core = ex.core if ex else None
        out.append({"name": inf.name, "core_size": len(core) if core is not None else None,
                    "minimal": bool(ex and ex.minimal), "solve_s": round(dt, 3), "core": core,
                    "planted_core": sorted(inf.expected)})
    return out


async def _incremental(n_groups: int) -> dict:
    base = generate(200, 1800, 450, seed=7)
    ctl = PlacementController.from_problem(base, base.planted)  # type: ignore[attr-defined]
    names = [g.name for g in base.groups]
    samples = []
    for i in range(n_groups):
        g = f"new{i:02d}"
        rules = [{"name": f"{g}-hosts", "kind": "anti_affinity", "groups": [g], "level": "host"},
                 {"name": f"{g}-racks", "kind": "spread", "groups": [g], "level": "rack", "max_skew": 2},
                 {"name": f"{g}-apart", "kind": "anti_affinity", "groups": [g, names[i % len(names)]],
                  "level": "rack", "required": False, "weight": 3}]
        t = time.perf_counter()
        res = await ctl.place_group({"name": g, "count": 20, "demand": {"vcpus": 1, "memory_mib": 2048}}, rules)
        samples.append((time.perf_counter() - t) * 1000)
        if not res.ok:
            raise RuntimeError(f"incremental placement of {g} refused: {res.message}")
    rep = ctl.check()
    if rep.required_violations:
        raise RuntimeError(f"incremental placements break required rules: {rep.violated()} {rep.problems}")
    s = sorted(samples)
    return {"group_vms": 20, "groups": n_groups, "median_ms": round(statistics.median(s), 1),
            "p95_ms": round(s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))], 1),
            "samples_ms": [round(x, 1) for x in samples], "required_violations": rep.required_violations}


def main(quick: bool = False) -> None:
    rows = instances(quick)
    inc = asyncio.run(_incremental(10 if quick else 30))
    expl = explanations()
    print_table(["name", "solver", "status", "req.viol", "penalty", "solve_s", "gap"],
                [[r["name"], r["solver"], r["status"], r["required_violations"], r["preferred_penalty"],
                  r["solve_s"], r["gap"]] for r in rows])
    print(f"incremental: 20-VM group into 200 hosts: median {inc['median_ms']} ms, p95 {inc['p95_ms']} ms")
    print_table(["name", "core_size", "minimal", "solve_s"],
                [[e["name"], e["core_size"], e["minimal"], e["solve_s"]] for e in expl])
    hard = {r["name"] for r in rows if r["name"].startswith("hard-")}
    summary = {
        "required_violations_total": sum(r["required_violations"] or 0 for r in rows),
        "hard_cpsat_placed": sum(1 for r in rows if r["name"] in hard and r["solver"] == "cpsat"
                                 and r["status"] in ("optimal", "feasible")),
        "hard_greedy_placed": sum(1 for r in rows if r["name"] in hard and r["solver"] == "greedy"
                                  and r["status"] in ("optimal", "feasible")),
        "hard_instances": len(hard),
    }
    print(f"summary: {summary}")
    write_result("placement", {"quick": quick, "time_limit_s": TIME_LIMIT_S, "instances": rows,
                               "incremental": inc, "explanations": expl, "summary": summary})


if __name__ == "__main__":
    main()
