"""Online exploration through the live engine, against the oracle: ``kdvfs simulate --explore``.

Each seed runs a training run's own path: an :class:`~kdvfs_plugins.engine.Engine` in mode
``auto`` with its plugin manager, actuator, meter (energy from power readings anchored to the
counter, as on a real card) and :class:`~kdvfs_plugins.explore.Explorer`, on a
:class:`~kdvfs_plugins.devices.simulated.TraceDevice` that replays the trace. :class:`TraceDriver`
plays the adapter: it reports the trace's phases, and each stretch's region in the steps where the
engine wants module boundaries, as the Lightning callback reports a model's.

The plan the explorer applies and the oracle's plan are then executed the same way (an engine
with the plan, on a fresh device of the same seed) beside the default clocks; their figures are
the device's true energy and time over the executed steps. Every figure is a model prediction.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time as _time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from ..clocks import ClockPair
from ..config import KdvfsConfig
from ..devices.simulated import TraceDevice
from ..distributed import LocalAllGather, Replicas, run_ranks
from ..engine import Engine
from ..regions import STEP
from ..sim.model import H100Model
from ..sim.stretch import StretchGPU
from ..sim.trace import Trace
from ..switching import DEFAULT_SWITCH_LATENCY_MS
from .planning import Execution

#: Steps each plan is executed for, after warm-up steps that are not counted.
EXECUTE_STEPS = 20
EXECUTE_WARMUP_STEPS = 3
#: Lane ``i`` of a seed explores on the card of seed ``seed + LANE_SEED_STRIDE * i`` (its own card
#: factors and noise), far from the seeds a report runs next to it.
LANE_SEED_STRIDE = 1000


class TraceDriver:
    """Reports a trace's steps to an engine the way an adapter reports a training loop's."""

    def __init__(self, engine: Engine, device: TraceDevice):
        self.engine = engine
        self.device = device

    def step(self) -> None:
        eng, dev = self.engine, self.device
        regions = dev.layout.regions
        dev.at_stretch(0)
        eng.step_begin()
        detail = eng.profiling_or_switching
        phase: Optional[str] = None
        group: Optional[str] = None
        for i, region in enumerate(regions):
            p = region.partition("/")[0]
            dev.at_stretch(i)
            if p != phase:
                if phase is not None and phase != STEP:
                    eng.region_exit(phase)  # closes the open group too
                group = None
                if p != STEP:
                    eng.region_enter(p)
                phase = p
            if not detail or p == STEP:
                continue
            if "/" in region:
                eng.region_switch(region)
                group = region
            elif group is not None:
                eng.region_exit(group)
                group = None
        dev.at_stretch(len(regions))
        eng.step_end()


def _config(**kw) -> KdvfsConfig:
    return KdvfsConfig.from_dict({"device": "simulated", "progress": False, "warmup_steps": 3, **kw},
                                 source="kdvfs simulate")


def _engine(cfg: KdvfsConfig, device: TraceDevice, **kw) -> Engine:
    return Engine(cfg, framework="kdvfs simulate", device=device, **kw).start()


@contextlib.contextmanager
def _quiet_engines():
    """The study's engines log as a training run's would (each result, a temporary plan file);
    the study prints its own table instead."""
    log = logging.getLogger("kdvfs")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _run_fixed(trace: Trace, clocks_by_name: Mapping[str, Optional[ClockPair]], *, seed: int, noise: bool,
               latency_ms: float, issue_ahead: bool, steps: int, model: Optional[H100Model]) -> tuple[float, float, int]:
    gpu = StretchGPU(trace, seed=seed, noise=noise, switch_latency_ms=latency_ms, model=model, issue_ahead=issue_ahead)
    dev = TraceDevice(gpu)
    regions = {k: v.to_dict() for k, v in clocks_by_name.items() if v is not None}
    with tempfile.TemporaryDirectory() as run_dir, _quiet_engines():
        cfg = _config(mode="apply" if regions else "observe", run_dir=run_dir, region_clocks=regions,
                      switch_latency_ms=latency_ms, issue_ahead=issue_ahead, energy_sample_period_ms=0)
        eng = _engine(cfg, dev)
        drive = TraceDriver(eng, dev)
        for _ in range(EXECUTE_WARMUP_STEPS):
            drive.step()
        t0, e0, c0 = gpu.now_s, gpu.energy_j, gpu.clock_changes
        for _ in range(steps):
            drive.step()
        t1, e1, c1 = gpu.now_s, gpu.energy_j, gpu.clock_changes
        eng.close()
    return (t1 - t0) / steps, (e1 - e0) / steps, c1 - c0


def execute(trace: Trace, clocks_by_name: Mapping[str, Optional[ClockPair]], *, seed: int = 0, noise: bool = True,
            latency_ms: float = DEFAULT_SWITCH_LATENCY_MS, issue_ahead: bool = True, steps: int = EXECUTE_STEPS,
            model: Optional[H100Model] = None) -> Execution:
    """Run ``clocks_by_name`` (region -> clocks) through an engine on the trace, beside the default clocks:
    true time and energy per step over ``steps`` steps after warm-up."""
    kw = dict(seed=seed, noise=noise, latency_ms=latency_ms, issue_ahead=issue_ahead, steps=steps, model=model)
    t, e, changes = _run_fixed(trace, clocks_by_name, **kw)
    t_def, e_def, _ = _run_fixed(trace, {}, **kw)
    return Execution(t, e, t_def, e_def, changes / steps)


@dataclass(frozen=True)
class SeedResult:
    seed: int
    energy_change: float
    time_change: float
    steps: int
    exploration_time_change: float
    applied: bool
    status: str = ""
    predicted: Mapping[str, float] = field(default_factory=dict)
    validated: Mapping[str, float] = field(default_factory=dict)
    #: the applied plan: knob -> "SM/mem MHz"
    clocks: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "energy_change": self.energy_change, "time_change": self.time_change,
                "steps": self.steps, "exploration_time_change": self.exploration_time_change,
                "applied": self.applied, "status": self.status, "predicted": dict(self.predicted),
                "validated": dict(self.validated), "clocks": dict(self.clocks)}


def run_seed(trace: Trace, seed: int, *, max_steps: int = 1500, max_slowdown: float = 0.0,
             explore_max_slowdown: float = 0.02, window_steps: int = 10, noise: bool = True,
             switch_latency_ms: float = DEFAULT_SWITCH_LATENCY_MS, issue_ahead: bool = True,
             model: Optional[H100Model] = None, execute_steps: int = EXECUTE_STEPS, lanes: int = 1):
    """One seed of ``mode="auto"`` through the live engine; the applied plan executed beside default.

    ``lanes`` > 1: as many data-parallel replicas exploring together, each an engine on a card of
    its own (lane ``i`` on the card of seed ``seed + LANE_SEED_STRIDE * i``; lane 0 is the card a
    single run gets), one thread each, exchanging through an all-gather among the threads as the
    ranks of a process group would. Their results agree; lane 0's is reported and executed.

    Returns (:class:`SeedResult`, lane 0's explorer, for its blocks)."""
    if lanes < 1:
        raise ValueError(f"lanes={lanes}: at least 1")
    devs = [TraceDevice(StretchGPU(trace, seed=seed + LANE_SEED_STRIDE * lane, noise=noise,
                                   switch_latency_ms=switch_latency_ms, model=model, issue_ahead=issue_ahead))
            for lane in range(lanes)]
    gather = LocalAllGather(lanes) if lanes > 1 else None
    with tempfile.TemporaryDirectory() as run_dir, _quiet_engines():
        engines = []
        for lane, dev in enumerate(devs):
            cfg = _config(mode="auto", run_dir=f"{run_dir}/lane{lane}", max_slowdown=max_slowdown,
                          explore_max_slowdown=explore_max_slowdown, explore_max_steps=max_steps,
                          window_steps=window_steps, switch_latency_ms=switch_latency_ms, issue_ahead=issue_ahead,
                          sim_seed=seed)
            replicas = Replicas(gather.for_rank(lane), lane, lanes) if gather else None
            engines.append(_engine(cfg, dev, rank=lane, world_size=lanes, replicas=replicas))
        # a step's records reach the explorer one step late (the meter resolves a step after it ends)
        limit = cfg.warmup_steps + window_steps + max_steps + 2 * window_steps

        def explore(lane: int) -> int:
            eng, drive, steps = engines[lane], TraceDriver(engines[lane], devs[lane]), 0
            while eng.explore_result is None and steps < limit:
                drive.step()
                steps += 1
            return steps

        try:
            if gather is None:
                steps = explore(0)
            else:
                with ThreadPoolExecutor(lanes) as pool:
                    steps = run_ranks(pool, explore, lanes, gather)[0]
        finally:
            for e in engines:
                e.close()
    eng, ex = engines[0], engines[0].explorer
    res = eng.explore_result if eng.explore_result is not None else (ex.result if ex is not None else None)
    n = int(res.steps) if res is not None else max(0, steps - cfg.warmup_steps)
    expl = float(res.exploration_time_change) if res is not None else (ex.exploration_time_change if ex else 0.0)
    applied = res is not None and res.status == "applied" and any(v is not None for v in res.clocks_by_name.values())
    de = dt = 0.0
    if applied:
        exe = execute(trace, res.clocks_by_name, seed=seed, noise=noise, latency_ms=switch_latency_ms,
                      issue_ahead=issue_ahead, steps=execute_steps, model=model)
        de, dt = exe.energy_change, exe.time_change
    clocks = {k: str(v) for k, v in res.clocks_by_name.items() if v is not None} if applied else {}
    return SeedResult(seed, float(de), float(dt), n, expl, bool(applied), res.status if res else "unfinished",
                      dict(res.predicted) if res else {}, dict(res.validated) if res else {}, clocks), ex


def oracle(trace: Trace, *, max_slowdown: float, switch_latency_ms: float, issue_ahead: bool = True):
    """The planner given the true model (noise-free tables, fitted to the power controller), with
    the actuation the explorer's plan gets: kernel granularity (finer than the explorer's knobs,
    so never easier to reach), the live actuator's floor between changes, issued ahead or late,
    and never worse than the best one-lock-per-phase plan that noise-free replays find
    (:func:`~.planning.phase_search`: the fixed point can miss plans that spend the power a
    memory-bound phase's low clock frees). The cost of a switch is
    :func:`kdvfs_plugins.switching.switch_model`'s, as the explorer's."""
    from ..switching import ISSUE_AHEAD_MIN_INTERVAL_MS
    from .planning import PlanningContext, phase_search, plan_on_trace

    objective = "strict" if max_slowdown == 0 else "relaxed"
    ctx = PlanningContext(trace)
    phases = phase_search(ctx, objective=objective, max_slowdown=max_slowdown, switch_latency_ms=switch_latency_ms,
                          issue_ahead=issue_ahead)
    return plan_on_trace(ctx, objective=objective, max_slowdown=max_slowdown, switch_latency_ms=switch_latency_ms,
                         issue_ahead=issue_ahead, min_interval_ms=ISSUE_AHEAD_MIN_INTERVAL_MS, candidates=[phases])


def _stats(values: Sequence[float]) -> Optional[dict]:
    if not len(values):
        return None
    v = np.array(values, dtype=float)
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def seeds_summary(rows: Sequence[Mapping], shares: Sequence[float]) -> dict:
    """min, median and max over the seeds of each figure of the exploration contract."""
    return {**{key: _stats([r[key] for r in rows])
               for key in ("energy_change", "time_change", "steps", "exploration_time_change")},
            "share_of_oracle_saving": _stats(shares)}


def seed_row(r: Mapping) -> list:
    """One seed of the exploration contract as a table row: seed, energy, time, plan, steps,
    exploration slowdown, share of the oracle's saving."""
    share = r.get("share_of_oracle_saving")
    return [r["seed"], f"{r['energy_change']:+.2%}", f"{r['time_change']:+.2%}",
            "applied" if r["applied"] else f"none ({r['status']})", r["steps"],
            f"{r['exploration_time_change']:+.2%}", "-" if share is None else f"{abs(share) if share == 0 else share:.0%}"]


def explore_report(trace_name: str = "gpt1b", seeds: Sequence[int] = range(5), *, max_steps: int = 1500,
                   max_slowdown: float = 0.0, explore_max_slowdown: float = 0.02, noise: bool = True,
                   switch_latency_ms: float = DEFAULT_SWITCH_LATENCY_MS, issue_ahead: bool = True,
                   lanes: int = 1, progress=None) -> dict:
    """Explore on each seed through the live engine (``lanes`` replicas exploring together);
    compare the applied plans with the oracle's."""
    trace = Trace.load(trace_name)
    t0 = _time.perf_counter()
    orc = oracle(trace, max_slowdown=max_slowdown, switch_latency_ms=switch_latency_ms, issue_ahead=issue_ahead)
    orc_clocks = {k: v for k, v in orc.clocks_by_name.items() if v is not None}
    rows, orc_e, orc_t = [], [], []
    for seed in seeds:
        rows.append(run_seed(trace, seed, max_steps=max_steps, max_slowdown=max_slowdown,
                             explore_max_slowdown=explore_max_slowdown, noise=noise,
                             switch_latency_ms=switch_latency_ms, issue_ahead=issue_ahead, lanes=lanes)[0])
        if orc_clocks:
            ex = execute(trace, orc_clocks, seed=seed, noise=noise, latency_ms=switch_latency_ms,
                         issue_ahead=issue_ahead)
            orc_e.append(ex.energy_change)
            orc_t.append(ex.time_change)
        else:
            orc_e.append(0.0)
            orc_t.append(0.0)
        if progress is not None:
            progress(1)
    oe, ot = float(np.median(orc_e)), float(np.median(orc_t))
    share = [(r.energy_change / oe) if oe < 0 else None for r in rows]
    shares = [s for s in share if s is not None]
    return {
        "model_prediction": True,
        "path": "live engine, explorer and meter on a trace-replaying simulated H100",
        "trace": trace.source,
        "max_slowdown": max_slowdown,
        "explore_max_slowdown": explore_max_slowdown,
        "explore_max_steps": max_steps,
        "switch_latency_ms": switch_latency_ms,
        "issue_ahead": issue_ahead,
        "lanes": lanes,
        "noise": noise,
        "power_reading": "instant field (100 ms), integrated and anchored to the counter",
        "oracle_energy_change": oe,
        "oracle_time_change": ot,
        "oracle_clocks": {k: str(v) for k, v in orc_clocks.items()},
        "seeds": [{**r.to_dict(), "share_of_oracle_saving": s} for r, s in zip(rows, share)],
        "summary": seeds_summary([r.to_dict() for r in rows], shares),
        "cpu_s": _time.perf_counter() - t0,
    }


def format_report(out: dict, fmt: str = "text") -> str:
    """The seeds as a table (``fmt``: ``text`` or ``markdown``), the oracle in a note."""
    from ..tables import Table

    table = Table(["seed", "energy", "time", "plan", "steps", "exploration slowdown", "share of oracle"],
                  [seed_row(r) for r in out["seeds"]],
                  align="lrrlrrr",
                  title=(f"model prediction (simulated H100): online exploration through the live engine, "
                         f"trace {out['trace']}, switch latency {out['switch_latency_ms']:g} ms"
                         + (f", {out['lanes']} replicas exploring together (lane 0 shown)"
                            if out.get("lanes", 1) > 1 else "")),
                  notes=[f"oracle plan: energy {out['oracle_energy_change']:+.2%}, "
                         f"time {out['oracle_time_change']:+.2%}"])
    return table.render(fmt)


def run_command(args) -> int:
    """``kdvfs simulate --explore``."""
    from ..errors import ConfigError

    if args.seeds < 1:
        raise ConfigError("--seeds", args.seeds, "at least 1", source="kdvfs simulate --explore")
    if args.lanes < 1:
        raise ConfigError("--lanes", args.lanes, "at least 1", source="kdvfs simulate --explore")
    from ..commands.simulate import _latency
    from ..progress import progress

    with progress(args.seeds, "exploring seeds") as bar:
        out = explore_report(args.trace, range(args.seed, args.seed + args.seeds), max_steps=args.explore_max_steps,
                             max_slowdown=args.explore_plan_slowdown, explore_max_slowdown=args.explore_max_slowdown,
                             noise=not args.no_noise, switch_latency_ms=_latency(args), lanes=args.lanes,
                             progress=bar.update)
    fmt = "markdown" if getattr(args, "markdown", False) else "text"
    print(json.dumps(out, indent=1) if args.json else format_report(out, fmt))
    return 0
