"""Exploration on the virtual GPU, fast: a stretch-level simulation and ``kdvfs simulate --explore``.

Replaying ~1300 kernels per step through the :class:`~.gpu.VirtualGPU` costs about 0.2 s of CPU per
step, far too slow for thousands of exploration steps over several seeds. Inside one exploration
block every step has the same clocks, so a step's *noise-free* behaviour is the same each time:

- :class:`StretchSim` runs the step once per clock configuration on a VirtualGPU (with the seed's
  card-to-card factors, without per-kernel jitter), at chunk level (consecutive kernels of one class
  inside a region stretch merged into one work item, which the virtual GPU costs identically up to
  how often its power controller re-decides). The controller, the switch latency and the card
  factors are therefore the virtual GPU's own. The result per region stretch (time, energy) is
  cached per configuration; the first step after a change of configuration is simulated from the
  previous configuration's end state (the switch lands late, the controller adapts).
- Each simulated step then draws the per-kernel jitter analytically: a stretch of ``n`` kernels gets
  relative noise ``sigma / sqrt(n_eff)`` on time and power.
- The energy counter refreshes every 100 ms of virtual time and holds integer mJ; window energy is
  read from it exactly as :class:`~kdvfs_plugins.meter.Meter` does on the simulated device (the
  counter value at each step boundary, interpolated between the points where it changed).

``tests/test_explore_sim.py`` checks it against :func:`~.trace.replay` on several configurations.
Every number it produces is a model prediction.
"""
from __future__ import annotations

import json
import random
import time as _time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..clocks import ClockPair
from ..events import StepRecord, WindowRecord
from ..meter import EnergySeries
from .gpu import ENERGY_REFRESH_S, VirtualGPU
from .model import H100Model, Work, default_model
from .trace import Trace, TraceStep, issue_due_changes, planned_changes

ClocksFor = Callable[[str], Optional[ClockPair]]


class _NoJitter(random.Random):
    """Per-kernel jitter drawn elsewhere (analytically per stretch): the virtual GPU gets zeros."""

    def gauss(self, mu=0.0, sigma=1.0):  # noqa: D401 - random.Random API
        return 0.0


@dataclass(frozen=True)
class _Chunk:
    category: str
    duration_s: float
    gap_before_s: float


@dataclass(frozen=True)
class StepLayout:
    """One trace step as region stretches, each a list of chunks."""

    regions: tuple[str, ...]
    chunks: tuple[tuple[_Chunk, ...], ...]
    tail_gap_s: float
    #: effective number of kernels per stretch, for the jitter's averaging (sum d)^2 / sum d^2
    n_eff: np.ndarray
    #: share of each stretch's time that is idle gap (no jitter there)
    gap_s: np.ndarray

    @classmethod
    def of(cls, ts: TraceStep) -> "StepLayout":
        regions, chunks, n_eff, gaps = [], [], [], []
        for region, kernels in ts.stretches():
            out: list[_Chunk] = []
            for k in kernels:
                if out and out[-1].category == k.category:
                    last = out[-1]
                    out[-1] = _Chunk(last.category, last.duration_s + k.duration_s, last.gap_before_s + k.gap_before_s)
                else:
                    out.append(_Chunk(k.category, k.duration_s, k.gap_before_s))
            d = np.array([k.duration_s for k in kernels])
            regions.append(region)
            chunks.append(tuple(out))
            n_eff.append(d.sum() ** 2 / max(float((d ** 2).sum()), 1e-30))
            gaps.append(sum(k.gap_before_s for k in kernels))
        return cls(tuple(regions), tuple(chunks), ts.tail_gap_s, np.array(n_eff), np.array(gaps))


class StretchSim:
    """A fast, faithful stand-in for replaying a trace on a noisy :class:`VirtualGPU`.

    ``run_step(clocks_for)`` simulates one step and returns ``(region_time_ms, step_time_s)``;
    windows of steps are closed with :meth:`close_window` (energy from the 100 ms counter).
    """

    def __init__(self, trace: Trace, *, seed: int = 0, noise: bool = True,
                 switch_latency_ms: Optional[float] = None, model: Optional[H100Model] = None,
                 issue_ahead: bool = False, meter: str = "counter"):
        self.model = model or default_model()
        if meter not in ("counter", "power"):
            raise ValueError(f"meter={meter!r}: use 'counter' or 'power'")
        self.meter = meter
        #: changes issued one latency ahead of their boundaries once a configuration repeats (the
        #: first step after a change of configuration writes at the boundaries: nothing to predict from)
        self.issue_ahead = issue_ahead
        self.trace = trace
        self.layouts = [StepLayout.of(ts) for ts in trace.steps]
        self.noise = noise
        self.seed = seed
        self.switch_latency_ms = switch_latency_ms
        self._gpu = self._new_gpu()
        self.clock_table = self._gpu.clock_table
        self._rng = np.random.default_rng(seed + 7919)
        nz = self.model.params.noise
        self._sig_t = nz["kernel_time_sigma"] if noise else 0.0
        self._sig_p = nz["kernel_power_sigma"] if noise else 0.0
        self._cache: dict = {}
        self._config_key: Optional[tuple] = None
        self._step_index = 0
        # timeline
        self.now_s = 0.0
        self.energy_j = 0.0  # true energy so far
        self._next_refresh_s = ENERGY_REFRESH_S
        self._counter_mj = 0
        self._prev_cum: Optional[tuple] = None
        self.series = EnergySeries()
        self.series.add(0.0, 0)
        self._win_begin_s: Optional[float] = None
        self._win_steps: list[tuple[int, float]] = []
        self.clock_changes = 0
        self.true_log: list[tuple[float, float]] = []  # (time_s, energy_j) per step, noise included

    def _new_gpu(self) -> VirtualGPU:
        gpu = VirtualGPU(switch_latency_ms=self.switch_latency_ms, noise=self.noise, seed=self.seed, params=self.model)
        gpu._rng = _NoJitter()
        return gpu

    # ------------------------------------------------------------------ noise-free step per configuration
    def _simulate(self, gpu: VirtualGPU, layout: StepLayout, clocks_for: Optional[ClocksFor], current: list,
                  prev_offsets: Optional[np.ndarray] = None):
        """One step; with ``prev_offsets`` (stretch starts of the previous step at this configuration)
        each change is requested one latency before its predicted boundary, re-anchored at every
        boundary reached, as the issue-ahead actuator does (:func:`~.trace.replay`'s ``lead_s``)."""
        n = len(layout.regions)
        t = np.zeros(n)
        e = np.zeros(n)
        sm = np.zeros(n)  # time-weighted SM clock per stretch (what a clock reading reports)
        changes = 0
        lead = gpu.switch_latency_s
        ahead = clocks_for is not None and lead > 0 and prev_offsets is not None and len(prev_offsets) == n
        todo: list = []
        if ahead:
            todo = planned_changes(layout.regions, clocks_for, current)
            changes += len(todo)
        for i, (region, chunks) in enumerate(zip(layout.regions, layout.chunks)):
            if ahead:
                issue_due_changes(gpu, todo, prev_offsets, i, lead)
            elif clocks_for is not None:
                want = clocks_for(region)
                if want != current[0]:
                    gpu.request_clocks(want, gpu.now_s)
                    current[0] = want
                    changes += 1
            t0, e0 = gpu.now_s, gpu.energy_j
            busy = 0.0
            for c in chunks:
                if c.gap_before_s > 0:
                    gpu.idle(c.gap_before_s)
                d, _ = gpu.run(Work(c.category, c.duration_s))
                sm[i] += gpu.last_sm_mhz * d
                busy += d
            sm[i] /= max(busy, 1e-30)
            t[i], e[i] = gpu.now_s - t0, gpu.energy_j - e0
        if layout.tail_gap_s > 0:
            t0, e0 = gpu.now_s, gpu.energy_j
            gpu.idle(layout.tail_gap_s)
            t[-1] += gpu.now_s - t0
            e[-1] += gpu.energy_j - e0
        self._last_sm = sm
        return t, e, changes

    @staticmethod
    def _offsets(t: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(t)[:-1]])

    def _steady(self, key: tuple, clocks_for: Optional[ClocksFor], layout_i: int):
        """(time, energy, changes) per stretch of a step repeated at one configuration."""
        ck = (key, layout_i)
        hit = self._cache.get(ck)
        if hit is None:
            gpu = self._new_gpu()
            cur: list = [None]
            nl = len(self.layouts)
            # warm the controller and land the first switches; issued ahead, each step's changes are
            # predicted from the previous step's boundaries (the layouts' stretches line up)
            prev = None
            for j in range(3 if self.issue_ahead else 2):
                tw, _, _ = self._simulate(gpu, self.layouts[(layout_i + j - 3) % nl], clocks_for, cur,
                                          prev if self.issue_ahead else None)
                prev = self._offsets(tw)
            hit = self._simulate(gpu, self.layouts[layout_i], clocks_for, cur, prev if self.issue_ahead else None)
            hit = hit + (self._last_sm,)
            self._cache[ck] = hit
        return hit

    def _transition(self, key: tuple, clocks_for: Optional[ClocksFor], layout_i: int):
        """The first step at a configuration, after a step at the previous one."""
        prev = self._config_key
        if prev is None or prev == key:
            return self._steady(key, clocks_for, layout_i)
        ck = ("T", prev, key, layout_i)
        hit = self._cache.get(ck)
        if hit is None:
            gpu = self._new_gpu()
            cur: list = [None]
            nl = len(self.layouts)
            prev_for = self._prev_clocks_for
            self._simulate(gpu, self.layouts[(layout_i - 2) % nl], prev_for, cur)
            self._simulate(gpu, self.layouts[(layout_i - 1) % nl], prev_for, cur)
            hit = self._simulate(gpu, self.layouts[layout_i], clocks_for, cur)
            hit = hit + (self._last_sm,)
            self._cache[ck] = hit
        return hit

    # ------------------------------------------------------------------ public
    def run_step(self, clocks_for: Optional[ClocksFor], key: Optional[tuple] = None) -> tuple[dict, float, float]:
        """One step at ``clocks_for`` (``key`` identifies the configuration for the cache).

        Returns (region GPU ms of this step, step time s, true energy J of this step).
        """
        key = key if key is not None else ("default",) if clocks_for is None else (id(clocks_for),)
        li = self._step_index % len(self.layouts)
        layout = self.layouts[li]
        t, e, changes, sm = self._transition(key, clocks_for, li)
        #: SM MHz per region in this step (time-weighted): the device's clock reading
        self.region_sm_mhz = {}
        wsum: dict = {}
        for name, ti, fi in zip(layout.regions, t, sm):
            self.region_sm_mhz[name] = self.region_sm_mhz.get(name, 0.0) + fi * ti
            wsum[name] = wsum.get(name, 0.0) + ti
        self.region_sm_mhz = {k: v / max(wsum[k], 1e-30) for k, v in self.region_sm_mhz.items()}
        self._config_key, self._prev_clocks_for = key, clocks_for
        self._step_index += 1
        self.clock_changes += changes
        if self.noise:
            busy = np.maximum(t - layout.gap_s, 0.0)
            zt = self._rng.standard_normal(len(t)) * self._sig_t / np.sqrt(layout.n_eff)
            zp = self._rng.standard_normal(len(t)) * self._sig_p / np.sqrt(layout.n_eff)
            p_busy = np.divide(e, np.maximum(t, 1e-30))  # gaps draw about the same power: fine for noise
            t = t + busy * zt
            e = t * p_busy * (1.0 + zp)
        step_t, step_e = float(t.sum()), float(e.sum())
        # the counter: refreshes inside this step see the energy at their own instant
        t0, e0 = self.now_s, self.energy_j
        cum_t = t0 + np.concatenate([[0.0], np.cumsum(t)])
        cum_e = e0 + np.concatenate([[0.0], np.cumsum(e)])
        if self._win_begin_s is None:
            self._win_begin_s = t0
            self.series.add(t0, self._meter_mj(t0, cum_t, cum_e))
        while self._next_refresh_s <= t0 + step_t + 1e-12:
            r = self._next_refresh_s
            self._counter_mj = int(float(np.interp(r, cum_t, cum_e)) * 1e3)
            self._next_refresh_s = r + ENERGY_REFRESH_S
        self.now_s, self.energy_j = t0 + step_t, e0 + step_e
        self.series.add(self.now_s, self._meter_mj(self.now_s, cum_t, cum_e))
        self._prev_cum = (cum_t, cum_e)
        self.true_log.append((step_t, step_e))
        region_ms: dict[str, float] = {}
        for name, ti in zip(layout.regions, t):
            region_ms[name] = region_ms.get(name, 0.0) + ti * 1e3
        return region_ms, step_t, step_e

    def _meter_mj(self, t_s: float, cum_t: np.ndarray, cum_e: np.ndarray) -> float:
        """The meter's energy reading at ``t_s``.

        ``counter``: the 100 ms counter's last value, as the simulated device's meter reads it.
        ``power``: integrated power readings, as the meter does on a real GPU; a reading is the
        average over the last 100 ms refresh, so the integral trails the true energy by one
        refresh period and is otherwise exact for the model (its sensor noise is in the power).
        """
        if self.meter == "counter":
            return float(self._counter_mj)
        lag_t = t_s - ENERGY_REFRESH_S
        if lag_t <= 0:
            return 0.0
        if lag_t >= cum_t[0]:
            return float(np.interp(lag_t, cum_t, cum_e)) * 1e3
        pt, pe = self._prev_cum if self._prev_cum is not None else (cum_t[:1], cum_e[:1])
        return float(np.interp(lag_t, pt, pe)) * 1e3

    def window_energy_j(self, begin_s: float, end_s: float) -> Optional[float]:
        """Energy between two step boundaries as the meter reads it from the counter."""
        e0, e1 = self.series.at(begin_s), self.series.at(end_s)
        if e0 is None or e1 is None:
            return None
        return (e1 - e0) / 1e3


# ---------------------------------------------------------------------- exploration run
@dataclass(frozen=True)
class SeedResult:
    seed: int
    energy_change: float
    time_change: float
    steps: int
    exploration_time_change: float
    applied: bool
    predicted: Mapping[str, float] = field(default_factory=dict)
    validated: Mapping[str, float] = field(default_factory=dict)
    #: the applied plan: knob -> "SM/mem MHz"
    clocks: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "energy_change": self.energy_change, "time_change": self.time_change,
                "steps": self.steps, "exploration_time_change": self.exploration_time_change,
                "applied": self.applied, "predicted": dict(self.predicted), "validated": dict(self.validated),
                "clocks": dict(self.clocks)}


def _as_clock(answer) -> Optional[ClockPair]:
    from ..policy import as_clocks

    return as_clocks(answer)


def trace_layout(sim: StretchSim) -> list:
    """The default step's stretches (region, ms) as a profiled step would show them."""
    from ..explore import Occurrence

    t = sim._steady(("default",), None, 0)[0]
    return [Occurrence(r, float(x) * 1e3) for r, x in zip(sim.layouts[0].regions, t)]


def run_seed(trace: Trace, seed: int, *, max_steps: int = 1500, max_slowdown: float = 0.0,
             explore_max_slowdown: float = 0.02, window_steps: int = 10, noise: bool = True,
             switch_latency_ms: Optional[float] = None, execute_steps: int = 10,
             model: Optional[H100Model] = None, apply: bool = True,
             issue_ahead: bool = True, meter: str = "power", lanes: int = 1) -> tuple[SeedResult, "Explorer"]:
    """Explore on the fast stretch simulation of ``trace``; execute the applied plan on the VirtualGPU.

    ``lanes`` > 1: that many data-parallel replicas, each on its own card (its own card factors
    and noise), explore together; the lanes here do not wait for each other as ranks joined by
    a gradient all-reduce would.
    """
    from ..explore import ExploreSettings, Explorer
    from .gpu import DEFAULT_SWITCH_LATENCY_MS

    lat = DEFAULT_SWITCH_LATENCY_MS if switch_latency_ms is None else switch_latency_ms
    # The meter as it runs on a real GPU (integrated power readings), not the bare counter.
    sims = [StretchSim(trace, seed=seed + 1000 * lane, noise=noise, switch_latency_ms=lat, model=model,
                       issue_ahead=issue_ahead, meter=meter) for lane in range(lanes)]
    sim = sims[0]
    settings = ExploreSettings(clock_table=sim.clock_table, max_slowdown=max_slowdown,
                               objective="strict" if max_slowdown == 0 else "relaxed",
                               explore_max_slowdown=explore_max_slowdown, explore_max_steps=max_steps,
                               window_steps=window_steps, switch_latency_ms=lat, seed=seed,
                               issue_ahead=issue_ahead, lanes=lanes)
    ex = Explorer(settings, apply=apply)
    ex.set_layout(trace_layout(sim))
    win_begin_s, win_first = [s.now_s for s in sims], 0
    step = 0
    explore_time_s = 0.0
    while not ex.done and step < max_steps + 1:
        answers: list[dict] = [{} for _ in sims]

        def clocks_for(region: str, lane: int, _step=step):
            if region not in answers[lane]:
                answers[lane][region] = _as_clock(ex.clocks_for(region, _step, lane))
            return answers[lane][region]

        for lane in range(lanes):
            for r in sim.layouts[0].regions:  # decide the block (and its key) before the step runs
                clocks_for(r, lane)
        if ex.done:
            break
        for lane, sl in enumerate(sims):
            key = tuple(sorted((r, c) for r, c in answers[lane].items() if c is not None))
            region_ms, step_t, _ = sl.run_step(lambda r, lane=lane: clocks_for(r, lane), key=("cfg",) + key)
            explore_time_s += step_t / lanes
            ex.observe_step(step, step_t * 1e3, region_ms, lane)
            ex.observe_clocks(step, sl.region_sm_mhz, region_ms, lane)
        step += 1
        if step - win_first >= window_steps:
            for lane, sl in enumerate(sims):
                e = sl.window_energy_j(win_begin_s[lane], sl.now_s)
                if e is not None:
                    ex.observe_window(win_first, step - 1, e, lane)
            win_begin_s, win_first = [sl.now_s for sl in sims], step
    res = ex.result
    n = step
    # the default step's true time at this seed (noise-free steady state of the stretch simulation)
    t_def = float(sim._steady(("default",), None, 0)[0].sum() + sim._steady(("default",), None, 1 % len(sim.layouts))[0].sum()) / 2
    expl = explore_time_s / max(n, 1) / t_def - 1.0
    applied = res is not None and res.status in ("applied", "explored") and bool(res.clocks_by_name)
    if applied:
        from .planning import execute, plan_lookup

        # the actuator's issue-ahead: no seeded timing, each step predicted from the previous ones
        exe = execute(trace, plan_lookup(dict(res.clocks_by_name)), switch_latency_ms=lat, noise=noise, seed=seed,
                      steps=execute_steps, model=model, issue_ahead=issue_ahead)
        de, dt = exe.energy_change, exe.time_change
    else:
        de = dt = 0.0
    clocks = {k: str(v) for k, v in res.clocks_by_name.items() if v is not None} if applied else {}
    return SeedResult(seed, float(de), float(dt), int(n), float(expl), bool(applied),
                      dict(res.predicted) if res else {}, dict(res.validated) if res else {}, clocks), ex


# ---------------------------------------------------------------------- command
def oracle(trace: Trace, *, max_slowdown: float, switch_latency_ms: float, model: Optional[H100Model] = None,
           issue_ahead: bool = True, min_interval_ms: float = 1.0):
    """The planner given the true model (noise-free tables, fitted to the power controller), with
    the actuation the explorer's plan gets: kernel granularity (finer than the explorer's knobs,
    so never easier to reach), the actuator's floor between changes, issued ahead or landing late."""
    from .planning import plan_on_trace

    objective = "strict" if max_slowdown == 0 else "relaxed"
    tp = plan_on_trace(trace, objective=objective, max_slowdown=max_slowdown, switch_latency_ms=switch_latency_ms,
                       issue_ahead=issue_ahead, min_interval_ms=min_interval_ms)
    return tp


def _stats(values: Sequence[float]) -> dict:
    v = np.array(values, dtype=float)
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def explore_report(trace_name: str = "gpt1b", seeds: int = 5, *, max_steps: int = 1500, max_slowdown: float = 0.0,
                   explore_max_slowdown: float = 0.02, noise: bool = True,
                   switch_latency_ms: Optional[float] = None, execute_steps: int = 10,
                   issue_ahead: bool = True, lanes: int = 1) -> dict:
    """Explore on the virtual GPU for each seed; compare the applied plans with the oracle's."""
    from .gpu import DEFAULT_SWITCH_LATENCY_MS
    from .planning import execute

    trace = Trace.load(trace_name)
    lat = DEFAULT_SWITCH_LATENCY_MS if switch_latency_ms is None else switch_latency_ms
    t0 = _time.perf_counter()
    orc = oracle(trace, max_slowdown=max_slowdown, switch_latency_ms=lat, issue_ahead=issue_ahead)
    rows, orc_e, orc_t = [], [], []
    for seed in range(seeds):
        res, _ = run_seed(trace, seed, max_steps=max_steps, max_slowdown=max_slowdown,
                          explore_max_slowdown=explore_max_slowdown, noise=noise, switch_latency_ms=lat,
                          execute_steps=execute_steps, issue_ahead=issue_ahead, lanes=lanes)
        rows.append(res)
        if orc.clocks_by_name and any(c is not None for c in orc.clocks_by_name.values()):
            ex = execute(trace, orc.clocks_for, switch_latency_ms=lat, noise=noise, seed=seed, steps=execute_steps,
                         issue_ahead=issue_ahead)
            orc_e.append(ex.energy_change)
            orc_t.append(ex.time_change)
        else:
            orc_e.append(0.0)
            orc_t.append(0.0)
    oe, ot = float(np.median(orc_e)), float(np.median(orc_t))
    share = [(r.energy_change / oe) if oe < 0 else None for r in rows]
    return {
        "model_prediction": True,
        "trace": trace.source,
        "max_slowdown": max_slowdown,
        "explore_max_slowdown": explore_max_slowdown,
        "explore_max_steps": max_steps,
        "switch_latency_ms": lat,
        "issue_ahead": issue_ahead,
        "noise": noise,
        "lanes": lanes,
        "oracle_energy_change": oe,
        "oracle_time_change": ot,
        "oracle_clocks": {k: (None if v is None else str(v)) for k, v in orc.clocks_by_name.items() if v is not None},
        "seeds": [{**r.to_dict(), "share_of_oracle_saving": s} for r, s in zip(rows, share)],
        "summary": {
            "energy_change": _stats([r.energy_change for r in rows]),
            "time_change": _stats([r.time_change for r in rows]),
            "steps": _stats([r.steps for r in rows]),
            "exploration_time_change": _stats([r.exploration_time_change for r in rows]),
            "share_of_oracle_saving": _stats([s for s in share if s is not None]) if any(s is not None for s in share) else None,
        },
        "cpu_s": _time.perf_counter() - t0,
    }


def run_command(args) -> int:
    """``kdvfs simulate --explore``: the handler registered in :data:`kdvfs_plugins.commands.simulate.MODES`."""
    from ..errors import ConfigError

    if args.seeds < 1:
        raise ConfigError("--seeds", args.seeds, "at least 1", source="kdvfs simulate --explore")
    if args.lanes < 1:
        raise ConfigError("--lanes", args.lanes, "at least 1", source="kdvfs simulate --explore")
    out = explore_report(args.trace, args.seeds, max_steps=args.explore_max_steps, max_slowdown=args.explore_plan_slowdown,
                         explore_max_slowdown=args.explore_max_slowdown, noise=not args.no_noise,
                         switch_latency_ms=args.switch_latency_ms, lanes=args.lanes)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    lanes = f", {args.lanes} data-parallel replicas exploring together" if args.lanes > 1 else ""
    print(f"model prediction (simulated H100): online exploration vs the oracle plan{lanes}")
    print(f"  oracle: energy {out['oracle_energy_change']:+.2%}, time {out['oracle_time_change']:+.2%}")
    for r in out["seeds"]:
        print(f"  seed {r['seed']}: energy {r['energy_change']:+.2%}, time {r['time_change']:+.2%}, "
              f"applied after {r['steps']} steps, exploration slowdown {r['exploration_time_change']:+.2%}")
    return 0
