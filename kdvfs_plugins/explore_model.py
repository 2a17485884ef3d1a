"""The response model: each knob's time and energy at every clock state, fitted to block measurements.

Time is measured: region GPU times are precise every step, so a knob's time at a state is the mean
over the blocks that ran it; other states are interpolated in 1/f (a roofline is piecewise linear
in 1/f) at each memory clock, and states below the lowest measured SM clock are left out (never
extrapolated).

Energy is fitted (per step, per knob ``k`` at state ``c``; ``f`` its effective SM clock, ``m`` the
memory clock, ``t_k(c)`` its measured time)::

    E_k(c) = A_k * V(f)^2  +  t_k(c) * S(f, m)  +  B_k
    S(f, m) = s0 + s1 * V(f)^2 + s2 * (f/f_max) * V(f)^2 + s3 * (m/m_max)

The first term is the SM's switching energy (charge per operation times V^2: fixed work costs
V^2, not time); ``S`` is the power drawn while clocked (board, leakage, clock tree, memory
interface) for as long as the knob runs; ``B_k`` (memory traffic, fixed per work) does not depend
on the clocks and cancels in every comparison. ``V(f)`` is a generic DVFS voltage curve, flat at
``V_MIN`` up to ``V_KNEE_FRACTION`` of the top clock, then linear to 1 (an assumption). Block energy
is linear in ``A_k``, ``s0..s3`` and one intercept (plus one offset per further lane: cards differ
by a few percent in power), so least squares over the blocks fits it.

The default state's effective SM clock is not a lock and is not read: it is estimated per knob
from the time response (the locked clock whose time equals the default time), and a lock above it
is treated as running at it (the power cap).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .clocks import ClockPair

#: Generic voltage-frequency curve: flat up to this share of the top clock, then linear to 1.
V_MIN = 0.7
V_KNEE_FRACTION = 0.45

#: knob -> state index -> mean ms per step (state 0: default clocks)
TimeTable = dict[str, dict[int, float]]


def voltage(f_mhz, f_max_mhz: float) -> np.ndarray:
    """The assumed generic DVFS voltage (relative to the top clock's) at SM clock ``f_mhz``."""
    x = np.asarray(f_mhz, dtype=float) / f_max_mhz
    return np.clip(V_MIN + (1.0 - V_MIN) * (x - V_KNEE_FRACTION) / (1.0 - V_KNEE_FRACTION), V_MIN, 1.0)


@dataclass(frozen=True)
class Sample:
    """One block's measurement as the model sees it."""

    design: Mapping[str, int]   # knob -> state index (absent: default)
    knob_ms: Mapping[str, float]  # mean ms per step of each knob
    energy_j: float             # energy over the block's measured windows
    energy_steps: int           # steps those windows cover
    lane: int = 0


@dataclass(frozen=True)
class EnergyFit:
    """The fitted energy model: coefficients, residual, and the default state's clock per knob."""

    coef: np.ndarray
    sigma_j: float       # residual standard deviation per block
    blocks: int
    default_sm_mhz: Mapping[str, float]


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
        that sensitivity plus a margin instead (time is convex in 1/f, so a straight line would
        under-predict). The default state is taken to run at the top clock (its own clock is not
        read), which over-predicts the cost of a lock: safe for the exploration bound.
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
            grow_sm = max(f2 / c.sm_mhz - 1.0, 0.0) * min(1.0, 2.0 * sens_sm + 0.1)
            grow_mem = max(m2 / c.mem_mhz - 1.0, 0.0) * min(1.0, 2.0 * sens_mem + 0.1)
            best = min(best, ms * (1.0 + grow_sm + grow_mem))
        return best

    def time_grid(self, table: TimeTable) -> np.ndarray:
        """ms per step of every knob at every state; inf where unknown (below the lowest measured
        SM clock at a memory clock, or a memory clock never measured)."""
        T = np.full((len(self.knobs), len(self.states)), np.inf)
        for j, k in enumerate(self.knobs):
            d = table[k]
            T[j, 0] = d.get(0, 0.0)
            for m in self.mem_mhz:
                pts = sorted((self.states[s].sm_mhz, ms) for s, ms in d.items() if s and self.states[s].mem_mhz == m)
                idx = [i for i, c in enumerate(self.states) if c is not None and c.mem_mhz == m]
                if not pts:
                    continue
                fs = np.array([self.states[i].sm_mhz for i in idx], float)
                pf = np.array([p[0] for p in pts], float)
                pt = np.array([p[1] for p in pts], float)
                vals = np.interp(1.0 / fs, (1.0 / pf)[::-1], pt[::-1])
                T[j, idx] = np.where(fs < pf.min() - 1e-9, np.inf, vals)
        return T

    # ------------------------------------------------------------------ energy
    def default_clocks(self, table: TimeTable) -> dict[str, float]:
        """Per knob: the locked SM clock (top memory clock) whose time equals the default time."""
        out = {}
        for k in self.knobs:
            d = table[k]
            t0 = d.get(0)
            pts = sorted((self.states[s].sm_mhz, ms) for s, ms in d.items()
                         if s and self.states[s].mem_mhz == self.m_max)
            f_est = self.f_max
            if t0 is not None and len(pts) >= 2:
                fs = np.array([p[0] for p in pts], float)
                ts = np.array([p[1] for p in pts], float)
                slope = (ts[0] - ts[-1]) / max(ts[-1], 1e-9)
                if slope > 0.02:  # responds to the SM clock: invert t(1/f) where it crosses t0
                    inv = 1.0 / fs
                    order = np.argsort(ts)
                    f_est = float(1.0 / np.interp(t0, ts[order], inv[order]))
            out[k] = float(np.clip(f_est, min(self.f_max * 0.5, f_est), self.f_max))
        return out

    def effective(self, knob: str, st: int, default_sm_mhz: Mapping[str, float]) -> tuple[float, float]:
        """(SM MHz, memory MHz) a knob runs at in a state: a lock above the default's clock is capped to it."""
        c = self.states[st]
        if c is None:
            return default_sm_mhz[knob], self.m_max
        return min(float(c.sm_mhz), default_sm_mhz[knob]), float(c.mem_mhz)

    def regressors(self, knob_ms: Mapping[str, float], design: Mapping[str, int],
                   default_sm_mhz: Mapping[str, float], lane: int = 0) -> np.ndarray:
        """Per-step regressors: [1, V^2 per knob, T, T*V^2, T*f*V^2, T*m, lane 1.., lane n-1]."""
        nk = len(self.knobs)
        row = np.zeros(1 + nk + 4 + self.lanes - 1)
        row[0] = 1.0
        if lane > 0:
            row[1 + nk + 4 + lane - 1] = 1.0
        for j, k in enumerate(self.knobs):
            f, m = self.effective(k, design.get(k, 0), default_sm_mhz)
            v2 = float(voltage(f, self.f_max)) ** 2
            t = knob_ms.get(k, 0.0) / 1e3
            row[1 + j] = v2
            row[1 + nk:1 + nk + 4] += t * np.array([1.0, v2, f / self.f_max * v2, m / self.m_max])
        return row

    def fit_energy(self, samples: Sequence[Sample], table: TimeTable) -> Optional[EnergyFit]:
        """Least squares over the blocks with energy; None where too few blocks determine it."""
        fd = self.default_clocks(table)
        X, y = [], []
        for s in samples:
            if s.energy_steps <= 0 or not s.knob_ms:
                continue
            X.append(self.regressors(s.knob_ms, s.design, fd, s.lane) * s.energy_steps)
            y.append(s.energy_j)
        if not X:
            return None
        X, y = np.array(X), np.array(y)
        if len(y) < X.shape[1] // 2 + 2:
            return None
        # ridge toward zero on the static shape terms only lightly: they are collinear with the
        # step time, and the plan's predictions only need their combination
        nk = len(self.knobs)
        lam = np.zeros(X.shape[1])
        scale = np.sqrt((X ** 2).mean(0)) + 1e-12
        Xs = X / scale
        lam[1:] = 1e-6 * len(y)
        lam[1 + nk:1 + nk + 4] = 1e-3 * len(y)
        A = Xs.T @ Xs + np.diag(lam)
        coef = np.linalg.lstsq(A, Xs.T @ y, rcond=None)[0] / scale
        resid = y - X @ coef
        dof = max(1, len(y) - X.shape[1])
        return EnergyFit(coef, float(np.sqrt(resid @ resid / dof)), len(y), fd)

    def energy_grid(self, fit: EnergyFit, T: np.ndarray) -> np.ndarray:
        """J per step of every knob at every state where its time is known (up to B_k, which cancels)."""
        nk = len(self.knobs)
        E = np.zeros_like(T)
        s_coef = fit.coef[1 + nk:1 + nk + 4]
        for j, k in enumerate(self.knobs):
            for i in range(len(self.states)):
                if not np.isfinite(T[j, i]):
                    continue
                f, m = self.effective(k, i, fit.default_sm_mhz)
                v2 = float(voltage(f, self.f_max)) ** 2
                static = s_coef @ np.array([1.0, v2, f / self.f_max * v2, m / self.m_max])
                E[j, i] = fit.coef[1 + j] * v2 + T[j, i] / 1e3 * static
        return E
