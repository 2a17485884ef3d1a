"""Online exploration across pipeline stages: every stage measures, all solve the same plan.

Each stage (rank) runs a :class:`PipelineExplorer` beside its engine. The stages explore in the
same blocks of iterations: block boundaries fall at the same iteration everywhere, and each block
runs one design for the whole pipeline (per rank one clock per instruction kind: forward,
backward, optimizer; and one clock for its waits). At every block boundary ``exchange`` (an
all-gather over the ranks) brings each rank's measurements of the blocks just finished to every
rank, applied in rank order; every rank then holds the same tables and, drawing from one shared
seed, makes the same decisions: the same next design, the same plan, the same verdict, at the
same iteration. (One rank solving and broadcasting would give the same result; solving everywhere
needs no second collective.)

A stage measures only what a live stage can: each of its instructions' GPU time per iteration
(markers: ``forward/pipe.mb3`` ...) and its meter's window energies. The plan comes from
:func:`kdvfs_plugins.pipeline_planner.plan_critical_path` on the measured tables
(:mod:`.pipeline_explore_fit`), strict by default. Designs are drawn so that the iteration time
predicted on the schedule's graph (measured times, and for a clock not yet measured an upper
bound: the default time scaled by the clock ratio) keeps the exploration's slowdown within
``explore_max_slowdown`` over the blocks run so far. The plan is then validated in plan/default
block pairs on all stages (:func:`kdvfs_plugins.explore_validate.judge`: the saving significant
and the iteration time within the budget plus ``time_tolerance``, both within noise), re-planned once with its lowered
clocks taken slower if it was too slow (by a multiple of the measured miss), and applied only if it passes.

A rank whose GPU refuses clock writes keeps exchanging (so nothing waits on it) with
``measuring`` False: its energies are left out, its times count as the default clocks', and every
plan keeps it at the default clocks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .clocks import ClockPair, ClockTable
from .explore_validate import PairedBlock, judge, pair_changes
from .explore_hooks import ExplorerHooks
from .pipeline_explore_fit import EXCLUDED_S, WAIT, PipelineShape, StageBlock, Tables, fit_powers, measured_graph
from .pipeline_planner import PipelineGraph, plan_critical_path, schedule_times
from .policy import DEFAULT_CLOCKS
from .regions import STEP
from .switching import SwitchModel

__all__ = ["PipelineExploreSettings", "PipelineExploreResult", "StageExploreResult", "PipelineExplorer", "Assignment",
           "default_grid", "stage_explorer", "EXPLORED_KINDS"]

#: Instruction kinds that get a clock of their own in a design (the all-reduce is link-bound).
EXPLORED_KINDS = ("forward", "backward", "optimizer")
#: Default blocks at the start: the default times every prediction starts from.
BASELINE_BLOCKS = 2
#: Every this many exploring blocks one runs the default clocks (the anchor of the energy fit).
DEFAULT_EVERY = 4
#: Share of the exploration slowdown bound that designs plan to use (the bound of an unmeasured
#: clock is conservative, a measured time exact up to jitter).
BOUND_MARGIN = 0.85
#: One block may spend at most this many times the bound (the rest of the budget stays for others).
BLOCK_CAP = 2.0
#: A re-plan takes lowered clocks slower by this many times the measured miss (time change plus
#: two standard errors): lowered instructions fill at least half of a path's time, and the first
#: correction of an optimistic model tends to fall short.
SLOW_PER_MISS = 4.0
#: A plan goes to validation only if it predicts at least this saving.
MIN_PREDICTED_SAVING = 0.005
#: Share of the designs whose waits take the lowest clock (the others: the default), so that the
#: fit tells wait power from instruction power.
LOW_WAIT_SHARE = 0.75
#: Grid of SM clocks explored, as fractions of the top SM clock: at the top memory clock, then at
#: the lowest memory clock (with the lowest SM clock). On the shipped GPT stages, the
#: critical-path planner restricted to this grid keeps 97.6% of its full-table saving.
TOP_MEM_SM_FRACTIONS = (1.0, 0.77, 0.62, 0.545, 0.47, 0.394, 0.318)
LOW_MEM_SM_FRACTIONS = (0.318, 0.242, 0.0)


def default_grid(table: ClockTable) -> tuple[Optional[ClockPair], ...]:
    """``None`` (the driver's default) then the locks explored: each fraction snapped to the
    nearest SM clock the table supports at that memory clock."""
    out: list[Optional[ClockPair]] = [None]
    top_sm = max(table.sm_mhz)
    for mem, fractions in ((max(table.mem_mhz), TOP_MEM_SM_FRACTIONS), (min(table.mem_mhz), LOW_MEM_SM_FRACTIONS)):
        sms = table.sm_mhz_by_mem[mem]
        for f in fractions:
            pair = ClockPair(min(sms, key=lambda s: abs(s - f * top_sm)), mem)
            if pair not in out:
                out.append(pair)
    return tuple(out)


@dataclass(frozen=True)
class Assignment:
    """A state per instruction (node) and per rank the state of its waits (None: clock in force)."""

    node_state: tuple[int, ...]
    wait_state: tuple[Optional[int], ...]


@dataclass(frozen=True)
class PipelineExploreSettings:
    """Identical on every rank but ``rank`` (frozen: it crosses hooks)."""

    shape: PipelineShape
    rank: int
    #: the states: None (the default) then the locks explored (:func:`default_grid`)
    clocks: tuple[Optional[ClockPair], ...]
    switch: SwitchModel = SwitchModel()
    max_slowdown: float = 0.0
    explore_max_slowdown: float = 0.02
    explore_max_steps: int = 1500
    block_steps: int = 10
    start_step: int = 0
    seed: int = 0
    validation_pairs: int = 4
    #: Validation judges the iteration time against ``max_slowdown`` plus this share: issued-ahead
    #: changes land on predicted boundaries, and an instruction that runs shorter than predicted
    #: hands a moment at the wrong clock to the next. On the virtual cluster the critical-path
    #: oracle's own strict plan executes +0.02% to +0.07%; a plan is not held to less.
    time_tolerance: float = 0.001


@dataclass(frozen=True)
class PipelineExploreResult:
    """How exploration ended, the same on every rank (frozen: reported and handed to the engine)."""

    status: str  # "applied" | "rejected" | "explored"
    node_clocks: tuple[Optional[ClockPair], ...]  # per instruction; None: the default
    wait_clocks: tuple[Optional[ClockPair], ...]  # per rank; None: the clock in force
    assignment: Optional[Assignment]
    predicted: Mapping[str, float]
    validated: Mapping[str, float]
    steps: int
    exploration_time_change: float
    message: str = ""

    def region_clocks(self, shape: PipelineShape, rank: int) -> dict[str, Optional[ClockPair]]:
        """One rank's plan by region name (what its plan file holds)."""
        return {shape.regions[i]: self.node_clocks[i] for i in shape.order[rank]}

    def for_rank(self, shape: PipelineShape, rank: int) -> "StageExploreResult":
        """What one rank's engine keeps of the result: its own regions' clocks, its waits under
        ``step`` (receives and bubbles fall back to it)."""
        clocks = {**self.region_clocks(shape, rank), STEP: self.wait_clocks[rank]}
        return StageExploreResult(self.status, clocks, tuple(clocks), dict(self.predicted), dict(self.validated),
                                  self.steps, self.exploration_time_change, self.message, self)


@dataclass(frozen=True)
class StageExploreResult:
    """One rank's view of a :class:`PipelineExploreResult`, in the shape the engine reports and
    saves an exploration's result (frozen: it crosses the engine's ``on_done``)."""

    status: str
    clocks_by_name: Mapping[str, Optional[ClockPair]]
    knobs: tuple[str, ...]
    predicted: Mapping[str, float]
    validated: Mapping[str, float]
    steps: int
    exploration_time_change: float
    message: str
    pipeline: PipelineExploreResult


@dataclass
class _Block:
    index: int
    first_step: int
    kind: str  # baseline, default, explore, settle, validate-plan, validate-default
    assignment: Assignment
    #: per rank, once exchanged
    data: dict = field(default_factory=dict)
    steps: int = 10

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1


class _Outgoing:
    """This rank's own measurements of one block, until the exchange."""

    def __init__(self) -> None:
        self.node_ms: dict[int, list] = {}
        self.step_ms: list[float] = []
        self.energy_j = 0.0
        self.energy_steps = 0


class PipelineExplorer(ExplorerHooks):
    """One rank's explorer: answers its regions' clocks, takes its measurements, exchanges them.

    The engine registers it as a plugin (``kdvfs_choose_clocks``, ``kdvfs_step_measured``,
    ``kdvfs_window_measured``) and calls :meth:`begin_step` at every step's start; a study may call
    the same methods directly. ``exchange(items) -> [items of rank 0, rank 1, ...]`` is the
    all-gather over the pipeline's ranks (needed with more than one rank)."""

    def __init__(self, settings: PipelineExploreSettings, exchange: Optional[Callable[[list], Sequence[list]]] = None,
                 on_done: Optional[Callable[[PipelineExploreResult], None]] = None, apply: bool = True):
        s = settings
        if not 0 <= s.rank < s.shape.ranks:
            raise ValueError(f"rank {s.rank} of a {s.shape.ranks}-rank pipeline")
        if s.shape.ranks > 1 and exchange is None:
            raise ValueError("a pipeline of several ranks explores together: pass exchange (an all-gather)")
        if s.clocks[0] is not None:
            raise ValueError("state 0 must be the default clocks (None)")
        self.s = s
        self._exchange = exchange
        self.on_done = on_done
        self.apply = apply
        #: False once this rank's clocks cannot be set: it then measures the default clocks only
        self.measuring = True
        self.exchanges = 0
        self.result: Optional[PipelineExploreResult] = None
        shape = s.shape
        self._n = len(shape.kinds)
        self._rank_of = [0] * self._n
        for r, seq in enumerate(shape.order):
            for i in seq:
                self._rank_of[i] = r
        self._own_region = {shape.regions[i]: i for i in shape.order[s.rank]}
        self._struct = shape.graph(np.zeros((self._n, 1)), np.zeros((self._n, 1)), np.zeros(1))
        self._rng = random.Random(f"pipeline-explore-{s.seed}")
        self.tables = Tables(self._n, len(s.clocks))
        self._cells: dict[tuple, int] = {}
        self._pinned: set[int] = set()
        top_sm = max(c.sm_mhz for c in s.clocks if c is not None)
        top_mem = max(c.mem_mhz for c in s.clocks if c is not None)
        self._sm_mhz = [float(top_sm) if c is None else float(c.sm_mhz) for c in s.clocks]
        # an upper bound on the time at a state, as a multiple of the default's: time scales at
        # most as the clock that bounds it
        self._bound = np.array([1.0 if c is None else max(top_sm / c.sm_mhz, top_mem / c.mem_mhz) for c in s.clocks])
        self._low_wait = int(np.argmin(self._sm_mhz))
        self.blocks: list[_Block] = []
        self._out: dict[int, _Outgoing] = {}
        self._sent: set[int] = set()  # blocks whose measurements went out in an exchange
        self._total_blocks = max(1, s.explore_max_steps // s.block_steps)
        # room kept for two validation rounds, each followed by a default block
        self._reserve = 2 * (2 * s.validation_pairs + 1) + 1
        self._plan: Optional[Assignment] = None
        self._plan_at = 0
        self.predicted: dict[str, float] = {}
        self.validated: dict[str, float] = {}
        self.replans = 0
        #: a re-plan takes every lowered clock this share slower than measured
        self.slow = 0.0
        self._default_assignment = Assignment(tuple([0] * self._n), tuple([None] * shape.ranks))

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        return self.result is not None

    def _block_at(self, step: int) -> Optional[_Block]:
        k = (step - self.s.start_step) // self.s.block_steps
        return self.blocks[k] if 0 <= k < len(self.blocks) else None

    def assignment(self, step: int) -> Assignment:
        """What every rank runs at ``step``: the block's design, the plan once applied, else default."""
        if self.result is not None:
            a = self.result.assignment
            return a if (a is not None and self.result.status == "applied") else self._default_assignment
        b = self._block_at(step)
        return b.assignment if b is not None else self._default_assignment

    def clocks_for(self, region: str, step: int):
        """This rank's clocks for ``region`` at ``step``; None leaves the choice to the plan policy."""
        if step < self.s.start_step:
            return None
        a = self.assignment(step)
        node = self._own_region.get(region)
        if node is not None:
            state = a.node_state[node]
        else:  # the step's own level and its receives are the rank's waits
            state = a.wait_state[self.s.rank]
            if state is None:
                return None
        c = self.s.clocks[state]
        return DEFAULT_CLOCKS if c is None else c

    # ------------------------------------------------------------------ measurements
    def observe_step(self, step: int, gpu_time_ms: float, region_time_ms: Mapping[str, float]) -> None:
        b = self._block_at(step)
        if b is None or self.done or b.index in self._sent:
            return
        out = self._out.setdefault(b.index, _Outgoing())
        out.step_ms.append(float(gpu_time_ms))
        for region, ms in region_time_ms.items():
            node = self._own_region.get(region)
            if node is not None:
                acc = out.node_ms.setdefault(node, [0.0, 0])
                acc[0] += float(ms)
                acc[1] += 1

    def observe_window(self, first_step: int, last_step: int, energy_j: float) -> None:
        b = self._block_at(first_step)
        if b is None or self.done or self._block_at(last_step) is not b or b.index in self._sent:
            return  # a window across a block boundary mixes two designs; a block sent is closed
        out = self._out.setdefault(b.index, _Outgoing())
        out.energy_j += float(energy_j)
        out.energy_steps += last_step - first_step + 1

    # ------------------------------------------------------------------ the block boundary
    def begin_step(self, step: int) -> None:
        """Call before the step's first ``clocks_for``: at a block boundary, exchange what was
        measured and decide the next block (the same on every rank)."""
        s = self.s
        if self.done or step < s.start_step or (step - s.start_step) % s.block_steps:
            return
        k = (step - s.start_step) // s.block_steps
        if k < len(self.blocks):
            return
        # A block goes out once its window's energy is in, or a block later: a live meter closes a
        # window only once a power reading after its end has come in (up to 100 ms later), so the
        # last block's energy usually arrives just after the boundary. Whatever of a block arrives
        # after it went out is dropped (a second item would replace the first on every rank).
        ready = [i for i, o in sorted(self._out.items())
                 if i < k - 1 or (i == k - 1 and (o.energy_steps >= s.block_steps or not self.measuring))]
        outbox = [StageBlock(s.rank, i, self.measuring,
                             tuple((n, a[0], a[1]) for n, a in sorted(self._out[i].node_ms.items())),
                             tuple(self._out[i].step_ms), self._out[i].energy_j, self._out[i].energy_steps)
                  for i in ready]
        for i in ready:
            del self._out[i]
            self._sent.add(i)
        gathered = self._exchange(outbox) if self._exchange is not None else [outbox]
        self.exchanges += 1
        for items in gathered:
            for item in items:
                self._receive(item)
        self._next_block(k, step)

    def _receive(self, item: StageBlock) -> None:
        b = self.blocks[item.block]
        b.data[item.rank] = item
        r = item.rank
        if not item.measuring:
            self._pinned.add(r)
        a = b.assignment
        feats: dict = {}
        busy_ms = 0.0
        for node, total_ms, count in item.node_ms:
            state = a.node_state[node] if item.measuring else 0
            self.tables.add_times(node, state, total_ms, count)
            key = (self.s.shape.kinds[node], state)
            feats[key] = feats.get(key, 0.0) + total_ms / 1e3
            busy_ms += total_ms
        if not item.measuring or item.energy_steps <= 0 or not item.step_ms:
            return
        ws = a.wait_state[r]
        feats[(WAIT, 0 if ws is None else ws)] = max(0.0, sum(item.step_ms) - busy_ms) / 1e3
        share = item.energy_steps / len(item.step_ms)  # the window's part of the block
        self.tables.add_row(r, {key: v * share for key, v in feats.items()}, item.energy_j)
        for kind in EXPLORED_KINDS:
            states = {a.node_state[i] for i in self.s.shape.order[r] if self.s.shape.kinds[i] == kind}
            for st in states:
                self._cells[(r, kind, st)] = self._cells.get((r, kind, st), 0) + 1

    # ------------------------------------------------------------------ decisions
    def _add(self, k: int, step: int, kind: str, a: Assignment) -> None:
        self.blocks.append(_Block(k, step, kind, a, steps=self.s.block_steps))

    def _next_block(self, k: int, step: int) -> None:
        validating = [b for b in self.blocks if b.kind.startswith("validate")]
        if self._plan is not None:
            n_val = 2 * self.s.validation_pairs
            if len(validating) - self._plan_at < n_val:
                i = len(validating) - self._plan_at
                plan_first = (i // 2) % 2 == 0  # pairs alternate their order: drift favours neither
                is_plan = (i % 2 == 0) == plan_first
                self._add(k, step, "validate-plan" if is_plan else "validate-default",
                          self._plan if is_plan else self._default_assignment)
                return
            if self._validation_measured() or k >= self._total_blocks:
                self._judge(step)
                if self.done:
                    return
                return self._next_block(k, step)
            self._add(k, step, "settle", self._default_assignment)
            return
        if k < BASELINE_BLOCKS:
            self._add(k, step, "baseline", self._default_assignment)
            return
        if k < self._total_blocks - self._reserve:
            if (k - BASELINE_BLOCKS) % DEFAULT_EVERY == DEFAULT_EVERY - 1:
                self._add(k, step, "default", self._default_assignment)
            else:
                self._add(k, step, "explore", self._draw_design())
            return
        self._make_plan(step)
        if not self.done:
            self._next_block(k, step)

    def _validation_measured(self) -> bool:
        vb = [b for b in self.blocks if b.kind.startswith("validate")][self._plan_at:]
        ranks = set(range(self.s.shape.ranks)) - self._pinned
        return all(ranks <= set(b.data) for b in vb)

    def _default_step_ms(self) -> Optional[float]:
        steady = [t for b in self.blocks if b.kind in ("baseline", "default", "settle", "validate-default")
                  for t in self._block_times(b)[1:]]
        return float(np.mean(steady)) if steady else None

    def _block_times(self, b: _Block) -> list[float]:
        """The block's iteration times, the mean over the ranks that measured it."""
        rows = [d.step_ms for d in b.data.values() if d.step_ms]
        if not rows:
            return []
        n = min(len(r) for r in rows)
        return [float(np.mean([r[j] for r in rows])) for j in range(n)]

    @property
    def exploration_time_change(self) -> float:
        """Measured slowdown of every iteration explored so far against the default blocks'."""
        ref = self._default_step_ms()
        times = [t for b in self.blocks for t in self._block_times(b)]
        if not ref or not times:
            return 0.0
        return float(np.sum(times)) / (len(times) * ref) - 1.0

    def _durations(self) -> np.ndarray:
        """Per (node, state): measured time, else the default's times the state's bound."""
        t = self.tables.time_s()
        bound = t[:, :1] * self._bound[None, :]
        return np.where(np.isnan(t), bound, t)

    def _draw_design(self) -> Assignment:
        """One clock per (rank, kind) and per rank a wait clock: the least measured states first,
        each kept only while the predicted iteration stays within what the budget allows."""
        s, shape = self.s, self.s.shape
        dur = self._durations()
        ref = self._default_step_ms()
        if np.isnan(dur[:, 0]).any() or not ref:
            return self._default_assignment
        idx = np.arange(self._n)
        t0 = float(schedule_times(self._struct, dur[:, 0])[1].max())
        times = [t for b in self.blocks for t in self._block_times(b)]
        excess = float(np.sum(times)) / ref - len(times) if times else 0.0
        allowed = (BOUND_MARGIN * s.explore_max_slowdown * (len(times) + s.block_steps) - excess) / s.block_steps
        limit = t0 * (1.0 + min(max(allowed, 0.0), BLOCK_CAP * s.explore_max_slowdown))
        x = np.zeros(self._n, dtype=np.intp)
        cells = [(r, kind) for r in range(shape.ranks) if r not in self._pinned for kind in EXPLORED_KINDS]
        self._rng.shuffle(cells)
        for r, kind in cells:
            nodes = [i for i in shape.order[r] if shape.kinds[i] == kind]
            if not nodes:
                continue
            cands = list(range(len(s.clocks)))
            self._rng.shuffle(cands)
            cands.sort(key=lambda st: self._cells.get((r, kind, st), 0))
            for st in cands:
                x[nodes] = st
                if float(schedule_times(self._struct, dur[idx, x])[1].max()) <= limit:
                    break
            else:
                x[nodes] = 0
        waits = tuple(None if r in self._pinned else
                      (self._low_wait if self._rng.random() < LOW_WAIT_SHARE else 0) for r in range(shape.ranks))
        return Assignment(tuple(int(v) for v in x), waits)

    def _graph(self) -> Optional[PipelineGraph]:
        pinned = sorted(self._pinned)
        powers = {r: fit_powers(rows, self.s.clocks) for r, rows in self.tables.rows.items() if r not in self._pinned}
        g = measured_graph(self.s.shape, self.tables, powers, self._sm_mhz, pinned)
        if g is None or not self.slow:
            return g
        t = g.time_s.copy()
        t[:, 1:] = np.where(t[:, 1:] < EXCLUDED_S, t[:, 1:] * (1.0 + self.slow), t[:, 1:])
        return self.s.shape.graph(t, g.energy_j, g.wait_power_w)

    def _make_plan(self, step: int) -> None:
        g = self._graph()
        if g is None:
            self._finish("rejected", step, "too few measurements to plan on (no default times or no wait "
                         "energy); raise explore_max_steps")
            return
        p = plan_critical_path(g, max_slowdown=self.s.max_slowdown, switch=self.s.switch)
        ws = tuple(None if r in self._pinned else w for r, w in enumerate(p.wait_state))
        self.predicted = {"time_change": p.time_change, "energy_change": p.energy_change}
        if p.energy_change > -MIN_PREDICTED_SAVING:
            self._finish("rejected", step, f"the measured plan predicts {p.energy_change:+.2%} energy, less than "
                         f"the {MIN_PREDICTED_SAVING:.1%} worth validating; the default clocks stay")
            return
        self._plan = Assignment(tuple(p.node_state), ws)
        self._plan_at = len([b for b in self.blocks if b.kind.startswith("validate")])

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        vb = [b for b in self.blocks if b.kind.startswith("validate")][self._plan_at:]
        ranks = set(range(self.s.shape.ranks)) - self._pinned

        def paired(b: _Block) -> Optional[PairedBlock]:
            rows = [b.data[r] for r in ranks if r in b.data and b.data[r].energy_steps > 0]
            times = self._block_times(b)
            if len(rows) < len(ranks) or not times:
                return None
            return PairedBlock(sum(d.energy_j / d.energy_steps for d in rows), tuple(times))

        plan_b = [paired(b) for b in vb if b.kind == "validate-plan"]
        def_b = [paired(b) for b in vb if b.kind == "validate-default"]
        return pair_changes([(p, d) for p, d in zip(plan_b, def_b) if p is not None and d is not None])

    def _judge(self, step: int) -> None:
        de, dt = self._pairs()
        if len(de) < 2:
            self._finish("rejected", step, "too few validation blocks measured on all stages; raise explore_max_steps")
            return
        verdict = judge(de, dt, self.s.max_slowdown + self.s.time_tolerance)
        self.validated = dict(verdict.figures)
        if verdict.accepted:
            self._finish("applied" if self.apply else "explored", step, "validated on all stages")
            return
        blocks_left = self._total_blocks - len(self.blocks)
        if verdict.saves and self.replans < 1 and blocks_left >= 2 * self.s.validation_pairs:
            self.replans += 1
            # The times are measured, so a slow plan misses by jitter on the paths it left without
            # float: every lowered clock is taken slower, so chains of them keep float in hand.
            miss = (verdict.figures["time_change"] + 2 * verdict.figures["time_change_se"] - self.s.max_slowdown
                    - self.s.time_tolerance)
            self.slow += SLOW_PER_MISS * max(miss, 0.0005)
            self._plan = None
            self._make_plan(step)
            return
        self._finish("rejected", step, verdict.why_not())

    def _finish(self, status: str, step: int, message: str) -> None:
        s = self.s
        applied = status in ("applied", "explored") and self._plan is not None
        a = self._plan if applied else None
        node = tuple(s.clocks[st] for st in a.node_state) if a else tuple([None] * self._n)
        wait = tuple(None if w is None else s.clocks[w] for w in a.wait_state) if a else \
            tuple([None] * s.shape.ranks)
        self.result = PipelineExploreResult(status, node, wait, a, dict(self.predicted), dict(self.validated),
                                            step - s.start_step, float(self.exploration_time_change), message)
        if self.on_done is not None:
            self.on_done(self.result)

    # ------------------------------------------------------------------ the engine's explorer surface
    #: the pipeline adapters report instructions, never module boundaries: exploration needs none
    wants_module_regions = False
    #: set by the engine (the one-GPU explorer's switch to phase level); nothing to switch here
    phase_level_after_baseline = False

    @property
    def phase(self) -> str:
        """For the engine's progress line."""
        if self.done:
            return "done"
        return "validating" if self._plan is not None else "exploring"

    def set_layout(self, occurrences) -> None:
        """The meter's first profiled step: the schedule (``shape``) already says what runs."""
        return None


def stage_explorer(shape: PipelineShape, rank: int, exchange: Optional[Callable[[list], Sequence[list]]],
                   clocks: Optional[Sequence[Optional[ClockPair]]] = None, block_steps: Optional[int] = None):
    """An engine's ``explorer_factory`` for one pipeline rank: the engine calls it with itself, the
    first exploring step and its ``on_done``, and registers the :class:`PipelineExplorer` it gets.

    The settings come from the engine's config (budgets, step budget, seed, switch latency and
    floor), blocks are the meter's windows (``window_steps``) unless ``block_steps`` is given; the
    clock grid is :func:`default_grid` of the device's table unless ``clocks`` is given.
    ``exchange``: the all-gather over the pipeline's ranks."""
    from .switching import switch_model

    def make(engine, start_step: int, on_done) -> PipelineExplorer:
        cfg, info = engine.config, engine.device.info()
        latency_ms = engine._switch_latency_ms()
        floor_ms = cfg.min_switch_interval_ms if latency_ms > 0 and cfg.issue_ahead else 0.0
        switch = switch_model(latency_ms, issue_ahead=cfg.issue_ahead, min_interval_ms=floor_ms)
        settings = PipelineExploreSettings(
            shape=shape, rank=rank, clocks=tuple(clocks) if clocks is not None else default_grid(info.clocks),
            switch=switch, max_slowdown=cfg.max_slowdown, explore_max_slowdown=cfg.explore_max_slowdown,
            explore_max_steps=cfg.explore_max_steps, block_steps=block_steps or cfg.window_steps,
            start_step=start_step, seed=cfg.sim_seed)  # one seed on every rank: the same draws
        return PipelineExplorer(settings, exchange=exchange, apply=cfg.mode == "auto",
                                on_done=lambda result: on_done(result.for_rank(shape, rank)))

    return make
