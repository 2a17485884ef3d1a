"""Online exploration: learn each region's clock response during training, plan, validate, apply.

The instruments decide the method. Region GPU times are precise every step (markers), so the time
response of a region at a clock is known after one block of steps at that clock. Energy is not:
the meter's windows are good to about a tenth of a second of power, so energy is measured over
blocks of steps: each exploring block moves one knob, and is compared with the default blocks next
to it. After the early look (which declines where no saving is there to resolve), the plan from
single locks becomes the incumbent, and the last exploring blocks measure one more change at a
time against it. The plan is then validated against the default clocks in pairs of blocks.

This module is the facade the engine and the studies use: :class:`Explorer` with its hooks, its
settings and its result. The parts, each in its own module:

- :mod:`.explore_knobs`: which regions get a clock of their own (the knobs);
- :mod:`.explore_blocks`: the block schedule, block lengths, and which lock each exploring block
  measures within the exploration slowdown bound;
- :mod:`.explore_model`: the response model (knob times, each lock's measured effect on the step);
- :mod:`.explore_plan`: the planner on the measured tables, and locks that do not pay dropped;
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
from .explore_blocks import Block, Schedule, block_steps, build_grid, draw_single, steps_for_noise
from .explore_knobs import Knobs, Occurrence
from .explore_model import ResponseModel, Sample
from .explore_plan import MIN_PREDICTED_SAVING, PlanDraft, make_plan, time_penalised
from .explore_validate import SIGNIFICANCE_SE, PairedBlock, judge, pair_changes, slow_scale
from .explore_hooks import ExplorerHooks
from .planner import SwitchModel
from .policy import DEFAULT_CLOCKS
from .switching import DEFAULT_SWITCH_LATENCY_MS

__all__ = ["ExploreSettings", "ExploreResult", "Explorer", "Occurrence"]

#: Share of the exploration slowdown bound that designs plan to use (predictions can miss).
BOUND_MARGIN = 0.85
#: Validation: plan/default block pairs.
VALIDATION_PAIRS = 4
#: Share of exploration blocks kept at default clocks (the anchor of the comparison).
DEFAULT_SHARE = 0.25
#: A lock is measured only if its predicted step-time cost is within what a plan could spend: the
#: slowdown budget, the time the measured locks gain, and this share of the step to look beyond.
RELEVANT_MARGIN = 0.01
#: Share of the exploration steps spent on single locks against the default; the rest measures one
#: more change at a time against the plan they give (the incumbent).
REFINE_SHARE = 0.6
#: Refine blocks per knob measured around an incumbent before the best change may replace it.
REFINE_ROUND = 2
#: The early look: once this share of the step budget is spent, a plan from what was measured so
#: far must clear the floor, or exploration declines there (the saving is below what the
#: measurements resolve, and more blocks of the same kind would not change that).
EARLY_CHECK_SHARE = 0.25
#: Blocks are shortened once the default-design blocks show how much their energy scatters: to
#: where one lock's measured effect scatters by this share of the step's energy (half the
#: smallest saving a plan is validated for, so resolution is never what shortening costs), but
#: never below two windows. Long steps make few, long blocks; where the card is quiet, more blocks
#: explore more clocks in the same step budget.
TARGET_EFFECT_SE = 0.5 * MIN_PREDICTED_SAVING
#: Blocks of one design (the default) whose scatter is measured before blocks are shortened.
NOISE_BLOCKS = 3
#: Energy (J per step, above default) given to a state a knob was not measured at.
UNMEASURED_PENALTY_J = 1.0
#: A plan goes to validation only if its predicted saving is this many standard errors of its
#: measured effects (and at least MIN_PREDICTED_SAVING).
PLAN_FLOOR_SE = 3.0
#: A change to the incumbent is taken as slow as this many standard errors of its measured time.
#: None: validation judges the plan's time as the strict budget means it (not significantly
#: slower than the default), and a margin here kept plans a noise's width from that edge (on the
#: Llama-class step the optimizer one grid step above its best strict clock: 83% of the oracle's
#: saving against 91%).
LOCK_TIME_SE = 0.0
#: A lock stays in a plan only if it pays at least this many standard errors of a measured effect.
LOCK_FLOOR_SE = 2.0
#: Plans may spend this many standard errors of a lock's measured time effect beyond the slowdown
#: budget: a lock the measurements cannot tell from no time at all is as strict as validation can
#: judge (it accepts a plan not significantly slower than the budget).
PLAN_TIME_SE = 1.0


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
    #: measurements of all lanes feed one plan, so exploration needs about 1/lanes of the steps
    lanes: int = 1
    #: the lane this rank runs (its index among the replicas)
    lane: int = 0
    #: Validation holds a plan to the slowdown budget plus this (a fraction of the step): the
    #: oracle's own strict plans execute +0.01% to +0.03% on the replayed steps (a kernel-level
    #: plan of noise-free tables, issued ahead against boundaries that jitter); a plan is not
    #: held to less. Without it the strict edge lies inside the validation's noise, and on a step
    #: where the optimizer's clock saves 0.4% of the energy per 0.007% of time, plans landed
    #: anywhere from the default to 2.5 times the oracle's saving, seed by seed.
    time_tolerance: float = 0.0003


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


class Explorer(ExplorerHooks):
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
        #: then is the default clocks, not its lane's design, and stays out of the shared measurements.
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
        #: lane -> [ms, steps] of its exploration steps, and lane -> its default step (ms): each
        #: lane's steps count against its own default (replicas that do not wait for each other
        #: run at their own card's speed; data-parallel ranks that do wait all have the slowest's)
        self._lane_explore: dict[int, list] = {}
        self._lane_default_ms: dict[int, float] = {}
        self.steps_seen = 0
        self._model: Optional[ResponseModel] = None
        self._draft: Optional[PlanDraft] = None
        self._explore_target = 1
        self._early_checked = False
        self._first_block_steps = 1
        #: the first block measured around the current incumbent
        self._incumbent_since = 0
        #: the plan from single locks, once exploration refines around it (knob -> state)
        self.incumbent: Optional[dict] = None
        self._early_draft: Optional[PlanDraft] = None

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
    def explore_steps(self) -> int:
        """Exploration steps measured so far, every lane's."""
        return sum(n for _, n in self._lane_explore.values())

    @property
    def excess_ms(self) -> float:
        """GPU time the exploration steps took beyond the default step, each lane's against its own."""
        return sum(ms - n * self._lane_default_ms.get(lane, self.default_step_ms)
                   for lane, (ms, n) in self._lane_explore.items())

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
            acc = self._lane_explore.setdefault(lane, [0.0, 0])
            acc[0] += gpu_time_ms
            acc[1] += 1

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
        if first_step == b.first_step and last_step < b.last_step and self._follows_other_design(b):
            # The meter integrates power readings that trail the GPU by a refresh (about 0.1 s): a
            # block's first window still holds some of the previous design's power, which biases
            # a design measured against its neighbours by up to half a percent of the step.
            return
        b.energy_j += energy_j
        b.energy_steps += last_step - first_step + 1

    def _follows_other_design(self, b: Block) -> bool:
        prev = self.schedule.find(b.first_step - 1, b.lane)
        return prev is not None and {k: v for k, v in prev.design.items() if v} != {k: v for k, v in b.design.items() if v}

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
        if self.phase == "explore":
            self._fit_block_steps()
        left = self.s.explore_max_steps - (self.schedule.next_step - self.s.start_step)
        bs = self.block_steps
        self._refresh_default()
        # room for two validations: a plan measured slightly too slow is re-planned once
        reserve = 2 * self._validation_slots() * bs
        if self.phase == "explore":
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
            plan_design = dict(self._draft.design) if kind == "validate-plan" else {}
            self.schedule.add_slot(bs, kind, lambda lane: dict(plan_design))
            return
        if left < bs:
            self._finish("rejected", "the step budget ran out before a plan could be validated")
            return
        if self.incumbent and self._promote():
            self.schedule.add_slot(bs, "reference", lambda lane: dict(self.incumbent))
            return
        reference = self.incumbent or {}
        ref_kind, kind = ("reference", "refine") if self.incumbent else ("default", "explore")
        since = self._incumbent_since if self.incumbent else 0
        ndef = sum(1 for b in self._used_blocks()[since:] if b.kind in (ref_kind, "baseline" if not self.incumbent else ""))
        nexp = sum(1 for b in self.blocks[since:] if b.kind == kind)
        anchored = not self.baseline_detailed or any(b.kind == "default" for b in self.blocks)
        # Until the blocks are fitted to the scatter, every other block is a default one: three of
        # them show the scatter early, while most of the step budget is still to be spent.
        share = DEFAULT_SHARE if self._unit_sd is not None or self.s.block_steps is not None else 0.5
        if not anchored or not self.knobs or ndef < share * (ndef + nexp + 1) \
                or (self.incumbent and not self.blocks[-1].kind == ref_kind and nexp == 0):
            self.schedule.add_slot(bs, ref_kind, lambda lane: dict(reference))
            return
        samples = self._samples()
        table = self._model.time_table(samples)
        effects = self._effects(samples, bool(self.incumbent))
        used = self.schedule.next_step - self.s.start_step
        if not self._early_checked and used >= EARLY_CHECK_SHARE * self.s.explore_max_steps:
            self._early_checked = True
            self._make_plan(early=True)
            if self.done:
                return
        if self.incumbent is None and used >= REFINE_SHARE * (self.s.explore_max_steps - reserve):
            self._make_plan(early=True, time_se=0.0)  # the incumbent's own time is measured next
            # The plan from single locks becomes the incumbent; the rest of the exploration measures
            # one more change at a time against it: a lock's effect can depend on the others (a
            # knob held below the top keeps the power the optimizer's low clock freed), which
            # single locks against the default cannot show.
            if self.done:
                return
            draft = self._early_draft
            # a plan that does not clear what the measurements resolve is no incumbent
            resolved = draft.energy_change <= -self._resolvable(draft, effects)
            self.incumbent = dict(draft.design) if resolved else {}
            self._incumbent_since = len(self.blocks)
            if self.incumbent:
                self.schedule.add_slot(bs, "reference", lambda lane: dict(self.incumbent))
                return
            reference = {}
        # Each lane's design may cost what is left per step: data-parallel ranks wait for the
        # slowest, so a slot costs its costliest lane, on every lane.
        budget = BOUND_MARGIN * self.s.explore_max_slowdown
        lane_steps = bs * self.s.lanes
        allowance_ms = budget * (self.explore_steps + lane_steps) * self.default_step_ms - self.excess_ms
        # what any plan could spend: locks that cost more are not worth a block
        gains_ms = sum(max(0.0, -min((e.step_ms for e in effects.get(k, {}).values()), default=0.0))
                       for k in self.knobs)
        relevant_ms = (max(0.0, self.s.max_slowdown) + RELEVANT_MARGIN) * self.default_step_ms + gains_ms
        allowance_ms /= lane_steps
        top_sub = self._first_step_down()

        # An incumbent measured slower than the budget allows, as validation would find it
        # (significantly), is refined upwards only: the changes that give time back are the ones
        # its plan needs.
        upwards = bool(self.incumbent) and self._incumbent_ms(-SIGNIFICANCE_SE) > \
            max(0.0, self.s.max_slowdown) * self.default_step_ms

        def affordable(k: str, st: int) -> bool:
            if st == reference.get(k, 0) or (st not in self.grid and st not in between.get(k, ())):
                return False
            if upwards and (not reference.get(k, 0) or (self.states[st].sm_mhz, self.states[st].mem_mhz) <= (
                    self.states[reference[k]].sm_mhz, self.states[reference[k]].mem_mhz)):
                return False  # only a locked knob can give time back, and only by going up
            cost = max(0.0, self._model.predict_ms(k, st, table) - table[k].get(0, 0.0))
            # the first lock below the top clock is always worth a look: where the power controller
            # holds a knob lower, it costs nothing, which no roofline bound can tell beforehand
            first = st == top_sub and not any(self.states[s2] is not None and self.states[s2].sm_mhz < self.f_max
                                              for s2 in effects.get(k, {}))
            return cost <= allowance_ms and (cost <= relevant_ms or first)

        promising = {}
        for k, d in effects.items():
            pts = [(e.step_ms, e.energy_j, st) for st, e in d.items()] + [(0.0, 0.0, reference.get(k, 0))]
            promising[k] = {st for t, e, st in pts if st != reference.get(k, 0) and not any(
                t2 <= t and e2 < e or t2 < t and e2 <= e for t2, e2, _ in pts)}
        changes = []
        for b in self.blocks[since:]:
            if b.kind == kind:
                moved = [(k, st) for k, st in b.design.items() if st != reference.get(k, 0)]
                changes += moved[:1]
        between = self._between(reference, self._effects(samples)) if self.incumbent else {}
        grid = self.grid + sorted({st for sts in between.values() for st in sts})

        def design(lane: int) -> dict:
            change = draw_single(self.knobs, grid, self.states, changes, self._rng, affordable, promising,
                                 around=reference if self.incumbent else None)
            d = dict(reference)
            d.update(change)
            changes.extend(change.items())
            return {k: v for k, v in d.items() if v}

        self.schedule.add_slot(bs, kind, design)

    def _first_step_down(self) -> int:
        """The grid's highest state below the top SM clock at the top memory clock."""
        below = [st for st in self.grid if self.states[st].mem_mhz == self.m_max and self.states[st].sm_mhz < self.f_max]
        return max(below, key=lambda st: self.states[st].sm_mhz) if below else -1

    def _setup_after_baseline(self) -> None:
        base = [b for b in self.blocks if b.kind == "baseline"]
        self.default_step_ms = self._default_ms(base) or 100.0
        self._lane_default_ms = self._lane_means_ms(base)
        self.block_steps, alone = block_steps(self.default_step_ms, self.s.window_steps, self.s.explore_max_steps,
                                              self.s.lanes, self.s.block_steps)
        # The exploration one replica alone fits in its step budget (after the baseline and room
        # for two validations), in block-steps; lanes share it between them.
        reserve = 2 * 2 * self.s.validation_pairs * alone
        room = self.s.explore_max_steps - base[0].steps - reserve
        self._explore_target = max(1, (room // alone) * alone // self.block_steps)
        self._first_block_steps = self.block_steps
        region_ms: dict[str, list[float]] = {}
        for b in base:
            for r, v in b.region_ms.items():
                region_ms.setdefault(r, []).extend(v)
        self.knob_map = Knobs.choose({r: float(np.mean(v)) for r, v in region_ms.items() if v}, self.layout,
                                     self.s.switch_latency_ms)
        self._model = ResponseModel(self.states, self.s.clock_table.mem_mhz, self.knobs, self.s.lanes)
        self.grid = build_grid(self.s.clock_table, self.states)
        self.phase = "explore"

    def _fit_block_steps(self) -> None:
        """Blocks as short as the measured scatter allows (``TARGET_EFFECT_SE``), never longer than
        the first ones nor shorter than two windows: re-fitted at every exploring slot, as blocks
        of repeated designs (the default, the incumbent) show the scatter better."""
        if self.s.block_steps is None and self._unit_sd is not None:
            self.block_steps = steps_for_noise(self._first_block_steps, self.s.window_steps,
                                               self._unit_sd, TARGET_EFFECT_SE)

    @property
    def _unit_sd(self) -> Optional[float]:
        """The scatter of one effect (a block against the mean of two) for a block of one counted
        step, from blocks of repeated designs, each deviation scaled by the square root of its
        counted steps (blocks differ in length once they are fitted); None before
        ``NOISE_BLOCKS`` blocks of one design were measured."""
        dev = []
        for blocks in self._repeated_designs(("default", "explore", "reference", "refine"), NOISE_BLOCKS):
            e = np.array([b.energy_j / b.energy_steps for b in blocks])
            n = np.array([b.energy_steps for b in blocks], dtype=float)
            mean = float(np.average(e, weights=n))
            dev.extend((e / mean - 1.0) * np.sqrt(n) * np.sqrt(len(blocks) / (len(blocks) - 1)))
        if not dev:
            return None
        return float(np.sqrt(np.mean(np.square(dev)) * 1.5))

    def _anchor_blocks(self) -> list[Block]:
        """Default-clock blocks measured as the designs are (see ``baseline_detailed``)."""
        if not self.baseline_detailed:
            return [b for b in self.blocks if b.kind == "baseline"]
        return [b for b in self.blocks if b.kind == "default" and b.time_ms]

    def _used_blocks(self) -> list[Block]:
        """The blocks whose measurements enter the time table and the effects: all, but the
        baseline where it was measured in more detail than the rest and default blocks stand in."""
        if not self.baseline_detailed or not self._anchor_blocks():
            return self.blocks
        return [b for b in self.blocks if b.kind != "baseline"]

    @staticmethod
    def _lane_means_ms(blocks: Sequence[Block]) -> dict[int, float]:
        """Each lane's mean steady step over default-clock blocks. The mean, as every block's time
        is taken: steps that alternate (a trace of two different steps, gradient accumulation) put
        a median on one of them, and the exploration excess then counted the difference as
        slowdown (+2.5% on a ViT step replayed at 103 and 108 ms)."""
        by_lane: dict[int, list[float]] = {}
        for b in blocks:
            by_lane.setdefault(b.lane, []).extend(b.time_ms[1:] or b.time_ms)
        return {lane: float(np.mean(v)) for lane, v in by_lane.items() if v}

    @classmethod
    def _default_ms(cls, blocks: Sequence[Block]) -> Optional[float]:
        """The default step time: the slowest lane's (data-parallel ranks wait for it)."""
        means = cls._lane_means_ms(blocks)
        return max(means.values()) if means else None

    def _refresh_default(self) -> None:
        """Re-derive the default step time from the default blocks measured as the designs are
        (the baseline's one window is too few steps where they alternate); the exploration excess
        counts against it from then on, the steps already taken included."""
        if self.default_step_ms is None:
            return
        blocks = self._anchor_blocks()
        if not self.baseline_detailed:
            blocks = blocks + [b for b in self.blocks if b.kind == "default" and b.time_ms]
        step_ms = self._default_ms(blocks)
        if step_ms is not None:
            self.default_step_ms = step_ms
            self._lane_default_ms = self._lane_means_ms(blocks)

    def _explored_enough(self) -> bool:
        """Lanes together have run the exploration blocks one replica alone would have."""
        if self.s.lanes == 1:
            return False  # one lane stops on its step budget, which is the same count
        # blocks without measurements (a lane whose GPU refuses writes) do not count
        n = sum(b.steps for b in self.blocks if b.kind in ("default", "explore") and b.time_ms)
        return n >= self._explore_target * self._first_block_steps

    # ------------------------------------------------------------------ model
    def _samples(self) -> list[Sample]:
        """The measured blocks the model learns from (validation's plan blocks excluded: they
        stand for the plan, which the choice of the plan must not be tuned to)."""
        out = []
        for b in self._used_blocks():
            if not b.time_ms or b.kind == "validate-plan":
                continue
            steady = b.time_ms[1:] or b.time_ms
            out.append(Sample(b.design, self.knob_map.times_ms(b.region_ms, self.baseline_detailed),
                              b.energy_j, b.energy_steps, b.lane, float(np.mean(steady)), b.first_step, b.kind))
        return out

    def _effects(self, samples: Sequence[Sample], refined: bool = False):
        """Each lock's measured effect: against the default blocks, from the blocks of single locks;
        ``refined``: against the incumbent, from the blocks that refine it. Each stage against its
        own reference blocks, never across (the incumbent's blocks, a single lock, lie far from the
        default blocks of the first stage, and drift in between would enter)."""
        kinds = ("reference", "refine") if refined else ("baseline", "default", "explore")
        return self._model.step_effects([x for x in samples if x.kind in kinds],
                                        self.incumbent if refined else None)

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
    def _effect_grids(self, samples, table, time_se: float) -> tuple[np.ndarray, np.ndarray]:
        """Time and energy per step of every knob at every state it was measured in alone, from its
        effect on the whole step.

        A state a knob was not measured at gets the default's energy and a time no better than the
        roofline bound: never worth choosing, but priced where a change landing late runs part of
        the knob's stretch at the previous knob's clock."""
        nk = len(self.knobs)
        T = np.zeros((nk, len(self.states)))
        E = np.zeros((nk, len(self.states)))
        # a joule more than default: an unmeasured state never wins a tie against the default
        E[:, 1:] = UNMEASURED_PENALTY_J
        for j, k in enumerate(self.knobs):
            t0 = table[k].get(0, 0.0)
            T[j, 1:] = [max(t0, self._model.predict_ms(k, st, table)) if table[k] else t0
                        for st in range(1, len(self.states))]
        measured = False
        effects = self._model.step_effects(samples)
        # A lock's measured time is taken ``time_se`` standard errors slower than measured: a plan
        # on the budget's edge would be validated, found too slow and re-planned, at the cost of
        # the blocks.
        se_t_ms = self._effect_se(time=True) * (self.default_step_ms or 0.0)
        for j, k in enumerate(self.knobs):
            T[j, 0] = table[k].get(0, 0.0)
            E[j, 0] = 0.0
            for st, eff in effects.get(k, {}).items():
                T[j, st] = T[j, 0] + eff.step_ms + time_se * se_t_ms / np.sqrt(eff.blocks)
                E[j, st] = eff.energy_j
                measured = True
        return (T, E) if measured else (T, None)

    def _effect_se(self, time: bool = False) -> float:
        """Standard error of one measured effect, a fraction of the step's energy (``time``: of the
        step time): the scatter of blocks that ran one design on one lane (the default, the
        incumbent), for a block against the mean of two."""
        rel: list[float] = []
        for blocks in self._repeated_designs(("baseline", "default", "explore", "reference", "refine"), 3):
            v = np.array([float(np.mean(b.time_ms[1:] or b.time_ms)) if time else b.energy_j / b.energy_steps
                          for b in blocks])
            rel.extend(v / v.mean() - 1.0)
        if len(rel) < 3:
            return MIN_PREDICTED_SAVING / LOCK_FLOOR_SE
        return float(np.std(rel, ddof=1) * np.sqrt(1.5))

    def _repeated_designs(self, kinds: Sequence[str], at_least: int) -> list[list[Block]]:
        """Measured blocks of these kinds grouped by lane and design, the designs run in at least
        ``at_least`` blocks: their scatter about their mean is the measurements' noise."""
        groups: dict[tuple, list[Block]] = {}
        for b in self._used_blocks():
            if b.energy_steps and b.time_ms and b.kind in kinds:
                key = (b.lane, tuple(sorted((k, v) for k, v in b.design.items() if v)))
                groups.setdefault(key, []).append(b)
        return [v for v in groups.values() if len(v) >= at_least]

    def _plan_draft(self, samples, table, *, time_se: float, slow_scale_factor: float = 1.0,
               max_slowdown: Optional[float] = None) -> PlanDraft:
        """The planner's best plan on the measured effects (``time_se``: see :meth:`_effect_grids`)."""
        T, E = self._effect_grids(samples, table, time_se)
        # Validation measured the plan slower than predicted: the time effects of locks grow.
        T = time_penalised(T, slow_scale_factor)
        # A re-plan after validation found the plan too slow spends no time the measurements
        # cannot resolve: that time is what validation just measured.
        budget = max_slowdown if max_slowdown is not None else (
            self._plan_budget() if slow_scale_factor == 1.0 else self.s.max_slowdown)
        default_ms = {k: T[j, 0] for j, k in enumerate(self.knobs)}
        return make_plan(T, E, knobs=self.knobs, states=self.states,
                         occurrences=self.knob_map.occurrences(self.layout, default_ms),
                         default_step_energy_j=self._default_step_energy(), max_slowdown=budget,
                         objective=self.s.objective if budget == self.s.max_slowdown else "relaxed",
                         switch=self._switch_model(),
                         # the states a plan takes were mostly measured twice (see draw_single)
                         drop_floor=min(MIN_PREDICTED_SAVING, LOCK_FLOOR_SE * self._effect_se() / np.sqrt(2)))

    def _plan_budget(self) -> float:
        """The slowdown a plan may be planned to: the budget, and what one lock's measured time
        effect cannot resolve (``PLAN_TIME_SE``; its states were mostly measured twice)."""
        return max(0.0, self.s.max_slowdown) + PLAN_TIME_SE * self._effect_se(time=True) / np.sqrt(2)

    def _resolvable(self, draft: PlanDraft, effects) -> float:
        """The saving a plan must predict to be told from noise (a fraction of the step's energy):
        0.2 %, or ``PLAN_FLOOR_SE`` standard errors of its summed effects (it is the best of many
        noisy effects, so it must clear more than two)."""
        n = [effects[k][st].blocks for k, st in draft.design.items() if st in effects.get(k, {})]
        se = self._effect_se() * np.sqrt(sum(1.0 / b for b in n)) if n else 0.0
        return float(max(MIN_PREDICTED_SAVING, PLAN_FLOOR_SE * se))

    def _make_plan(self, slow_scale_factor: float = 1.0, early: bool = False, time_se: float = LOCK_TIME_SE) -> None:
        samples = self._samples()
        table = self._model.time_table(samples)
        effects = self._effects(samples)
        if not effects:
            self._finish("rejected", "no lock was measured against default blocks; run more steps "
                         "(explore_max_steps) or use shorter windows (window_steps)")
            return
        when = f" after {self.schedule.next_step - self.s.start_step} steps (an early look)" if early else ""
        if early:
            # Whether a saving is there to resolve at all: the plan with the time the unexplored
            # locks may still give back (what exploration looks beyond the budget for).
            hope = self._plan_draft(samples, table, time_se=0.0, max_slowdown=self.s.max_slowdown + RELEVANT_MARGIN)
            floor = self._resolvable(hope, effects)
            if hope.energy_change > -floor:
                self.predicted = {"time_change": hope.time_change, "energy_change": hope.energy_change,
                                  "effect_se": self._effect_se(), "resolvable_saving": floor}
                self._finish("rejected", f"the measured locks offer a saving of at most "
                             f"{-hope.energy_change:.2%}{when}, below the {floor:.2%} that the measurements "
                             "resolve: the default clocks stay")
                return
        draft = self._plan_draft(samples, table, time_se=time_se, slow_scale_factor=slow_scale_factor)
        if time_se and draft.energy_change > -self._resolvable(draft, effects):
            # Nothing fits with the margin: the measured times themselves, validation decides.
            draft = self._plan_draft(samples, table, time_se=0.0, slow_scale_factor=slow_scale_factor)
        self.predicted = {"time_change": draft.time_change, "energy_change": draft.energy_change,
                          "effect_se": self._effect_se(),
                          "blocks": float(sum(1 for b in self.blocks if b.kind in ("explore", "default")))}
        if early:
            self._early_draft = draft
            return  # a saving worth exploring for: go on measuring
        if not draft.design:
            self._finish("rejected", "the measured locks offer no saving within the slowdown budget: "
                         "the default clocks stay")
            return
        floor = self._resolvable(draft, effects)
        self.predicted["resolvable_saving"] = floor
        if draft.energy_change > -floor:
            self._finish("rejected", f"the measured locks offer a saving of {-draft.energy_change:.2%}, "
                         f"below the {floor:.2%} that the measurements resolve: the default clocks stay")
            return
        if self.incumbent and slow_scale_factor == 1.0:
            draft = self._refined(samples)
        self._draft = draft
        self.plan_clocks = {k: self.states[st] for k, st in draft.design.items()}
        self.phase = "validate"

    def _incumbent_ms(self, margin_se: float = LOCK_TIME_SE) -> float:
        """The incumbent's time against the default (ms per step), ``margin_se`` standard errors
        on the slow side: measured by its reference blocks against the default blocks where there
        are some (where locks interact, that is the slack there really is to spend), else predicted."""
        step_ms = self.default_step_ms or 0.0
        inc = {k: v for k, v in self.incumbent.items() if v}
        ref_ms = [float(np.mean(b.time_ms[1:] or b.time_ms)) for b in self.blocks
                  if b.kind == "reference" and b.time_ms and {k: v for k, v in b.design.items() if v} == inc]
        def_ms = [float(np.mean(b.time_ms[1:] or b.time_ms)) for b in self.blocks
                  if b.kind == "default" and b.time_ms and not any(b.design.values())]
        if ref_ms and def_ms:
            se_t = self._effect_se(time=True) * step_ms
            return float(np.mean(ref_ms) - np.mean(def_ms)) + margin_se * se_t / np.sqrt(len(ref_ms))
        return self._early_draft.time_change * step_ms

    def _between(self, design: Mapping[str, int], effects) -> dict[str, list[int]]:
        """Per locked knob of ``design``, the clocks halfway between its state and the neighbouring
        grid clocks (at its memory clock), where a grid step moves its measured energy by more than
        a block resolves (``LOCK_FLOOR_SE`` standard errors; ``effects``: the single locks against
        the default). The grid is coarse, and refining a plan is where a finer step still pays (on
        the Llama-class step, the optimizer's best strict clock lies between two grid clocks); where
        a grid step is within the noise, half a step is noise too, and blocks spent on it are lost
        to the changes that matter (on the GPT step, 15 MHz steps of forward and backward)."""
        index = {c: i for i, c in enumerate(self.states)}
        floor_j = LOCK_FLOOR_SE * self._effect_se() * self._default_step_energy()
        out: dict[str, list[int]] = {}
        for k, st in design.items():
            c = self.states[st] if st else None
            measured = effects.get(k, {})
            if c is None or st not in measured:
                continue
            allowed = self.s.clock_table.sm_mhz_by_mem[c.mem_mhz]
            same = sorted({self.states[g].sm_mhz for g in self.grid if self.states[g].mem_mhz == c.mem_mhz})
            lower = [f for f in same if f < c.sm_mhz][-1:]
            upper = [f for f in same if f > c.sm_mhz][:1]
            for f in lower + upper:
                g = index.get(ClockPair(f, c.mem_mhz))
                if g not in measured or not abs(measured[g].energy_j - measured[st].energy_j) > floor_j:
                    continue
                mid = ClockPair(min(allowed, key=lambda a: abs(a - (f + c.sm_mhz) / 2)), c.mem_mhz)
                if mid in index and index[mid] not in self.grid:
                    out.setdefault(k, []).append(index[mid])
        return out

    def _promote(self) -> bool:
        """After a round of changes measured around the incumbent, the best one that pays becomes
        the incumbent (True): refinement then goes on from there, a change at a time, as far as
        the step budget allows, instead of stopping at the first."""
        n = sum(1 for b in self.blocks[self._incumbent_since:] if b.kind == "refine")
        if n < REFINE_ROUND * len(self.knobs):
            return False
        draft = self._refined(self._samples())
        if draft.design == {k: v for k, v in self.incumbent.items() if v}:
            return False  # nothing pays yet: measure on
        self._early_draft = draft
        self.incumbent = dict(draft.design)
        self._incumbent_since = len(self.blocks)
        return True

    def _refined(self, samples) -> PlanDraft:
        """The incumbent with the one measured change against it that saves most within the budget.

        A change counts only where it saves more than its measurement resolves (``LOCK_FLOOR_SE``
        standard errors) and, taken ``LOCK_TIME_SE`` standard errors slower than measured, keeps the
        plan within the slowdown budget. The incumbent was planned on the measured times without a
        margin (nearer the budget's edge, where the saving is); its own blocks measure its time."""
        base = self._early_draft
        step_ms = self.default_step_ms or 0.0
        e_step = self._default_step_energy()
        se_e, se_t = self._effect_se() * e_step, self._effect_se(time=True) * step_ms
        budget_ms = self._plan_budget() * step_ms
        base_ms = self._incumbent_ms()
        # Where the incumbent itself measured over the budget, as validation would find it
        # (significantly), the change that brings it within at the least energy is taken, whatever
        # it saves: a reference block's time scatters by about the margin, and on the mean alone
        # one slow block sent a knob back up.
        over = self._incumbent_ms(-SIGNIFICANCE_SE) > budget_ms
        best = None
        for k, by_state in self._effects(samples, refined=True).items():
            for st, eff in by_state.items():
                n = np.sqrt(eff.blocks)
                slow_ms = eff.step_ms + LOCK_TIME_SE * se_t / n
                # A clock lowered a step saves energy wherever the time allows (above the knob's
                # energy-optimal clock): there a change that is measured saving counts, though a
                # step between two close clocks saves less than a block resolves.
                floor_j = 0.0 if self._lowers(k, st) else LOCK_FLOOR_SE * se_e / n
                if base_ms + slow_ms > budget_ms or (not over and eff.energy_j > -floor_j):
                    continue
                if best is None or eff.energy_j < best[2].energy_j:
                    best = (k, st, eff, slow_ms)
        self.predicted["refined"] = 0.0 if best is None else 1.0
        if best is None:
            return base
        k, st, eff, slow_ms = best
        design = dict(self.incumbent)
        design[k] = st
        design = {kk: v for kk, v in design.items() if v}
        self.predicted.update(time_change=(base_ms + slow_ms) / step_ms,
                              energy_change=base.energy_change + eff.energy_j / e_step)
        return PlanDraft(design, self.predicted["time_change"], self.predicted["energy_change"], base.time_ms)

    def _lowers(self, knob: str, st: int) -> bool:
        """Whether ``st`` lowers the knob's SM clock from the incumbent's, at the same memory clock."""
        c = self.states[st]
        cur = self.states[self.incumbent.get(knob, 0)]
        if c is None:
            return False
        cur_mhz, cur_mem = (self.f_max, self.m_max) if cur is None else (cur.sm_mhz, cur.mem_mhz)
        return c.mem_mhz == cur_mem and c.sm_mhz < cur_mhz

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
        verdict = judge(de, dt, self.s.max_slowdown + self.s.time_tolerance)
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
