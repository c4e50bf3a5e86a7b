"""The benchmark harness's pure logic: interleaving order, statistics, verdicts, JSON shape."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bench import _common as bc
from bench._common import Stat, compare, meets, merge_samples, plan


# ---------------------------------------------------------------- interleaving


def test_every_round_runs_every_config_once() -> None:
    s = plan(["a", "b", "c", "d"], 5, seed=1)
    assert len(s.rounds) == 5
    for rnd in s.rounds:
        assert sorted(rnd) == ["a", "b", "c", "d"]


def test_shuffle_is_reproducible_from_the_recorded_seed() -> None:
    a = plan(list("abcdef"), 4, seed=123)
    b = plan(list("abcdef"), 4, seed=a.seed)
    assert a.rounds == b.rounds
    assert a.to_json()["seed"] == 123


def test_shuffle_changes_the_order_between_rounds() -> None:
    s = plan(list("abcdefgh"), 6, seed=7)
    assert len(set(s.rounds)) > 1


def test_seed_is_drawn_and_recorded_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HVSIM_BENCH_SEED", raising=False)
    s = plan(["a", "b"], 2)
    assert plan(["a", "b"], 2, seed=s.seed).rounds == s.rounds
    monkeypatch.setenv("HVSIM_BENCH_SEED", "99")
    assert plan(["a", "b"], 2).seed == 99


def test_rotate_starts_each_round_one_place_further() -> None:
    s = plan(["a", "b", "c"], 4, order="rotate")
    assert s.rounds == (("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c"))


def test_groups_stay_contiguous_and_are_reordered() -> None:
    cfgs = [(cell, pol) for cell in ("small", "large") for pol in ("p1", "p2", "p3")]
    s = plan(cfgs, 6, seed=3, group=lambda c: c[0])
    firsts = set()
    for rnd, blocks in zip(s.rounds, s.blocks, strict=True):
        cells = [c[0] for c in rnd]
        # one block per cell: the cell changes exactly once within a round
        assert sum(1 for x, y in zip(cells, cells[1:], strict=False) if x != y) == 1
        assert [g for g, _ in blocks] == [cells[0], cells[-1]]
        firsts.add(cells[0])
    assert firsts == {"small", "large"}  # both cells go first in some round


def test_grouped_rotate() -> None:
    cfgs = [("x", 1), ("x", 2), ("y", 1)]
    s = plan(cfgs, 2, order="rotate", group=lambda c: c[0])
    assert s.rounds == ((("x", 1), ("x", 2), ("y", 1)), (("y", 1), ("x", 2), ("x", 1)))


@pytest.mark.parametrize("configs,n,why", [([], 2, "no configurations"), (["a", "a"], 2, "duplicate"),
                                           (["a"], 0, "repeats")])
def test_plan_refuses_bad_input(configs: list[str], n: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        plan(configs, n, seed=0)


def test_repeats_minimums(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HVSIM_BENCH_REPEATS", raising=False)
    assert bc.repeats(True) == 2 and bc.repeats(False) == 3
    assert bc.repeats(True, quick_n=4) == 4
    with pytest.raises(ValueError, match="at least 3"):
        bc.repeats(False, full_n=2)
    with pytest.raises(ValueError, match="at least 2"):
        bc.repeats(True, quick_n=1)
    monkeypatch.setenv("HVSIM_BENCH_REPEATS", "5")
    assert bc.repeats(True) == 5
    monkeypatch.setenv("HVSIM_BENCH_REPEATS", "1")
    with pytest.raises(ValueError, match="HVSIM_BENCH_REPEATS=1"):
        bc.repeats(True)


async def test_runner_follows_the_schedule_and_collects_per_config() -> None:
    s = plan(["a", "b", "c"], 3, seed=5)
    calls: list[tuple[str, int]] = []

    async def run(cfg: str, rnd: int) -> str:
        calls.append((cfg, rnd))
        return f"{cfg}{rnd}"
    out = await bc.run_interleaved(s, run, log=None)
    assert [c for c, _ in calls] == [c for rnd in s.rounds for c in rnd]
    assert [r for _, r in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.of("b") == ["b0", "b1", "b2"]
    assert out.by_config() == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1", "c2"]}
    trace = out.to_json()["trace"]
    assert [(t["config"], t["round"], t["position"]) for t in trace] == \
        [(c, r, p) for r, rnd in enumerate(s.rounds) for p, c in enumerate(rnd)]


async def test_grouped_runner_enters_each_block_once_per_round() -> None:
    cfgs = [(g, i) for g in ("x", "y") for i in range(3)]
    s = plan(cfgs, 2, seed=11, group=lambda c: c[0])
    events: list[Any] = []

    @asynccontextmanager
    async def enter(g: Any, rnd: int) -> AsyncIterator[str]:
        events.append(("enter", g, rnd))
        try:
            yield f"env-{g}-{rnd}"
        finally:
            events.append(("exit", g, rnd))

    async def run(cfg: tuple[str, int], rnd: int, env: str) -> str:
        assert env == f"env-{cfg[0]}-{rnd}"
        events.append(("run", cfg))
        return env
    out = await bc.run_grouped(s, enter, run, log=None)
    assert sum(1 for e in events if e[0] == "enter") == 4
    assert sum(1 for e in events if e[0] == "exit") == 4
    assert len(out.trials) == 12
    # every run happens between its block's enter and exit
    inside = None
    for e in events:
        if e[0] == "enter":
            inside = e[1]
        elif e[0] == "exit":
            inside = None
        else:
            assert e[1][0] == inside


async def test_runner_exits_the_block_when_a_run_fails() -> None:
    s = plan([("x", 1), ("x", 2)], 2, seed=0, group=lambda c: c[0])
    exited = []

    @asynccontextmanager
    async def enter(g: Any, rnd: int) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            exited.append(rnd)

    async def run(cfg: Any, rnd: int, env: None) -> None:
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        await bc.run_grouped(s, enter, run, log=None)
    assert exited == [0]


# ---------------------------------------------------------------- statistics


def test_stat_median_and_range() -> None:
    s = Stat.of([3.0, 1.0, 2.0, 10.0])
    assert s is not None
    assert (s.median, s.min, s.max, s.n, s.missing) == (2.5, 1.0, 10.0, 4, 0)
    s = Stat.of([5, None, 1, 3])
    assert s is not None and (s.median, s.n, s.missing) == (3, 3, 1)
    assert Stat.of([None, None]) is None
    assert Stat.of([]) is None
    with pytest.raises(ValueError, match="NaN"):
        Stat.of([1.0, float("nan")])


def test_stat_format() -> None:
    assert bc.fmt_stat([9.1, 8.6, 18.6]) == "9.1 (8.6-18.6)"
    assert bc.fmt_stat([2.0]) == "2 (n=1)"
    assert bc.fmt_stat([None, 4.0, 5.0]) == "4.5 (4-5) [1 missing]"
    assert bc.fmt_stat([None]) == "-"
    assert bc.fmt_stat([999.5, 0.00123]) == "500 (0.00123-1000)"
    assert bc.fmt_stat([-0.15, -0.07]) == "-0.11 (-0.15..-0.07)"
    assert bc.fmt_stat([1.0, 2.0], scale=1000) == "1500 (1000-2000)"


def test_overlap_is_closed() -> None:
    a, b, c = Stat.of([1, 2]), Stat.of([2, 3]), Stat.of([2.5, 4])
    assert a and b and c
    assert a.overlaps(b) and b.overlaps(a)
    assert not a.overlaps(c) and not c.overlaps(a)
    assert b.overlaps(c)


# ---------------------------------------------------------------- verdicts


def test_compare_non_overlapping_lower_is_better() -> None:
    c = compare([1.0, 1.2, 1.1], [2.0, 2.4, 2.2])
    assert c.verdict == "win"
    assert c.ratio == pytest.approx(1.1 / 2.2)
    assert c.lo == pytest.approx(1.0 / 2.4) and c.hi == pytest.approx(1.2 / 2.0)
    assert compare([2.0, 2.4], [1.0, 1.2]).verdict == "loss"


def test_compare_higher_is_better() -> None:
    assert compare([90, 100], [40, 50], better="higher").verdict == "win"
    assert compare([40, 50], [90, 100], better="higher").verdict == "loss"


def test_compare_overlapping_ranges_are_noise_even_with_a_big_median_ratio() -> None:
    # the case: one floor run of 28.8 s beside runs of ~10 s
    c = compare([9.0, 28.8], [19.9, 21.0])
    assert c.ratio == pytest.approx(18.9 / 20.45)
    assert c.verdict == "within noise"
    assert compare([1.0, 2.0], [2.0, 3.0]).verdict == "within noise"  # touching ends overlap


def test_compare_needs_two_samples_a_side_and_data() -> None:
    assert compare([1.0], [5.0, 6.0]).verdict == "too few samples"
    assert compare([1.0, 1.1], [None, 5.0]).verdict == "too few samples"
    assert compare([None], [1.0, 2.0]).verdict == "no data"
    assert compare([1.0, 2.0], [0.0, 0.0]).verdict == "no data"
    assert compare([1.0, 2.0], [0.0, 3.0]).hi is None       # b's min 0: no upper extreme
    with pytest.raises(ValueError, match="better"):
        compare([1.0], [1.0], better="faster")  # type: ignore[arg-type]


def test_compare_accepts_stats() -> None:
    a, b = Stat.of([1, 2]), Stat.of([4, 5])
    assert compare(a, b).verdict == "win"
    assert compare(a, b).fmt() == "0.333 (0.2-0.5)"


def test_meets_target_ranges() -> None:
    assert meets(Stat.of([10, 20]), at_most=30) == "met"
    assert meets(Stat.of([10, 20]), at_most=15) == "within noise"
    assert meets(Stat.of([10, 20]), at_most=5) == "missed"
    assert meets(Stat.of([4, 6]), at_least=5) == "within noise"
    assert meets((-0.1, 0.1), at_least=-0.2, at_most=0.2) == "met"
    assert meets((0.3, 0.5), at_least=-0.2, at_most=0.2) == "missed"
    assert meets(compare([5, 6], [1, 1.1]), at_least=4) == "met"     # ratio range 4.5-6
    assert meets(None, at_most=1) == "no data"
    with pytest.raises(ValueError):
        meets((1, 2))


# ---------------------------------------------------------------- JSON shape


def test_merge_keeps_keys_with_medians_and_samples_beside() -> None:
    rows = [{"config": "floor", "pattern": "seq", "retouch_s": 9.1, "hit_rate": 0.0, "verified": True},
            {"config": "floor", "pattern": "seq", "retouch_s": 28.8, "hit_rate": 0.0, "verified": True},
            {"config": "floor", "pattern": "seq", "retouch_s": 10.0, "hit_rate": None, "verified": False}]
    m = merge_samples(rows, ident=("config", "pattern"))
    assert list(m) == ["config", "pattern", "retouch_s", "retouch_s_samples", "hit_rate", "hit_rate_samples",
                       "verified", "verified_samples"]
    assert m["config"] == "floor" and "config_samples" not in m
    assert m["retouch_s"] == 10.0 and m["retouch_s_samples"] == [9.1, 28.8, 10.0]
    assert m["hit_rate"] == 0.0 and m["hit_rate_samples"] == [0.0, 0.0, None]
    assert m["verified"] is False
    json.dumps(m)


def test_merge_categorical_nested_and_reduce() -> None:
    rows = [{"outcome": "completed", "gaps": {"a": 0.1}, "viol": 0},
            {"outcome": "timeout", "gaps": {"a": 0.3}, "viol": 2},
            {"outcome": "completed", "gaps": {"a": 0.2}, "viol": 0}]
    m = merge_samples(rows, reduce={"viol": lambda v: max(v)})
    assert m["outcome"] == "mixed: completed x2, timeout x1"
    assert m["gaps"] == {"a": 0.2, "a_samples": [0.1, 0.3, 0.2]}
    assert m["viol"] == 2 and m["viol_samples"] == [0, 2, 0]
    counts = merge_samples([{"n": 2}, {"n": 4}, {"n": 3}, {"n": 5}])
    assert counts["n"] == 3.5
    counts = merge_samples([{"n": 2}, {"n": 2}])
    assert counts["n"] == 2 and isinstance(counts["n"], int)
    same = merge_samples([{"outcome": "completed"}, {"outcome": "completed"}])
    assert same["outcome"] == "completed"


def test_merge_refuses_disagreeing_identity_and_empty_input() -> None:
    with pytest.raises(ValueError, match="'name' differs"):
        merge_samples([{"name": "a"}, {"name": "b"}], ident=["name"])
    with pytest.raises(ValueError, match="no samples"):
        merge_samples([])


def test_write_result_embeds_context_and_schedule(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bc, "RESULTS", tmp_path)
    ctx = bc.context(quick=True)
    for key in ("git", "qemu", "accel", "host_kernel", "guest_kernel", "cpu_model", "cpus", "loadavg_start",
                "python", "mode", "started_at"):
        assert key in ctx, key
    assert ctx["mode"] == "quick"
    s = plan(["a", "b"], 2, seed=4)
    samples: bc.Samples[str, int] = bc.Samples(s)
    samples.trials.append(bc.Trial("a", 0, 0, 0.0, 1.5, 0.3, 7))
    path = bc.write_result("x", {"runs": [{"v": 1, "v_samples": [1]}]}, ctx, samples)
    data = json.loads(path.read_text())
    assert data["runs"] == [{"v": 1, "v_samples": [1]}]       # the benchmark's own shape is untouched
    assert data["context"]["loadavg_end"] is not None and data["context"]["duration_s"] is not None
    assert "_t0" not in data["context"]
    assert data["schedule"]["seed"] == 4 and data["schedule"]["rounds"] == [list(r) for r in s.rounds]
    assert data["schedule"]["trace"][0] == {"config": "a", "round": 0, "position": 0, "start_s": 0.0,
                                            "duration_s": 1.5, "load1": 0.3}


def test_context_records_failures_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str:
        raise OSError("no qemu here")
    monkeypatch.setattr(bc, "_accel", broken)
    ctx = bc.context(quick=False)
    assert ctx["accel"] is None and "no qemu here" in ctx["errors"]["accel"]
    assert ctx["mode"] == "full"


def test_labels() -> None:
    assert bc.label(("floor", "seq")) == "floor/seq"
    assert bc.label((128, 0.7, "stepwise")) == "128/0.7/stepwise"
    assert bc.label("boot") == "boot"


def test_git_context_names_dirty_files_but_not_results(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "x.py").write_text("a\n")
    (tmp_path / "bench" / "results" / "x.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(bc, "REPO", tmp_path)
    g = bc._git()
    assert len(g["revision"]) == 40 and g["dirty"] is False
    (tmp_path / "bench" / "results" / "x.json").write_text('{"new": 1}\n')
    assert bc._git()["dirty"] is False          # a benchmark rewriting its results is not a dirty tree
    (tmp_path / "bench" / "x.py").write_text("b\n")
    g = bc._git()
    assert g["dirty"] is True and g["dirty_files"] == ["bench/x.py"]
