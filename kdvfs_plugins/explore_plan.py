"""From the measured tables to a plan: the planner on the step's stretches, and locks that do not pay dropped.

The tables (time and energy of every knob at every clock state) become a
:class:`~kdvfs_plugins.planner.PlanningProblem` with one occurrence per stretch of the step, in
order, and the switch as the actuator executes it. A lock that pays less than the measurements
resolve (``drop_floor`` of the step, at most ``MIN_PREDICTED_SAVING``) goes back to default, so
that similar data give one plan where the minimum is flat.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .clocks import ClockPair
from .planner import PlanningProblem, SwitchModel, plan as plan_step

#: A plan is validated only if it is predicted to save at least this much energy (a fraction of
#: the step): smaller savings are within what block measurements resolve and not worth the risk.
MIN_PREDICTED_SAVING = 0.002
#: Plans the planner may enumerate exactly (knobs ^ front states); above, its heuristic search.
EXACT_LIMIT = 300_000


@dataclass(frozen=True)
class PlanDraft:
    """A plan made from the measurements, before validation."""

    design: Mapping[str, int]            # knob -> state index, locked knobs only
    time_change: float                   # predicted, a fraction of the default step
    energy_change: float                 # predicted, a fraction of the default step's energy
    time_ms: np.ndarray                  # the time grid it was planned on (knob x state)


def time_penalised(T: np.ndarray, slow_scale: float) -> np.ndarray:
    """Every time effect of a lock made less favourable by ``slow_scale``: what a lowered clock
    costs grows by it, what a lock above the default's clock gains shrinks by it."""
    if slow_scale == 1.0:
        return T
    d = T - T[:, :1]
    beta = slow_scale - 1.0
    return np.where(np.isfinite(T), T[:, :1] + np.where(d > 0, d * (1 + beta), d * max(0.0, 1 - beta)), T)


def front_states(T: np.ndarray, E: np.ndarray) -> list[int]:
    """States on some knob's time/energy front (and the default): only those can be in a best
    plan, and with a handful of knobs that few let the planner search every combination exactly."""
    finite = np.isfinite(T)
    finite[:, 0] = True
    front = {0}
    for j in range(T.shape[0]):
        fin = [i for i in range(T.shape[1]) if finite[j, i]]
        for i in fin:
            if not any(T[j, o] <= T[j, i] and E[j, o] < E[j, i] or T[j, o] < T[j, i] and E[j, o] <= E[j, i]
                       for o in fin):
                front.add(i)
    return sorted(front)


def make_plan(T: np.ndarray, E: np.ndarray, *, knobs: Sequence[str], states: Sequence[Optional[ClockPair]],
              occurrences: Sequence[tuple[str, float]], default_step_energy_j: float, max_slowdown: float,
              objective: str, switch: SwitchModel, drop_floor: float = MIN_PREDICTED_SAVING) -> PlanDraft:
    """The planner's best plan on the tables, without locks that pay less than ``drop_floor``.

    Cells that are not finite are never chosen; each knob keeps its own usable states (one knob
    explored less deeply must not take a low clock away from the others). ``occurrences``: (knob,
    share of its time) per stretch in step order.
    """
    finite = np.isfinite(T)
    finite[:, 0] = True
    cols = front_states(T, E)
    # Unmeasured cells get a cost no plan can want (the solver needs finite numbers).
    t_big = 100.0 * float(np.nanmax(np.where(finite, T, np.nan)))
    e_big = 100.0 * float(np.nanmax(np.abs(np.where(finite, E, np.nan))))
    Tf = np.where(finite, T, t_big)
    Ef = np.where(finite, E, e_big)
    j_of = {k: j for j, k in enumerate(knobs)}
    names = [k for k, _ in occurrences]
    tt = np.array([[Tf[j_of[k], i] * sh for i in cols] for k, sh in occurrences]) / 1e3
    ee = np.array([[Ef[j_of[k], i] * sh for i in cols] for k, sh in occurrences])
    # the energy offset is arbitrary (B_k cancels); keep the planner's inputs positive
    ee = ee - ee.min() + 1e-3 * np.abs(ee).max() + 1e-9
    problem = PlanningProblem(tuple(names), tt, ee, tuple(states[i] for i in cols), 0)
    budget = max(0.0, max_slowdown)
    plan_kw = dict(objective=objective if budget > 0 else "strict", max_slowdown=budget, switch=switch,
                   exact_limit=EXACT_LIMIT)
    best = plan_step(problem, **plan_kw)
    ps = drop_unproven_locks(problem, best, plan_kw, knobs, drop_floor * default_step_energy_j)
    design = {k: list(states).index(c) for k, c in ps.clocks_by_name.items() if c is not None}
    return PlanDraft(design, float(ps.time_change),
                     float((ps.energy_j - ps.default_energy_j) / max(default_step_energy_j, 1e-9)), T)


def drop_unproven_locks(problem: PlanningProblem, best, plan_kw: dict, knobs: Sequence[str], floor_j: float):
    """The best plan without the locks that do not pay beyond ``floor_j`` of predicted energy.

    Each locked knob in turn goes back to default, the others re-planned around it; that plan
    is kept where it costs at most ``floor_j`` more predicted energy than the best. Where the
    minimum is flat (a lock near the default's clock, or a slowdown budget that forward and backward
    can spend alike), which plan the planner picks otherwise depends on the noise: another card,
    another seed, or replicas sharing the exploration each pick another, and validation cannot tell
    them apart. The plan with fewer locks is the one similar data agree on, and it switches and
    risks less.
    """
    limit_s = best.default_time_s * (1.0 + plan_kw["max_slowdown"]) * (1 + 1e-9)
    # a time no plan within the budget can afford: a knob given it at every lock stays at default
    unaffordable_s = 1e3 * float(problem.time_s.max())
    chosen, fixed = best, set()
    for k in knobs:
        if chosen.clocks_by_name.get(k) is None:
            continue
        tt = problem.time_s.copy()
        for i, name in enumerate(problem.names):
            if name in fixed or name == k:
                tt[i, 1:] = unaffordable_s
        trial = plan_step(PlanningProblem(problem.names, tt, problem.energy_j, problem.clocks, 0), **plan_kw)
        if trial.time_s <= limit_s and trial.energy_j - best.energy_j <= floor_j \
                and trial.clocks_by_name.get(k) is None:
            chosen = trial
            fixed.add(k)
    return chosen
