"""Problem files: round trip, and bad input failing with a message naming the field."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hvsim.placement import ProblemError, RuleConflictError, dump_problem, load_problem, solve
from hvsim.placement.schema import problem_to_dict

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "placement"
BASE = json.loads((EXAMPLES / "web-db.json").read_text())


def bad(mutate) -> ProblemError:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(ProblemError) as ei:
        load_problem(doc)
    return ei.value


def fields(err: ProblemError) -> list[str]:
    return [f for f, _ in err.errors]


def test_examples_load_and_round_trip(tmp_path):
    for path in sorted(EXAMPLES.glob("*.json")):
        p = load_problem(path)
        text = dump_problem(p, tmp_path / path.name)
        q = load_problem(tmp_path / path.name)
        assert problem_to_dict(q) == problem_to_dict(p) == json.loads(text)


def test_unknown_group_in_rule():
    e = bad(lambda d: d["rules"][1].__setitem__("groups", ["web", "dbx"]))
    assert fields(e) == ["rules[1] (web-db).groups[1]"] and "unknown group 'dbx'" in str(e)


def test_unknown_domain():
    e = bad(lambda d: d["rules"].append({"name": "in", "kind": "domain_affinity", "groups": ["web"],
                                         "domains": ["rack:r9"]}))
    assert fields(e) == ["rules[3] (in).domains[0]"] and "unknown domain 'rack:r9'" in str(e)


def test_negative_capacity():
    e = bad(lambda d: d["hosts"][2]["capacity"].__setitem__("memory_mib", -1))
    assert fields(e) == ["hosts[2].capacity.memory_mib"] and "negative capacity" in str(e)


def test_rule_naming_nothing():
    e = bad(lambda d: d["rules"][0].__setitem__("groups", []))
    assert fields(e) == ["rules[0] (web-hosts).groups"] and "names no group" in str(e)
    e = bad(lambda d: d["rules"].append({"name": "r", "kind": "reserve_hosts", "hosts": []}))
    assert fields(e) == ["rules[3] (r).hosts"]


def test_duplicates_and_types_and_unknown_fields():
    assert fields(bad(lambda d: d["hosts"].append(dict(d["hosts"][0])))) == ["hosts[6].name"]
    assert fields(bad(lambda d: d["rules"][2].__setitem__("name", "web-db"))) == ["rules[2].name"]
    assert fields(bad(lambda d: d["groups"][0].__setitem__("count", "3"))) == ["groups[0].count"]
    assert fields(bad(lambda d: d["rules"][0].__setitem__("levle", "host"))) == ["rules[0] (web-hosts).levle"]
    assert fields(bad(lambda d: d["rules"][0].__setitem__("level", "room"))) == ["rules[0] (web-hosts).level"]
    assert fields(bad(lambda d: d["rules"][0].__setitem__("kind", "near"))) == ["rules[0].kind"]
    assert fields(bad(lambda d: d["hosts"][0]["domain"].pop("rack"))) == ["hosts[0].domain.rack"]
    assert fields(bad(lambda d: d.__setitem__("current", {"web-0": "nowhere"}))) == ["current.web-0"]
    assert fields(bad(lambda d: d["rules"][0].__setitem__("weight", 3))) == ["rules[0] (web-hosts).weight"]


def test_not_json(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{ nope")
    with pytest.raises(ProblemError, match="not valid JSON"):
        load_problem(f)


def test_contradicting_rules_reported_when_defined():
    def both(d):
        d["rules"].append({"name": "web-db-together", "kind": "affinity", "groups": ["web", "db"], "level": "rack"})
    with pytest.raises(RuleConflictError) as ei:
        load_problem(_mut(both))
    assert ei.value.rules == [("web-db-together", "web-db")]
    assert "keeps them apart" in str(ei.value)


def test_affinity_finer_than_anti_affinity_contradicts():
    def host_aff(d):
        d["rules"].append({"name": "web-one-host", "kind": "affinity", "groups": ["web"], "level": "host"})
    with pytest.raises(RuleConflictError) as ei:
        load_problem(_mut(host_aff))
    assert ei.value.rules == [("web-one-host", "web-hosts")]


def test_preferred_contradictions_are_fine():
    def soft(d):
        d["rules"].append({"name": "web-db-together", "kind": "affinity", "groups": ["web", "db"], "level": "rack",
                           "required": False, "weight": 2})
    res = solve(load_problem(_mut(soft)))
    assert res.ok and res.check.preferred_penalty == 2


def _mut(f):
    doc = copy.deepcopy(BASE)
    f(doc)
    return doc
