"""Validation: a plan against the default clocks, measured in adjacent pairs of blocks, and the verdict.

Each pair is a plan block next to a default block on one lane (one GPU: GPUs differ in power by a
few percent, more than the saving), the order alternating from pair to pair so that drift favours
neither. Per pair: the energy and time change of the plan. A plan is applied only if the saving is
significant (mean + 2 standard errors < 0) and the slowdown within the budget (mean - 2 standard
errors <= max_slowdown). A plan that saves but is too slow may be re-planned once, with every time
effect of its locks made less favourable by twice the measured miss (:func:`slow_scale`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

#: The verdict's significance: this many standard errors.
SIGNIFICANCE_SE = 2.0


@dataclass(frozen=True)
class PairedBlock:
    """What validation needs of one block: its energy per step and its steps' times."""

    energy_j_per_step: float
    time_ms: tuple[float, ...]

    @property
    def steady_time_ms(self) -> float:
        """Mean step time without the first step: it pays the switch into the block's design (its
        changes cannot be issued ahead before a step of the design has been seen); an applied plan
        pays that once, not once a block."""
        t = self.time_ms[1:] or self.time_ms
        return float(np.mean(t))


def pair_changes(pairs: Sequence[tuple[PairedBlock, PairedBlock]]) -> tuple[np.ndarray, np.ndarray]:
    """Energy and time change of the plan per (plan block, default block) pair."""
    de = np.array([p.energy_j_per_step / d.energy_j_per_step - 1.0 for p, d in pairs])
    dt = np.array([p.steady_time_ms / d.steady_time_ms - 1.0 for p, d in pairs])
    return de, dt


@dataclass(frozen=True)
class Verdict:
    """The judgement of a plan from its pairs."""

    figures: Mapping[str, float]   # mean, min, max, standard error of energy and time change, pairs
    saves: bool                    # the energy saving is significant
    fast_enough: bool              # the slowdown is within the budget

    @property
    def accepted(self) -> bool:
        return self.saves and self.fast_enough

    def why_not(self) -> str:
        f = self.figures
        why = "the saving is not significant" if not self.saves else "the slowdown exceeds the budget"
        return (f"validation rejected the plan: {why} (energy {f['energy_change']:+.2%} "
                f"± {SIGNIFICANCE_SE * f['energy_change_se']:.2%}, time {f['time_change']:+.2%})")


def judge(de: np.ndarray, dt: np.ndarray, max_slowdown: float) -> Verdict:
    """Mean, spread and standard error of the pairs; needs at least two pairs."""
    if len(de) < 2:
        raise ValueError(f"{len(de)} validation pairs: judging a plan needs at least 2")
    se_e = float(de.std(ddof=1) / math.sqrt(len(de)))
    se_t = float(dt.std(ddof=1) / math.sqrt(len(dt)))
    fig = {"energy_change": float(de.mean()), "energy_change_min": float(de.min()),
           "energy_change_max": float(de.max()), "energy_change_se": se_e,
           "time_change": float(dt.mean()), "time_change_min": float(dt.min()),
           "time_change_max": float(dt.max()), "time_change_se": se_t, "pairs": float(len(de))}
    return Verdict(fig, fig["energy_change"] + SIGNIFICANCE_SE * se_e < 0,
                   fig["time_change"] - SIGNIFICANCE_SE * se_t <= max_slowdown)


def slow_scale(validated: Mapping[str, float], predicted_time_change: float, moved_ms: float,
               default_step_ms: float) -> float:
    """Factor on the time cost of lowered clocks that makes the plan's prediction meet its
    measurement (plus two standard errors): the time model's error, measured where it matters.

    ``moved_ms``: how far the plan's locks moved its knobs' times, summed (ms per step)."""
    miss_ms = (validated["time_change"] + SIGNIFICANCE_SE * validated["time_change_se"]
               - predicted_time_change) * default_step_ms
    if moved_ms <= 0 or miss_ms <= 0 or default_step_ms <= 0:
        return 1.5
    # Twice the measured miss: there is room for one re-plan only, and the first correction of
    # a model that was optimistic tends to fall short (seen on the GPT step: +0.08% -> +0.03%).
    return 1.0 + 2.0 * miss_ms / moved_ms
