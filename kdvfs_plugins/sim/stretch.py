"""A virtual H100 that replays a kernel trace fast: whole steps at stretch level, cached per clock plan.

Replaying ~1300 kernels per step kernel by kernel through :class:`~.gpu.VirtualGPU` costs about
0.2 s of CPU per step, far too slow for thousands of exploration steps over several seeds. But a
step repeated with the same clock changes behaves the same each time, noise aside. So:

- A step's clock changes are given as *requests*: the clocks that take force at the start of
  stretch ``j`` (a stretch is a run of consecutive kernels of one region). Requests plus the clocks
  in force when the step starts are the step's *configuration*.
- The noise-free step is simulated once per configuration on a VirtualGPU (with the seed's
  card-to-card factors, without per-kernel jitter), at chunk level (consecutive kernels of one
  class inside a stretch merged, which the virtual GPU costs identically up to how often its power
  controller re-decides), after warm-up steps at the same configuration; the first step after a
  change of configuration is simulated from the previous configuration's steady state. The power
  controller and the switch latency are the virtual GPU's own.
- Issued ahead (``issue_ahead``), each change is requested one latency before its boundary as the
  previous step placed it, re-anchored at every boundary reached, as the live actuator does
  (:func:`~.trace.issue_due_changes`): this device dates its boundaries only when a step completes,
  so it places the actuator's changes itself.
- Per-kernel jitter is drawn analytically per stretch: a stretch of ``n`` kernels gets relative noise
  ``sigma / sqrt(n_eff)`` on time and power.
- The timeline's energy feeds :class:`~.readings.Readings`: the counter and both power readings as
  NVML gives them.

Every number it produces is a model prediction.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from ..clocks import ClockPair
from .gpu import VirtualGPU
from .model import H100Model, Work, default_model
from .readings import Readings
from .trace import Trace, TraceStep, issue_due_changes

#: Requests of one step: stretch index -> the clocks from that stretch on (None: the driver's default).
Requests = Mapping[int, Optional[ClockPair]]


class _NoJitter(random.Random):
    """Per-kernel jitter drawn elsewhere (analytically per stretch): the virtual GPU gets zeros."""

    def gauss(self, mu=0.0, sigma=1.0):  # noqa: D401 - random.Random API
        return 0.0


@dataclass(frozen=True)
class _Chunk:
    category: str
    duration_s: float
    gap_before_s: float


@dataclass(frozen=True)
class StepLayout:
    """One trace step as region stretches, each a list of chunks."""

    regions: tuple[str, ...]
    chunks: tuple[tuple[_Chunk, ...], ...]
    tail_gap_s: float
    #: effective number of kernels per stretch, for the jitter's averaging (sum d)^2 / sum d^2
    n_eff: np.ndarray
    #: idle gap time in each stretch (no jitter there)
    gap_s: np.ndarray

    @classmethod
    def of(cls, ts: TraceStep) -> "StepLayout":
        regions, chunks, n_eff, gaps = [], [], [], []
        for region, kernels in ts.stretches():
            out: list[_Chunk] = []
            for k in kernels:
                if out and out[-1].category == k.category:
                    last = out[-1]
                    out[-1] = _Chunk(last.category, last.duration_s + k.duration_s, last.gap_before_s + k.gap_before_s)
                else:
                    out.append(_Chunk(k.category, k.duration_s, k.gap_before_s))
            d = np.array([k.duration_s for k in kernels])
            regions.append(region)
            chunks.append(tuple(out))
            n_eff.append(d.sum() ** 2 / max(float((d ** 2).sum()), 1e-30))
            gaps.append(sum(k.gap_before_s for k in kernels))
        return cls(tuple(regions), tuple(chunks), ts.tail_gap_s, np.array(n_eff), np.array(gaps))


@dataclass(frozen=True)
class StepRun:
    """One simulated step: per stretch its start (virtual s), time (s), energy (J) and SM clock."""

    layout_index: int
    start_s: np.ndarray
    time_s: np.ndarray
    energy_j: np.ndarray
    sm_mhz: np.ndarray
    changes: int

    @property
    def end_s(self) -> float:
        return float(self.start_s[-1] + self.time_s[-1]) if len(self.time_s) else 0.0


class StretchGPU:
    """A fast, faithful stand-in for replaying ``trace`` step after step on a noisy VirtualGPU."""

    def __init__(self, trace: Trace, *, seed: int = 0, noise: bool = True,
                 switch_latency_ms: Optional[float] = None, model: Optional[H100Model] = None,
                 issue_ahead: bool = True):
        self.model = model or default_model()
        self.trace = trace
        self.layouts = [StepLayout.of(ts) for ts in trace.steps]
        self.noise = noise
        self.seed = seed
        self.switch_latency_ms = switch_latency_ms
        self.issue_ahead = issue_ahead
        gpu = self._new_gpu()
        self.name = gpu.name
        self.clock_table = gpu.clock_table
        self.switch_latency_s = gpu.switch_latency_s
        self._rng = np.random.default_rng(seed + 7919)
        nz = self.model.params.noise
        self._sig_t = nz["kernel_time_sigma"] if noise else 0.0
        self._sig_p = nz["kernel_power_sigma"] if noise else 0.0
        self._cache: dict = {}
        self._config: Optional[tuple] = None
        self._step_index = 0
        self.now_s = 0.0
        self.energy_j = 0.0
        self.readings = Readings(self.model.idle_power_w())
        #: the clocks requested last (what is in force once it has landed)
        self.clocks: Optional[ClockPair] = None
        self.last_sm_mhz = float(self.model.params.idle_sm_mhz)
        self.clock_changes = 0

    def _new_gpu(self) -> VirtualGPU:
        gpu = VirtualGPU(switch_latency_ms=self.switch_latency_ms, noise=self.noise, seed=self.seed, params=self.model)
        gpu._rng = _NoJitter()
        return gpu

    @property
    def next_layout(self) -> StepLayout:
        """The layout of the step :meth:`run_step` runs next (the trace's steps in turn)."""
        return self.layouts[self._step_index % len(self.layouts)]

    # ------------------------------------------------------------------ noise-free step per configuration
    def _simulate(self, gpu: VirtualGPU, layout: StepLayout, requests: tuple, current: list,
                  prev_offsets: Optional[np.ndarray] = None):
        n = len(layout.regions)
        t, e, sm = np.zeros(n), np.zeros(n), np.zeros(n)
        lead = gpu.switch_latency_s
        todo = [(j, c) for j, c in requests if j < n]  # every request is a change (the actuator sends no others)
        changes = len(todo)
        ahead = lead > 0 and prev_offsets is not None and len(prev_offsets) == n
        by_index = dict(todo)
        for i, chunks in enumerate(layout.chunks):
            if ahead:
                issue_due_changes(gpu, todo, prev_offsets, i, lead)
            elif i in by_index:
                gpu.request_clocks(by_index[i], gpu.now_s)
            if i in by_index:
                current[0] = by_index[i]
            t0, e0 = gpu.now_s, gpu.energy_j
            busy = 0.0
            for c in chunks:
                if c.gap_before_s > 0:
                    gpu.idle(c.gap_before_s)
                d, _ = gpu.run(Work(c.category, c.duration_s))
                sm[i] += gpu.last_sm_mhz * d
                busy += d
            sm[i] /= max(busy, 1e-30)
            t[i], e[i] = gpu.now_s - t0, gpu.energy_j - e0
        if layout.tail_gap_s > 0:
            t0, e0 = gpu.now_s, gpu.energy_j
            gpu.idle(layout.tail_gap_s)
            t[-1] += gpu.now_s - t0
            e[-1] += gpu.energy_j - e0
        return t, e, sm, changes

    @staticmethod
    def _offsets(t: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(t)[:-1]])

    def _steady(self, config: tuple, li: int):
        """(time, energy, SM clock, changes) per stretch of a step repeated at one configuration."""
        key = ("S", config, li)
        hit = self._cache.get(key)
        if hit is None:
            start, requests = config
            gpu = self._new_gpu()
            if start is not None:
                gpu.request_clocks(start, 0.0)
            cur: list = [start]
            nl = len(self.layouts)
            prev = None
            # warm the controller and land the first switches; issued ahead, each step's changes are
            # placed by the previous step's boundaries (the layouts' stretches line up)
            for j in range(3 if self.issue_ahead else 2):
                tw, *_ = self._simulate(gpu, self.layouts[(li + j - 3) % nl], requests, cur,
                                        prev if self.issue_ahead else None)
                prev = self._offsets(tw)
            hit = self._simulate(gpu, self.layouts[li], requests, cur, prev if self.issue_ahead else None)
            self._cache[key] = hit
        return hit

    def _transition(self, config: tuple, li: int):
        """The first step at a configuration, after steps at the previous one."""
        prev = self._config
        if prev is None or prev == config:
            return self._steady(config, li)
        key = ("T", prev, config, li)
        hit = self._cache.get(key)
        if hit is None:
            gpu = self._new_gpu()
            nl = len(self.layouts)
            start, requests = prev
            if start is not None:
                gpu.request_clocks(start, 0.0)
            cur: list = [start]
            self._simulate(gpu, self.layouts[(li - 2) % nl], requests, cur)
            self._simulate(gpu, self.layouts[(li - 1) % nl], requests, cur)
            hit = self._simulate(gpu, self.layouts[li], config[1], cur)  # changes land late: nothing to predict from
            self._cache[key] = hit
        return hit

    # ------------------------------------------------------------------ public
    def run_step(self, requests: Requests) -> StepRun:
        """Run the next trace step with ``requests``; advance the timeline and the readings."""
        li = self._step_index % len(self.layouts)
        layout = self.layouts[li]
        config = (self.clocks, tuple(sorted(requests.items(), key=lambda kv: kv[0])))
        t, e, sm, changes = self._transition(config, li)
        self._config = config
        self._step_index += 1
        self.clock_changes += changes
        if requests:
            self.clocks = requests[max(requests)]
        if self.noise:
            busy = np.maximum(t - layout.gap_s, 0.0)
            zt = self._rng.standard_normal(len(t)) * self._sig_t / np.sqrt(layout.n_eff)
            zp = self._rng.standard_normal(len(t)) * self._sig_p / np.sqrt(layout.n_eff)
            p_busy = np.divide(e, np.maximum(t, 1e-30))  # gaps draw about the same power: fine for noise
            t = t + busy * zt
            e = t * p_busy * (1.0 + zp)
        start = self.now_s + self._offsets(t)
        t_prev, e_prev = self.now_s, self.energy_j
        for ts, ti, ei in zip(start, t, e):
            self.readings.advance(ts, e_prev, ts + ti, e_prev + ei)
            e_prev += ei
        self.now_s = float(t_prev + t.sum())
        self.energy_j = float(e_prev)
        if len(sm):
            self.last_sm_mhz = float(sm[-1])
        return StepRun(li, start, t, e, sm, changes)
