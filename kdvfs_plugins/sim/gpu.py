"""A virtual GPU on a virtual timeline (placeholder model; the calibrated H100 model replaces it).

API contract used by the simulated device, the planner and the explorer:

- ``Work(category, duration_s, flops=0, bytes=0)``: GPU work, with its duration at default clocks.
- ``VirtualGPU(switch_latency_ms=None, noise=True, seed=0)``
  - ``clock_table`` (:class:`~kdvfs_plugins.clocks.ClockTable`), ``now_s`` (virtual time),
  - ``request_clocks(clocks_or_None, at_s)``: a lock (or None: back to default) that takes
    effect ``switch_latency_s`` after ``at_s``,
  - ``run(work) -> (duration_s, energy_j)``, ``idle(duration_s)``,
  - ``energy_counter_mj()`` (refreshes every 100 ms of virtual time), ``power_w()``,
  - ``effective_clocks()``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from ..clocks import ClockPair, ClockTable
from ..data import h100_clock_lists

DEFAULT_SWITCH_LATENCY_MS = 6.0
ENERGY_REFRESH_S = 0.1


@dataclass(frozen=True)
class Work:
    category: str
    duration_s: float
    flops: float = 0.0
    bytes: float = 0.0


class VirtualGPU:
    name = "Simulated NVIDIA H100 80GB HBM3"

    def __init__(self, switch_latency_ms: Optional[float] = None, noise: bool = True, seed: int = 0):
        mem, sm = h100_clock_lists()
        self.clock_table = ClockTable.from_lists(mem, sm)
        self.switch_latency_s = (DEFAULT_SWITCH_LATENCY_MS if switch_latency_ms is None else switch_latency_ms) / 1e3
        self.noise = noise
        self._rng = random.Random(seed)
        self.now_s = 0.0
        self._energy_j = 0.0
        self._pending: list[tuple[float, Optional[ClockPair]]] = []
        self._clocks: Optional[ClockPair] = None
        self._counter_mj = 0
        self._counter_t = 0.0
        self._last_power_w = 72.0

    def request_clocks(self, clocks: Optional[ClockPair], at_s: float) -> None:
        if clocks is not None:
            self.clock_table.check(clocks)
        self._pending.append((max(at_s, 0.0) + self.switch_latency_s, clocks))
        self._pending.sort(key=lambda p: p[0])

    def effective_clocks(self) -> ClockPair:
        return self._clocks or ClockPair(1755, 2619)

    def _advance_clocks(self) -> None:
        while self._pending and self._pending[0][0] <= self.now_s:
            self._clocks = self._pending.pop(0)[1]

    def run(self, work: Work) -> tuple[float, float]:
        self._advance_clocks()
        c = self.effective_clocks()
        scale = 0.5 * 1755 / c.sm_mhz + 0.5 * 2619 / c.mem_mhz
        dur = work.duration_s * scale
        power = 100 + 500 * (c.sm_mhz / 1980) ** 2.5
        if self.noise:
            dur *= 1 + self._rng.gauss(0, 0.005)
            power *= 1 + self._rng.gauss(0, 0.01)
        self._tick(dur, power)
        return dur, dur * power

    def idle(self, duration_s: float) -> None:
        self._advance_clocks()
        self._tick(duration_s, 72.0)

    def _tick(self, dur: float, power: float) -> None:
        self.now_s += dur
        self._energy_j += dur * power
        self._last_power_w = power
        if self.now_s - self._counter_t >= ENERGY_REFRESH_S:
            self._counter_t = self.now_s - (self.now_s - self._counter_t) % ENERGY_REFRESH_S
            self._counter_mj = int(self._energy_j * 1e3)

    def energy_counter_mj(self) -> int:
        return self._counter_mj

    def power_w(self) -> float:
        return self._last_power_w
