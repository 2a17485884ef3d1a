"""The block schedule: blocks of steps, how long they are, and what each exploring block runs.

Energy is read over windows of steps, good to about a tenth of a second of power per reading, so
it is attributed over *blocks* of several seconds: each block holds one design (a clock state per
knob) on every lane, and its energy is the sum of the meter's windows inside it (the reading error
enters once per block, not once per window).

Each exploring block moves one knob (see :func:`draw_single`), to a state whose predicted cost fits
what the exploration slowdown bound still allows and that a plan could spend.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from .clocks import ClockPair, ClockTable

#: SM clocks (as fractions of the top clock) explored at each memory clock; the rest is interpolated.
SM_FRACTIONS = (0.85, 0.76, 0.68, 0.6, 0.52, 0.44)
#: Small steps down from the top SM clock (top memory clock): a knob's default clock lies somewhere
#: below the top (the power controller holds compute-bound work lower), and locks just under the
#: top clock cost little time but save on the memory-bound work that runs at the top by default.
NEAR_TOP_FRACTIONS = (0.97, 0.94)
#: Seconds of GPU time per block: long blocks make the meter's reading error small.
BLOCK_S = 6.0
#: Blocks the step budget must hold at least (exploration and validation); shorter blocks otherwise.
MIN_BLOCKS = 24


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


def steps_for_noise(steps: int, window_steps: int, unit_sd: float, target_se: float) -> int:
    """Steps per block that bring one measured effect's scatter to ``target_se`` (``unit_sd``: its
    scatter with one counted step; the error of a mean of steps, falling as one over the square
    root of the steps counted), never more than ``steps`` nor fewer than two windows (a block's
    first window is not counted where the design before it differs)."""
    ws = max(1, window_steps)
    if unit_sd <= 0 or target_se <= 0:
        return 2 * ws
    want = (unit_sd / target_se) ** 2 + ws
    return int(min(steps, max(2 * ws, int(math.ceil(want / ws)) * ws)))


def build_grid(table: ClockTable, states: Sequence[Optional[ClockPair]]) -> list[int]:
    """State indices explored: the top SM clock and ``SM_FRACTIONS`` of it at each memory clock, and
    ``NEAR_TOP_FRACTIONS`` of it at the top memory clock."""
    f_max = float(max(table.sm_mhz))
    index = {c: i for i, c in enumerate(states)}
    m_max = max(table.mem_mhz)
    grid: list[int] = []
    for m in table.mem_mhz:
        allowed = table.sm_mhz_by_mem[m]
        near = [fr * f_max for fr in NEAR_TOP_FRACTIONS] if m == m_max else []
        for f in [f_max] + near + [fr * f_max for fr in SM_FRACTIONS]:
            c = ClockPair(min(allowed, key=lambda a: abs(a - f)), m)
            if c in index and index[c] not in grid:
                grid.append(index[c])
    return grid


def draw_single(knobs: Sequence[str], grid: Sequence[int], states: Sequence[Optional[ClockPair]],
                changes: Sequence[tuple[str, int]], rng: random.Random, affordable: Callable[[str, int], bool],
                promising: Optional[dict] = None, around: Optional[dict] = None) -> dict:
    """One knob at one state, the rest at default: the block then measures that lock's effect on
    the whole step, against the default blocks next to it.

    ``changes``: the (knob, state) each earlier block of this kind measured. The knob whose
    affordable states were measured least goes first (then the knob measured least, ties at
    random). Among its least measured states that are ``affordable`` (within the exploration bound
    and worth a plan), it takes the one farthest, in 1/f, from every state it was measured at (the
    default counts as the top clock):
    the first blocks of a knob span its range coarsely, later ones fill in, so that an early look
    already sees how far a knob can go. A knob with nothing affordable gives way to the next;
    nothing affordable at all: default. Once a state was measured, it is measured again before
    the others only where it is ``promising`` (knob -> states a plan could take: the measured
    time/energy front), so repeated blocks shrink the noise where the plan is decided.

    ``around`` (knob -> state, absent: default): refine around a plan instead, nearest states
    first (a small step from the plan is what can still pay at its edge of the budget).
    """
    counts = {k: {st: 0 for st in grid} for k in knobs}
    for k, st in changes:
        if k in counts and st in counts[k]:
            counts[k][st] += 1
    promising = promising or {}
    for k in knobs:  # a state off the front waits a round longer
        for st, n in counts[k].items():
            if n and st not in promising.get(k, ()):
                counts[k][st] = n + 1

    top = max(c.sm_mhz for c in states if c is not None), max(c.mem_mhz for c in states if c is not None)

    def inv_f(st: int) -> tuple[float, float]:
        c = states[st]  # None: the default, counted as the top clocks
        return (1.0 / top[0], 1.0 / top[1]) if c is None else (1.0 / c.sm_mhz, 1.0 / c.mem_mhz)
    options = []
    for k in knobs:
        afford = [st for st in grid if affordable(k, st)]
        if afford:
            options.append((min(counts[k][st] for st in afford), sum(counts[k].values()), rng.random(), k, afford))
    if not options:
        return {}
    # the knob with an affordable state measured least (then the knob measured least) goes first
    least, _, _, k, afford = min(options)
    if around is not None:
        seen = [inv_f(around.get(k, 0))]
    else:
        seen = [inv_f(st) for st, n in counts[k].items() if n] + [(1.0 / top[0], 1.0 / top[1])]

    def distance(st: int) -> float:
        a = inv_f(st)
        return min(abs(a[0] - b[0]) * top[0] + abs(a[1] - b[1]) * top[1] for b in seen)

    sign = -1.0 if around is not None else 1.0
    pick = max((st for st in afford if counts[k][st] == least), key=lambda st: (sign * distance(st), rng.random()))
    return {k: pick}
