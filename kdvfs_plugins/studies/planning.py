"""Planning on the virtual GPU: a trace's step as a planning problem, plans fitted to the power
controller by a fixed point, and plans executed with switch latency and noise.

API (stable; the explorer's oracle uses it)
-------------------------------------------
``PlanningContext(trace, model=None, *, step=None, clocks=None)``
    Caches for one trace: :meth:`~PlanningContext.default_observation`, :meth:`~PlanningContext.observe`
    (a plan replayed noise-free, cached per plan, latency and actuation) and
    :meth:`~PlanningContext.problem` (the planning problem for given per-stretch controller clocks,
    cached). ``step`` is the trace step that is planned and observed (default: the one replayed
    after one warm-up step, ``1 % len(trace.steps)``).

``observe_step(trace, clocks_for=None, *, step, switch_latency_ms=0.0, issue_ahead=False, model=None)
-> StepObservation``
    One step replayed on a noise-free :class:`VirtualGPU` after one warm-up step: per region
    stretch its GPU time, energy and the power controller's SM clock while it ran (its local
    ceiling), and the step's totals.

``problem_from_trace(trace, model=None, *, step=0, clocks=None, ceiling_sm_mhz=None, default=None)
-> TraceProblem``
    The step as a :class:`~kdvfs_plugins.planner.PlanningProblem`: one occurrence per region
    stretch, each at every clock state (``None`` = the driver default, then every locked pair).
    ``ceiling_sm_mhz``: None (the default mix's controller clock for all stretches), one number, or
    one number per stretch (local ceilings, as observed). ``default``: a :class:`StepObservation`
    of the default clocks, whose exact per-stretch figures then fill the default state's column.

``switch_model_for(switch_latency_ms, issue_ahead) -> SwitchModel``
    The planner's switch model that matches the executor (see "Switching" below).

``plan_on_trace(trace_or_context, *, granularity="kernel", objective="strict", max_slowdown=0.0,
switch_latency_ms=None, issue_ahead=True, max_iterations=4, time_rtol=DEFAULT_TIME_RTOL,
candidates=()) -> TracePlan``
    The fixed-point planning (below). ``TracePlan``: ``planned`` (the planner's
    :class:`~kdvfs_plugins.planner.PlannedStep` for the chosen plan, on the problem it was chosen
    on), ``observed`` (that plan replayed noise-free), ``default`` (the default step, noise-free),
    ``switch``, ``issue_ahead``, ``iterations``, ``converged``; ``clocks_by_name``,
    ``clocks_for(region)``, ``executed_time_change``/``executed_energy_change`` (noise-free).

``execute(trace, clocks_for, *, switch_latency_ms=None, noise=True, seed=0, steps=20,
warmup_steps=3, model=None, baseline=None, issue_ahead=False) -> Execution``
    A plan run on a (noisy) :class:`VirtualGPU` next to the default clocks with the same seed.

``compare(...)``, ``sweep(...)``, ``latency_sweep(...)``: the paper's Table 2, Fig. 6 and the
switch-latency trade-off for a trace (JSON-ready dicts; every figure a model prediction).

Method: why a fixed point
-------------------------
The card's power controller is local: it holds the highest SM clock at which power averaged over a
short window (10 ms here) meets the cap. Inside the GPT step that clock is one value for the mix
(about 1667 MHz), so a matrix product in the default state runs at that clock, not at its own cap
clock. Lowering the clocks of memory-bound stretches lowers the window's average power, and the
matrix products that follow run faster -- but only those within a window of the lowered stretch,
and by an amount that depends on the whole plan. A planning problem with one global ceiling is
therefore wrong both ways: the default mix's clock makes matrix products unable to gain anything,
and an optimistic global clock promises gains in stretches far from any lowered region.

So the problem is built from what the controller really does:

1. The default state's column is exact: each stretch's time and energy from a noise-free replay of
   the default clocks (:func:`observe_step`).
2. A locked state ``(sm, mem)`` of stretch ``i`` runs at ``min(sm, ceiling_i)``, where ``ceiling_i``
   is the controller's clock observed while stretch ``i`` ran under the *current* plan.
3. Iterate: plan on the problem, replay the plan noise-free (with its switch latency and actuation),
   read each stretch's ceiling, rebuild, replan, until the plan repeats or ``max_iterations``.
   Two chains run: one from the default ceilings and one from an optimistic start (no cap at all),
   which is how plans that use the freed power are found at all.
4. Of every plan tried (plus the default clocks, one-clock plans the planner considers, and any
   ``candidates`` such as a coarser granularity's plan), keep the one whose noise-free replay uses
   least energy (least energy x time for edp) within the time budget, with ``time_rtol`` slack for
   the replay's resolution.

Limits: the planner still treats ``ceiling_i`` as fixed while it chooses, so it cannot see that its
own choice for stretch ``i`` moves the ceilings of its neighbours; the replay corrects that after
the fact, and the selection only ever keeps what the replay confirmed. A plan is fitted to one
trace step and the controller's window; a different window, workload mix or power limit needs a
new fit. The fixed point is not guaranteed to converge (plans may cycle); ``converged`` says
whether the last plan repeated. Every figure is a model prediction of the virtual H100.

Switching
---------
The virtual GPU applies a change ``latency`` after it is requested, without stalling and without
extra energy. With the change requested at the boundary (``issue_ahead=False``) the first
``latency`` of the next stretch runs at the old clocks: the planner's ``lands_late`` mode. With
``issue_ahead=True`` the executor requests each change ``latency`` before the boundary's time
predicted from the previous step (:func:`~kdvfs_plugins.sim.trace.replay`'s ``lead_s``): the
planner's ``hide_latency`` mode. In both modes the planner keeps changes at least ``latency``
apart, since a real actuator has one change in flight at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ..clocks import ClockPair
from ..errors import ConfigError
from ..planner import GRANULARITIES, OBJECTIVES, AgainstDefault, PlannedStep, PlanningProblem, SwitchModel, plan
from ..switching import DEFAULT_SWITCH_LATENCY_MS, check_latency_ms, switch_model
from ..sim.gpu import VirtualGPU
from ..sim.model import H100Model, Work, default_model
from ..sim.trace import ClocksFor, ReplayResult, Trace, replay

__all__ = [
    "DEFAULT_TIME_RTOL", "StepObservation", "TraceProblem", "TracePlan", "Execution", "PlanningContext",
    "clock_states", "observe_step", "problem_from_trace", "switch_model_for", "plan_on_trace", "execute",
    "plan_lookup", "plan_ceiling_sm_mhz", "compare", "sweep", "latency_sweep", "phase_search",
    "SWEEP_SLOWDOWNS", "LATENCY_SWEEP_MS",
]

#: Slack on the time budget when a plan's noise-free replay is checked (a fraction of the default
#: step): the replay's timing resolution, far below the noise of any measurement.
DEFAULT_TIME_RTOL = 1e-4
#: Floor between clock changes the planner keeps by default: none, as the executor here (a replay on
#: the virtual GPU) has none. A live actuator has one (``min_switch_interval_ms``, 1 ms by default);
#: pass it as ``min_interval_ms`` to plan for it.
DEFAULT_MIN_INTERVAL_MS = 0.0
#: Slowdown budgets of the sweep (the paper's Fig. 6 runs 0 to 30%).
SWEEP_SLOWDOWNS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
#: Switch latencies of the latency sweep, in ms.
LATENCY_SWEEP_MS = (0.0, 0.1, 0.3, 1.0, 3.0, 6.0, 10.0, 30.0)


def clock_states(model: H100Model, mem_mhz: Optional[Sequence[int]] = None,
                 sm_mhz: Optional[Sequence[int]] = None) -> list[Optional[ClockPair]]:
    """The default state (None) followed by every locked pair, highest clocks first."""
    table = VirtualGPU(noise=False, params=model).clock_table
    mems = list(mem_mhz) if mem_mhz is not None else list(table.mem_mhz)
    sms = list(sm_mhz) if sm_mhz is not None else list(table.sm_mhz)
    return [None] + [ClockPair(int(s), int(m)) for m in mems for s in sms]


def _latency_ms(switch_latency_ms: Optional[float]) -> float:
    if switch_latency_ms is None:
        return DEFAULT_SWITCH_LATENCY_MS
    return check_latency_ms(switch_latency_ms, source="kdvfs planning")


# --------------------------------------------------------------------------------------------
# Observation: a step replayed noise-free, per stretch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepObservation:
    """One step replayed noise-free on the virtual GPU, per region stretch (in step order).

    ``time_s``/``energy_j`` include the idle gaps before each stretch's kernels, and the step's
    tail gap in the last stretch, so they sum to the step's totals. ``ceiling_sm_mhz`` is the
    power controller's SM clock while the stretch's kernels ran (time-weighted): the clock a lock
    above it is lowered to.
    """

    regions: tuple[str, ...]
    time_s: np.ndarray
    energy_j: np.ndarray
    ceiling_sm_mhz: np.ndarray
    step_time_s: float
    step_energy_j: float
    clock_changes_per_step: float = 0.0

    @property
    def offsets_s(self) -> np.ndarray:
        """Each stretch's start, from the step's start (the issue-ahead prediction's input)."""
        return np.concatenate([[0.0], np.cumsum(self.time_s)[:-1]])


class _CeilingProbe:
    """Wraps a VirtualGPU and records the controller's clock around every kernel it runs."""

    def __init__(self, gpu: VirtualGPU):
        self._gpu = gpu
        self.samples: list[tuple[float, float]] = []  # (ceiling MHz, kernel time s)

    def __getattr__(self, name):
        return getattr(self._gpu, name)

    def run(self, work: Work):
        # The controller's clock is internal to the virtual GPU; reading it is what a real
        # measurement does with the SM clock reading of a locked-at-top run.
        c0 = self._gpu._ceiling_sm_mhz()
        d, e = self._gpu.run(work)
        c1 = self._gpu._ceiling_sm_mhz()
        self.samples.append((0.5 * (c0 + c1), d))
        return d, e


def _warmup_for(trace: Trace, step: int) -> int:
    """The fewest warm-up steps (at least one) after which the replay measures trace step ``step``."""
    n = len(trace.steps)
    w = step % n
    return w if w >= 1 else n


def observe_step(trace: Trace, clocks_for: Optional[Callable[[str], Optional[ClockPair]]] = None, *,
                 step: int = 1, switch_latency_ms: float = 0.0, issue_ahead: bool = False,
                 model: Optional[H100Model] = None, lead_offsets_s: Optional[Sequence[float]] = None
                 ) -> StepObservation:
    """Replay trace step ``step`` noise-free after warm-up, at ``clocks_for`` (None: default).

    ``issue_ahead``: changes are requested one latency ahead of their predicted boundaries
    (:func:`~kdvfs_plugins.sim.trace.replay`'s ``lead_s``), the prediction seeded by
    ``lead_offsets_s`` (boundary offsets from the step's start, e.g. the plan's replay at zero
    latency: the timing the hidden changes aim at) and then taken from the previous step.
    """
    model = model or default_model()
    lat_ms = _latency_ms(switch_latency_ms)
    probe = _CeilingProbe(VirtualGPU(switch_latency_ms=lat_ms, noise=False, params=model))
    marks: list[int] = []
    warmup = _warmup_for(trace, step) + (len(trace.steps) if issue_ahead else 0)
    res = replay(probe, trace, steps=1, warmup_steps=warmup, clocks_for=clocks_for,
                 on_region=lambda region, now: marks.append(len(probe.samples)),
                 lead_s=lat_ms / 1e3 if issue_ahead else 0.0, lead_offsets_s=lead_offsets_s)
    sr = res.steps[-1]
    n = len(sr.regions)
    starts = marks[-n:] + [len(probe.samples)]
    samples = np.array(probe.samples)
    ceil = np.empty(n)
    for i in range(n):
        s = samples[starts[i]:starts[i + 1]]
        w = s[:, 1].sum()
        ceil[i] = float((s[:, 0] * s[:, 1]).sum() / w) if w > 0 else float(s[:, 0].mean())
    t = np.array([r[1] for r in sr.regions])
    e = np.array([r[2] for r in sr.regions])
    # The tail gap after the last kernel belongs to the last stretch.
    t[-1] += sr.time_s - t.sum()
    e[-1] += sr.energy_j - e.sum()
    return StepObservation(tuple(r[0] for r in sr.regions), t, e, ceil, sr.time_s, sr.energy_j,
                           res.clock_changes / (warmup + 1))


# --------------------------------------------------------------------------------------------
# The planning problem
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TraceProblem:
    problem: PlanningProblem
    #: the default state's SM clock for the whole step (the power controller's clock for the mix)
    default_ceiling_sm_mhz: float
    #: the controller clock each stretch's locked states were computed with (per occurrence)
    ceilings_sm_mhz: Optional[np.ndarray] = None


def problem_from_trace(trace: Trace, model: Optional[H100Model] = None, *, step: int = 0,
                       clocks: Optional[Sequence[Optional[ClockPair]]] = None,
                       ceiling_sm_mhz: Union[None, float, Sequence[float], np.ndarray] = None,
                       default: Optional[StepObservation] = None) -> TraceProblem:
    """One step of ``trace`` as a :class:`~kdvfs_plugins.planner.PlanningProblem`.

    Each region stretch is an occurrence. Idle gaps before a kernel belong to the stretch they are
    in and draw static power at its clocks; the step's tail gap belongs to its last stretch.
    Locked clocks are lowered to the controller's clock where the cap binds: by default the
    default mix's clock for every stretch (conservative for a plan that lowers some stretches);
    ``ceiling_sm_mhz`` gives one clock or one per stretch (see :class:`PlanningContext`). With
    ``default`` (a noise-free observation of the default clocks) the default state's figures are
    the observed ones, exactly.
    """
    model = model or default_model()
    states = list(clocks) if clocks is not None else clock_states(model)
    if states[0] is not None:
        raise ConfigError("clocks", states[0], "the first clock state must be None (the default state)",
                          source="problem_from_trace")
    ts = trace.steps[step % len(trace.steps)]
    stretches = ts.stretches()
    n, n_states = len(stretches), len(states)
    gaps_total = sum(k.gap_before_s for k in ts.kernels) + ts.tail_gap_s
    default_ceiling = model.mix_ceiling_sm_mhz([(k.work(), None) for k in ts.kernels], gap_s=gaps_total)
    if ceiling_sm_mhz is None:
        ceil = np.full(n, default_ceiling)
    else:
        ceil = np.broadcast_to(np.asarray(ceiling_sm_mhz, dtype=float), (n,)).copy() if np.ndim(ceiling_sm_mhz) == 0 \
            else np.asarray(ceiling_sm_mhz, dtype=float)
        if ceil.shape != (n,):
            raise ConfigError("ceiling_sm_mhz", f"{ceil.shape[0]} values", f"one clock or {n} (one per stretch)",
                              source="problem_from_trace")
    if default is not None and (len(default.regions) != n or any(a != b for a, (b, _) in zip(default.regions, stretches))):
        raise ConfigError("default", "observation", "an observation of the same trace step (same region stretches)",
                          source="problem_from_trace")
    locked = states[1:]
    sm = np.array([c.sm_mhz for c in locked], dtype=float)
    mem = np.array([c.mem_mhz for c in locked], dtype=float)
    static_default = float(model.static_power_w(default_ceiling, model.params.mem_max_mhz))
    time_s = np.zeros((n, n_states))
    energy_j = np.zeros((n, n_states))
    names = []
    cache: dict = {}
    for i, (region, kernels) in enumerate(stretches):
        names.append(region)
        c_i = float(ceil[i])
        per_class: dict[str, float] = {}
        gap = sum(k.gap_before_s for k in kernels)
        if i == n - 1:
            gap += ts.tail_gap_s
        for k in kernels:
            per_class[k.category] = per_class.get(k.category, 0.0) + k.duration_s
        for cat, dur in per_class.items():
            key = (cat, round(c_i, 6))
            if key not in cache:
                unit = Work(cat, 1.0)
                t_l, e_l = model.time_energy(unit, sm, mem, ceiling_sm_mhz=c_i)
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
        energy_j[i, 1:] += gap * model.static_power_w(np.minimum(sm, c_i), mem)
    if default is not None:
        time_s[:, 0] = default.time_s
        energy_j[:, 0] = default.energy_j
    problem = PlanningProblem(tuple(names), time_s, energy_j, tuple(states), 0)
    return TraceProblem(problem, float(default_ceiling), ceil)


def switch_model_for(switch_latency_ms: Optional[float] = None, issue_ahead: bool = True,
                     min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS) -> SwitchModel:
    """The planner's switch model for the virtual GPU's executor: :func:`kdvfs_plugins.switching.switch_model`."""
    return switch_model(_latency_ms(switch_latency_ms), issue_ahead=issue_ahead, min_interval_ms=min_interval_ms)


# --------------------------------------------------------------------------------------------
# Fixed-point planning
# --------------------------------------------------------------------------------------------


def _plan_key(clocks_by_name: Mapping[str, Optional[ClockPair]]) -> tuple:
    return tuple(sorted((k, None if v is None else (v.sm_mhz, v.mem_mhz)) for k, v in clocks_by_name.items()))


class PlanningContext:
    """Caches for planning one trace step: the default observation, observations of plans (per
    latency and actuation) and problems (per ceilings). Not thread-safe; cheap to create."""

    def __init__(self, trace: Trace, model: Optional[H100Model] = None, *, step: Optional[int] = None,
                 clocks: Optional[Sequence[Optional[ClockPair]]] = None):
        self.trace = trace
        self.model = model or default_model()
        self.step = (1 % len(trace.steps)) if step is None else int(step) % len(trace.steps)
        self.clocks = list(clocks) if clocks is not None else clock_states(self.model)
        self._default: Optional[StepObservation] = None
        self._observations: dict = {}
        self._problems: dict = {}
        self._plans: dict = {}

    def default_observation(self) -> StepObservation:
        if self._default is None:
            self._default = observe_step(self.trace, None, step=self.step, model=self.model)
        return self._default

    def observe(self, clocks_by_name: Mapping[str, Optional[ClockPair]], switch_latency_ms: Optional[float] = None,
                issue_ahead: bool = True) -> StepObservation:
        """A plan (keys: region names, phases or ``step``) replayed noise-free; cached."""
        lat = _latency_ms(switch_latency_ms)
        key = (_plan_key(clocks_by_name), lat, bool(issue_ahead) and lat > 0)
        if all(v is None for v in clocks_by_name.values()):
            return self.default_observation()
        if key not in self._observations:
            seed = self.observe(clocks_by_name, 0.0).offsets_s if key[2] else None
            self._observations[key] = observe_step(self.trace, plan_lookup(clocks_by_name), step=self.step,
                                                   switch_latency_ms=lat, issue_ahead=key[2], model=self.model,
                                                   lead_offsets_s=seed)
        return self._observations[key]

    def plan(self, tp: TraceProblem, *, granularity: str, objective: str, max_slowdown: float,
             switch: SwitchModel) -> PlannedStep:
        """:func:`~kdvfs_plugins.planner.plan` on a problem of this context; cached. Switch models
        that cost the same (e.g. hidden changes at any latency) share entries."""
        sw = (switch.mode, switch.time_s_per_switch, switch.energy_j, switch.effective_min_interval_s,
              switch.latency_s if switch.mode == "late" else 0.0)
        key = (id(tp), granularity, objective, float(max_slowdown), sw)
        if key not in self._plans:
            self._plans[key] = plan(tp.problem, granularity=granularity, objective=objective,
                                    max_slowdown=max_slowdown, switch=switch)
        return self._plans[key]

    def problem(self, ceilings_sm_mhz: Union[None, float, np.ndarray] = None) -> TraceProblem:
        """The step's problem with per-stretch ceilings (None: those of the default observation)."""
        default = self.default_observation()
        ceil = default.ceiling_sm_mhz if ceilings_sm_mhz is None else ceilings_sm_mhz
        ceil = np.broadcast_to(np.asarray(ceil, dtype=float), default.ceiling_sm_mhz.shape)
        # Ceilings to 0.1 MHz: finer differences change no plan and would defeat the cache.
        key = np.round(ceil, 1).tobytes()
        if key not in self._problems:
            self._problems[key] = problem_from_trace(self.trace, self.model, step=self.step, clocks=self.clocks,
                                                     ceiling_sm_mhz=np.round(ceil, 1), default=default)
        return self._problems[key]


@dataclass(frozen=True)
class TracePlan:
    """A plan found by :func:`plan_on_trace` and its noise-free replay."""

    planned: PlannedStep
    observed: StepObservation
    default: StepObservation
    switch: SwitchModel
    issue_ahead: bool
    iterations: int
    converged: bool

    @property
    def clocks_by_name(self) -> Mapping[str, Optional[ClockPair]]:
        return self.planned.clocks_by_name

    def clocks_for(self, region: str) -> Optional[ClockPair]:
        return plan_lookup(self.planned.clocks_by_name)(region)

    @property
    def executed_time_change(self) -> float:
        """Noise-free replay's step time against the default step (fraction)."""
        return self.observed.step_time_s / self.default.step_time_s - 1.0

    @property
    def executed_energy_change(self) -> float:
        """Noise-free replay's step energy against the default step (fraction, - = saved)."""
        return self.observed.step_energy_j / self.default.step_energy_j - 1.0


def _as_context(trace_or_context: Union[Trace, PlanningContext]) -> PlanningContext:
    return trace_or_context if isinstance(trace_or_context, PlanningContext) else PlanningContext(trace_or_context)


def _score(ob: StepObservation, objective: str, budget_s: float) -> tuple[float, float]:
    """A replayed plan's rank, lowest best: the time over the budget (none for edp), then energy
    (energy x time for edp)."""
    obj = ob.step_energy_j * ob.step_time_s if objective == "edp" else ob.step_energy_j
    return (0.0 if objective == "edp" else max(0.0, ob.step_time_s - budget_s), obj)


def plan_on_trace(trace_or_context: Union[Trace, PlanningContext], *, granularity: str = "kernel",
                  objective: str = "strict", max_slowdown: float = 0.0, switch_latency_ms: Optional[float] = None,
                  issue_ahead: bool = True, min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS,
                  max_iterations: int = 4, time_rtol: float = DEFAULT_TIME_RTOL,
                  candidates: Iterable[Union[TracePlan, PlannedStep]] = ()) -> TracePlan:
    """Plan a trace step by the fixed point of the module doc; returns the best replay-confirmed plan.

    ``candidates``: further plans to consider (e.g. the coarser granularity's), re-planned only in
    the sense that their replay decides; a finer granularity given the coarser plan is never worse
    in the replay than that plan.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError("granularity", granularity, f"use one of {', '.join(GRANULARITIES)}", source="kdvfs planning")
    if objective not in OBJECTIVES:
        raise ConfigError("objective", objective, f"use one of {', '.join(OBJECTIVES)}", source="kdvfs planning")
    if max_iterations < 1:
        raise ConfigError("max_iterations", max_iterations, "at least 1", source="kdvfs planning")
    ctx = _as_context(trace_or_context)
    lat = _latency_ms(switch_latency_ms)
    ahead = bool(issue_ahead) and lat > 0
    switch = switch_model_for(lat, ahead, min_interval_ms)
    slowdown = 0.0 if objective == "strict" else float(max_slowdown)
    default = ctx.default_observation()
    budget_s = default.step_time_s * (1.0 + slowdown) * (1.0 + time_rtol)

    best: Optional[tuple] = None
    iterations = 0
    converged = False

    def consider(p: PlannedStep, ob: StepObservation, conv: bool) -> None:
        nonlocal best
        s = _score(ob, objective, budget_s)
        if best is None or s < best[0]:
            best = (s, p, ob, conv)

    # The default clocks: always there, always within budget.
    default_plan = PlannedStep({"step": None}, default.step_time_s, default.step_energy_j, default.step_time_s,
                               default.step_energy_j, 0, 0.0, 0.0, granularity, objective, exact=False,
                               max_slowdown=slowdown)
    consider(default_plan, default, True)
    for c in candidates:
        p = c.planned if isinstance(c, TracePlan) else c
        consider(p, ctx.observe(p.clocks_by_name, lat, ahead), False)

    # Longer floors between changes give plans with fewer, longer runs, whose changes a
    # predicted-ahead actuator lands reliably; the replay decides which floor pays.
    # Changes issued ahead rely on the previous step's timing; hundreds of them in flight feed
    # each other's prediction errors (a late change slows its stretch, which moves the next
    # boundaries), and noise then makes the step unstable. So ahead of time at least 1 ms apart.
    floors = [float(min_interval_ms) if not ahead else max(float(min_interval_ms), 1.0)]
    if lat > 0:
        floors += [f for f in (1.0, lat) if f > floors[0]]
    top = float(ctx.model.params.sm_max_mhz)
    chains = [(floors[0], None), (floors[0], top)] + [(f, top) for f in dict.fromkeys(floors[1:])]
    for floor, start in chains:
        switch_f = switch_model_for(lat, ahead, floor)
        ceil = start
        seen: set = set()
        for _ in range(max_iterations):
            tp = ctx.problem(ceil)
            p = ctx.plan(tp, granularity=granularity, objective=objective, max_slowdown=slowdown, switch=switch_f)
            key = _plan_key(p.clocks_by_name)
            conv = key in seen
            if conv:
                converged = True
                # Same plan again: the fixed point; its prediction on its own ceilings is the one to report.
                ob = ctx.observe(p.clocks_by_name, lat, ahead)
                consider(p, ob, True)
                break
            seen.add(key)
            iterations += 1
            ob = ctx.observe(p.clocks_by_name, lat, ahead)
            consider(p, ob, False)
            ceil = ob.ceiling_sm_mhz
    assert best is not None
    _, p, ob, conv = best
    return TracePlan(p, ob, default, switch, ahead, iterations, converged)


#: SM clocks (top memory clock) the phase search tries first, as fractions of the top clock; it
#: then tries clocks this share of the top clock above and below each phase's best, then half that.
PHASE_SEARCH_FRACTIONS = (0.94, 0.85, 0.76, 0.67, 0.58, 0.49)
PHASE_SEARCH_STEP = 0.045
PHASE_SEARCH_DEPTHS = 3


def phase_search(trace_or_context: Union[Trace, PlanningContext], *, objective: str = "strict",
                 max_slowdown: float = 0.0, switch_latency_ms: Optional[float] = None, issue_ahead: bool = True,
                 time_rtol: float = DEFAULT_TIME_RTOL, rounds: int = 2) -> PlannedStep:
    """One lock per phase (``forward``, ``backward``, ``optimizer``...), chosen by noise-free
    replays rather than by a planning problem: coordinate descent over the phases' SM clocks.

    The fixed point of :func:`plan_on_trace` treats each stretch's controller clock as given
    while it chooses, so it can miss a plan that lowers a memory-bound phase and spends the power
    it frees on the compute-bound phases (on the ``llama-gqa2b`` step it kept the default clocks
    where the optimizer at 1500 MHz alone saves 1.9% at no time). Every candidate here is judged
    by its replay, so the result is a plan the virtual GPU confirms. Returns a
    :class:`PlannedStep` whose figures are those of its replay."""
    ctx = _as_context(trace_or_context)
    lat = _latency_ms(switch_latency_ms)
    ahead = bool(issue_ahead) and lat > 0
    slowdown = 0.0 if objective == "strict" else float(max_slowdown)
    default = ctx.default_observation()
    budget_s = default.step_time_s * (1.0 + slowdown) * (1.0 + time_rtol)
    m_top = max(c.mem_mhz for c in ctx.clocks if c is not None)
    sm = sorted({c.sm_mhz for c in ctx.clocks if c is not None and c.mem_mhz == m_top})
    top = sm[-1]

    def nearest(f: float) -> int:
        return min(sm, key=lambda a: abs(a - f))

    def score(plan: Mapping[str, Optional[int]]) -> tuple[float, float]:
        return _score(ctx.observe({k: ClockPair(f, m_top) for k, f in plan.items() if f}, lat, ahead),
                      objective, budget_s)

    phases = list(dict.fromkeys(r.partition("/")[0] for r in ctx.trace.regions if r.partition("/")[0] != "step"))
    plan_mhz: dict[str, Optional[int]] = {k: None for k in phases}
    best = score(plan_mhz)
    for _ in range(max(1, rounds)):
        improved = False
        for k in phases:
            tried = {plan_mhz[k]}
            options = [nearest(fr * top) for fr in PHASE_SEARCH_FRACTIONS]
            for depth in range(PHASE_SEARCH_DEPTHS):
                for f in options:
                    if f in tried:
                        continue
                    tried.add(f)
                    s = score({**plan_mhz, k: f})
                    # a lock that changes nothing (the top clock where the default runs there
                    # anyway) is not taken on a rounding difference
                    if s[0] < best[0] or s[0] == best[0] and s[1] < best[1] - 1e-6 * abs(best[1]):
                        best, plan_mhz, improved = s, {**plan_mhz, k: f}, True
                here = plan_mhz[k] or top
                step = top * PHASE_SEARCH_STEP / 2 ** depth
                options = [nearest(here - step), nearest(here + step)]
        if not improved:
            break
    clocks = {k: ClockPair(f, m_top) for k, f in plan_mhz.items() if f}
    ob = ctx.observe(clocks, lat, ahead)
    return PlannedStep(clocks or {"step": None}, ob.step_time_s, ob.step_energy_j, default.step_time_s,
                       default.step_energy_j, 0, 0.0, 0.0, "phase", objective, exact=False, max_slowdown=slowdown)


# --------------------------------------------------------------------------------------------
# Execution on a noisy virtual GPU
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Execution(AgainstDefault):
    """A plan run on the virtual GPU next to the default clocks (same seed, same noise)."""

    time_s: float
    energy_j: float
    default_time_s: float
    default_energy_j: float
    clock_changes_per_step: float


def plan_lookup(clocks_by_name: Mapping[str, Optional[ClockPair]]) -> ClocksFor:
    """``clocks_for(region)`` for a plan keyed by region names, phases or ``step``."""
    from ..regions import lookup

    def clocks_for(region: str) -> Optional[ClockPair]:
        return lookup(clocks_by_name, region)[1]

    return clocks_for


def execute(trace: Trace, clocks_for: ClocksFor, *, switch_latency_ms: Optional[float] = None,
            noise: bool = True, seed: int = 0, steps: int = 20, warmup_steps: int = 3,
            model: Optional[H100Model] = None, baseline: Optional[ReplayResult] = None,
            issue_ahead: bool = False, lead_offsets_s: Optional[Sequence[float]] = None) -> Execution:
    """Run ``clocks_for`` for ``steps`` steps and the default clocks for as many, with the same seed.

    ``issue_ahead``: request each change one switch latency before its boundary as predicted from
    the previous step (the actuator's issue-ahead mode), so that it lands on time;
    ``lead_offsets_s`` seeds the first step's prediction (see :func:`observe_step`).
    """
    model = model or default_model()
    lat_ms = _latency_ms(switch_latency_ms)
    if baseline is None:
        baseline = replay(VirtualGPU(switch_latency_ms=lat_ms, noise=noise, seed=seed, params=model),
                          trace, steps=steps, warmup_steps=warmup_steps)
    run = replay(VirtualGPU(switch_latency_ms=lat_ms, noise=noise, seed=seed, params=model),
                 trace, steps=steps, clocks_for=clocks_for, warmup_steps=warmup_steps,
                 lead_s=lat_ms / 1e3 if issue_ahead else 0.0, lead_offsets_s=lead_offsets_s)
    return Execution(run.step_time_s, run.energy_j, baseline.step_time_s, baseline.energy_j,
                     run.clock_changes / (steps + warmup_steps))


def plan_ceiling_sm_mhz(trace: Trace, clocks_for: ClocksFor, model: Optional[H100Model] = None, step: int = 0) -> float:
    """The power controller's steady clock for the step's whole mix when regions run at ``clocks_for``
    (one global figure; :meth:`PlanningContext.observe` gives the local, per-stretch ones)."""
    model = model or default_model()
    ts = trace.steps[step % len(trace.steps)]
    gaps = sum(k.gap_before_s for k in ts.kernels) + ts.tail_gap_s
    return model.mix_ceiling_sm_mhz([(k.work(), clocks_for(k.region)) for k in ts.kernels], gap_s=gaps)


# --------------------------------------------------------------------------------------------
# The paper's Table 2, Fig. 6 and the latency trade-off, for a trace
# --------------------------------------------------------------------------------------------


def _row(tp: TracePlan, ex: Optional[Execution], granularity: str, objective: str, slowdown: float) -> dict:
    row = {
        "granularity": granularity, "objective": objective,
        "max_slowdown": slowdown if objective == "relaxed" else (0.0 if objective == "strict" else None),
        "planned_time_change": tp.planned.time_change, "planned_energy_change": tp.planned.energy_change,
        "replayed_time_change": tp.executed_time_change, "replayed_energy_change": tp.executed_energy_change,
        "planned_switches_per_step": tp.planned.switches,
        "clocks": {k: ("default" if v is None else f"{v.sm_mhz}/{v.mem_mhz}") for k, v in tp.clocks_by_name.items()},
        "fixed_point_iterations": tp.iterations, "converged": tp.converged,
    }
    if ex is not None:
        row.update(executed_time_change=ex.time_change, executed_energy_change=ex.energy_change,
                   switches_per_step=ex.clock_changes_per_step)
    else:
        row.update(executed_time_change=tp.executed_time_change, executed_energy_change=tp.executed_energy_change,
                   switches_per_step=tp.observed.clock_changes_per_step)
    return row


def compare(trace_or_context: Union[Trace, PlanningContext], *, switch_latency_ms: Optional[float] = None,
            issue_ahead: bool = True, max_slowdown: float = 0.05, noise: bool = True, seed: int = 0,
            steps: int = 4, warmup_steps: int = 2, min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS,
            objectives: Sequence[str] = OBJECTIVES, granularities: Sequence[str] = GRANULARITIES) -> dict:
    """For each objective and granularity: the plan's planned change, then the plan executed on a
    virtual GPU with switch latency and noise (``noise=False``: exact), against the default clocks
    run with the same seed. Each granularity also considers the coarser one's plan."""
    ctx = _as_context(trace_or_context)
    lat = _latency_ms(switch_latency_ms)
    ahead = bool(issue_ahead) and lat > 0
    baseline = replay(VirtualGPU(switch_latency_ms=lat, noise=noise, seed=seed, params=ctx.model),
                      ctx.trace, steps=steps, warmup_steps=warmup_steps)
    executed: dict = {}
    rows = []
    for objective in objectives:
        prev: Optional[TracePlan] = None
        for granularity in granularities:
            tp = plan_on_trace(ctx, granularity=granularity, objective=objective, max_slowdown=max_slowdown,
                               switch_latency_ms=lat, issue_ahead=ahead, min_interval_ms=min_interval_ms,
                               candidates=[prev] if prev is not None else [])
            prev = tp
            key = _plan_key(tp.clocks_by_name)
            if key not in executed:
                seed_offsets = ctx.observe(tp.clocks_by_name, 0.0).offsets_s if ahead else None
                executed[key] = execute(ctx.trace, tp.clocks_for, switch_latency_ms=lat, noise=noise, seed=seed,
                                        steps=steps, warmup_steps=warmup_steps, model=ctx.model, baseline=baseline,
                                        issue_ahead=ahead, lead_offsets_s=seed_offsets)
            rows.append(_row(tp, executed[key], granularity, objective, max_slowdown))
    return {"model_prediction": True, "device": VirtualGPU.name, "trace": ctx.trace.source,
            "switch_latency_ms": lat, "issue_ahead": ahead, "min_interval_ms": float(min_interval_ms),
            "max_slowdown": float(max_slowdown), "noise": bool(noise), "seed": int(seed), "steps": int(steps),
            "rows": rows}


def sweep(trace_or_context: Union[Trace, PlanningContext], *, slowdowns: Sequence[float] = SWEEP_SLOWDOWNS,
          switch_latency_ms: Optional[float] = None, issue_ahead: bool = True,
          min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS, granularities: Sequence[str] = GRANULARITIES) -> dict:
    """Energy saved against slowdown for each granularity (the paper's Fig. 6): the relaxed plan for
    each budget, planned and replayed noise-free on the virtual GPU."""
    ctx = _as_context(trace_or_context)
    lat = _latency_ms(switch_latency_ms)
    points = []
    for g_budget in slowdowns:
        prev = None
        for granularity in granularities:
            objective = "strict" if g_budget == 0 else "relaxed"
            tp = plan_on_trace(ctx, granularity=granularity, objective=objective, max_slowdown=g_budget,
                               switch_latency_ms=lat, issue_ahead=issue_ahead, min_interval_ms=min_interval_ms,
                               candidates=[prev] if prev is not None else [])
            prev = tp
            points.append({"granularity": granularity, "max_slowdown": float(g_budget),
                           "planned_time_change": tp.planned.time_change,
                           "planned_energy_change": tp.planned.energy_change,
                           "executed_time_change": tp.executed_time_change,
                           "executed_energy_change": tp.executed_energy_change})
    return {"model_prediction": True, "device": VirtualGPU.name, "trace": ctx.trace.source,
            "switch_latency_ms": lat, "issue_ahead": bool(issue_ahead) and lat > 0, "noise": False,
            "points": points}


def latency_sweep(trace_or_context: Union[Trace, PlanningContext], *, latencies_ms: Sequence[float] = LATENCY_SWEEP_MS,
                  objective: str = "strict", min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS,
                  actuations: Sequence[str] = ("ahead", "late")) -> dict:
    """Kernel-level (and pass-level) saving, replayed noise-free, at each switch latency: with changes
    issued ahead of their boundaries, and with changes requested at the boundary (landing late)."""
    ctx = _as_context(trace_or_context)
    points = []
    for lat in latencies_ms:
        for actuation in actuations:
            ahead = actuation == "ahead"
            pass_plan = plan_on_trace(ctx, granularity="pass", objective=objective, switch_latency_ms=lat,
                                      issue_ahead=ahead, min_interval_ms=min_interval_ms)
            kern = plan_on_trace(ctx, granularity="kernel", objective=objective, switch_latency_ms=lat,
                                 issue_ahead=ahead, min_interval_ms=min_interval_ms, candidates=[pass_plan])
            points.append({"switch_latency_ms": float(lat), "actuation": actuation,
                           "kernel_time_change": kern.executed_time_change,
                           "kernel_energy_change": kern.executed_energy_change,
                           "kernel_planned_energy_change": kern.planned.energy_change,
                           "kernel_switches_per_step": kern.observed.clock_changes_per_step,
                           "pass_time_change": pass_plan.executed_time_change,
                           "pass_energy_change": pass_plan.executed_energy_change})
    return {"model_prediction": True, "device": VirtualGPU.name, "trace": ctx.trace.source, "objective": objective,
            "noise": False, "points": points}
