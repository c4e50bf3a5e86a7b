"""Solve a placement problem with CP-SAT or the greedy baseline; explain refusals.

``solve`` is synchronous and CPU-bound; async callers use ``solve_async``, which runs it in a
worker thread so the event loop keeps going. Every placement returned with status optimal or
feasible has passed the independent checker (check.py) with zero required violations: a result
that does not is never handed out as a placement.

Explanation of an infeasible problem: a model where every required rule (and ``keep:GROUP`` for
VMs that may not move, ``move-limit`` for the move budget) hangs on an assumption literal; CP-SAT
names a sufficient set of them, which is then shrunk by deletion until dropping any one rule
makes the problem feasible. The greedy scheduler is replayed to say, at the VM where it got
stuck, which filter eliminated how many hosts.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import greedy
from .check import check
from .cpsat import (KEEP_PREFIX, MOVE_LIMIT, SMALL_MODEL_VARS, STATUS, ModelTimeout, PlacementModel, SolverOptions,
                    solve_staged)
from .errors import ProblemError, show
from .model import RESOURCE_LABELS, Problem
from .result import Explanation, PlacementResult

SOLVERS = ("cpsat", "greedy")
WARM_START_VMS = 1000
WARM_START_SHARE = 0.25  # of the time limit, at most, for the greedy warm start


def _variable_vms(p: Problem) -> int:
    n = sum(len(g.vms) for g in p.groups)
    return n if p.moves.allowed else n - sum(1 for v in p.current if v)


def solve(problem: Problem, solver: str = "cpsat", *, explain: bool = True, options: SolverOptions | None = None,
          hint: Mapping[str, str] | None = None, explain_time_s: float = 2.0,
          check_rules: Iterable[str] | None = None, check_hosts: Iterable[str] | None = None,
          warm_start: bool = False, started: float | None = None,
          constants: dict[str, int] | None = None) -> PlacementResult:
    """Place every VM of ``problem``.

    The time limit (``options.time_limit_s``) counts from ``started`` (a ``time.perf_counter()``
    value; default: now), so a caller that read and validated the problem first passes when it
    began: building the model, solving, naming the VMs, the independent check and the
    explanation all end within it. When the limit cuts a stage short the result says so
    (``limit_reached``).

    ``warm_start``: for big problems (>= WARM_START_VMS VMs to place) start CP-SAT from the greedy
    placement (its time counts in the limit). ``explain``: on refusal, compute the minimal
    conflicting rule set (within ``explain_time_s`` and the limit); the per-host elimination
    counts are always given. ``check_rules``/``check_hosts`` narrow the final independent check
    to what could have changed (the controller's incremental path); ``constants`` carries the
    penalty of preferred rules on fixed groups between such solves (see ``PlacementModel``)."""
    if solver not in SOLVERS:
        raise ProblemError([("solver", f"unknown solver {show(solver)} (known: {', '.join(SOLVERS)})")])
    opts = options or SolverOptions()
    t0 = time.perf_counter() if started is None else started
    limit_at = t0 + opts.time_limit_s
    # leave room for naming the VMs and the independent check within the limit
    deadline = limit_at - min(0.25, 0.02 * opts.time_limit_s)

    def result(status: str, **kw: Any) -> PlacementResult:
        return PlacementResult(status, solver, solve_s=time.perf_counter() - t0, time_limit_s=opts.time_limit_s, **kw)

    if solver == "greedy":
        return _greedy(problem, result, deadline, check_rules, check_hosts)

    if hint is None and warm_start and _variable_vms(problem) >= WARM_START_VMS:
        # a first solution for a big model (or as much as greedy places in its share of the time)
        out = greedy.schedule(problem, deadline=min(deadline, t0 + WARM_START_SHARE * opts.time_limit_s))
        hint = out.assignment
    try:
        pm = PlacementModel(problem, hint=hint, deadline=deadline, constants=constants)
    except ModelTimeout:
        return result("unknown", limit_reached=True,
                      message=f"no placement within {opts.time_limit_s:g} s: the time limit was reached while "
                              f"the model was being built")
    # big models: stage 2 (balance) starts from stage 1's complete solution without presolve;
    # most of the time goes to the preferred penalty, the objective that ranks first
    big = len(pm.m.proto.variables) >= SMALL_MODEL_VARS
    staged = solve_staged(pm, opts, deadline, stage2_share=0.1 if big else 0.2, combined_share=0.0 if big else 0.4)
    status = staged.status
    if status in ("optimal", "feasible"):
        s = staged.solver
        assert s is not None
        asg = pm.assignment(s)
        rep = check(problem, asg, rules=check_rules, hosts=check_hosts)
        if rep.ok:
            return result(status, assignment=asg, gap=staged.gap, objective=pm.components(s), check=rep,
                          limit_reached=staged.limit_hit, gaps={k: round(v, 6) for k, v in staged.gaps.items()})
        # a rule the fast model skipped (it touches only VMs that may not move) is broken
    elif status == "unknown":
        return result("unknown", limit_reached=True, message=f"no placement found within {opts.time_limit_s:g} s")
    elif status == "invalid":
        return result("failed", message=f"internal error: CP-SAT refused the model ({pm.invalid_reason()})")
    expl = explain_infeasible(problem, opts, minimise=explain, budget_s=explain_time_s,
                              deadline=limit_at - min(0.1, 0.01 * opts.time_limit_s))
    if expl is None:
        return result("failed", message="internal error: the solver's placement breaks a required rule "
                                        "but the problem is feasible")
    return result("infeasible", explanation=expl, message=_headline(expl), limit_reached=expl.limit_reached)


async def solve_async(problem: Problem, solver: str = "cpsat", **kw: Any) -> PlacementResult:
    """``solve`` in a worker thread, off the event loop."""
    return await asyncio.to_thread(solve, problem, solver, **kw)


def _greedy(problem: Problem, result: Callable[..., PlacementResult], deadline: float,
            check_rules: Iterable[str] | None, check_hosts: Iterable[str] | None) -> PlacementResult:
    out = greedy.schedule(problem, deadline=deadline)
    if out.timed_out:
        n = sum(len(g.vms) for g in problem.groups)
        return result("unknown", assignment=out.assignment, limit_reached=True,
                      message=f"greedy stopped at the time limit with {len(out.assignment)} of {n} VMs placed")
    if not out.placed_all:
        assert out.failure is not None
        ex = Explanation(None, False, 0.0, [out.failure],
                         [f"greedy found no host for {out.failure.vm}; a placement may still exist "
                          f"(the cpsat solver decides)"])
        return result("failed", assignment=out.assignment, explanation=ex,
                      message=f"no host for {out.failure.vm}: {out.failure.text}")
    rep = check(problem, out.assignment, rules=check_rules, hosts=check_hosts)
    if not rep.ok:
        return result("failed", assignment=out.assignment, check=rep,
                      message=f"greedy placed every VM but breaks {', '.join(rep.violated()) or rep.problems}")
    return result("feasible", assignment=out.assignment,
                  objective={"preferred_penalty": rep.preferred_penalty, "moves": rep.moves}, check=rep)


# ------------------------------------------------------------------------------------------ explanations


def _describe(problem: Problem, name: str) -> str:
    if name.startswith(KEEP_PREFIX):
        return f"VMs of {name[len(KEEP_PREFIX):]} stay on their current hosts (moves not allowed)"
    if name == MOVE_LIMIT:
        return f"at most {problem.moves.max} moves"
    r = problem.rule(name)
    fields = {k: getattr(r, k) for k in ("groups", "level", "domains", "max_skew", "min_domains", "max", "hosts",
                                         "amount") if hasattr(r, k)}
    body = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in fields.items())
    return f"required {r.kind} ({body})"


def _headline(ex: Explanation) -> str:
    if ex.core:
        return "no placement: rules " + ", ".join(ex.core) + " cannot all hold"
    return ex.messages[0] if ex.messages else "no placement"


def explain_infeasible(problem: Problem, opts: SolverOptions | None = None, *, minimise: bool = True,
                       budget_s: float = 2.0, deadline: float | None = None) -> Explanation | None:
    """Why ``problem`` has no placement. None when it turns out to have one.

    The search for a minimal core gets ``budget_s``; everything (the greedy replay included)
    ends by ``deadline`` (a ``time.perf_counter()`` value) when given."""
    t0 = time.perf_counter()
    opts = opts or SolverOptions()
    end = t0 + budget_s if deadline is None else min(t0 + budget_s, deadline)
    try:
        em = PlacementModel(problem, explain=True, deadline=deadline)
    except ModelTimeout:
        return Explanation(None, False, time.perf_counter() - t0,
                           messages=["the time limit was reached before the conflicting rules could be named"],
                           limit_reached=True)
    by_index = {lit.index: name for name, lit in em.lits.items()}
    names = sorted(em.lits)
    cut = False

    def run(assumed: list[str]) -> tuple[str, list[str]]:
        nonlocal cut
        left = end - time.perf_counter() - em.load_s
        if left < 0.01:
            cut = True
            return "unknown", []
        em.assume(assumed)
        s = em.solver(SolverOptions(left, opts.seed, opts.workers))
        # the LP over enforced constraints settles counting arguments (more VMs than domains
        # allow) at once, which clause learning alone takes exponentially long to refute
        s.parameters.linearization_level = 2
        st = STATUS[s.solve(em.m)]
        if st == "unknown":
            cut = True
        core = [by_index[i] for i in s.sufficient_assumptions_for_infeasibility()] if st == "infeasible" else []
        return st, core

    st, core = run(names)
    if st in ("optimal", "feasible"):
        return None
    messages: list[str] = []
    minimal = False
    result_core: list[str] | None
    if st == "infeasible":
        core = sorted(set(core))
        minimal = True
        if minimise:
            i = 0
            while i < len(core):
                if time.perf_counter() > end:
                    minimal = False
                    cut = True
                    break
                trial = core[:i] + core[i + 1:]
                st2, sub = run(trial)
                if st2 == "infeasible":
                    core = sorted(set(sub) & set(trial)) if sub else trial
                    # (i stays: the rule now at position i has not been tried)
                elif st2 in ("optimal", "feasible"):
                    i += 1
                else:
                    minimal = False
                    i += 1
        else:
            minimal = len(core) <= 1
        result_core = core
    else:
        result_core = None
        messages.append("the solver could not name the conflicting rules within the time budget")
    if result_core == []:
        messages.extend(_capacity_messages(problem))
    gr = greedy.schedule(problem, deadline=deadline)
    hosts = [gr.failure] if gr.failure else []
    if gr.timed_out:
        cut = True
        messages.append("the one-at-a-time replay (which filter eliminated which hosts) stopped at the time limit")
    elif gr.placed_all:
        rep = check(problem, gr.assignment)
        messages.append(f"one-at-a-time placement fits every VM but breaks {', '.join(rep.violated())}")
    details = {n: _describe(problem, n) for n in (result_core or [])}
    return Explanation(result_core, minimal if result_core is not None else False, time.perf_counter() - t0,
                       hosts, messages, details, limit_reached=cut)


def _capacity_messages(problem: Problem) -> list[str]:
    out = ["the VMs do not fit even with every rule dropped"]
    topo = problem.topology
    demand: dict[str, int] = {}
    for vm in problem.vms():
        for r, a in vm.demand.items():
            demand[r] = demand.get(r, 0) + a
    for r, a in sorted(demand.items()):
        cap = sum(e.get(r, 0) for e in topo.effective)
        if a > cap:
            out.append(f"{RESOURCE_LABELS.get(r, r)}: demand {a} > capacity {cap}")
    for vm in problem.vms():
        if not any(all(e.get(r, 0) >= a for r, a in vm.demand.items()) for e in topo.effective):
            out.append(f"VM {vm.name} ({', '.join(f'{r} {a}' for r, a in vm.demand.items())}) fits no host")
            break
    return out


__all__ = ["solve", "solve_async", "explain_infeasible", "PlacementResult", "Explanation", "SolverOptions"]
