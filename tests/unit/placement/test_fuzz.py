"""Property-based tests (issue 9): arbitrary JSON into the problem schema and arbitrary option
values into `hvsim place` never give a traceback; a solve never claims more than it proved
(stopped at its time limit => says so); memory stays within the documented bound (measured on real
subprocesses). No wall-clock threshold anywhere: the solver's own report is what is asserted."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvbase.errors import InputError
from hvsim.placement import ProblemError, SolverOptions, check, load_problem, solve
from hvsim.placement.generate import generate
from hvsim.placement.schema import dump_problem

from .clihelp import place, place_subprocess

EX = Path(__file__).resolve().parents[3] / "examples" / "placement"
BASE = json.loads((EX / "web-db.json").read_text())
INFEASIBLE = json.loads((EX / "infeasible.json").read_text())
# documented bound on the peak RSS of `hvsim place` (docs/placement.md, "Limits")
MAX_RSS_MIB = 1536

WORDS = ["name", "kind", "groups", "level", "hosts", "capacity", "vcpus", "memory_mib", "overcommit", "domain",
         "rack", "datacenter", "host", "count", "demand", "vms", "rules", "required", "weight", "max", "max_skew",
         "min_domains", "domains", "amount", "current", "moves", "allowed", "objective", "mode", "pack", "web", "db",
         "h1", "r1", "dc1", "affinity", "anti_affinity", "spread", "max_per_domain", "reserve_hosts",
         "reserve_amount", "domain_affinity", "domain_anti_affinity", "levels", "version", "resources"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 40), st.integers(-(10 ** 30), 10 ** 30), st.sampled_from([2 ** 31, 2 ** 32, 2 ** 32 + 1, 2 ** 63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 2.0, 1e300, -0.0]),
    st.sampled_from(WORDS), st.text(max_size=8), st.text(min_size=129, max_size=200),
)
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=4)),
                           max_leaves=20)


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, prefix + (i,))
    return out


def _number_at(d: Any, path: tuple[Any, ...]) -> bool:
    for k in path:
        d = d[k]
    return isinstance(d, (int, float)) and not isinstance(d, bool)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """A valid example with a few fields replaced, removed or added (most land deep inside the
    schema), or plain arbitrary JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    d = copy.deepcopy(draw(st.sampled_from([BASE, INFEASIBLE])))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["replace", "replace", "delete", "add", "number", "number"]))
        paths = _paths(d)
        if how == "number":
            paths = [q for q in paths if _number_at(d, q)] or paths
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        if how == "number" and _number_at(d, path):
            # in or near the documented ranges: mostly problems that load, with extreme values
            parent[path[-1]] = draw(st.one_of(st.integers(0, 64), st.sampled_from([2 ** 32, 2 ** 32 - 1, 100.0, 1e-9]),
                                              st.floats(0.01, 100.0)))
        elif how in ("replace", "number"):
            parent[path[-1]] = draw(json_values)
        elif how == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return d


def _text(doc: Any) -> str:
    return json.dumps(doc)  # (NaN and Infinity as JavaScript literals, as Python's json writes them)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(documents())
def test_arbitrary_documents_are_placed_or_refused_by_field(doc):
    outcomes = []
    for src in ((doc, _text(doc)) if isinstance(doc, (dict, list)) else (doc,)):
        try:
            outcomes.append(load_problem(src))
        except ProblemError as exc:
            assert isinstance(exc, InputError)
            assert str(exc) and exc.errors, "a refusal names a field"
            assert len(str(exc).splitlines()[0]) < 600
            outcomes.append(None)
    if isinstance(doc, dict):
        assert (outcomes[0] is None) == (outcomes[1] is None)  # a dict and its JSON text: the same answer
    p = next((o for o in outcomes if o is not None), None)
    if p is None:
        return
    res = solve(p, options=SolverOptions(time_limit_s=1.0), explain=True, explain_time_s=0.5)
    assert res.status in ("optimal", "feasible", "infeasible", "unknown")
    if res.ok:
        rep = check(p, res.assignment)
        assert rep.required_violations == 0
        if res.status == "optimal":
            assert res.objective["preferred_penalty"] == rep.preferred_penalty
    json.dumps(res.to_dict(), allow_nan=False)  # the result document is plain JSON


time_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 10 ** 6).map(str),
                        st.sampled_from(["0.5", "1", "3600", "3600.5", "0.49", "1e-9", "abc", ""]))
int_values = st.one_of(st.integers(-(10 ** 30), 10 ** 30).map(str), st.integers(-2, 20).map(str),
                       st.sampled_from(["1.5", "x", "", "0x10"]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.fixed_dictionaries({}, optional={"--time-limit": time_values, "--workers": int_values,
                                           "--seed": int_values,
                                           "--solver": st.sampled_from(["cpsat", "greedy", "CPSAT", "", "x"])}),
       st.sampled_from(["web-db.json", "infeasible.json"]), st.booleans())
def test_arbitrary_options_exit_0_1_or_2_without_traceback(opts, example, as_json):
    args: list[str] = [str(EX / example)] + (["--json"] if as_json else [])
    for k, v in opts.items():
        args += [k, v]
    r = place(*args)  # raises (fails the test) on any traceback
    assert r.exit_code in (0, 1, 2), (r.exit_code, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    if r.exit_code == 2:
        assert any(k in r.stderr for k in opts), (opts, r.stderr)  # names the option it refuses
        lines = r.error_lines()
        assert lines[0].startswith("hvsim: error: --") or "Invalid value for" in r.stderr, r.stderr
    elif as_json:
        json.loads(r.stdout)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.integers(4, 60), st.integers(10, 400), st.integers(0, 120), st.integers(0, 3),
       st.sampled_from([0.5, 1.0]))
def test_a_solve_stopped_by_its_limit_says_so(h, v, r, seed, limit):
    p = generate(h, v, r, seed=seed)
    res = solve(p, options=SolverOptions(time_limit_s=limit), explain=True)
    if res.status == "optimal":
        assert not res.limit_reached and res.gap == 0.0
    elif res.status in ("feasible", "unknown"):
        assert res.limit_reached, res.to_dict()  # the optimum is not proven, and the result says why
    assert res.time_limit_s == limit and res.to_dict()["limit_reached"] == res.limit_reached


@pytest.mark.slow
def test_big_problem_stops_at_its_limit_within_the_memory_bound(tmp_path):
    """The benchmark's biggest instance with a short limit, in a real process: it reports that it
    stopped at the limit (not proven optimal), and stays within the documented memory bound."""
    f = tmp_path / "big.json"
    dump_problem(generate(200, 2000, 500, seed=1), f)
    r = place_subprocess(f, "--json", "--time-limit", "2")
    assert r.exit_code in (0, 1), r.stderr
    doc = json.loads(r.stdout)
    assert doc["limit_reached"] is True and doc["status"] in ("feasible", "unknown"), doc["status"]
    assert doc["time_limit_s"] == 2
    assert r.maxrss_mib < MAX_RSS_MIB, r.maxrss_mib


@pytest.mark.slow
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(documents(), st.sampled_from(["0.5", "1"]))
def test_arbitrary_documents_in_a_real_process(tmp_path, doc, limit):
    """Whatever the document, the real command exits 0, 1 or 2 without a traceback and within the
    memory bound."""
    f = tmp_path / "doc.json"
    f.write_text(_text(doc))
    r = place_subprocess(f, "--time-limit", limit)
    assert r.exit_code in (0, 1, 2) and "Traceback" not in r.stderr, r.stderr
    if r.exit_code == 2:
        assert len(r.error_lines()) == 1, r.stderr
    assert r.maxrss_mib < MAX_RSS_MIB and not math.isnan(r.maxrss_mib)
