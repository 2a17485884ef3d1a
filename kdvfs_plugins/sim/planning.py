"""Planning on the virtual GPU: a trace's regions as a planning problem, and plans executed.

:func:`problem_from_trace` turns one step of a kernel trace into the planner's input: its region
stretches in order ("occurrences"), each with time and energy at every clock state, from the
noise-free model. :func:`execute` replays a plan on a noisy :class:`VirtualGPU` with switch
latency, next to the default clocks with the same noise, and reports the changes. Both are model
predictions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..clocks import ClockPair
from ..planner import PlanningProblem
from .gpu import VirtualGPU
from .model import H100Model, Work, default_model
from .trace import ReplayResult, Trace, replay


def clock_states(model: H100Model, mem_mhz: Optional[Sequence[int]] = None,
                 sm_mhz: Optional[Sequence[int]] = None) -> list[Optional[ClockPair]]:
    """The default state (None) followed by every locked pair, highest clocks first."""
    table = VirtualGPU(noise=False, params=model).clock_table
    mems = list(mem_mhz) if mem_mhz is not None else list(table.mem_mhz)
    sms = list(sm_mhz) if sm_mhz is not None else list(table.sm_mhz)
    return [None] + [ClockPair(int(s), int(m)) for m in mems for s in sms]


@dataclass(frozen=True)
class TraceProblem:
    problem: PlanningProblem
    #: the default state's SM clock for the whole step (the power controller's clock for the mix)
    default_ceiling_sm_mhz: float


def problem_from_trace(trace: Trace, model: Optional[H100Model] = None, *, step: int = 0,
                       clocks: Optional[Sequence[Optional[ClockPair]]] = None,
                       ceiling_sm_mhz: Optional[float] = None) -> TraceProblem:
    """One step of ``trace`` as a :class:`~kdvfs_plugins.planner.PlanningProblem`.

    Each region stretch is an occurrence. Idle gaps before a kernel belong to the stretch they are
    in and draw static power at its clocks; the step's tail gap belongs to its last stretch.
    Locked clocks are lowered to the default mix's controller clock where the cap binds, which is
    conservative: locking other regions lower frees power and can only raise that clock.
    """
    model = model or default_model()
    states = list(clocks) if clocks is not None else clock_states(model)
    if states[0] is not None:
        raise ValueError("the first clock state must be None (the default state)")
    ts = trace.steps[step % len(trace.steps)]
    gaps_total = sum(k.gap_before_s for k in ts.kernels) + ts.tail_gap_s
    default_ceiling = model.mix_ceiling_sm_mhz([(k.work(), None) for k in ts.kernels], gap_s=gaps_total)
    ceiling = default_ceiling if ceiling_sm_mhz is None else ceiling_sm_mhz
    locked = [c for c in states[1:]]
    sm = np.array([c.sm_mhz for c in locked], dtype=float)
    mem = np.array([c.mem_mhz for c in locked], dtype=float)
    static_locked = model.static_power_w(np.minimum(sm, ceiling), mem)
    static_default = float(model.static_power_w(default_ceiling, model.params.mem_max_mhz))
    stretches = ts.stretches()
    n, n_states = len(stretches), len(states)
    time_s = np.zeros((n, n_states))
    energy_j = np.zeros((n, n_states))
    names = []
    cache: dict = {}
    for i, (region, kernels) in enumerate(stretches):
        names.append(region)
        per_class: dict[str, float] = {}
        gap = sum(k.gap_before_s for k in kernels)
        if i == n - 1:
            gap += ts.tail_gap_s
        for k in kernels:
            per_class[k.category] = per_class.get(k.category, 0.0) + k.duration_s
        for cat, dur in per_class.items():
            key = cat
            if key not in cache:
                unit = Work(cat, 1.0)
                t_l, e_l = model.time_energy(unit, sm, mem, ceiling_sm_mhz=ceiling)
                t_d, e_d, _ = model.auto_time_energy(unit, ceiling_sm_mhz=default_ceiling)
                cache[key] = (float(t_d), float(e_d), t_l, e_l)
            t_d, e_d, t_l, e_l = cache[key]
            # time and energy are linear in a Work's duration at fixed clocks
            time_s[i, 0] += dur * t_d
            energy_j[i, 0] += dur * e_d
            time_s[i, 1:] += dur * t_l
            energy_j[i, 1:] += dur * e_l
        time_s[i, :] += gap
        energy_j[i, 0] += gap * static_default
        energy_j[i, 1:] += gap * static_locked
    problem = PlanningProblem(tuple(names), time_s, energy_j, tuple(states), 0)
    return TraceProblem(problem, float(default_ceiling))


ClocksFor = Callable[[str], Optional[ClockPair]]


@dataclass(frozen=True)
class Execution:
    """A plan run on the virtual GPU next to the default clocks (same seed, same noise)."""

    time_s: float
    energy_j: float
    default_time_s: float
    default_energy_j: float
    clock_changes_per_step: float

    @property
    def time_change(self) -> float:
        return self.time_s / self.default_time_s - 1.0

    @property
    def energy_change(self) -> float:
        return self.energy_j / self.default_energy_j - 1.0


def plan_lookup(clocks_by_name: Mapping[str, Optional[ClockPair]]) -> ClocksFor:
    """``clocks_for(region)`` for a plan keyed by region names, phases or ``step``."""
    from ..regions import STEP, Region

    def clocks_for(region: str) -> Optional[ClockPair]:
        r: Optional[Region] = Region.parse(region)
        while r is not None:
            if r.name in clocks_by_name:
                return clocks_by_name[r.name]
            r = r.parent
        return clocks_by_name.get(STEP)

    return clocks_for


def execute(trace: Trace, clocks_for: ClocksFor, *, switch_latency_ms: Optional[float] = None,
            noise: bool = True, seed: int = 0, steps: int = 20, warmup_steps: int = 3,
            model: Optional[H100Model] = None, baseline: Optional[ReplayResult] = None) -> Execution:
    """Run ``clocks_for`` for ``steps`` steps and the default clocks for as many, with the same seed."""
    model = model or default_model()
    if baseline is None:
        baseline = replay(VirtualGPU(switch_latency_ms=switch_latency_ms, noise=noise, seed=seed, params=model),
                          trace, steps=steps, warmup_steps=warmup_steps)
    run = replay(VirtualGPU(switch_latency_ms=switch_latency_ms, noise=noise, seed=seed, params=model),
                 trace, steps=steps, clocks_for=clocks_for, warmup_steps=warmup_steps)
    return Execution(run.step_time_s, run.energy_j, baseline.step_time_s, baseline.energy_j,
                     run.clock_changes / (steps + warmup_steps))


def plan_ceiling_sm_mhz(trace: Trace, clocks_for: ClocksFor, model: Optional[H100Model] = None, step: int = 0) -> float:
    """The power controller's clock for the step's mix when regions run at ``clocks_for``."""
    model = model or default_model()
    ts = trace.steps[step % len(trace.steps)]
    gaps = sum(k.gap_before_s for k in ts.kernels) + ts.tail_gap_s
    return model.mix_ceiling_sm_mhz([(k.work(), clocks_for(k.region)) for k in ts.kernels], gap_s=gaps)
