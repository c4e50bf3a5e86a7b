"""The one benchmark harness: run context, interleaved repeats, statistics, tables, result files.

A number from one run on a shared 2-core machine says little, so every benchmark here follows
the same recipe::

    ctx = context(quick)                                   # git, QEMU, accel, kernels, CPU, load...
    sched = plan(configs, repeats(quick), group=...)       # round 1 of every config, then round 2...
    samples = await run_interleaved(sched, run_one)        # (or run_grouped: setup per block)
    row = merge_samples([...])                             # old keys hold the median, KEY_samples all
    print_table(...)                                       # cells "median (min-max)", verdict columns
    write_result(name, data, ctx, samples)                 # embeds "context" and "schedule"

Rules the helpers implement (and tests/unit/test_bench_common.py checks):

- **Repeats**: at least 3 in full mode and 2 in quick mode (:func:`repeats`; a benchmark may ask for
  more, ``HVSIM_BENCH_REPEATS`` raises the count for a run).
- **Interleaving** (:func:`plan`): each round runs every configuration once; the order is shuffled
  per round with a recorded seed (``HVSIM_BENCH_SEED`` replays an order) or rotated. With ``group``
  the configurations of one group stay contiguous inside a round (one booted guest, one server
  process) while groups, and configurations inside a group, are reordered.
- **Statistics** (:class:`Stat`): median, min and max of the samples that exist (``None`` = a run
  that produced no value, counted as missing).
- **Verdicts** (:func:`compare`): the ratio of medians a/b, and its extremes min(a)/max(b) and
  max(a)/min(b); "win"/"loss" only when the two min-max ranges do not overlap, else "within
  noise" (and "too few samples" below 2 samples a side). :func:`meets` checks a range against a
  target: "met" when the whole range satisfies it, "missed" when none of it does, else "within
  noise".
- **JSON** (:func:`merge_samples`): a benchmark's existing keys keep their names and hold the median
  (numbers), ``all()`` (booleans), the common value or ``"mixed: a x2, b x1"`` (anything else);
  every sample sits beside as ``KEY_samples`` in round order.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
MIN_REPEATS = {"quick": 2, "full": 3}
SAMPLES_SUFFIX = "_samples"

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
E = TypeVar("E")
Order = Literal["shuffle", "rotate"]
Better = Literal["lower", "higher"]


# --------------------------------------------------------------------------------------------
# context


def _run(argv: list[str], timeout: float = 10.0, strip: bool = True) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    return out.stdout.strip() if strip else out.stdout


def _probe(errors: dict[str, str], key: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None with the reason recorded in ``errors[key]`` (a context never fails a run)."""
    try:
        return fn()
    except Exception as exc:  # any failure to learn a fact is recorded, not fatal
        errors[key] = f"{type(exc).__name__}: {exc}"[:300]
        return None


def _git() -> dict[str, Any]:
    rev = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    branch = _run(["git", "-C", str(REPO), "rev-parse", "--abbrev-ref", "HEAD"])
    # the results this very run rewrites do not make the tree dirty
    status = _run(["git", "-C", str(REPO), "status", "--porcelain", "--", ".", ":(exclude)bench/results"],
                  strip=False).splitlines()
    return {"revision": rev, "branch": branch, "dirty": bool(status),
            "dirty_files": [line[3:] for line in status if line.strip()][:50]}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _images() -> Path:
    from hvsim.core.cluster import images_dir  # the bench is an entry point: it may compose anything
    return images_dir()


def _accel() -> str:
    from hvsim.core.cluster import INITRD_FILE, KERNEL_FILE
    from qmp_bridge.accel import choose_accel
    imgs = _images()
    return choose_accel(str(imgs / KERNEL_FILE), str(imgs / INITRD_FILE))


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def context(quick: bool) -> dict[str, Any]:
    """What this run ran on, taken at the start of a benchmark (``write_result`` adds the end).

    Keys: git (revision, branch, dirty, dirty_files), qemu (``qemu-system-x86_64 --version``),
    accel (``choose_accel`` on the guest images) and accel_env (HVSIM_ACCEL), host_kernel
    (``uname -r``), guest_kernel (images/out/kernel-version), cpu_model, cpus (online),
    cpus_usable (affinity), loadavg_start / loadavg_end (1, 5, 15 min), python, mode
    (quick/full), started_at / finished_at (UTC), duration_s, errors (a fact that could not be
    learnt: why).
    """
    errors: dict[str, str] = {}
    return {
        "git": _probe(errors, "git", _git),
        "qemu": _probe(errors, "qemu", lambda: _run(["qemu-system-x86_64", "--version"]).splitlines()[0]),
        "accel": _probe(errors, "accel", _accel),
        "accel_env": os.environ.get("HVSIM_ACCEL", "auto"),
        "host_kernel": platform.release(),
        "guest_kernel": _probe(errors, "guest_kernel", lambda: (_images() / "kernel-version").read_text().strip()),
        "cpu_model": _probe(errors, "cpu_model", _cpu_model),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_start": _loadavg(),
        "loadavg_end": None,
        "python": platform.python_version(),
        "mode": "quick" if quick else "full",
        "started_at": _now(),
        "finished_at": None,
        "duration_s": None,
        "_t0": time.monotonic(),
        "errors": errors,
    }


def finish_context(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``ctx`` with the end of the run filled in (load average, time, duration)."""
    out = {k: v for k, v in ctx.items() if k != "_t0"}
    out["loadavg_end"] = _loadavg()
    out["finished_at"] = _now()
    if "_t0" in ctx:
        out["duration_s"] = round(time.monotonic() - float(ctx["_t0"]), 1)
    return out


# --------------------------------------------------------------------------------------------
# repeats and the interleaved schedule


def repeats(quick: bool, *, quick_n: int = MIN_REPEATS["quick"], full_n: int = MIN_REPEATS["full"]) -> int:
    """How many rounds: ``quick_n``/``full_n`` (never below 2/3), or more with HVSIM_BENCH_REPEATS."""
    mode = "quick" if quick else "full"
    n = quick_n if quick else full_n
    if n < MIN_REPEATS[mode]:
        raise ValueError(f"{mode} mode needs at least {MIN_REPEATS[mode]} repeats, got {n}")
    env = os.environ.get("HVSIM_BENCH_REPEATS")
    if env:
        try:
            want = int(env)
        except ValueError as exc:
            raise ValueError(f"HVSIM_BENCH_REPEATS={env!r}: expected an integer") from exc
        if want < MIN_REPEATS[mode]:
            raise ValueError(f"HVSIM_BENCH_REPEATS={want}: {mode} mode needs at least {MIN_REPEATS[mode]}")
        n = max(n, want)
    return n


def _seed(seed: int | None) -> int:
    if seed is not None:
        return seed
    env = os.environ.get("HVSIM_BENCH_SEED")
    if env:
        try:
            return int(env)
        except ValueError as exc:
            raise ValueError(f"HVSIM_BENCH_SEED={env!r}: expected an integer") from exc
    return random.SystemRandom().randrange(2**31)


def _reorder(items: list[Any], r: int, order: Order, rng: random.Random) -> list[Any]:
    if order == "rotate":
        k = r % len(items) if items else 0
        return items[k:] + items[:k]
    out = list(items)
    rng.shuffle(out)
    return out


def label(key: Hashable) -> str:
    """A configuration key as text: tuples joined with '/', the rest with str()."""
    if isinstance(key, tuple):
        return "/".join(str(k) for k in key)
    return str(key)


@dataclass(frozen=True)
class Schedule(Generic[K]):
    """Who runs when: ``blocks[r]`` is round r as a sequence of (group, configs) blocks."""

    configs: tuple[K, ...]
    repeats: int
    seed: int
    order: Order
    blocks: tuple[tuple[tuple[Hashable, tuple[K, ...]], ...], ...]
    grouped: bool = False

    @property
    def rounds(self) -> tuple[tuple[K, ...], ...]:
        """Round r as the flat order of its configurations."""
        return tuple(tuple(c for _, cs in rnd for c in cs) for rnd in self.blocks)

    def to_json(self) -> dict[str, Any]:
        return {"repeats": self.repeats, "seed": self.seed, "order": self.order, "grouped": self.grouped,
                "configs": [label(c) for c in self.configs],
                "rounds": [[label(c) for c in rnd] for rnd in self.rounds]}


def plan(configs: Sequence[K], n_repeats: int, *, seed: int | None = None, order: Order = "shuffle",
         group: Callable[[K], Hashable] | None = None) -> Schedule[K]:
    """Round 1 of every configuration, then round 2, ...; the order changes every round.

    ``order="shuffle"``: a seeded shuffle per round (the seed is kept in the schedule);
    ``"rotate"``: round r starts r places further along. With ``group``, configurations sharing
    ``group(config)`` run back to back within a round (groups in first-seen order, reordered per
    round, and configurations reordered inside each group).
    """
    cfgs = list(configs)
    if not cfgs:
        raise ValueError("plan: no configurations")
    if len(set(cfgs)) != len(cfgs):
        dup = [label(c) for c, n in Counter(cfgs).items() if n > 1]
        raise ValueError(f"plan: duplicate configurations {dup}")
    if n_repeats < 1:
        raise ValueError(f"plan: repeats must be >= 1, got {n_repeats}")
    if order not in ("shuffle", "rotate"):
        raise ValueError(f"plan: order must be 'shuffle' or 'rotate', got {order!r}")
    s = _seed(seed)
    rng = random.Random(s)
    groups: dict[Hashable, list[K]] = {}
    for c in cfgs:
        groups.setdefault(group(c) if group else None, []).append(c)
    rounds = []
    for r in range(n_repeats):
        rnd = []
        for g in _reorder(list(groups), r, order, rng):
            rnd.append((g, tuple(_reorder(groups[g], r, order, rng))))
        rounds.append(tuple(rnd))
    return Schedule(tuple(cfgs), n_repeats, s, order, tuple(rounds), grouped=group is not None)


# --------------------------------------------------------------------------------------------
# running a schedule


@dataclass(frozen=True)
class Trial(Generic[K, T]):
    """One execution of one configuration."""

    config: K
    round: int
    position: int       # index within its round
    start_s: float      # since the first trial started
    duration_s: float
    load1: float        # 1-minute load average when it started
    value: T


@dataclass
class Samples(Generic[K, T]):
    """What a schedule produced: every trial, in execution order."""

    schedule: Schedule[K]
    trials: list[Trial[K, T]] = field(default_factory=list)

    def of(self, config: K) -> list[T]:
        """The values of one configuration, in round order."""
        return [t.value for t in sorted(self.trials, key=lambda t: t.round) if t.config == config]

    def by_config(self) -> dict[K, list[T]]:
        return {c: self.of(c) for c in self.schedule.configs}

    def to_json(self) -> dict[str, Any]:
        """The schedule plus a trace of when each trial ran (values stay in the benchmark's keys)."""
        d = self.schedule.to_json()
        d["trace"] = [{"config": label(t.config), "round": t.round, "position": t.position,
                       "start_s": round(t.start_s, 2), "duration_s": round(t.duration_s, 2), "load1": t.load1}
                      for t in self.trials]
        return d


def _announce(log: Callable[[str], None] | None, sched: Schedule[Any], r: int, pos: int, cfg: Hashable) -> None:
    if log is not None:
        n = len(sched.configs)
        log(f"[round {r + 1}/{sched.repeats} #{pos + 1}/{n}] {label(cfg)} (load {os.getloadavg()[0]:.2f})")


async def run_interleaved(sched: Schedule[K], run: Callable[[K, int], Awaitable[T]], *,
                          log: Callable[[str], None] | None = print) -> Samples[K, T]:
    """Run ``run(config, round)`` in the schedule's order; an exception ends the whole run."""
    return await _drive(sched, lambda _g, _r: _NullCtx(), lambda c, r, _e: run(c, r), log)


async def run_grouped(sched: Schedule[K], enter: Callable[[Hashable, int], AbstractAsyncContextManager[E]],
                      run: Callable[[K, int, E], Awaitable[T]], *,
                      log: Callable[[str], None] | None = print) -> Samples[K, T]:
    """Like :func:`run_interleaved`, with ``async with enter(group, round) as env`` around each block
    (boot the guest, start the server) and ``run(config, round, env)`` inside it."""
    return await _drive(sched, enter, run, log)


class _NullCtx(AbstractAsyncContextManager[None]):
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def _drive(sched: Schedule[K], enter: Callable[[Hashable, int], AbstractAsyncContextManager[E]],
                 run: Callable[[K, int, E], Awaitable[T]], log: Callable[[str], None] | None) -> Samples[K, T]:
    out: Samples[K, T] = Samples(sched)
    t_first: float | None = None
    for r, rnd in enumerate(sched.blocks):
        pos = 0
        for g, cfgs in rnd:
            async with enter(g, r) as env:
                for cfg in cfgs:
                    _announce(log, sched, r, pos, cfg)
                    load1 = round(os.getloadavg()[0], 2)
                    t0 = time.monotonic()
                    if t_first is None:
                        t_first = t0
                    value = await run(cfg, r, env)
                    out.trials.append(Trial(cfg, r, pos, t0 - t_first, time.monotonic() - t0, load1, value))
                    pos += 1
    return out


# --------------------------------------------------------------------------------------------
# statistics and verdicts


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Stat:
    """Median and range of the samples that exist; ``missing`` counts the runs without a value."""

    median: float
    min: float
    max: float
    n: int
    missing: int = 0

    @classmethod
    def of(cls, samples: Iterable[float | None]) -> Stat | None:
        """None when no sample has a value."""
        vals = list(samples)
        have = [float(v) for v in vals if v is not None]
        for v in have:
            if v != v:  # NaN
                raise ValueError("Stat.of: NaN sample")
        if not have:
            return None
        return cls(statistics.median(have), min(have), max(have), len(have), len(vals) - len(have))

    @property
    def range(self) -> tuple[float, float]:
        return (self.min, self.max)

    def overlaps(self, other: Stat) -> bool:
        """Closed ranges: touching ends overlap."""
        return self.min <= other.max and other.min <= self.max

    def fmt(self, scale: float = 1.0) -> str:
        """``median (min-max)``; ``median (n=1)`` for a single sample; ``, k missing`` when some ran dry."""
        m = fmt_num(self.median * scale)
        s = f"{m} (n=1)" if self.n == 1 else f"{m} ({fmt_range(self.min * scale, self.max * scale)})"
        return s + (f" [{self.missing} missing]" if self.missing else "")

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n, "missing": self.missing}


def stat(samples: Iterable[float | None]) -> Stat | None:
    return Stat.of(samples)


WIN, LOSS, NOISE, FEW, NODATA = "win", "loss", "within noise", "too few samples", "no data"


@dataclass(frozen=True)
class Comparison:
    """a against b: ratio of medians, the ratio's extremes over the two ranges, and a verdict.

    ``verdict`` is about a: "win" when a's whole range is on the ``better`` side of b's, "loss" when
    it is wholly on the other side, "within noise" when the ranges overlap, "too few samples" when
    a side has fewer than 2, "no data" when a side has none (or b's median is 0).
    """

    ratio: float | None
    lo: float | None
    hi: float | None
    verdict: str
    a: Stat | None
    b: Stat | None

    @property
    def range(self) -> tuple[float, float] | None:
        return None if self.lo is None or self.hi is None else (self.lo, self.hi)

    def fmt(self) -> str:
        if self.ratio is None:
            return "-"
        if self.lo is None or self.hi is None:
            return fmt_num(self.ratio)
        return f"{fmt_num(self.ratio)} ({fmt_range(self.lo, self.hi)})"

    def to_json(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "lo": self.lo, "hi": self.hi, "verdict": self.verdict,
                "a": self.a.to_json() if self.a else None, "b": self.b.to_json() if self.b else None}


def _as_stat(x: Stat | Iterable[float | None] | None) -> Stat | None:
    if x is None or isinstance(x, Stat):
        return x
    return Stat.of(x)


def compare(a: Stat | Iterable[float | None] | None, b: Stat | Iterable[float | None] | None, *,
            better: Better = "lower", min_samples: int = 2) -> Comparison:
    """Compare a with b (samples or a :class:`Stat`); see :class:`Comparison` for the verdict."""
    if better not in ("lower", "higher"):
        raise ValueError(f"compare: better must be 'lower' or 'higher', got {better!r}")
    sa, sb = _as_stat(a), _as_stat(b)
    if sa is None or sb is None or sb.median == 0:
        return Comparison(None, None, None, NODATA, sa, sb)
    ratio = sa.median / sb.median
    lo = sa.min / sb.max if sb.max else None
    hi = sa.max / sb.min if sb.min else None
    if sa.n < min_samples or sb.n < min_samples:
        verdict = FEW
    elif sa.overlaps(sb):
        verdict = NOISE
    else:
        a_lower = sa.max < sb.min
        verdict = WIN if a_lower == (better == "lower") else LOSS
    return Comparison(ratio, lo, hi, verdict, sa, sb)


MET, MISSED = "met", "missed"


def meets(x: Stat | Comparison | tuple[float, float] | None, *, at_most: float | None = None,
          at_least: float | None = None) -> str:
    """A range against a target interval: "met" when the whole range is inside it, "missed" when
    none of it is, "within noise" when it straddles a bound, "no data" without a range."""
    if at_most is None and at_least is None:
        raise ValueError("meets: give at_most and/or at_least")
    rng = x.range if isinstance(x, (Stat, Comparison)) else x
    if rng is None:
        return NODATA
    lo, hi = rng
    top = float("inf") if at_most is None else at_most
    bottom = float("-inf") if at_least is None else at_least
    if bottom <= lo and hi <= top:
        return MET
    if hi < bottom or lo > top:
        return MISSED
    return NOISE


# --------------------------------------------------------------------------------------------
# merging samples into the benchmark's JSON shape


def _mixed(values: list[Any]) -> Any:
    """The common value, or ``"mixed: a x2, b x1"`` (most frequent first)."""
    first = values[0]
    if all(v == first for v in values):
        return first
    keys = [json.dumps(v, sort_keys=True, default=str) for v in values]
    counts = Counter(keys)
    parts = [f"{k.strip(chr(34))} x{n}" for k, n in counts.most_common()]
    return "mixed: " + ", ".join(parts)


def merge_value(values: list[Any]) -> Any:
    """One value for a key from its samples (see the module docstring)."""
    have = [v for v in values if v is not None]
    if not have:
        return None
    if all(_is_num(v) for v in have):
        m = statistics.median(have)
        if all(isinstance(v, int) for v in have) and float(m).is_integer():
            return int(m)   # counts stay integers where the median is one
        return m
    if all(isinstance(v, bool) for v in have):
        return all(have)
    if all(isinstance(v, dict) for v in have):
        return merge_samples(have)
    return _mixed(values)


def merge_samples(samples: Sequence[Mapping[str, Any]], *, ident: Iterable[str] = (),
                  reduce: Mapping[str, Callable[[list[Any]], Any]] | None = None) -> dict[str, Any]:
    """Many result rows of one configuration -> one row of the same shape.

    ``ident`` keys must agree across samples and are copied (``ValueError`` otherwise); every
    other key holds the merged value (:func:`merge_value`, or ``reduce[key](values)``) and its
    samples beside it as ``KEY_samples``. Keys keep the order of their first appearance.
    """
    if not samples:
        raise ValueError("merge_samples: no samples")
    idents = set(ident)
    reduce = reduce or {}
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s if k not in keys]
    out: dict[str, Any] = {}
    for k in keys:
        values = [s.get(k) for s in samples]
        if k in idents:
            if any(v != values[0] for v in values):
                raise ValueError(f"merge_samples: identity key {k!r} differs between samples: {values}")
            out[k] = values[0]
            continue
        out[k] = reduce[k](values) if k in reduce else merge_value(values)
        out[k + SAMPLES_SUFFIX] = values
    return out


# --------------------------------------------------------------------------------------------
# result files and tables


def write_result(name: str, data: Mapping[str, Any], ctx: Mapping[str, Any],
                 samples: Samples[Any, Any] | None = None) -> Path:
    """Write bench/results/NAME.json: ``data`` with ``"context"`` (the run's :func:`context`,
    finished now) and ``"schedule"`` (order, seed and trace of ``samples``) added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = dict(data)
    payload.setdefault("generated_at", _now())
    payload["context"] = finish_context(ctx)
    if samples is not None:
        payload["schedule"] = samples.to_json()
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    print(f"[bench] wrote {path}")
    return path


def print_table(headers: list[str], rows: list[list[Any]], *, file: Any = None) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = file or sys.stdout
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def print_context(ctx: Mapping[str, Any]) -> None:
    """One line: revision, QEMU, accel, kernels, CPU, load."""
    g = ctx.get("git") or {}
    rev = f"{str(g.get('revision', '?'))[:10]}{'+dirty' if g.get('dirty') else ''}"
    print(f"[bench] {rev} | {ctx.get('qemu')} | accel {ctx.get('accel')} | host {ctx.get('host_kernel')}"
          f" guest {ctx.get('guest_kernel')} | {ctx.get('cpu_model')} x{ctx.get('cpus')}"
          f" | load {ctx.get('loadavg_start')} | {ctx.get('mode')}", flush=True)


def fmt_num(v: float) -> str:
    return _fmt(float(v))


def fmt_range(lo: float, hi: float) -> str:
    """``lo-hi``, or ``lo..hi`` when a bound is negative."""
    sep = ".." if lo < 0 or hi < 0 else "-"
    return f"{fmt_num(lo)}{sep}{fmt_num(hi)}"


def fmt_stat(samples: Stat | Iterable[float | None] | None, scale: float = 1.0) -> str:
    """``median (min-max)`` of samples (or a Stat); ``-`` without data."""
    s = _as_stat(samples)
    return "-" if s is None else s.fmt(scale)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"   # 3 significant digits, never an exponent
    return str(v)
