"""Clocks for a pipeline-parallel iteration, chosen on the schedule's graph.

A pipeline iteration is a graph: per stage and microbatch a forward and a backward instruction,
per rank an optional gradient all-reduce and the optimizer step; edges for the data dependences
(point-to-point transfers carry a delay) and each rank's program order. The iteration time is the
graph's longest path. Work off that path can run at lower clocks until it meets it (the
time-cost trade-off of Perseus); waits and bubbles can take the lowest clock.

API
---
``PipelineGraph(order, preds, time_s, energy_j, wait_power_w, kinds, default_state=0)``
    ``order``: per rank its node indices in program order; ``preds``: per node ``(pred, delay_s)``;
    ``time_s``/``energy_j``: ``[nodes, states]`` at every clock state (state ``default_state`` is
    the driver's default); ``wait_power_w``: ``[states]``, what a waiting GPU draws; ``kinds``:
    per node ``forward``/``backward``/``allreduce``/``optimizer``.
``evaluate(graph, node_state, wait_state, min_wait_s=0.0) -> Evaluation``
    Iteration time and energy of an assignment, changes landing on their boundaries. Per rank,
    ``wait_state`` is the state its waits take (None: the clock in force stays), for waits of at
    least ``min_wait_s``; shorter waits keep the clock in force.
``plan_critical_path(graph, *, max_slowdown=0.0, switch) -> PipelinePlan``
    The time-cost trade-off (method below).
``plan_envpipe(graph, *, max_slowdown=0.0, switch, sm_states)``: EnvPipe's heuristic.
``plan_per_gpu(graph, *, clocks, switch)``: today's plan: each rank plans its own step alone
    with :func:`kdvfs_plugins.planner.plan` (strict, one clock per phase), knowing nothing of waits.

Method (``critical_path``)
--------------------------
With every long wait at the wait state, the iteration's energy is
``sum_n E_n(c_n) + sum_r P_wait,r * (T - busy_r)``, so at a fixed iteration time each node costs
``J_n(c) = E_n(c) - P_wait * t_n(c)``: slowing a node pays when the energy it saves exceeds what
the wait it fills would have drawn. The solver:

1. free moves: every node takes its cheapest state that is not slower than the default (the
   iteration cannot get longer);
2. slack-greedy: compute every node's total float against the budget (earliest finish from a
   forward pass, latest finish from a backward pass from ``T_budget``); among all moves that fit
   in their node's float, take the one that saves most ``J`` per second of float it uses; repeat
   (a move is one node to one state; the schedule is recomputed after each);
3. polish: coordinate descent, every node to its cheapest state within its float, until nothing
   moves; the result is checked by :func:`evaluate` (exact, with the wait rule) and the better of
   the greedy and polished plans is kept. Strict: ``T <= T_default`` (``max_slowdown=0``).

Why not ``lowtime`` (Perseus's Phillips-Dessouky solver): it fits a continuous exponential cost
model to each node's options and quantises time, so its frontier is an approximation of the
discrete clock table, and it pulls in scikit-learn, scipy and a compiled Rust extension for a
core module that must stay light. The graphs here are small (tens to hundreds of nodes); the
greedy above works on the exact discrete table, respects the budget by construction and runs in
about a second. It gives no optimality bound (neither does lowtime's fitted model). Evaluated on
the 4 x 8 1F1B graph (docs/pipeline.md): lowtime with 1 ms quanta took 9-12 s and, checked in
real time, saved 25.77% strict; this solver 25.92% in 0.6 s of CPU.

Switch costs come from :mod:`kdvfs_plugins.switching`. Issued ahead, changes land on time; a
wait gets the wait state only if it lasts at least the switch model's floor between changes
(``effective_min_interval_s``; the instructions themselves last longer than the floor). Landing
late (``lands_late``), a change takes effect ``latency_s`` into the node after the boundary
(:func:`node_costs`); the planners then keep waits at the clock in force and check each move with
the late landings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError
from .planner import AgainstDefault
from .switching import SwitchModel

__all__ = ["PipelineGraph", "Evaluation", "PipelinePlan", "evaluate", "node_costs", "schedule_times",
           "plan_critical_path", "plan_envpipe", "plan_per_gpu", "default_plan", "clocks_summary", "PLANNERS"]

PLANNERS = ("default", "per_gpu", "envpipe", "critical_path")
# Floats below this are the critical path (seconds): the forward and backward passes round.
_FLOAT_EPS_S = 1e-9


@dataclass(frozen=True, eq=False)
class PipelineGraph:
    order: tuple[tuple[int, ...], ...]
    preds: tuple[tuple[tuple[int, float], ...], ...]
    time_s: np.ndarray
    energy_j: np.ndarray
    wait_power_w: np.ndarray
    kinds: tuple[str, ...]
    default_state: int = 0

    def __post_init__(self) -> None:
        n = len(self.preds)
        if self.time_s.shape != self.energy_j.shape or self.time_s.shape[0] != n:
            raise ConfigError("graph", self.time_s.shape, f"time_s and energy_j of shape [{n}, states]",
                              source="pipeline planner")
        if len(self.wait_power_w) != self.time_s.shape[1] or len(self.kinds) != n:
            raise ConfigError("graph", len(self.wait_power_w), "one wait power per state and one kind per node",
                              source="pipeline planner")
        rank_of = [-1] * n
        for r, seq in enumerate(self.order):
            for i in seq:
                rank_of[i] = r
        if min(rank_of, default=0) < 0:
            raise ConfigError("graph", "order", "every node in exactly one rank's order", source="pipeline planner")
        object.__setattr__(self, "rank_of", tuple(rank_of))
        # Program order as an edge, then one topological order for the forward and backward passes.
        prev = [-1] * n
        for seq in self.order:
            for a, b in zip(seq, seq[1:]):
                prev[b] = a
        object.__setattr__(self, "prev", tuple(prev))
        succs: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        indeg = [0] * n
        for i in range(n):
            for p, d in self.preds[i]:
                succs[p].append((i, d))
                indeg[i] += 1
            if prev[i] >= 0:
                succs[prev[i]].append((i, 0.0))
                indeg[i] += 1
        topo, ready = [], [i for i in range(n) if indeg[i] == 0]
        while ready:
            i = ready.pop()
            topo.append(i)
            for j, _ in succs[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    ready.append(j)
        if len(topo) != n:
            raise ConfigError("graph", "cycle", "an acyclic schedule", source="pipeline planner")
        object.__setattr__(self, "topo", tuple(topo))
        object.__setattr__(self, "succs", tuple(tuple(s) for s in succs))

    @property
    def n_nodes(self) -> int:
        return len(self.preds)

    @property
    def n_states(self) -> int:
        return self.time_s.shape[1]

    @property
    def wait_state(self) -> int:
        """The state a wait draws least in (the lowest clock)."""
        return int(np.argmin(self.wait_power_w))


@dataclass(frozen=True)
class Evaluation:
    time_s: float
    energy_j: float
    rank_energy_j: tuple[float, ...]


@dataclass(frozen=True)
class PipelinePlan(AgainstDefault):
    """A state per node and per rank a wait state; the planner's own prediction against default."""

    planner: str
    objective: str
    node_state: tuple[int, ...]
    wait_state: tuple[Optional[int], ...]
    min_wait_s: float
    time_s: float
    energy_j: float
    default_time_s: float
    default_energy_j: float


def schedule_times(graph: PipelineGraph, durations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every node with these durations: each as early as its inputs allow."""
    start = np.zeros(graph.n_nodes)
    end = np.zeros(graph.n_nodes)
    for i in graph.topo:
        s = 0.0
        for p, d in graph.preds[i]:
            s = max(s, end[p] + d)
        if graph.prev[i] >= 0:
            s = max(s, end[graph.prev[i]])
        start[i] = s
        end[i] = s + durations[i]
    return start, end


def _latest_end(graph: PipelineGraph, durations: np.ndarray, horizon_s: float) -> np.ndarray:
    """Latest end of every node that keeps the iteration within ``horizon_s``."""
    late = np.full(graph.n_nodes, horizon_s)
    for i in reversed(graph.topo):
        v = horizon_s
        for j, d in graph.succs[i]:
            v = min(v, late[j] - durations[j] - d)
        late[i] = v
    return late


def _lag_s(switch: SwitchModel) -> float:
    """How late a change lands after its boundary (0 when it is issued ahead or free)."""
    return switch.latency_s if switch.mode == "late" else 0.0


def node_costs(graph: PipelineGraph, node_state: Sequence[int], lag_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(time_s, energy_j) of every node at its state. With ``lag_s`` > 0 a change lands that long
    after the node starts: its first ``lag_s`` runs at the clock in force before it (the previous
    node's on its rank; for the first node, the rank's last, as the iteration before ended)."""
    x = np.asarray(node_state, dtype=np.intp)
    idx = np.arange(graph.n_nodes)
    T, E = graph.time_s, graph.energy_j
    dur, en = T[idx, x].copy(), E[idx, x].copy()
    if lag_s <= 0:
        return dur, en
    for seq in graph.order:
        prev = x[seq[-1]]
        for i in seq:
            c = x[i]
            if c != prev and T[i, prev] > 0:
                frac = min(1.0, lag_s / T[i, prev])  # of the work done before the change lands
                dur[i] = T[i, prev] if frac >= 1.0 else lag_s + (1.0 - frac) * T[i, c]
                en[i] = frac * E[i, prev] + (1.0 - frac) * E[i, c]
            prev = c
    return dur, en


def evaluate(graph: PipelineGraph, node_state: Sequence[int], wait_state: Sequence[Optional[int]],
             min_wait_s: float = 0.0, lag_s: float = 0.0) -> Evaluation:
    """Time and energy of one iteration (no noise); changes land on their boundaries, or
    ``lag_s`` after them (:func:`node_costs`)."""
    x = np.asarray(node_state, dtype=np.intp)
    dur, en = node_costs(graph, x, lag_s)
    start, end = schedule_times(graph, dur)
    T = float(end.max())
    wp = graph.wait_power_w
    per_rank = []
    for r, seq in enumerate(graph.order):
        e = float(en[list(seq)].sum())
        ws = wait_state[r]
        gaps = [(start[i] - (end[seq[k - 1]] if k else 0.0), int(x[seq[k - 1]] if k else x[seq[0]]))
                for k, i in enumerate(seq)]
        gaps.append((T - end[seq[-1]], int(x[seq[-1]])))
        for gap, prev_state in gaps:
            if gap <= 0:
                continue
            st = ws if (ws is not None and gap >= min_wait_s) else prev_state
            e += wp[st] * gap
        per_rank.append(e)
    return Evaluation(T, float(sum(per_rank)), tuple(per_rank))


def _check_slowdown(max_slowdown: float) -> float:
    if not (isinstance(max_slowdown, (int, float)) and math.isfinite(max_slowdown) and max_slowdown >= 0):
        raise ConfigError("max_slowdown", max_slowdown, "a fraction >= 0, e.g. 0.01 for 1% (0: strict)",
                          source="pipeline planner")
    return float(max_slowdown)


def _default(graph: PipelineGraph) -> tuple[np.ndarray, Evaluation]:
    x = np.full(graph.n_nodes, graph.default_state, dtype=np.intp)
    return x, evaluate(graph, x, [None] * len(graph.order))


def _objective(max_slowdown: float) -> str:
    return "strict" if max_slowdown == 0 else f"relaxed {max_slowdown:.0%}"


def plan_critical_path(graph: PipelineGraph, *, max_slowdown: float = 0.0,
                       switch: SwitchModel = SwitchModel(), max_rounds: int = 20000) -> PipelinePlan:
    """Least energy with the iteration time within ``(1 + max_slowdown)`` x default (see the module doc).

    With changes that land late (``switch.mode == "late"``), an instruction after a wait at the
    lowest clock would start at it, so waits keep the clock in force, and every move is checked
    with the late landings (:func:`node_costs`) before it is kept."""
    max_slowdown = _check_slowdown(max_slowdown)
    x_def, ev_def = _default(graph)
    budget_s = ev_def.time_s * (1.0 + max_slowdown)
    idx = np.arange(graph.n_nodes)
    lag_s = _lag_s(switch)
    ws = graph.wait_state
    wait_states: list[Optional[int]] = [ws if lag_s == 0 else None] * len(graph.order)
    min_wait_s = switch.effective_min_interval_s
    T, E = graph.time_s, graph.energy_j
    # Energy of a node net of the wait it fills: at the wait clock, or (late) at the node's own.
    J = E - (graph.wait_power_w[ws] if lag_s == 0 else graph.wait_power_w[None, :]) * T
    banned = np.zeros(T.shape, dtype=bool)  # moves the late landings put over budget

    def within(x: np.ndarray) -> bool:
        if lag_s == 0:
            return True  # floats are exact: a move that fits its float keeps the budget
        return float(schedule_times(graph, node_costs(graph, x, lag_s)[0])[1].max()) <= budget_s * (1 + 1e-12)

    def floats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dur = node_costs(graph, x, lag_s)[0]
        _, end = schedule_times(graph, dur)
        return dur, _latest_end(graph, dur, budget_s) - end

    # 1. Free moves: the cheapest state no slower than the default.
    t0 = T[idx, x_def][:, None]
    x = np.where(T <= t0 + 1e-15, J, np.inf).argmin(axis=1)
    if not within(x):
        x = x_def.copy()

    # 2. Slack-greedy by savings per second of float.
    for _ in range(max_rounds):
        dur, slack = floats(x)
        dt = T - dur[:, None]
        dj = J[idx, x][:, None] - J
        fits = (dt <= slack[:, None] + 1e-12) & (dj > 1e-9) & ~banned
        if not fits.any():
            break
        rate = np.where(fits, dj / np.maximum(dt, 1e-9), -np.inf)
        i, c = np.unravel_index(int(np.argmax(rate)), rate.shape)
        old, x[i] = x[i], c
        if not within(x):
            x[i], banned[i, c] = old, True
    greedy = x.copy()

    # 3. Polish: each node to its cheapest state within its float, until nothing moves.
    for _ in range(50):
        moved = False
        dur, slack = floats(x)
        for i in graph.topo:
            ok = (T[i] <= dur[i] + slack[i] + 1e-12) & ~banned[i]
            c = int(np.where(ok, J[i], np.inf).argmin())
            if J[i, c] < J[i, x[i]] - 1e-9:
                old, x[i] = x[i], c
                if within(x):
                    moved = True
                    dur, slack = floats(x)  # a move uses float other nodes shared
                else:
                    x[i], banned[i, c] = old, True
        if not moved:
            break

    best_x, best_ev = x_def, ev_def
    for cand in (greedy, x):
        ev = evaluate(graph, cand, wait_states, min_wait_s, lag_s)
        if ev.time_s <= budget_s * (1 + 1e-12) and ev.energy_j < best_ev.energy_j:
            best_x, best_ev = cand, ev
    waits = tuple(wait_states) if best_x is not x_def else tuple([None] * len(graph.order))
    return PipelinePlan("critical_path", _objective(max_slowdown), tuple(int(v) for v in best_x), waits,
                        min_wait_s, best_ev.time_s, best_ev.energy_j, ev_def.time_s, ev_def.energy_j)


def plan_envpipe(graph: PipelineGraph, *, sm_states: Sequence[int], max_slowdown: float = 0.0,
                 switch: SwitchModel = SwitchModel()) -> PipelinePlan:
    """EnvPipe's heuristic: the units off the default schedule's critical path get a lower SM clock.

    ``sm_states``: the states that lock only the SM clock (memory at its default), highest SM
    clock first. Per rank, every instruction off the critical path shares one SM clock; ranks take
    turns lowering theirs one step while the iteration stays within budget and energy falls.
    Instructions on the critical path keep the default clocks. Waits take the lowest clock, as for
    the critical-path planner, so that the two differ only in how they choose instruction clocks.
    """
    max_slowdown = _check_slowdown(max_slowdown)
    x_def, ev_def = _default(graph)
    budget_s = ev_def.time_s * (1.0 + max_slowdown)
    idx = np.arange(graph.n_nodes)
    dur = graph.time_s[idx, x_def]
    _, end = schedule_times(graph, dur)
    critical = (_latest_end(graph, dur, ev_def.time_s) - end) <= _FLOAT_EPS_S * max(1.0, ev_def.time_s)
    lag_s = _lag_s(switch)
    # Changes that land late would start the next instruction at the wait clock: waits keep theirs.
    waits = [graph.wait_state if lag_s == 0 else None] * len(graph.order)
    min_wait_s = switch.effective_min_interval_s
    level = [-1] * len(graph.order)  # -1: default clocks; k: sm_states[k]

    def assignment(levels) -> np.ndarray:
        x = x_def.copy()
        for r, seq in enumerate(graph.order):
            if levels[r] >= 0:
                for i in seq:
                    if not critical[i]:
                        x[i] = sm_states[levels[r]]
        return x

    best = evaluate(graph, assignment(level), waits, min_wait_s, lag_s)
    # A lock at the top clock costs as much as the default, so a step-by-step descent would stop
    # on that plateau: each rank instead takes its best feasible level, in turns, until stable.
    for _ in range(4):
        changed = False
        for r in range(len(graph.order)):
            for k in range(len(sm_states)):
                trial = list(level)
                trial[r] = k
                ev = evaluate(graph, assignment(trial), waits, min_wait_s, lag_s)
                if ev.time_s <= budget_s * (1 + 1e-12) and ev.energy_j < best.energy_j - 1e-9:
                    level, best, changed = trial, ev, True
        if not changed:
            break
    x = assignment(level)
    return PipelinePlan("envpipe", _objective(max_slowdown), tuple(int(v) for v in x), tuple(waits), min_wait_s,
                        best.time_s, best.energy_j, ev_def.time_s, ev_def.energy_j)


#: The single-GPU planner's phase name for each instruction kind.
_PHASE_OF_KIND = {"forward": "forward", "backward": "backward", "allreduce": "communication",
                  "optimizer": "optimizer"}


def plan_per_gpu(graph: PipelineGraph, *, clocks: Sequence, switch: SwitchModel = SwitchModel()) -> PipelinePlan:
    """Today's plan: every rank plans its own instructions alone (strict on its own busy time, one
    clock per phase), with the single-GPU planner; waits are unknown to it and keep the clock in
    force. ``clocks``: the clock pair of every state (None for the default)."""
    from .planner import PlanningProblem, plan

    x_def, ev_def = _default(graph)
    x = x_def.copy()
    state_of = {c: k for k, c in enumerate(clocks)}
    for seq in graph.order:
        names = [_PHASE_OF_KIND[graph.kinds[i]] for i in seq]
        problem = PlanningProblem(names=names, time_s=graph.time_s[list(seq)], energy_j=graph.energy_j[list(seq)],
                                  clocks=tuple(clocks), default_index=graph.default_state)
        planned = plan(problem, granularity="kernel", objective="strict", switch=switch)
        for i, nm in zip(seq, names):
            x[i] = state_of[planned.clocks_by_name[nm]]
    waits = [None] * len(graph.order)
    ev = evaluate(graph, x, waits, lag_s=_lag_s(switch))
    return PipelinePlan("per_gpu", "strict", tuple(int(v) for v in x), tuple(waits), 0.0, ev.time_s, ev.energy_j,
                        ev_def.time_s, ev_def.energy_j)


def default_plan(graph: PipelineGraph) -> PipelinePlan:
    """The driver's default clocks everywhere (the baseline)."""
    x, ev = _default(graph)
    return PipelinePlan("default", "default", tuple(int(v) for v in x), tuple([None] * len(graph.order)), 0.0,
                        ev.time_s, ev.energy_j, ev.time_s, ev.energy_j)


def clocks_summary(plan: PipelinePlan, graph: PipelineGraph, clocks: Sequence) -> list[Mapping]:
    """Per rank: the clocks its instructions and waits take (for reports)."""
    out = []
    for r, seq in enumerate(graph.order):
        by_kind: dict[str, list] = {}
        for i in seq:
            c = clocks[plan.node_state[i]]
            by_kind.setdefault(graph.kinds[i], []).append("default" if c is None else str(c))
        ws = plan.wait_state[r]
        out.append({"rank": r, "instructions": by_kind,
                    "waits": "clock in force" if ws is None else
                    ("default" if clocks[ws] is None else str(clocks[ws]))})
    return out
