"""A virtual H100 on a virtual timeline, calibrated to measurements of a real one.

API contract used by the simulated device, the planner and the explorer:

- ``Work(category, duration_s, flops=0, bytes=0)``: GPU work, with its duration at default clocks
  (the card's own throttled default state inside a training step; see :mod:`.model`).
- ``VirtualGPU(switch_latency_ms=None, noise=True, seed=0, params=None)``
  - ``clock_table`` (:class:`~kdvfs_plugins.clocks.ClockTable`), ``now_s`` (virtual time),
  - ``request_clocks(clocks_or_None, at_s)``: a lock (or None: back to default) that takes
    effect ``switch_latency_s`` after ``at_s``,
  - ``run(work) -> (duration_s, energy_j)``, ``idle(duration_s)``,
  - ``energy_counter_mj()`` (refreshes every 100 ms of virtual time), ``power_w()``,
  - ``effective_clocks()``.
  - ``model``: the noise-free :class:`~kdvfs_plugins.sim.model.H100Model` (vectorised time and
    energy at any clock pair, for the planner).

Behaviour:

- Default clocks ("auto") are the top clocks lowered by the power controller. The controller
  keeps an exponentially weighted average, over ``power_window_s``, of the power curve of recent
  work (its power at every SM clock) and holds the highest SM clock at which that average meets
  its target (~700 W). With a window longer than a kernel it holds one clock for a mix, as the
  measured card does inside a GPT step; alone, a GEMM settles at its own cap clock (~1430 MHz)
  and a copy at 1980 MHz.
- A lock sets the memory clock and an upper bound on the SM clock; the controller still enforces
  the cap, so a locked SM clock above the cap-sustainable clock is lowered. Work run at a low
  locked clock lowers the average, which gives the next matrix products a higher clock.
- Clock changes land ``switch_latency_s`` after they are requested; a change that lands inside a
  kernel splits it. The GPU does not stall while clocks change (assumption).
- The energy counter (integer mJ) and the power reading refresh every 100 ms of virtual time; the
  power reading is the average over the last completed 100 ms.
- Noise (seeded): a card-to-card factor on each class's time and power, drawn once per seed, and
  per-kernel jitter on time and power. ``noise=False`` gives the model's exact values.

Everything it produces is a model prediction.
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Optional, Union

import numpy as np

from ..clocks import ClockPair, ClockTable
from ..data import h100_clock_lists
from ..switching import DEFAULT_SWITCH_LATENCY_MS
from .model import H100Model, ModelParams, Work, default_model, load_params
from .readings import REFRESH_S as ENERGY_REFRESH_S, Readings

__all__ = ["Work", "VirtualGPU", "DEFAULT_SWITCH_LATENCY_MS", "ENERGY_REFRESH_S"]



class VirtualGPU:
    name = "Simulated NVIDIA H100 80GB HBM3"

    def __init__(self, switch_latency_ms: Optional[float] = None, noise: bool = True, seed: int = 0,
                 params: Union[None, str, Mapping, ModelParams, H100Model] = None):
        if isinstance(params, H100Model):
            self.model = params
        elif params is None:
            self.model = default_model()
        else:
            self.model = H100Model(load_params(params))
        p = self.params = self.model.params
        mem, sm = h100_clock_lists()
        self.clock_table = ClockTable.from_lists(mem, sm)
        self.switch_latency_s = (DEFAULT_SWITCH_LATENCY_MS if switch_latency_ms is None else switch_latency_ms) / 1e3
        self.noise = noise
        self.seed = seed
        self._rng = random.Random(seed)
        self._card_t: dict[str, float] = {}
        self._card_p: dict[str, float] = {}
        if noise:
            card = random.Random(f"card-{seed}")
            for name in sorted(p.classes):
                self._card_t[name] = 1.0 + card.gauss(0.0, p.noise["card_time_sigma"])
                self._card_p[name] = 1.0 + card.gauss(0.0, p.noise["card_power_sigma"])
        self.now_s = 0.0
        #: True energy since start (J); the counter shows it with 100 ms refresh.
        self.energy_j = 0.0
        self._pending: list[tuple[float, int, Optional[ClockPair]]] = []
        self._seq = 0
        self._lock: Optional[ClockPair] = None
        # Controller state: windowed average of power curves; starts as if idle for a long time.
        self._mix = np.full_like(self.model.grid_sm_mhz, self.model.idle_power_w())
        self._ceiling: Optional[float] = None  # the controller's clock for the current _mix
        self._idle_since: Optional[float] = -p.idle_hold_s  # idle since long before t=0
        #: The counter and the power readings as NVML gives them (see :mod:`.readings`).
        self.readings = Readings(self.model.idle_power_w())
        self._instant_w = self.model.idle_power_w()
        self.last_sm_mhz = float(p.idle_sm_mhz)
        self.last_mem_mhz = int(p.mem_max_mhz)
        self._mem_max_mhz = float(p.mem_max_mhz)  # a property that takes a max: read per slice

    # --- clocks --------------------------------------------------------------------------------
    def request_clocks(self, clocks: Optional[ClockPair], at_s: float) -> None:
        """Lock ``clocks`` (None: back to the driver's default) from ``at_s + switch latency``."""
        if clocks is not None:
            self.clock_table.check(clocks)
        self._seq += 1
        self._pending.append((max(at_s, 0.0) + self.switch_latency_s, self._seq, clocks))
        self._pending.sort(key=lambda x: (x[0], x[1]))

    @property
    def locked_clocks(self) -> Optional[ClockPair]:
        """The lock in force now (None: default clocks)."""
        self._apply_due()
        return self._lock

    def _apply_due(self) -> None:
        while self._pending and self._pending[0][0] <= self.now_s + 1e-15:
            self._lock = self._pending.pop(0)[2]

    def _ceiling_sm_mhz(self) -> float:
        if self._ceiling is None:  # asked once or twice per slice: worked out once per _mix
            self._ceiling = self.model.ceiling_from_curve(self._mix)
        return self._ceiling

    def _clocks_now(self) -> tuple[float, float]:
        """(SM MHz, memory MHz) a kernel would run at now: the lock, lowered by the cap."""
        ceiling = self._ceiling_sm_mhz()
        if self._lock is None:
            return ceiling, self._mem_max_mhz
        return min(float(self._lock.sm_mhz), ceiling), float(self._lock.mem_mhz)

    def effective_clocks(self) -> ClockPair:
        """The clocks the card runs at now, on the supported grid (SM rounded down to 15 MHz)."""
        self._apply_due()
        p = self.params
        if self._idle_since is not None and self._lock is None and self.now_s - self._idle_since >= p.idle_hold_s:
            return ClockPair(int(p.idle_sm_mhz), int(p.mem_max_mhz))
        sm, mem = self._clocks_now()
        sm_grid = p.sm_min_mhz + p.sm_step_mhz * math.floor((sm - p.sm_min_mhz) / p.sm_step_mhz + 1e-9)
        return ClockPair(int(sm_grid), int(mem))

    # --- work ----------------------------------------------------------------------------------
    def run(self, work: Work) -> tuple[float, float]:
        """Run ``work`` now; advance virtual time. Returns (duration_s, energy_j) of this work."""
        model = self.model
        cls = model.class_of(work).name
        top_s = model.top_time_s(work)
        if top_s <= 0:
            return 0.0, 0.0
        t_factor = p_factor = 1.0
        if self.noise:
            nz = self.params.noise
            t_factor = self._card_t[cls] * max(0.5, 1.0 + self._rng.gauss(0.0, nz["kernel_time_sigma"]))
            p_factor = self._card_p[cls]
            p_jitter = max(0.5, 1.0 + self._rng.gauss(0.0, nz["kernel_power_sigma"]))
        else:
            p_jitter = 1.0
        self._idle_since = None
        remaining = 1.0
        total_d = total_e = 0.0
        substep_s = max(self.params.power_window_s / 20.0, 1e-5)
        while remaining > 1e-12:
            self._apply_due()
            sm, mem = self._clocks_now()
            full_d = top_s * model.shape_at(cls, sm, mem) * t_factor
            d = remaining * full_d
            # Stop early where a clock change lands or the controller would re-decide.
            limit = self.now_s + substep_s
            if self._pending:
                limit = min(limit, max(self._pending[0][0], self.now_s + 1e-9))
            if self.now_s + d > limit:
                d = limit - self.now_s
                remaining -= d / full_d
            else:
                remaining = 0.0
            true_w = model.power_at(cls, sm, mem) * p_factor
            lock_sm = None if self._lock is None else float(self._lock.sm_mhz)
            curve = model.power_curve(cls, mem, lock_sm)
            self._advance(d, true_w * p_jitter, curve * p_factor)
            self.last_sm_mhz, self.last_mem_mhz = sm, int(mem)
            total_d += d
            total_e += d * true_w * p_jitter
        return total_d, total_e

    def idle(self, duration_s: float) -> None:
        """No work for ``duration_s``: clocks held (idle power at the clock), then the idle clock."""
        if duration_s <= 0:
            return
        p = self.params
        if self._idle_since is None:
            self._idle_since = self.now_s
        end = self.now_s + duration_s
        while self.now_s < end - 1e-15:
            self._apply_due()
            limit = min(end, self.now_s + max(p.power_window_s / 20.0, 1e-5))
            if self._pending:
                limit = min(limit, max(self._pending[0][0], self.now_s + 1e-9))
            held = self._lock is not None or self.now_s - self._idle_since < p.idle_hold_s
            if self._lock is None and held:
                limit = min(limit, self._idle_since + p.idle_hold_s)
            d = limit - self.now_s
            if held:
                sm, mem = self._clocks_now()
                lock_sm = None if self._lock is None else float(self._lock.sm_mhz)
                curve = self.model.static_curve(mem, lock_sm)
                w = self.model.static_power_at(sm, mem)
            else:
                sm, mem = float(p.idle_sm_mhz), self._mem_max_mhz
                w = self.model.idle_power_w()
                curve = np.full_like(self._mix, w)
            self._advance(d, w, curve)
            self.last_sm_mhz, self.last_mem_mhz = sm, int(mem)

    def _advance(self, d: float, power_w: float, curve: np.ndarray) -> None:
        """Advance time by ``d`` at ``power_w``; update the controller's average and the counter."""
        if d <= 0:
            return
        t0, e0 = self.now_s, self.energy_j
        self.now_s = t0 + d
        self.energy_j = e0 + d * power_w
        self._instant_w = power_w
        a = math.exp(-d / self.params.power_window_s)
        self._mix = a * self._mix + (1.0 - a) * curve
        self._ceiling = None
        self.readings.advance(t0, e0, self.now_s, self.energy_j)

    # --- readings ------------------------------------------------------------------------------
    def energy_counter_mj(self) -> int:
        """Energy since start in integer mJ, as of the last 100 ms refresh (like NVML's counter)."""
        return self.readings.counter_mj()

    @property
    def counter_history(self) -> list[tuple[float, int]]:
        """(virtual time, counter mJ) at every refresh still held, for readers that need the instants."""
        return self.readings.history()

    def counter_time_s(self) -> float:
        """Virtual time of the counter's last refresh."""
        return self.readings.last_refresh_s()

    def power_w(self) -> float:
        """The instant power field: average over the last completed 100 ms (idle before the first)."""
        return self.readings.instant_w()

    def power_usage_w(self) -> float:
        """NVML's power usage: the ~1 s running average the H100 reports."""
        return self.readings.usage_w()

    def instant_power_w(self) -> float:
        """True power of the latest stretch of work (not observable on a real card)."""
        return self._instant_w
