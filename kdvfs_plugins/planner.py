"""The planner: which clock pair each region of a training step gets.

Input is one training step as a sequence of *occurrences* (regions in step order; a region name may
occur many times, e.g. ``forward/layers.*.mlp`` once per layer), each with its time and energy at
every clock pair, a switch model and an objective. Output is one clock pair per region name.

API
---
``SwitchModel(latency_s=0.006, energy_j_per_switch=None, min_interval_s=0.0, hide_latency=False,
lands_late=False, stall_power_w=100.0)``
    What a clock change costs. Three effects (see ``mode``):

    - ``"stall"`` (default): a switch adds ``latency_s`` to the step and ``energy_j_per_switch``
      (default ``latency_s * stall_power_w``, the power drawn while the change holds the GPU up).
    - ``"late"`` (``lands_late=True``): no stall; the change lands ``latency_s`` after the boundary,
      so the first ``latency_s`` (measured at the default clock) of the region that follows the
      switch still runs at the previous clock: its time and energy are a mix of the two clocks.
      This is what makes switching into short regions worthless. The lag is not carried past the
      end of that region (a region is a stretch of consecutive occurrences of one name), and a
      change cannot be issued before the previous one landed: the floor between switches is at
      least ``latency_s`` (``effective_min_interval_s``). ``energy_j_per_switch`` defaults to 0:
      the energy during the lag is already in the mix.
    - ``"hidden"`` (``hide_latency=True``): the actuator issues the change ``latency_s`` ahead of
      the boundary, so it lands on time; a switch costs only ``energy_j_per_switch`` (default
      ``latency_s * stall_power_w``, the price of the overlapping transition).

    ``min_interval_s``: every run of one clock that ends with a switch must last at least this
    long (time at the run's own clock, idle gaps included) -- the actuator's floor between changes
    (``effective_min_interval_s`` is the floor enforced).

``PlanningProblem(names, time_s, energy_j, clocks, default_index, gap_time_s=None,
gap_energy_j=None, periodic=True)``
    ``names``: one region name per occurrence, in step order. ``time_s``/``energy_j``: arrays
    ``[n_occurrences, n_clocks]``. ``clocks``: the clock pairs (``None`` = the driver default
    state), ``default_index`` the baseline's entry. ``gap_time_s`` ``[n]``: idle after each
    occurrence, ``gap_energy_j`` ``[n]`` or ``[n, n_clocks]``: its energy (at the clock of the
    occurrence before it). ``periodic``: the step repeats, so the clock in force when it starts is
    the clock of its last occurrence (the wrap-around is a switch if they differ); if False the
    step starts in the default state.

``plan(problem, *, granularity="kernel", objective="strict", max_slowdown=0.0,
switch=SwitchModel(), exact_limit=4096) -> PlannedStep``
    ``granularity``: ``iteration`` (one clock pair for the step), ``pass`` (one per phase, via
    :func:`kdvfs_plugins.regions.coarsen`), ``kernel`` (one per region name; neighbours share a
    clock wherever a switch does not pay). ``objective``: ``strict`` (least energy with step time
    <= default time), ``relaxed`` (time <= (1 + max_slowdown) * default time), ``edp`` (least
    energy x time).

``PlannedStep``: ``clocks_by_name`` (keys are the names at the plan's granularity: region names,
phases, or ``"step"``; :meth:`PlannedStep.clocks_for` looks up a fine region name), predicted
``time_s``/``energy_j``, the default step's ``default_time_s``/``default_energy_j``,
``switches`` per step, ``lam`` (the Lagrange multiplier, J/s, of the bound), ``lower_bound`` (on
the objective: J, or J*s for edp), ``gap_bound`` (relative: (found - bound) / found; 0 means
proven optimal), ``exact``, ``granularity``, ``objective``; ``time_change``/``energy_change``:
fractions against the default step (negative = less).

``evaluate(problem, clocks_by_name, switch) -> Evaluation(time_s, energy_j, switches)``: the
planner's own prediction for any assignment (keys: region names, phases, or ``"step"``), under the
same switch model. ``satisfies_min_interval(problem, clocks_by_name, switch) -> bool``.

Method
------
Consecutive occurrences of one name always share a clock, so they are merged into *units*.
The *relaxed* problem lets every unit pick its clock independently; it is solved exactly, for a
batch of multipliers at once, by dynamic programming along the units minimising
``energy + lam * time``: the state is the clock of the current run, a run ``k..u`` at clock ``c``
costs its prefix-sum difference, entering it costs ``min_p(value[p] + lag[p]) + switch - lag[c]``
(one minimum over the previous clock, O(C), because switch cost and lag are separable), and the
minimum interval is a monotone pointer into the prefix minima of run starts. O(units x clocks)
per multiplier, vectorised over clocks and multipliers.

Because dropping the one-clock-per-name rule (and, when periodic, the wrap-around switch and the
first run's interval) only enlarges the feasible set, the relaxed Lagrangian values are lower
bounds: ``max_lam(V(lam) - lam * budget)`` for strict/relaxed, and for edp the minimum of
``T * max_i(V_i - lam_i * T)`` over ``T >= T_min`` (closed form at the envelope's breakpoints).
Feasible plans come from the relaxed paths (each name takes the clock that covers most of its
default time), from the coarser granularities' plans, and from the all-one-clock plans; each is
polished by coordinate descent over names (all clocks of one name at once, by exact incremental
evaluation). A granularity's plan is therefore never worse than a coarser one's.

The multiplier is searched on a geometric grid then refined twice around the best dual value
(strict/relaxed), or by Dinkelbach steps ``lam = E/T`` (edp, whose optimum is a vertex of the
lower convex hull of (time, energy) points, hence a Lagrangian minimiser).

Exactness: ``iteration`` is always solved exactly (enumeration of the clock pairs); so is any
granularity whose assignments number at most ``exact_limit``. Otherwise the result reports
``gap_bound``; it is 0 (and ``exact`` true) only where the bound meets the plan.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .clocks import ClockPair
from .switching import SwitchModel  # noqa: F401  (re-exported: planner users import it here)
from .errors import ConfigError, PlanError
from .regions import STEP, coarsen, lookup

OBJECTIVES = ("strict", "relaxed", "edp")
GRANULARITIES = ("iteration", "pass", "kernel")

# Relative slack on the time budget: plans are compared in floating point, and a plan equal to the
# default step in time must count as meeting a strict budget.
_TIME_RTOL = 1e-12


# --------------------------------------------------------------------------------------------
# Public data
# --------------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=float, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class PlanningProblem:
    """One step: occurrences in order with time and energy at every clock pair."""

    names: tuple[str, ...]
    time_s: np.ndarray
    energy_j: np.ndarray
    clocks: tuple[Optional[ClockPair], ...]
    default_index: int
    gap_time_s: Optional[np.ndarray] = None
    gap_energy_j: Optional[np.ndarray] = None
    periodic: bool = True

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "clocks", tuple(self.clocks))
        n, c = len(names), len(self.clocks)
        if n == 0:
            raise PlanError("the step has no occurrences; measure at least one region before planning")
        if c == 0:
            raise PlanError("no clock pairs given; pass the device's clock pairs (and None for default)")
        if len(set(self.clocks)) != c:
            raise PlanError("clock pairs repeat; pass each clock pair (and None) once")
        for key in ("time_s", "energy_j"):
            a = np.asarray(getattr(self, key), dtype=float)
            if a.shape != (n, c):
                raise PlanError(f"{key} has shape {a.shape}; it must be [n_occurrences, n_clocks] = {(n, c)}")
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                raise PlanError(f"{key} holds negative or non-finite values; measure again or drop those clocks")
            object.__setattr__(self, key, _readonly(a))
        if np.any(self.time_s <= 0):
            raise PlanError("time_s holds zeros; every occurrence must take time at every clock")
        if not (0 <= int(self.default_index) < c):
            raise PlanError(f"default_index {self.default_index} is outside 0..{c - 1}")
        object.__setattr__(self, "default_index", int(self.default_index))
        gt = np.zeros(n) if self.gap_time_s is None else np.asarray(self.gap_time_s, dtype=float)
        if gt.shape != (n,) or not np.all(np.isfinite(gt)) or np.any(gt < 0):
            raise PlanError(f"gap_time_s must be [n_occurrences] = ({n},) of seconds >= 0")
        ge = np.zeros(n) if self.gap_energy_j is None else np.asarray(self.gap_energy_j, dtype=float)
        if ge.ndim == 1:
            ge = np.repeat(ge[:, None], c, axis=1)
        if ge.shape != (n, c) or not np.all(np.isfinite(ge)) or np.any(ge < 0):
            raise PlanError("gap_energy_j must be [n_occurrences] or [n_occurrences, n_clocks] of joules >= 0")
        object.__setattr__(self, "gap_time_s", _readonly(gt))
        object.__setattr__(self, "gap_energy_j", _readonly(ge))

    @property
    def n_occurrences(self) -> int:
        return len(self.names)

    @property
    def n_clocks(self) -> int:
        return len(self.clocks)

    def clock_index(self, clocks: Optional[ClockPair]) -> int:
        try:
            return self.clocks.index(clocks)
        except ValueError:
            raise PlanError(f"clock pair {clocks} is not among the problem's clocks; plan only with "
                            "measured clock pairs") from None


class AgainstDefault:
    """``time_change`` and ``energy_change`` of a result with ``time_s``, ``energy_j``,
    ``default_time_s`` and ``default_energy_j``: fractions against the default (- = less)."""

    @property
    def time_change(self) -> float:
        """Time against the default, as a fraction (+ = slower)."""
        return self.time_s / self.default_time_s - 1.0  # type: ignore[attr-defined]

    @property
    def energy_change(self) -> float:
        """Energy against the default, as a fraction (- = saved)."""
        return self.energy_j / self.default_energy_j - 1.0  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PlannedStep(AgainstDefault):
    """A plan and the planner's prediction for it."""

    clocks_by_name: Mapping[str, Optional[ClockPair]]
    time_s: float
    energy_j: float
    default_time_s: float
    default_energy_j: float
    switches: int
    lam: float
    gap_bound: float
    granularity: str
    objective: str
    lower_bound: float = 0.0
    exact: bool = False
    max_slowdown: float = 0.0


    def clocks_for(self, region_name: str) -> Optional[ClockPair]:
        """The clocks for a region name at any granularity (looks up the name, its phase, the step)."""
        return _lookup(self.clocks_by_name, region_name)


class Evaluation(NamedTuple):
    time_s: float
    energy_j: float
    switches: int


# --------------------------------------------------------------------------------------------
# Internal model: units (maximal blocks of one name at the chosen granularity)
# --------------------------------------------------------------------------------------------


def _lookup(clocks_by_name: Mapping, name: str):
    found, clocks = lookup(clocks_by_name, name)
    if found:
        return clocks
    raise PlanError(f"no clocks for region {name!r}: give it, its phase {coarsen(name, 'pass')!r} "
                    f"or {STEP!r} a clock pair")


class _Units:
    """The step at one granularity, in the form the solver and the evaluator share."""

    def __init__(self, problem: PlanningProblem, coarse: Sequence[str], switch: SwitchModel):
        p = problem
        n, c = p.n_occurrences, p.n_clocks
        self.C = c
        self.periodic = p.periodic
        self.s0 = p.default_index
        tt = p.time_s + p.gap_time_s[:, None]
        ee = p.energy_j + p.gap_energy_j
        starts = [0] + [i for i in range(1, n) if coarse[i] != coarse[i - 1]]
        self.starts = np.array(starts)
        self.m = len(starts)
        self.T = np.add.reduceat(tt, self.starts, axis=0)
        self.E = np.add.reduceat(ee, self.starts, axis=0)
        self.names = list(dict.fromkeys(coarse))
        index = {nm: j for j, nm in enumerate(self.names)}
        self.name_of_unit = np.array([index[coarse[s]] for s in starts])
        self.units_of_name = [np.flatnonzero(self.name_of_unit == j) for j in range(len(self.names))]
        self.tdef = self.T[:, p.default_index]
        self.sw_t = switch.time_s_per_switch
        self.sw_e = switch.energy_j
        self.min_int = float(switch.effective_min_interval_s)
        self.lagT = self.lagE = None
        if switch.mode == "late" and switch.latency_s > 0:
            # The lag covers the first latency_s (default-clock time) of the fine region (block of
            # one problem name) that follows the switch. Fine blocks nest in units, so a unit's lag
            # is its first fine block's and the same assignment costs the same at any granularity.
            fstarts = np.array([0] + [i for i in range(1, n) if p.names[i] != p.names[i - 1]])
            block = np.repeat(np.arange(len(fstarts)), np.diff(np.append(fstarts, n)))
            tref = tt[:, p.default_index]
            cum = np.cumsum(tref) - tref  # default time before each occurrence
            before = cum - cum[fstarts][block]  # ... within its fine block
            alpha = np.clip((switch.latency_s - before) / tref, 0.0, 1.0)
            lagT_f = np.add.reduceat(alpha[:, None] * tt, fstarts, axis=0)
            lagE_f = np.add.reduceat(alpha[:, None] * ee, fstarts, axis=0)
            first_fine = np.searchsorted(fstarts, self.starts)
            self.lagT, self.lagE = lagT_f[first_fine], lagE_f[first_fine]
        self.cumT = np.cumsum(self.T, axis=0)
        self.cumE = np.cumsum(self.E, axis=0)
        self.K = self.Kvalid = None
        if self.min_int > 0:
            # K[u, c]: the latest run start k such that run k..u at clock c lasts >= min_int.
            tol = 1e-9 * self.min_int
            dk = np.vstack([np.zeros((1, c)), self.cumT[:-1]])  # duration before unit k
            self.K = np.empty((self.m, c), dtype=np.intp)
            for j in range(c):
                self.K[:, j] = np.searchsorted(dk[:, j], self.cumT[:, j] - self.min_int + tol, side="right") - 1
            if self.periodic:
                # Relaxation: the first linear run may be the tail of the wrap-around run.
                self.Kvalid = np.ones((self.m, c), dtype=bool)
                np.maximum(self.K, 0, out=self.K)
            else:
                self.Kvalid = self.K >= 0
                np.maximum(self.K, 0, out=self.K)

    # ---- evaluation -------------------------------------------------------------------------

    def _prev(self, X: np.ndarray, wrap: bool = True) -> np.ndarray:
        if self.periodic:
            prev = np.roll(X, 1, axis=-1)
            if not wrap:
                prev[..., 0] = X[..., 0]
            return prev
        return np.concatenate([np.full(X.shape[:-1] + (1,), self.s0, dtype=X.dtype), X[..., :-1]], axis=-1)

    def evaluate(self, X: np.ndarray, wrap: bool = True):
        """Time, energy, switches of unit assignments ``X`` ``[batch, m]`` (or ``[m]``)."""
        X = np.asarray(X)
        rows = np.arange(self.m)
        prev = self._prev(X, wrap)
        sw = prev != X
        t = self.T[rows, X]
        e = self.E[rows, X]
        if self.lagT is not None:
            t = t + sw * (self.lagT[rows, prev] - self.lagT[rows, X])
            e = e + sw * (self.lagE[rows, prev] - self.lagE[rows, X])
        nsw = sw.sum(-1)
        return t.sum(-1) + nsw * self.sw_t, e.sum(-1) + nsw * self.sw_e, nsw

    def interval_ok(self, x: np.ndarray) -> bool:
        """Every run that ends with a switch lasts at least min_interval_s."""
        return bool(self.interval_ok_batch(np.asarray(x)[None, :])[0])

    def interval_ok_batch(self, X: np.ndarray) -> np.ndarray:
        """``interval_ok`` for each row of ``X`` ``[batch, m]``: run sums by one bincount."""
        B, m = X.shape
        if self.min_int <= 0:
            return np.ones(B, dtype=bool)
        sw = self._prev(X) != X
        d = self.T[np.arange(m), X]
        rid = np.cumsum(sw, axis=1)  # run number of each unit
        flat = (np.arange(B)[:, None] * (m + 1) + rid).ravel()
        sums = np.bincount(flat, weights=d.ravel(), minlength=B * (m + 1)).reshape(B, m + 1)
        last = rid[:, -1]
        rows = np.arange(B)
        if self.periodic:
            # Units before the first switch close the cyclic run that the last switch opens.
            sums[rows, last] += np.where(last > 0, sums[:, 0], 0.0)
            lo, hi = np.ones(B, dtype=np.intp), last
        else:
            lo, hi = rid[:, 0], last - 1  # the step's last run ends without a switch
        ids = np.arange(m + 1)[None, :]
        check = (ids >= lo[:, None]) & (ids <= hi[:, None])
        lim = self.min_int - 1e-9 * self.min_int
        return np.all((sums >= lim) | ~check, axis=1)

    def delta(self, x: np.ndarray, j: int):
        """Change of step time and energy for every clock of name ``j``, the others as in ``x``.

        Only name j's units and their successors change cost. A switch's lag term vanishes when
        the clocks are equal, so every term is a row sum or a count: O(units of j x clocks).
        """
        uj = self.units_of_name[j]
        m, C = self.m, self.C
        in_j = np.zeros(m, dtype=bool)
        in_j[uj] = True
        if self.periodic:
            pu = (uj - 1) % m
            a = uj[~in_j[pu]]  # entered from another name
            pa = x[(a - 1) % m]
            v = (uj + 1) % m
        else:
            pu = uj - 1
            entered = (pu < 0) | ~in_j[np.maximum(pu, 0)]
            a = uj[entered]
            pa = np.where(a > 0, x[np.maximum(a - 1, 0)], self.s0)
            v = uj[uj + 1 < m] + 1
        v = v[~in_j[v]]  # left into another name
        xv = x[v]
        n_sw = (len(a) - np.bincount(pa, minlength=C)) + (len(v) - np.bincount(xv, minlength=C))

        def f(tab, lag, per_switch):
            out = tab[uj].sum(0) + per_switch * n_sw
            if lag is not None:
                out = out + (lag[a, pa].sum() - lag[a].sum(0)) + (lag[v].sum(0) - lag[v, xv].sum())
            return out

        ft = f(self.T, self.lagT, self.sw_t)
        fe = f(self.E, self.lagE, self.sw_e)
        cur = x[uj[0]]
        return ft - ft[cur], fe - fe[cur]

    # ---- relaxed dynamic programme -------------------------------------------------------------

    def dp(self, w_e: np.ndarray, w_t: np.ndarray, paths: bool = True):
        """Minimise w_e*energy + w_t*time over per-unit clocks, for each row of weights.

        Returns the values [L] (without the periodic wrap-around switch) and, with ``paths``, the
        optimal unit assignments [L, m].
        """
        w_e = np.asarray(w_e, float)
        w_t = np.asarray(w_t, float)
        L, m, C = len(w_e), self.m, self.C
        S = w_e * self.sw_e + w_t * self.sw_t
        P = w_e[None, :, None] * self.cumE[:, None, :] + w_t[None, :, None] * self.cumT[:, None, :]
        lag = None
        if self.lagT is not None:
            lag = w_e[None, :, None] * self.lagE[:, None, :] + w_t[None, :, None] * self.lagT[:, None, :]
        # q[l, c]: cost of everything before a run that starts at unit u at clock c, minus the
        # run's prefix sum before u; R is its running minimum over run starts.
        if self.periodic:
            # Free start: the wrap-around switch is relaxed to its cheapest possible cost, which
            # is negative when the lag would run on a cheaper previous clock.
            q = np.zeros((L, C))
            if lag is not None:
                q = np.minimum(q, S[:, None] + lag[0].min(1)[:, None] - lag[0])
        else:
            q = np.repeat(S[:, None], C, axis=1)
            if lag is not None:
                q += lag[0][:, [self.s0]] - lag[0]
            q[:, self.s0] = 0.0
        R = q
        arL, arC = np.arange(L), np.arange(C)
        Rk = np.zeros((L, C), dtype=np.int32)
        Rk_hist = np.zeros((m, L, C), dtype=np.int32) if paths else None
        ap_hist = np.zeros((m, L), dtype=np.intp) if paths else None
        use_k = self.K is not None
        R_hist = np.empty((m, L, C)) if use_k else None

        def eligible(u):
            # G[l, c]: best cost of units 0..u ending at clock c in a run long enough to switch.
            if not use_k:
                return R + P[u]
            g = R_hist[self.K[u], :, arC].T + P[u]
            g[:, ~self.Kvalid[u]] = np.inf
            return g

        if use_k:
            R_hist[0] = R
        G = eligible(0)
        for u in range(1, m):
            tmp = G + lag[u] if lag is not None else G
            if paths:
                ap = tmp.argmin(1)
                ap_hist[u] = ap
                bp = tmp[arL, ap]
            else:
                bp = tmp.min(1)
            q = (bp + S)[:, None] - P[u - 1]
            if lag is not None:
                q -= lag[u]
            better = q < R
            R = np.where(better, q, R)
            if paths:
                Rk = np.where(better, np.int32(u), Rk)
                Rk_hist[u] = Rk
            if use_k:
                R_hist[u] = R
            G = eligible(u)
        H = R + P[m - 1]
        values = H.min(1)
        if not paths:
            return values, None
        X = np.empty((L, m), dtype=np.intp)
        for l in range(L):
            u = m - 1
            c = int(H[l].argmin())
            k = int(Rk_hist[u, l, c])
            while True:
                X[l, k:u + 1] = c
                if k == 0:
                    break
                c = int(ap_hist[k, l])
                u = k - 1
                k = int(Rk_hist[self.K[u, c] if use_k else u, l, c])
        return values, X

    def to_names(self, X: np.ndarray) -> np.ndarray:
        """Name-consistent clocks from unit clocks: each name takes the clock covering most of its
        default time (ties to the lower index)."""
        X = np.atleast_2d(X)
        k = len(self.names)
        out = np.empty((X.shape[0], k), dtype=np.intp)
        for b in range(X.shape[0]):
            W = np.zeros((k, self.C))
            np.add.at(W, (self.name_of_unit, X[b]), self.tdef)
            out[b] = W.argmax(1)
        return out


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _fine_units(problem: PlanningProblem, clocks_by_name: Mapping, switch: SwitchModel):
    units = _Units(problem, problem.names, switch)
    y = np.array([problem.clock_index(_lookup(clocks_by_name, nm)) for nm in units.names], dtype=np.intp)
    return units, y[units.name_of_unit]


def evaluate(problem: PlanningProblem, clocks_by_name: Mapping[str, Optional[ClockPair]],
             switch: SwitchModel = SwitchModel()) -> Evaluation:
    """Predicted step time, energy and switch count of an assignment (region, phase or step keys)."""
    units, x = _fine_units(problem, clocks_by_name, switch)
    t, e, n = units.evaluate(x)
    return Evaluation(float(t), float(e), int(n))


def satisfies_min_interval(problem: PlanningProblem, clocks_by_name: Mapping[str, Optional[ClockPair]],
                           switch: SwitchModel = SwitchModel()) -> bool:
    """Whether every run that ends in a switch lasts at least ``switch.min_interval_s``."""
    units, x = _fine_units(problem, clocks_by_name, switch)
    return units.interval_ok(x)


class _Search:
    """Keeps the best name assignment found for one objective."""

    def __init__(self, units: _Units, objective: str, budget_s: float):
        self.u = units
        self.objective = objective
        self.budget_s = budget_s
        self.best_key = (math.inf, math.inf)
        self.best_y = None
        self.best_te = None
        self.seen: set[bytes] = set()

    def key(self, t, e):
        """Lexicographic (budget excess, objective); vectorised."""
        t = np.asarray(t, float)
        e = np.asarray(e, float)
        if self.objective == "edp":
            return np.zeros_like(t), e * t
        excess = np.maximum(t - self.budget_s * (1 + _TIME_RTOL), 0.0)
        return excess, e

    def offer(self, y: np.ndarray) -> bool:
        x = y[self.u.name_of_unit]
        if not self.u.interval_ok(x):
            return False
        t, e, _ = self.u.evaluate(x)
        k = tuple(float(v) for v in self.key(t, e))
        if k < self.best_key:
            self.best_key, self.best_y, self.best_te = k, y.copy(), (float(t), float(e))
        return True

    def polish(self, y: np.ndarray, max_sweeps: int = 8) -> None:
        """Coordinate descent over names from a feasible start; offers the result."""
        u = self.u
        y = y.copy()
        x = y[u.name_of_unit]
        if not u.interval_ok(x):
            return
        t, e, _ = u.evaluate(x)
        t, e = float(t), float(e)
        order = np.argsort([-u.tdef[idx].sum() for idx in u.units_of_name], kind="stable")
        for _ in range(max_sweeps):
            improved = False
            for j in order:
                dt, de = u.delta(x, j)
                nt, ne = t + dt, e + de
                ex, ob = self.key(nt, ne)
                ex0, ob0 = (float(v) for v in self.key(t, e))
                cands = np.lexsort((ob, ex))[:16]
                better = (ex[cands] < ex0) | ((ex[cands] == ex0) & (ob[cands] < ob0 - 1e-12 * abs(ob0)))
                cands = cands[better & (cands != y[j])]
                if len(cands) == 0:
                    continue
                X_try = np.repeat(x[None, :], len(cands), axis=0)
                X_try[:, u.units_of_name[j]] = cands[:, None]
                ok = np.flatnonzero(u.interval_ok_batch(X_try))
                if len(ok):
                    c = int(cands[ok[0]])
                    y[j] = c
                    x = X_try[ok[0]]
                    t, e = float(nt[c]), float(ne[c])
                    improved = True
            if not improved:
                break
        self.offer(y)


def _lam_scale(units: _Units, d: int) -> float:
    t = units.T[:, d].sum()
    return max(units.E[:, d].sum() / t, 1e-12)


def plan(problem: PlanningProblem, *, granularity: str = "kernel", objective: str = "strict",
         max_slowdown: float = 0.0, switch: SwitchModel = SwitchModel(),
         exact_limit: int = 4096) -> PlannedStep:
    """Choose one clock pair per region (at ``granularity``) for ``objective``. See the module doc."""
    if granularity not in GRANULARITIES:
        raise ConfigError("granularity", granularity, f"use one of {', '.join(GRANULARITIES)}", source="planner")
    if objective not in OBJECTIVES:
        raise ConfigError("objective", objective, f"use one of {', '.join(OBJECTIVES)}", source="planner")
    if not (isinstance(max_slowdown, (int, float)) and math.isfinite(max_slowdown) and max_slowdown >= 0):
        raise ConfigError("max_slowdown", max_slowdown, "use a fraction >= 0, e.g. 0.01 for 1%", source="planner")
    if objective == "strict":
        max_slowdown = 0.0
    coarse = [coarsen(nm, granularity) for nm in problem.names]
    units = _Units(problem, coarse, switch)
    d = problem.default_index
    k, C = len(units.names), units.C
    x_def = np.full(units.m, d, dtype=np.intp)
    t_def, e_def, _ = units.evaluate(x_def)
    t_def, e_def = float(t_def), float(e_def)
    budget_s = t_def * (1.0 + max_slowdown)
    search = _Search(units, objective, budget_s)

    # Seeds: every one-clock plan (always interval-feasible), and the coarser plans.
    # One clock everywhere has no switch inside the step, so every such plan is interval-feasible.
    one = np.repeat(np.arange(C, dtype=np.intp)[:, None], k, axis=1)
    t1, e1, _ = units.evaluate(one[:, units.name_of_unit])
    ex1, ob1 = search.key(t1, e1)
    search.offer(one[np.lexsort((ob1, ex1))[0]])
    lam_found = 0.0
    if granularity != "iteration":
        coarser = "pass" if granularity == "kernel" else "iteration"
        sub = plan(problem, granularity=coarser, objective=objective, max_slowdown=max_slowdown,
                   switch=switch, exact_limit=exact_limit)
        y = np.array([problem.clock_index(_lookup(sub.clocks_by_name, nm)) for nm in units.names], dtype=np.intp)
        search.offer(y)

    exact = False
    lower = -math.inf
    if C ** k <= exact_limit:
        _enumerate(search, k, C)
        exact = True
    else:
        lower, lam_found = _lagrangian(search, units, objective, budget_s)

    y = search.best_y
    t, e = search.best_te
    x = y[units.name_of_unit]
    _, _, nsw = units.evaluate(x)
    obj = e * t if objective == "edp" else e
    if exact:
        lower, gap = obj, 0.0
        if objective == "edp":
            lam_found = e / t
    else:
        gap = max(0.0, (obj - lower) / obj) if obj > 0 else 0.0
        if gap <= 1e-12:
            gap, exact = 0.0, True
    clocks_by_name = {nm: problem.clocks[int(y[j])] for j, nm in enumerate(units.names)}
    return PlannedStep(clocks_by_name=clocks_by_name, time_s=t, energy_j=e, default_time_s=t_def,
                       default_energy_j=e_def, switches=int(nsw), lam=float(lam_found), gap_bound=float(gap),
                       granularity=granularity, objective=objective, lower_bound=float(lower), exact=exact,
                       max_slowdown=float(max_slowdown))


def _enumerate(search: _Search, k: int, C: int, chunk: int = 4096) -> None:
    u = search.u
    it = itertools.product(range(C), repeat=k)
    while True:
        Y = np.array(list(itertools.islice(it, chunk)), dtype=np.intp).reshape(-1, k)
        if len(Y) == 0:
            return
        t, e, _ = u.evaluate(Y[:, u.name_of_unit])
        ex, ob = search.key(t, e)
        for b in np.lexsort((ob, ex)):
            if (float(ex[b]), float(ob[b])) >= search.best_key:
                break
            if search.offer(Y[b]):
                break


def _lagrangian(search: _Search, units: _Units, objective: str, budget_s: float) -> tuple[float, float]:
    """Dual search with DP; offers repaired relaxed plans; returns (lower bound, multiplier)."""
    scale = _lam_scale(units, units.s0)
    lams_all: list[np.ndarray] = []
    vals_all: list[np.ndarray] = []
    points: dict[float, tuple[float, float]] = {}  # lam -> relaxed (time, energy) of its path
    candidates: list[np.ndarray] = []

    def run(lams):
        lams = np.asarray(lams, float)
        v, X = units.dp(np.ones_like(lams), lams)
        lams_all.append(lams)
        vals_all.append(v)
        t, e, _ = units.evaluate(X, wrap=False)
        for i, lam in enumerate(lams):
            points[float(lam)] = (float(t[i]), float(e[i]))
        candidates.extend(units.to_names(X))
        return v

    # A coarse geometric grid around the default power, then the multiplier is refined where the
    # relaxed step time crosses the budget, by the slope between the two bracketing solutions
    # (the next breakpoint of the concave dual), falling back to bisection.
    grid = np.concatenate([[0.0], scale * np.geomspace(1e-2, 1e2, 7)])
    run(grid)
    if objective in ("strict", "relaxed"):
        if points[grid[-1]][0] > budget_s:
            run(scale * np.geomspace(1e3, 1e6, 4))
        for _ in range(8):
            lams = sorted(points)
            feas = [lam for lam in lams if points[lam][0] <= budget_s * (1 + _TIME_RTOL)]
            infeas = [lam for lam in lams if points[lam][0] > budget_s * (1 + _TIME_RTOL)]
            if not feas or not infeas or min(feas) == 0.0:
                break
            hi = min(feas)
            lo = max(lam for lam in infeas if lam < hi) if any(lam < hi for lam in infeas) else 0.0
            (t_lo, e_lo), (t_hi, e_hi) = points[lo], points[hi]
            nxt = (e_hi - e_lo) / (t_lo - t_hi) if t_lo > t_hi else math.nan
            if not (lo < nxt < hi) or nxt in points:
                if nxt in points or hi - lo <= 1e-9 * hi:
                    break  # the bracketing solutions meet at the breakpoint: the dual optimum
                nxt = 0.5 * (lo + hi)
            run([nxt])
        lam_all = np.concatenate(lams_all)
        g_all = np.concatenate(vals_all) - lam_all * budget_s
        i = int(np.argmax(g_all))
        lower, lam = float(g_all[i]), float(lam_all[i])
    else:
        t_min = float(units.dp(np.zeros(1), np.ones(1), paths=False)[0][0])
        _offer_all(search, candidates)
        for _ in range(2):
            t, e = search.best_te
            lam0 = e / t
            # Dinkelbach step: the edp optimum minimises energy + (E*/T*) * time.
            run(lam0 * np.array([0.9, 1.0, 1.1]))
            _offer_all(search, candidates)
        lam_all = np.concatenate(lams_all)
        v_all = np.concatenate(vals_all)
        lower = _edp_bound(lam_all, v_all, t_min)
        t, e = search.best_te
        lam = e / t
    _offer_all(search, candidates)
    return lower, lam


def _offer_all(search: _Search, candidates: list[np.ndarray], n_polish: int = 2) -> None:
    seen = search.seen
    fresh = []
    for y in candidates:
        b = y.tobytes()
        if b not in seen:
            seen.add(b)
            fresh.append(y)
    candidates.clear()
    if not fresh:
        return
    Y = np.array(fresh)
    u = search.u
    t, e, _ = u.evaluate(Y[:, u.name_of_unit])
    ex, ob = search.key(t, e)
    order = np.lexsort((ob, ex))
    # Polish the best few starts (and the incumbent); coordinate descent is the costly part.
    starts = [Y[b] for b in order[:n_polish]]
    if search.best_y is not None:
        starts.append(search.best_y)
    for y in starts:
        search.polish(y)


def _edp_bound(lams: np.ndarray, values: np.ndarray, t_min: float) -> float:
    """min over T >= t_min of T * max_i(values_i - lams_i * T): a lower bound on energy x time.

    Each line bounds the energy of any plan of time T; the product is concave on each piece of the
    envelope, so its minimum lies at a breakpoint or at t_min.
    """
    cand = [t_min]
    for i in range(len(lams)):
        for j in range(i + 1, len(lams)):
            dl = lams[i] - lams[j]
            if dl != 0:
                t = (values[i] - values[j]) / dl
                if t >= t_min and math.isfinite(t):
                    cand.append(t)
    T = np.array(cand)
    h = np.max(values[None, :] - lams[None, :] * T[:, None], axis=1)
    return float(max(0.0, np.min(T * np.maximum(h, 0.0))))
