"""The block schedule: blocks of steps, how long they are, and what each exploring block runs.

Energy is read over windows of steps, good to about a tenth of a second of power per reading, so
it is attributed over *blocks* of several seconds: each block holds one design (a clock state per
knob) on every lane, and its energy is the sum of the meter's windows inside it (the reading error
enters once per block, not once per window).

Designs are drawn within the exploration slowdown bound: each knob takes its least explored state
on the grid whose predicted cost fits what the bound still allows, or stays at default.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from .clocks import ClockPair, ClockTable

#: SM clocks (as fractions of the top clock) explored at each memory clock; the rest is interpolated.
SM_FRACTIONS = (0.85, 0.76, 0.68, 0.6, 0.52, 0.44)
#: Seconds of GPU time per block: long blocks make the meter's reading error small.
BLOCK_S = 6.0
#: Blocks the step budget must hold at least (fit and validation); shorter blocks otherwise.
MIN_BLOCKS = 24
#: Probability that a knob sits out a design (stays at default), so designs differ in which knobs move.
SIT_OUT = 0.3


@dataclass
class Block:
    """Steps that run one design on one lane, and what was measured in them."""

    index: int
    first_step: int
    steps: int
    kind: str  # baseline | default | explore | validate-plan | validate-default | superseded-...
    design: dict  # knob -> state index (absent or 0: default)
    energy_j: float = 0.0
    energy_steps: int = 0
    time_ms: list = field(default_factory=list)
    region_ms: dict = field(default_factory=dict)
    lane: int = 0

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1


class Schedule:
    """The blocks laid out so far, one per lane for each slot of steps."""

    def __init__(self, lanes: int, start_step: int):
        self.lanes = lanes
        self.start_step = start_step
        self.blocks: list[Block] = []

    @property
    def next_step(self) -> int:
        """The first step after the last slot."""
        return self.blocks[-1].last_step + 1 if self.blocks else self.start_step

    def covers(self, step: int) -> bool:
        return bool(self.blocks) and step <= self.blocks[-1].last_step

    def add_slot(self, steps: int, kind: str, design: Optional[Callable[[int], dict]] = None) -> None:
        """One block per lane over the next ``steps`` steps; ``design(lane)`` gives each lane's design."""
        first = self.next_step
        for lane in range(self.lanes):
            d = design(lane) if design is not None else {}
            self.blocks.append(Block(len(self.blocks), first, steps, kind, d, lane=lane))

    def find(self, step: int, lane: int = 0) -> Optional[Block]:
        for b in reversed(self.blocks):
            if b.first_step <= step <= b.last_step and b.lane == lane:
                return b
        return None

    def slots(self, kinds: Iterable[str]) -> int:
        """Slots of these kinds laid out so far."""
        kinds = tuple(kinds)
        return sum(1 for b in self.blocks if b.kind in kinds) // self.lanes


def block_steps(default_step_ms: float, window_steps: int, max_steps: int, lanes: int,
                fixed: Optional[int] = None) -> tuple[int, int]:
    """(steps per block, steps per block of one replica alone), multiples of ``window_steps``.

    About ``BLOCK_S`` of GPU time, but short enough that ``MIN_BLOCKS`` fit the step budget. Lanes
    need 1/lanes of the steps, and each slot is one round of designs (each round goes a little
    deeper than what was measured): where the step budget, not the meter's error, sets the block
    length, the lanes' blocks are as short as ``MIN_BLOCKS`` rounds within their share allow.
    """
    ws = max(1, window_steps)
    want = max(1, int(math.ceil(BLOCK_S / max(default_step_ms / 1e3, 1e-6))))

    def fitted(steps: int) -> int:
        return max(ws, int(math.ceil(steps / ws)) * ws)

    alone = fitted(fixed or min(want, max(1, max_steps // MIN_BLOCKS)))
    shared = alone if fixed else fitted(min(want, max(1, max_steps // (MIN_BLOCKS * lanes))))
    return shared, alone


def build_grid(table: ClockTable, states: Sequence[Optional[ClockPair]]) -> list[int]:
    """State indices explored: the top SM clock and ``SM_FRACTIONS`` of it, at each memory clock."""
    f_max = float(max(table.sm_mhz))
    index = {c: i for i, c in enumerate(states)}
    grid: list[int] = []
    for m in table.mem_mhz:
        allowed = table.sm_mhz_by_mem[m]
        for f in [f_max] + [fr * f_max for fr in SM_FRACTIONS]:
            c = ClockPair(min(allowed, key=lambda a: abs(a - f)), m)
            if c in index and index[c] not in grid:
                grid.append(index[c])
    return grid


def draw_design(knobs: Sequence[str], grid: Sequence[int], blocks: Sequence[Block], rng: random.Random,
                left_ms: float, cost_ms: Callable[[str, int], float]) -> dict:
    """Random states for a random subset of knobs, each only if the slowdown bound affords it.

    ``left_ms``: what this block may cost per step, so that after it the cumulative measured
    excess stays within the exploration bound (less a margin: the bound is checked on measured
    times). ``cost_ms(knob, state)``: the predicted extra ms per step. Each knob takes its least
    explored state whose predicted cost fits what is left (states seen least first, ties broken at
    random), or stays at default.
    """
    design = {}
    order = list(knobs)
    rng.shuffle(order)
    for k in order:
        if rng.random() < SIT_OUT:
            continue
        counts = {st: 0 for st in grid}
        for blk in blocks:
            st = blk.design.get(k)
            if st in counts:
                counts[st] += 1
        for st in sorted(grid, key=lambda x: counts[x] + rng.random()):
            cost = max(0.0, cost_ms(k, st))
            if cost <= left_ms:
                design[k] = st
                left_ms -= cost
                break
    return design
