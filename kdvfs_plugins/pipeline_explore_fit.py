"""Measured tables of a pipeline exploration, and the graph the critical-path planner solves on them.

Times are exact from the markers: every stage times each of its instructions (forward and
backward per microbatch, the optimizer step) in every iteration, so an instruction's time at a
clock is the mean over the iterations it ran at that clock. Energy is not: a stage's meter gives
only window energies. Per stage, the block energies are fitted by least squares to

    block energy = sum over (kind, state) of time x power(kind, state) + wait time x wait power(state)

(kinds: forward, backward, optimizer, allreduce; the wait time is the iteration less the stage's
instructions), with each kind's power a smooth function of the clocks (:func:`fit_powers`). An instruction's energy at a state is its measured time there times that power.
States an instruction was not measured at are left out of the graph (a time no float can hold).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .pipeline_planner import PipelineGraph

__all__ = ["PipelineShape", "StageBlock", "Tables", "fit_powers", "measured_graph", "EXCLUDED_S"]

#: The time given to an (instruction, state) never measured: no float holds it, so the planner
#: never picks it.
EXCLUDED_S = 1e3
WAIT = "wait"
#: Kinds that share one power curve in the fit. Forward and backward are both matrix products
#: at the same shapes; in block energies their powers are confounded (they run in every block in
#: the same proportion), and one curve for both is what the blocks resolve. On the simulated H100
#: their powers differ by up to 9% at mid clocks: a bias the validation measures, not the fit.
POWER_CLASS = {"forward": "compute", "backward": "compute"}


@dataclass(frozen=True)
class PipelineShape:
    """The schedule every stage runs (what the pipeline adapter knows): per rank its instructions
    in program order, the data dependences with their transfer delays, each instruction's kind,
    microbatch and region name (``forward/pipe.mb3``)."""

    order: tuple[tuple[int, ...], ...]
    preds: tuple[tuple[tuple[int, float], ...], ...]
    kinds: tuple[str, ...]
    regions: tuple[str, ...]

    @property
    def ranks(self) -> int:
        return len(self.order)

    def graph(self, time_s: np.ndarray, energy_j: np.ndarray, wait_power_w: np.ndarray) -> PipelineGraph:
        return PipelineGraph(self.order, self.preds, time_s, energy_j, wait_power_w, self.kinds)


@dataclass(frozen=True)
class StageBlock:
    """What one rank measured in one block (frozen: it travels through the exchange).

    ``node_ms``: (node, total ms, iterations) of its instructions; ``step_ms``: each iteration's
    time; ``energy_j``: its meter's energy over ``energy_steps`` iterations of the block (0 where no
    window fell inside the block); ``measuring``: False where the rank could not set its clocks (it
    ran the default clocks, not the block's design)."""

    rank: int
    block: int
    measuring: bool
    node_ms: tuple[tuple[int, float, int], ...]
    step_ms: tuple[float, ...]
    energy_j: float
    energy_steps: int


@dataclass
class Tables:
    """Every rank's measurements, accumulated from the exchanged blocks (the same on every rank)."""

    n_nodes: int
    n_states: int
    time_sum_ms: np.ndarray = field(init=False)
    time_n: np.ndarray = field(init=False)
    #: per rank: (features {(kind, state): s}, energy_j) of each measured block window
    rows: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.time_sum_ms = np.zeros((self.n_nodes, self.n_states))
        self.time_n = np.zeros((self.n_nodes, self.n_states))

    def add_times(self, node: int, state: int, total_ms: float, count: int) -> None:
        self.time_sum_ms[node, state] += total_ms
        self.time_n[node, state] += count

    def time_s(self) -> np.ndarray:
        """Mean time per (node, state); NaN where never measured."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.time_n > 0, self.time_sum_ms / np.maximum(self.time_n, 1) / 1e3, np.nan)

    def add_row(self, rank: int, features: dict, energy_j: float) -> None:
        self.rows.setdefault(rank, []).append((features, energy_j))


def _basis(clock, top_sm: float, top_mem: float) -> tuple[str, ...] | dict:
    """The power model's terms at one state: a column of its own for the default; for a lock, a
    cubic in the SM clock (dynamic power grows with frequency and the square of the voltage) and a
    term for a memory clock below the top."""
    if clock is None:
        return {"default": 1.0}
    x = clock.sm_mhz / top_sm
    return {"1": 1.0, "x": x, "x3": x ** 3, "mem": 1.0 - clock.mem_mhz / top_mem}


def fit_powers(rows: Sequence[tuple[dict, float]], clocks: Sequence) -> dict:
    """Power (W) of every (kind, state) from the block energies: least squares on a smooth model
    per kind (:func:`_basis`), so that a state measured in a few blocks borrows from its
    neighbours; a wait's power is fitted per state it was measured at. Kinds or wait states the
    rows never held are absent.

    The iteration time hardly moves between blocks, so the block energies pin every power of a
    rank only up to one common offset (adding it to every power, waits included, changes a block's
    energy by the offset times the iteration time less the time the powers cover: about nothing).
    The plan does not depend on it (an instruction's cost is its energy less the wait it fills),
    but absolute powers here may be off by it, even negative: :func:`measured_graph` aligns the
    ranks' offsets on their lowest wait clock."""
    locks = [c for c in clocks if c is not None]
    top_sm = float(max(c.sm_mhz for c in locks))
    top_mem = float(max(c.mem_mhz for c in locks))
    terms = {s: _basis(c, top_sm, top_mem) for s, c in enumerate(clocks)}

    def columns(key) -> dict:
        kind, s = key
        if kind == WAIT:
            return {(WAIT, s): 1.0}
        return {(POWER_CLASS.get(kind, kind), t): v for t, v in terms[s].items()}

    cols = sorted({c for f, _ in rows for key in f for c in columns(key)}, key=str)
    if not cols:
        return {}
    at = {c: j for j, c in enumerate(cols)}
    A = np.zeros((len(rows), len(cols)))
    for i, (f, _) in enumerate(rows):
        for key, tau in f.items():
            for c, v in columns(key).items():
                A[i, at[c]] += tau * v
    y = np.array([e for _, e in rows])
    # Columns scaled to unit norm and a light ridge: terms a design never separated stay small
    # instead of cancelling each other.
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0] = 1.0
    As = A / scale
    ridge = 1e-3 * float(np.linalg.norm(As, 2))
    aug = np.vstack([As, ridge * np.eye(len(cols))])
    x = np.linalg.lstsq(aug, np.concatenate([y, np.zeros(len(cols))]), rcond=None)[0] / scale
    coef = dict(zip(cols, x))
    out = {}
    kinds = {k for f, _ in rows for k, _ in f if k != WAIT}
    for kind in kinds:
        cls = POWER_CLASS.get(kind, kind)
        for s in terms:
            if all((cls, t) in coef for t in terms[s]):
                w = sum(coef[(cls, t)] * v for t, v in terms[s].items())
                out[(kind, s)] = float(w)
    for (kind, s), v in coef.items():
        if kind == WAIT:
            out[(WAIT, s)] = float(v)
    return out


def _interpolate(values: dict[int, float], sm_mhz: Sequence[float], n_states: int) -> np.ndarray:
    """One value per state from the measured ones, linear in the SM clock, clamped at the ends."""
    known = sorted((sm_mhz[s], v) for s, v in values.items())
    xs = np.array([k[0] for k in known])
    ys = np.array([k[1] for k in known])
    return np.array([float(np.interp(sm_mhz[s], xs, ys)) for s in range(n_states)])


def measured_graph(shape: PipelineShape, tables: Tables, powers: dict[int, dict], sm_mhz: Sequence[float],
                   pinned: Sequence[int] = ()) -> Optional[PipelineGraph]:
    """The planner's graph from the measurements: per node its measured states, energies from the
    fitted powers; ``pinned`` ranks keep the default state only (they cannot set clocks).

    ``powers``: per rank, (kind, state) -> W (``fit_powers``). ``sm_mhz``: per state, for the wait
    power between measured wait states (the default counts as the top clock, where a waiting card
    sits). None when a node has no default time or the wait power was never measured."""
    t = tables.time_s()
    n, c = t.shape
    if np.isnan(t[:, 0]).any():
        return None
    time_s = np.full((n, c), EXCLUDED_S)
    energy_j = np.full((n, c), EXCLUDED_S * 1e3)
    rank_of = {i: r for r, seq in enumerate(shape.order) for i in seq}
    waits: dict[int, list[float]] = {}
    for r, pw in powers.items():
        if r in pinned:
            continue
        for (kind, s), w in pw.items():
            if kind == WAIT and w is not None:
                waits.setdefault(s, []).append(w)
    if not waits:
        return None
    # One common offset per rank is not resolved by the fit (fit_powers): align every rank on the
    # mean of the ranks' powers at the lowest wait clock all of them measured.
    common = [s for s in waits if len(waits[s]) == len(waits[min(waits, key=lambda k: sm_mhz[k])])]
    low = min(common or waits, key=lambda k: sm_mhz[k])
    anchor = float(np.mean(waits[low]))
    aligned: dict[int, dict] = {}
    for r, pw in powers.items():
        if r in pinned:
            continue
        shift = anchor - pw.get((WAIT, low), anchor) if pw.get((WAIT, low)) is not None else 0.0
        aligned[r] = {k: (None if v is None else v + shift) for k, v in pw.items()}
    powers = aligned
    waits = {}
    for pw in powers.values():
        for (kind, s), w in pw.items():
            if kind == WAIT and w is not None:
                waits.setdefault(s, []).append(w)
    wait_power = _interpolate({s: float(np.mean(v)) for s, v in waits.items()}, sm_mhz, c)
    for i in range(n):
        r = rank_of[i]
        pw = powers.get(r, {})
        for s in range(c):
            if np.isnan(t[i, s]) or (r in pinned and s != 0):
                continue
            w = pw.get((shape.kinds[i], s))
            if w is None:
                if s != 0:
                    continue
                # no energy for the default: the node is only timed (it costs the same in any plan)
                w = 0.0
            time_s[i, s] = t[i, s]
            energy_j[i, s] = t[i, s] * w
    return shape.graph(time_s, energy_j, wait_power)
