"""Online exploration: learn each region's clock response during training, plan, validate, apply.

The instruments decide the method. Region GPU times are precise every step (markers), so the time
response of a region at a clock is known after one block of steps at that clock. Energy is not:
the meter's windows are good to about a tenth of a second of power, so energy is attributed
statistically, over blocks of steps, by a model of physically shaped terms fitted by least squares.

This module is the facade the engine and the studies use: :class:`Explorer` with its hooks, its
settings and its result. The parts, each in its own module:

- :mod:`.explore_knobs`: which regions get a clock of their own (the knobs);
- :mod:`.explore_blocks`: the block schedule, block lengths, and the designs drawn within the
  exploration slowdown bound;
- :mod:`.explore_model`: the response model (time table, energy fit, tables at every state);
- :mod:`.explore_plan`: the planner on the fitted tables, and locks that do not pay dropped;
- :mod:`.explore_validate`: the plan against the default clocks in pairs of blocks, and the verdict.

The explorer is fed exactly what the live engine measures: step records (``observe_step``: step
time and GPU time per region) and window energies (``observe_window``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .clocks import ClockPair, ClockTable
from .explore_blocks import Block, Schedule, block_steps, build_grid, draw_design
from .explore_knobs import Knobs, Occurrence
from .explore_model import ResponseModel, Sample, voltage
from .explore_plan import MIN_PREDICTED_SAVING, PlanDraft, make_plan, time_penalised
from .explore_validate import PairedBlock, judge, pair_changes, slow_scale
from .hookspecs import hookimpl
from .planner import SwitchModel
from .policy import DEFAULT_CLOCKS
from .switching import DEFAULT_SWITCH_LATENCY_MS

__all__ = ["ExploreSettings", "ExploreResult", "Explorer", "Occurrence", "voltage"]

#: Share of the exploration slowdown bound that designs plan to use (predictions can miss).
BOUND_MARGIN = 0.85
#: Validation: plan/default block pairs.
VALIDATION_PAIRS = 4
#: Share of exploration blocks kept at default clocks (the anchor of the comparison).
DEFAULT_SHARE = 0.25


@dataclass(frozen=True)
class ExploreSettings:
    """What the explorer needs from the configuration and the device (frozen: it crosses hooks)."""

    clock_table: ClockTable
    max_slowdown: float = 0.0
    objective: str = "strict"
    explore_max_slowdown: float = 0.02
    explore_max_steps: int = 1500
    window_steps: int = 10
    switch_latency_ms: float = DEFAULT_SWITCH_LATENCY_MS
    min_switch_interval_ms: float = 1.0
    #: steps per block; None: about BLOCK_S of GPU time, a multiple of window_steps
    block_steps: Optional[int] = None
    #: the first step the explorer sees (after the engine's warm-up)
    start_step: int = 0
    seed: int = 0
    validation_pairs: int = VALIDATION_PAIRS
    #: the actuator writes changes one latency ahead of their predicted boundaries: plan with the
    #: latency hidden (False: changes land a latency late, priced as such)
    issue_ahead: bool = False
    #: data-parallel replicas exploring together: each block runs a design on every lane and the
    #: measurements of all lanes feed one fit, so exploration needs about 1/lanes of the steps
    lanes: int = 1
    #: the lane this rank runs (its index among the replicas)
    lane: int = 0


@dataclass(frozen=True)
class ExploreResult:
    """How exploration ended (frozen: handed to the engine and reported)."""

    status: str  # "applied" | "rejected" | "explored"
    clocks_by_name: Mapping[str, Optional[ClockPair]]
    predicted: Mapping[str, float]
    validated: Mapping[str, float]
    steps: int
    exploration_time_change: float
    knobs: tuple[str, ...]
    message: str = ""


class Explorer:
    """Chooses clocks while exploring; fed by step and window records from any source.

    ``clocks_for(region, step)`` answers what each region gets; ``observe_step`` and
    ``observe_window`` take the measurements; ``on_done(result)`` is called once when exploration
    ends. The engine registers it as a plugin (``kdvfs_choose_clocks`` and the meter hooks); the
    fast simulator calls the same methods directly.

    With ``settings.lanes > 1`` every data-parallel replica runs an explorer with the same
    settings and its own ``lane``. ``exchange`` (an all-gather over the replicas) is then called
    at each block boundary, from :meth:`begin_step`: the measurements each replica took since the
    last boundary are shared and applied in the same order everywhere, so every replica makes the
    same decisions from the same data and ends with the same plan at the same step.
    """

    def __init__(self, settings: ExploreSettings, on_done: Optional[Callable[[ExploreResult], None]] = None,
                 apply: bool = True, exchange: Optional[Callable[[list], Sequence[list]]] = None):
        if settings.lanes < 1 or not 0 <= settings.lane < settings.lanes:
            raise ValueError(f"lane {settings.lane} of {settings.lanes} lanes: lanes must be >= 1 and 0 <= lane < lanes")
        self.s = settings
        self._exchange = exchange
        #: this replica's measurements since the last exchange (only with ``exchange``)
        self._outbox: list[tuple] = []
        self.exchanges = 0
        #: False once this replica's clocks cannot be set (its GPU refuses writes): what it measures
        #: then is the default clocks, not its lane's design, and stays out of the shared fit.
        self.measuring = True
        #: Set by the engine: after the baseline, steps mark phase boundaries only (unless a module
        #: group becomes a knob). See :attr:`baseline_detailed`.
        self.phase_level_after_baseline = False
        self.on_done = on_done
        self.apply = apply
        t = settings.clock_table
        self.f_max = float(max(t.sm_mhz))
        self.m_max = float(max(t.mem_mhz))
        self.states: list[Optional[ClockPair]] = [None] + t.pairs()
        self._rng = random.Random(settings.seed)
        self.schedule = Schedule(settings.lanes, settings.start_step)
        self.block_steps = settings.block_steps
        self.layout: list[Occurrence] = []
        self.knob_map = Knobs()
        self.grid: list[int] = []  # explored state indices
        self.phase = "baseline"
        self.result: Optional[ExploreResult] = None
        self.plan_clocks: dict[str, Optional[ClockPair]] = {}
        self.predicted: dict = {}
        self.validated: dict = {}
        self.replans = 0
        self.default_step_ms: Optional[float] = None
        self.excess_ms = 0.0
        self.explore_ms = 0.0
        self.explore_steps = 0
        self.steps_seen = 0
        self._model: Optional[ResponseModel] = None
        self._draft: Optional[PlanDraft] = None
        self._explore_target = 1

    # ------------------------------------------------------------------ state
    @property
    def blocks(self) -> list[Block]:
        return self.schedule.blocks

    @property
    def knobs(self) -> tuple[str, ...]:
        return self.knob_map.names

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def exploration_time_change(self) -> float:
        """Measured slowdown of the exploration steps so far against the default step."""
        if not self.explore_steps or not self.default_step_ms:
            return 0.0
        return self.excess_ms / (self.explore_steps * self.default_step_ms)

    @property
    def baseline_detailed(self) -> bool:
        """The baseline marked every module boundary and later blocks do not: where the CPU limits
        the step, the baseline's instrumentation made it slower, so default blocks, not the
        baseline, give the default's times (the first block after the baseline is one)."""
        return self.phase_level_after_baseline and not self.knob_map.module_level

    @property
    def wants_module_regions(self) -> bool:
        """Whether steps must mark module boundaries: while the baseline lays out the step and
        chooses the knobs, or where a module group is a knob. Otherwise phase boundaries carry
        every knob's time, at a fraction of the CPU cost (which a CPU-bound step pays in time)."""
        return self.phase == "baseline" or self.knob_map.module_level

    # ------------------------------------------------------------------ inputs
    def set_layout(self, occurrences: Sequence[Occurrence]) -> None:
        """The step's stretches in order at default clocks (from a profiled default step)."""
        if self._buffer(("layout", tuple((o.region, o.time_ms) for o in occurrences))):
            return
        if not self.layout and occurrences:
            self.layout = list(occurrences)

    def _buffer(self, item: tuple) -> bool:
        """Hold this replica's own measurement until the next exchange (True if held)."""
        if self._exchange is None:
            return False
        if self.measuring or item[0] == "layout":
            self._outbox.append(item)
        return True

    def begin_step(self, step: int) -> None:
        """Call before the step's first ``clocks_for``: at a block boundary, exchange measurements
        with the other replicas (if any), then lay out the next block (the same everywhere)."""
        if self.done or step < self.s.start_step or self.schedule.covers(step):
            return
        if self._exchange is None:
            self._block_at(step)
            return
        outbox, self._outbox = self._outbox, []
        self.exchanges += 1
        exchange, self._exchange = self._exchange, None  # applied below as if measured here
        try:
            for items in exchange(outbox):
                for item in items:
                    kind, rest = item[0], item[1:]
                    if kind == "layout":
                        self.set_layout([Occurrence(*o) for o in rest[0]])
                    elif kind == "step":
                        self.observe_step(*rest)
                    elif kind == "window":
                        self.observe_window(*rest)
            self._block_at(step)
        finally:
            self._exchange = exchange

    def clocks_for(self, region: str, step: int, lane: Optional[int] = None):
        """Clocks for ``region`` in ``step`` (on this replica's lane, or ``lane``): a ClockPair,
        DEFAULT_CLOCKS, or None once done."""
        if self.done:
            return None
        b = self._block_at(step)
        if b is not None and lane is not None and lane != self.s.lane:
            b = self.schedule.find(step, lane)
        if b is None:
            return None if self.done else DEFAULT_CLOCKS
        knob = self.knob_map.of(region)
        if knob is None:
            return DEFAULT_CLOCKS
        c = self.states[b.design.get(knob, 0)]
        return DEFAULT_CLOCKS if c is None else c

    def observe_step(self, step: int, gpu_time_ms: float, region_time_ms: Mapping[str, float],
                     lane: Optional[int] = None) -> None:
        """One step's GPU time and GPU time per region (ms), as the engine's step record gives them."""
        if self.done:
            return
        lane = self.s.lane if lane is None else lane
        if self._buffer(("step", step, gpu_time_ms, dict(region_time_ms), lane)):
            return
        b = self.schedule.find(step, lane)
        if b is None:
            return
        self.steps_seen += 1
        b.time_ms.append(gpu_time_ms)
        for r, v in region_time_ms.items():
            b.region_ms.setdefault(r, []).append(v)
        if b.kind != "baseline" and self.default_step_ms is not None:
            self.explore_ms += gpu_time_ms
            self.explore_steps += 1
            self.excess_ms += gpu_time_ms - self.default_step_ms

    def observe_window(self, first_step: int, last_step: int, energy_j: float, lane: Optional[int] = None) -> None:
        """The energy (J) of a window of steps, as the engine's meter gives it."""
        if self.done:
            return
        lane = self.s.lane if lane is None else lane
        if self._buffer(("window", first_step, last_step, energy_j, lane)):
            return
        b = self.schedule.find(first_step, lane)
        if b is None or last_step > b.last_step:
            return  # a window across two designs says nothing about either
        b.energy_j += energy_j
        b.energy_steps += last_step - first_step + 1

    # ------------------------------------------------------------------ schedule
    def _block_at(self, step: int) -> Optional[Block]:
        if step < self.s.start_step:
            return None
        while not self.schedule.covers(step):
            if self.done:
                return None
            self._new_slot()
            if self.done:
                return None
        return self.schedule.find(step, self.s.lane)

    def _validation_slots(self) -> int:
        """Slots of one validation: plan/default pairs on every lane, ``validation_pairs`` in all."""
        return 2 * -(-self.s.validation_pairs // self.s.lanes)

    def _new_slot(self) -> None:
        if not self.blocks:
            # the baseline block, before the step time is known: one window
            self.schedule.add_slot(max(self.s.window_steps, 1), "baseline")
            return
        if self.phase == "baseline":
            self._setup_after_baseline()
        left = self.s.explore_max_steps - (self.schedule.next_step - self.s.start_step)
        bs = self.block_steps
        self._refresh_default()
        if self.phase == "explore":
            # room for two validations: a plan measured slightly too slow is re-planned once
            reserve = 2 * self._validation_slots() * bs
            if left - reserve < bs or self._explored_enough():
                self._make_plan()
                if self.done:
                    return
        if self.phase == "validate":
            slots = self.schedule.slots(("validate-plan", "validate-default"))
            if slots >= self._validation_slots() or left < bs:
                self._judge()
                if self.done:
                    return
                slots = 0
            # Every lane runs the same kind: data-parallel ranks wait for each other, so a plan
            # on one lane and default on another would hide the plan's slowdown in both.
            kind = "validate-plan" if slots % 2 == 0 else "validate-default"
            # alternate which comes first in each pair, so drift does not favour either
            if (slots // 2) % 2 == 1:
                kind = "validate-default" if kind == "validate-plan" else "validate-plan"
            design = dict(self._draft.design) if kind == "validate-plan" else {}
            self.schedule.add_slot(bs, kind, lambda lane: dict(design))
            return
        if left < bs:
            self._finish("rejected", "the step budget ran out before a plan could be validated")
            return
        ndef = sum(1 for b in self._used_blocks() if b.kind in ("default", "baseline"))
        nexp = sum(1 for b in self.blocks if b.kind == "explore")
        anchored = not self.baseline_detailed or any(b.kind == "default" for b in self.blocks)
        if not anchored or ndef < DEFAULT_SHARE * (ndef + nexp + 1) or not self.knobs:
            self.schedule.add_slot(bs, "default")
            return
        # Each lane's design may cost what is left per step: data-parallel ranks wait for the
        # slowest, so a slot costs its costliest lane, on every lane.
        budget = BOUND_MARGIN * self.s.explore_max_slowdown
        lane_steps = bs * self.s.lanes
        allowance_ms = budget * (self.explore_steps + lane_steps) * self.default_step_ms - self.excess_ms
        table = self._time_table()
        model = self._model

        def cost_ms(k: str, st: int) -> float:
            return model.predict_ms(k, st, table) - table[k].get(0, 0.0)

        self.schedule.add_slot(bs, "explore", lambda lane: draw_design(
            self.knobs, self.grid, self.blocks, self._rng, allowance_ms / lane_steps, cost_ms))

    def _setup_after_baseline(self) -> None:
        base = [b for b in self.blocks if b.kind == "baseline"]
        times = [t for b in base for t in (b.time_ms[1:] or b.time_ms)]
        self.default_step_ms = float(np.median(times)) if times else 100.0
        self.block_steps, alone = block_steps(self.default_step_ms, self.s.window_steps, self.s.explore_max_steps,
                                              self.s.lanes, self.s.block_steps)
        # The exploration one replica alone fits in its step budget (after the baseline and room
        # for two validations), in block-steps; lanes share it between them.
        reserve = 2 * 2 * self.s.validation_pairs * alone
        room = self.s.explore_max_steps - base[0].steps - reserve
        self._explore_target = max(1, (room // alone) * alone // self.block_steps)
        region_ms: dict[str, list[float]] = {}
        for b in base:
            for r, v in b.region_ms.items():
                region_ms.setdefault(r, []).extend(v)
        self.knob_map = Knobs.choose({r: float(np.mean(v)) for r, v in region_ms.items() if v}, self.layout,
                                     self.s.switch_latency_ms)
        self._model = ResponseModel(self.states, self.s.clock_table.mem_mhz, self.knobs, self.s.lanes)
        self.grid = build_grid(self.s.clock_table, self.states)
        self.phase = "explore"

    def _anchor_blocks(self) -> list[Block]:
        """Default-clock blocks measured as the designs are (see ``baseline_detailed``)."""
        if not self.baseline_detailed:
            return [b for b in self.blocks if b.kind == "baseline"]
        return [b for b in self.blocks if b.kind == "default" and b.time_ms]

    def _used_blocks(self) -> list[Block]:
        """The blocks whose measurements enter the time table and the energy fit: all, but the
        baseline where it was measured in more detail than the rest and default blocks stand in."""
        if not self.baseline_detailed or not self._anchor_blocks():
            return self.blocks
        return [b for b in self.blocks if b.kind != "baseline"]

    def _refresh_default(self) -> None:
        """Re-derive the default step time from the default blocks once the baseline no longer
        stands for them; the exploration excess is recounted against it."""
        if not self.baseline_detailed or self.default_step_ms is None:
            return
        times = [t for b in self._anchor_blocks() for t in (b.time_ms[1:] or b.time_ms)]
        if times:
            self.default_step_ms = float(np.median(times))
            self.excess_ms = self.explore_ms - self.explore_steps * self.default_step_ms

    def _explored_enough(self) -> bool:
        """Lanes together have run the exploration blocks one replica alone would have."""
        if self.s.lanes == 1:
            return False  # one lane stops on its step budget, which is the same count
        # blocks without measurements (a lane whose GPU refuses writes) do not count
        n = sum(1 for b in self.blocks if b.kind in ("default", "explore") and b.time_ms)
        return n >= self._explore_target

    # ------------------------------------------------------------------ model
    def _samples(self) -> list[Sample]:
        """The measured blocks the model learns from (validation's plan blocks excluded: they
        stand for the plan, which the fit must not be tuned to)."""
        out = []
        for b in self._used_blocks():
            if not b.time_ms or b.kind == "validate-plan":
                continue
            out.append(Sample(b.design, self.knob_map.times_ms(b.region_ms, self.baseline_detailed),
                              b.energy_j, b.energy_steps, b.lane))
        return out

    def _time_table(self):
        return self._model.time_table(self._samples())

    def _default_step_energy(self) -> float:
        vals = [b.energy_j / b.energy_steps for b in self._used_blocks()
                if b.energy_steps and b.kind in ("default", "baseline", "validate-default")]
        return float(np.mean(vals)) if vals else float("nan")

    def _switch_model(self) -> SwitchModel:
        """The switch as the actuator executes it: latency hidden when issued ahead, else landing late.

        Issued ahead, changes still stay at least a latency apart (one in flight at a time) and at
        least 1 ms: each relies on the previous step's timing, and changes packed closer feed each
        other's prediction errors.
        """
        from .switching import ISSUE_AHEAD_MIN_INTERVAL_MS, switch_model

        floor_ms = self.s.min_switch_interval_ms
        if self.s.issue_ahead and self.s.switch_latency_ms > 0:
            floor_ms = max(floor_ms, ISSUE_AHEAD_MIN_INTERVAL_MS)
        return switch_model(self.s.switch_latency_ms, issue_ahead=self.s.issue_ahead, min_interval_ms=floor_ms)

    # ------------------------------------------------------------------ plan
    def _make_plan(self, slow_scale_factor: float = 1.0) -> None:
        samples = self._samples()
        table = self._model.time_table(samples)
        fit = self._model.fit_energy(samples, table)
        if fit is None:
            self._finish("rejected", "too few energy windows to fit the energy model; run more steps "
                         "(explore_max_steps) or use shorter windows (window_steps)")
            return
        T = self._model.time_grid(table)
        E = self._model.energy_grid(fit, T)
        # Validation measured the plan slower than predicted: the time effects of locks grow.
        T = time_penalised(T, slow_scale_factor)
        default_ms = {k: T[j, 0] for j, k in enumerate(self.knobs)}
        draft = make_plan(T, E, knobs=self.knobs, states=self.states,
                          occurrences=self.knob_map.occurrences(self.layout, default_ms),
                          default_step_energy_j=self._default_step_energy(), max_slowdown=self.s.max_slowdown,
                          objective=self.s.objective, switch=self._switch_model())
        self.predicted = {"time_change": draft.time_change, "energy_change": draft.energy_change,
                          "energy_fit_sigma_j": fit.sigma_j, "blocks": float(fit.blocks)}
        if not draft.design:
            self._finish("rejected", "the fitted model predicts no saving within the slowdown budget: "
                         "the default clocks stay")
            return
        if draft.energy_change > -MIN_PREDICTED_SAVING:
            self._finish("rejected", f"the fitted model predicts a saving of {-draft.energy_change:.2%}, "
                         f"below the {MIN_PREDICTED_SAVING:.1%} floor: the default clocks stay")
            return
        self._draft = draft
        self.plan_clocks = {k: self.states[st] for k, st in draft.design.items()}
        self.phase = "validate"

    # ------------------------------------------------------------------ validation
    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Energy and time change of the plan per validation pair, each pair on one lane."""
        vb = [b for b in self.blocks if b.kind.startswith("validate") and b.energy_steps and b.time_ms]
        pairs = []
        for lane in range(self.s.lanes):
            plan_b = [b for b in vb if b.kind == "validate-plan" and b.lane == lane]
            def_b = [b for b in vb if b.kind == "validate-default" and b.lane == lane]
            pairs += [(PairedBlock(p.energy_j / p.energy_steps, tuple(p.time_ms)),
                       PairedBlock(d.energy_j / d.energy_steps, tuple(d.time_ms))) for p, d in zip(plan_b, def_b)]
        return pair_changes(pairs)

    def _judge(self) -> None:
        de, dt = self._pairs()
        if len(de) < 2:
            self._finish("rejected", "too few validation windows; raise explore_max_steps")
            return
        verdict = judge(de, dt, self.s.max_slowdown)
        self.validated = dict(verdict.figures)
        if verdict.accepted:
            self._finish("applied" if self.apply else "explored", "validated")
            return
        if verdict.saves and self.replans < 1:
            self.replans += 1
            j_of = {k: j for j, k in enumerate(self.knobs)}
            T = self._draft.time_ms
            moved_ms = sum(abs(float(T[j_of[k], st] - T[j_of[k], 0])) for k, st in self._draft.design.items())
            self._make_plan(slow_scale(self.validated, self.predicted.get("time_change", 0.0), moved_ms,
                                       self.default_step_ms or 0.0))
            if not self.done:
                # drop the old validation blocks from the next judgement
                for b in self.blocks:
                    if b.kind.startswith("validate"):
                        b.kind = "superseded-" + b.kind
            return
        self._finish("rejected", verdict.why_not())

    def _finish(self, status: str, message: str) -> None:
        steps = self.schedule.next_step - self.s.start_step
        clocks = dict(self.plan_clocks) if status in ("applied", "explored") else {}
        self.result = ExploreResult(status, clocks, dict(self.predicted), dict(self.validated),
                                    steps, float(self.exploration_time_change), self.knobs, message)
        if self.on_done is not None:
            self.on_done(self.result)

    # ------------------------------------------------------------------ hooks (engine)
    # trylast, registered after the plan policy: it answers before the policy, while a third-party
    # policy (a plain hookimpl) still answers first.
    @hookimpl(trylast=True)
    def kdvfs_choose_clocks(self, region, step):
        return self.clocks_for(region, step)

    @hookimpl
    def kdvfs_step_measured(self, record):
        self.observe_step(record.step, record.gpu_time_ms, record.region_time_ms)

    @hookimpl
    def kdvfs_window_measured(self, window):
        self.observe_window(window.first_step, window.last_step, window.energy_j)
