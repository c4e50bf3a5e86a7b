"""schemathesis against the manager's OpenAPI description, over real HTTP to a real manager
process (loopback TCP, SQLite store, no host agent): no 5xx,
responses conform to the description, and a rejected request (4xx) changes nothing: the store's
revision is the same before and after it."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from hvsim.control.etcd_cluster import free_port

from .manager_proc import Manager, manager_process

EXAMPLES = 20


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    d: Path = tmp_path_factory.mktemp("fuzz")
    with manager_process(d / "run", f"sqlite://{d / 'state.db'}", tcp=f"127.0.0.1:{free_port()}") as m:
        auth = {"Authorization": f"Bearer {m.token}"}
        with httpx.Client(base_url=m.address, headers=auth) as c:   # something to hit besides 404s
            c.post("/v1/hosts", json={"name": "h1"}).raise_for_status()
            c.post("/v1/groups", json={"name": "g1"}).raise_for_status()
            c.post("/v1/vms", json={"name": "vm1", "host": "h1", "group": "g1"}).raise_for_status()
        yield m


def check_case(case: schemathesis.Case, manager: Manager, c: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {manager.token}"}
    before = c.get("/v1/health").json()["revision"]
    headers = {**(case.headers or {}), **auth}
    response = case.call(base_url=manager.address, headers=headers)
    status = response.status_code
    assert status < 500, f"{case.method} {case.formatted_path}: {status} {response.text}"
    if 400 <= status < 500:
        body = response.json()
        assert body.get("detail"), body
        after = c.get("/v1/health").json()["revision"]
        assert after == before, f"rejected {case.method} {case.formatted_path} changed the store"
    case.validate_response(response, headers=headers,
                           excluded_checks=[schemathesis.checks.not_a_server_error,
                                            schemathesis.checks.positive_data_acceptance])


def fuzz(op: schemathesis.APIOperation, mode: GenerationMode, auth: dict[str, str], manager: Manager,
         c: httpx.Client) -> bool:
    @given(op.as_strategy(generation_mode=mode, headers=auth))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def run(case: schemathesis.Case) -> None:
        check_case(case, manager, c)
    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        return False        # nothing in this operation can be made invalid (no parameters, no body)
    return True


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_every_operation(manager: Manager, mode: GenerationMode) -> None:
    # schemathesis' own pytest plugin does not work with pytest 9 yet; drive its strategies directly
    api = schemathesis.openapi.from_url(manager.address + "/openapi.json")
    ops = [r.ok() for r in api.get_all_operations()]
    assert len(ops) >= 20
    auth = {"Authorization": f"Bearer {manager.token}"}
    seen: dict[str, set[int]] = {}
    with httpx.Client(base_url=manager.address, headers=auth) as c:
        for op in ops:
            if fuzz(op, mode, auth, manager, c):
                seen[op.label] = set()
    if mode is GenerationMode.POSITIVE:
        assert len(seen) == len(ops)
    else:
        assert len(seen) >= len(ops) - 3     # health, and the bodiless list/start verbs' negations


def test_unauthenticated_fuzz_is_refused(manager: Manager) -> None:
    with httpx.Client(base_url=manager.address) as c:
        paths = c.get("/openapi.json").json()["paths"]
        for path, methods in paths.items():
            url = path.replace("{name}", "vm1").replace("{op_id}", "0" * 16 + "-" + "0" * 8)
            for method in methods:
                r = c.request(method.upper(), url, json={})
                assert r.status_code == 401, (method, path, r.status_code)
