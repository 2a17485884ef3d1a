"""Which steps to profile: one in ``profile_every_n_steps`` at most, fewer where profiling costs.

A profiled step records a marker at every region boundary. Measured on an H100 under DeepSpeed
ZeRO-2 (GPT, 406 M parameters, about 450 module boundaries a step), a profiled step spent 10 to
30 ms of host time in kdvfs's hooks against 0.2 to 0.4 ms on a plain step, in steps of 80 to
120 ms that the CPU partly paces: one step in 25 then cost about 1% of the run on average.

So each profiled step's cost is measured where it matters, on the GPU's timeline: its GPU time
against the median of recent plain steps (a step the CPU does not pace hides the host time and
costs nothing). The profiled steps are then spaced so that they cost at most ``budget`` of the
time, and never more than ``max_stretch`` times ``profile_every_n_steps`` apart, so the region
table keeps following the run. The first profiled step installs the module hooks and pays once
for that, so its cost does not count.

A step's GPU time arrives when the GPU has finished it and kdvfs has dated it, which on a step
that changes no clock can be a couple of seconds later (see ``Engine``'s anchors): no step is
profiled while the one before it still waits to be judged, or an 85 ms step profiled one in 25
would have profiled again before learning what the last one cost.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

#: Share of the step time that profiled steps may cost on average.
PROFILE_BUDGET = 0.002
#: Profiled steps are at most this many times ``profile_every_n_steps`` apart.
MAX_STRETCH = 40
#: Plain steps needed before a profiled step's cost is judged.
MIN_PLAIN_STEPS = 4


class ProfileCadence:
    """Decides the profiled steps from ``first_step`` on and learns what they cost."""

    def __init__(self, every_n_steps: int, first_step: int, *, budget: float = PROFILE_BUDGET,
                 max_stretch: int = MAX_STRETCH):
        self.every_n_steps = every_n_steps
        self.budget = budget
        self.max_stretch = max_stretch
        #: Steps between profiled steps now.
        self.interval = every_n_steps
        self.next_step = first_step
        #: The latest estimate of what a profiled step adds to the GPU time of a step (ms).
        self.extra_ms: Optional[float] = None
        self._plain_ms: deque = deque(maxlen=32)
        self._due: set = set()
        self._first: Optional[int] = None

    def due(self, step: int) -> bool:
        """Whether ``step`` is to be profiled (call once per step, in order)."""
        if step < self.next_step or self._awaiting_judgement(step):
            return False
        self.next_step = step + self.interval
        if self._first is None:
            self._first = step
        self._due.add(step)
        return True

    def _awaiting_judgement(self, step: int) -> bool:
        """A profiled step to be judged has not been measured yet (and may still be)."""
        # A measurement that never comes (a step whose record was dropped) stops no one for long.
        self._due = {d for d in self._due if step - d < self.every_n_steps * self.max_stretch}
        return any(d != self._first for d in self._due)  # the first is not judged: no wait for it

    def measured(self, step: int, gpu_time_ms: float, profiled: bool) -> None:
        """A step's GPU time, once the GPU has finished it."""
        if not profiled:
            self._plain_ms.append(gpu_time_ms)
            return
        if step not in self._due:
            return  # profiled for another reason (exploration, a plugin watching regions)
        self._due.discard(step)
        if step == self._first or len(self._plain_ms) < MIN_PLAIN_STEPS:
            return
        plain_ms = statistics.median(self._plain_ms)
        if plain_ms <= 0:
            return
        extra = max(0.0, gpu_time_ms - plain_ms)
        # two profiled steps a few seconds apart differ by the run's own step-to-step noise
        self.extra_ms = extra if self.extra_ms is None else 0.5 * (self.extra_ms + extra)
        wanted = math.ceil(self.extra_ms / (self.budget * plain_ms))
        self.interval = min(max(self.every_n_steps, wanted), self.every_n_steps * self.max_stretch)
        self.next_step = step + self.interval
