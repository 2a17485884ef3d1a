"""The response model: each knob's time, and each lock's effect on the whole step, from block measurements.

Time is measured: region GPU times are precise every step, so a knob's time at a state is the mean
over the blocks that ran it; other states are predicted for the exploration bound only (time grows
at most like the clock ratio, a roofline bound).

Energy is measured too, not fitted: each exploring block moves one knob, and is compared with the
default-clock blocks next to it on its lane. The difference in energy per step and in step time is
that lock's effect on the whole step, drift and the card's own level cancelled, and whatever the
lock does to the other knobs included (a memory-bound knob at a low clock leaves the power
controller room to run the compute-bound work that follows faster: the step can get faster
although that knob got slower). A physical model fitted over all blocks was tried first; its
assumed voltage curve and one effective clock per knob missed both effects by more than the
savings at stake (predicted -1.2% where -0.7% was measured on the GPT step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .clocks import ClockPair

#: A reference block counts for a measured block only this many blocks away (one in four blocks
#: of a stage is a reference: the nearest is at most three away).
MAX_REFERENCE_GAP = 4

#: The least share of the clock ratio a lock below the measured ones is taken to cost. A knob that
#: did not slow down so far may still be held on the power cap's plateau: on the lanes test's
#: matrix products, locks at 94% and 85% of the top clock cost nothing and one at 44% a third of
#: the step (0.1 here let that block through).
SENSITIVITY_FLOOR = 0.5

#: knob -> state index -> mean ms per step (state 0: default clocks)
TimeTable = dict[str, dict[int, float]]


@dataclass(frozen=True)
class Sample:
    """One block's measurement as the model sees it."""

    design: Mapping[str, int]   # knob -> state index (absent: default)
    knob_ms: Mapping[str, float]  # mean ms per step of each knob
    energy_j: float             # energy over the block's measured windows
    energy_steps: int           # steps those windows cover
    lane: int = 0
    step_ms: float = 0.0        # mean step time (steady steps)
    first_step: int = 0         # where the block lies in the run (its neighbours are the reference)
    kind: str = ""              # the block's kind in the schedule


@dataclass(frozen=True)
class Effect:
    """A knob's lock as the whole step measured it, against adjacent default blocks."""

    step_ms: float      # change of the step time
    energy_j: float     # change of the energy per step
    blocks: int         # blocks it was measured in


class ResponseModel:
    """Time and energy of each knob at each clock state, from block samples."""

    def __init__(self, states: Sequence[Optional[ClockPair]], mem_mhz: Sequence[int], knobs: Sequence[str],
                 lanes: int = 1):
        self.states = list(states)
        self.mem_mhz = list(mem_mhz)
        self.knobs = tuple(knobs)
        self.lanes = lanes
        self.f_max = float(max(c.sm_mhz for c in self.states if c is not None))
        self.m_max = float(max(c.mem_mhz for c in self.states if c is not None))

    # ------------------------------------------------------------------ time
    def time_table(self, samples: Sequence[Sample]) -> TimeTable:
        """knob -> state -> mean measured ms per step (state 0: default).

        With several lanes each lane's times are first scaled to the lanes' common default time:
        cards differ in speed by about a percent, as much as the effects the plan trades."""
        scale: dict[tuple[str, int], float] = {}
        if self.lanes > 1:
            lane_def: dict[str, dict[int, list[float]]] = {k: {} for k in self.knobs}
            for s in samples:
                for k, ms in s.knob_ms.items():
                    if k in lane_def and s.design.get(k, 0) == 0:
                        lane_def[k].setdefault(s.lane, []).append(ms)
            for k, by_lane in lane_def.items():
                means = {lane: float(np.mean(v)) for lane, v in by_lane.items()}
                common = float(np.mean(list(means.values()))) if means else 0.0
                for lane, m in means.items():
                    if m > 0:
                        scale[(k, lane)] = common / m
        acc: dict[str, dict[int, list[float]]] = {k: {} for k in self.knobs}
        for s in samples:
            for k, ms in s.knob_ms.items():
                if k in acc:
                    acc[k].setdefault(s.design.get(k, 0), []).append(ms * scale.get((k, s.lane), 1.0))
        return {k: {st: float(np.mean(v)) for st, v in d.items()} for k, d in acc.items()}

    def predict_ms(self, knob: str, st: int, table: TimeTable) -> float:
        """Predicted ms of a knob at a state: measured, else extrapolated from measured states.

        From a measured state (f1, m1, t1) time grows at most like the clock ratio (a roofline
        bound). Where the knob's sensitivity to the clock is measured, the prediction uses twice
        that sensitivity plus ``SENSITIVITY_FLOOR`` instead (time is convex in 1/f, so a straight
        line would under-predict, and a knob on the power cap's plateau shows none). The default
        state is taken to run at the top clock (its own clock is not read), which over-predicts
        the cost of a lock: safe for the exploration bound.
        """
        d = table[knob]
        if st in d:
            return d[st]
        c = self.states[st]
        base = d.get(0)
        sens_sm = sens_mem = 1.0
        if base:
            for s2, ms in d.items():
                c2 = self.states[s2]
                if c2 is None:
                    continue
                if c2.mem_mhz == self.m_max and c2.sm_mhz < 0.97 * self.f_max:
                    sens_sm = min(sens_sm, max(0.0, (ms / base - 1.0) / (self.f_max / c2.sm_mhz - 1.0)))
                if c2.mem_mhz < self.m_max:
                    sens_mem = min(sens_mem, max(0.0, (ms / base - 1.0) / (self.m_max / c2.mem_mhz - 1.0)))
        best = math.inf
        for s2, ms in d.items():
            c2 = self.states[s2]
            f2 = self.f_max if c2 is None else c2.sm_mhz
            m2 = self.m_max if c2 is None else c2.mem_mhz
            grow_sm = max(f2 / c.sm_mhz - 1.0, 0.0) * min(1.0, 2.0 * sens_sm + SENSITIVITY_FLOOR)
            grow_mem = max(m2 / c.mem_mhz - 1.0, 0.0) * min(1.0, 2.0 * sens_mem + SENSITIVITY_FLOOR)
            best = min(best, ms * (1.0 + grow_sm + grow_mem))
        return best

    def step_effects(self, samples: Sequence[Sample], reference: Optional[Mapping[str, int]] = None
                     ) -> dict[str, dict[int, "Effect"]]:
        """knob -> state -> its measured effect on the whole step, from blocks that differ from the
        ``reference`` design (default: the default clocks) in that knob alone.

        Each such block is compared with the reference blocks nearest to it on its lane (the one
        before and the one after, where there is one): drift and the card's own level cancel, and
        the effect includes what the lock does to the other knobs (a memory-bound knob at a low
        clock leaves the power controller room to run the compute-bound work that follows faster).
        """
        ref_design = {k: v for k, v in (reference or {}).items() if v}
        by_lane: dict[int, list[Sample]] = {}
        for s in samples:
            if s.energy_steps > 0 and s.step_ms > 0:
                by_lane.setdefault(s.lane, []).append(s)
        acc: dict[str, dict[int, list[tuple[float, float]]]] = {}
        for lane, ss in by_lane.items():
            ss = sorted(ss, key=lambda s: s.first_step)
            designs = [{k: v for k, v in s.design.items() if v} for s in ss]
            ref = [i for i, d in enumerate(designs) if d == ref_design]
            for i, (s, d) in enumerate(zip(ss, designs)):
                moved = [k for k in set(d) | set(ref_design) if d.get(k, 0) != ref_design.get(k, 0)]
                if len(moved) != 1 or not ref:
                    continue
                before = [j for j in ref if j < i][-1:]
                after = [j for j in ref if j > i][:1]
                # only neighbours: a reference block far away in the run carries the drift since
                # (the incumbent's blocks, a single lock, are no measurement against the default)
                near = [j for j in before + after if abs(j - i) <= MAX_REFERENCE_GAP]
                if not near:
                    continue
                e_ref = float(np.mean([ss[j].energy_j / ss[j].energy_steps for j in near]))
                t_ref = float(np.mean([ss[j].step_ms for j in near]))
                acc.setdefault(moved[0], {}).setdefault(d.get(moved[0], 0), []).append(
                    (s.step_ms - t_ref, s.energy_j / s.energy_steps - e_ref))
        return {k: {st: Effect(float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals])), len(vals))
                    for st, vals in d.items()} for k, d in acc.items()}
