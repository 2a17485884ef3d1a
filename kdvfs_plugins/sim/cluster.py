"""A virtual cluster: P pipeline stages x D data-parallel replicas of the virtual H100.

Every figure it produces is a model prediction of the simulated H100 cluster.

API
---
``StageWorkload.from_trace(trace, step=1)``: one stage's microbatch as three instructions
(``forward``, ``backward``, ``optimizer``), split by region name (``forward/...``,
``backward/...``, ``optimizer``). ``StageWorkload.merged(a, b)``: two stages as one.
``shipped_stage_workloads(stages)``: the four shipped GPT stage traces (``gpt1b-stage{i}-of4``),
merged in pairs for 2 stages.

``build_schedule(stages, microbatches, replicas=1, schedule="1f1b", chunks=1) -> Schedule``: the
nodes (instructions) of one iteration, each rank's program order and the data dependences.
Schedules: ``1f1b``, ``gpipe`` and ``interleaved`` (Megatron's interleaved 1F1B, ``chunks`` model
chunks per rank: virtual stage ``chunk x stages + stage``).
Rank numbering: ``rank = replica * stages + stage``.

``VirtualCluster(workloads, microbatches, *, replicas=1, schedule="1f1b", links=Links(),
straggler=None, model=None, chunks=1)`` (``workloads``: one per virtual stage)
- ``states``: the clock states every instruction can run at (``None`` = the driver's default,
  then every locked pair of the H100);
- ``graph()``: nodes, program order, dependences with their transfer times, and each node's time
  and energy at every state (``[nodes, states]``), the wait power at every state;
- ``execute(plan=None, *, noise=True, seed=0, switch=SwitchModel-like, issue_ahead=True)
  -> ClusterRun``: one iteration run event by event, with clock changes landing when the
  switch model says and seeded noise.

``ClusterPlan(node_state, wait_state, min_wait_s)``: a state index per node; per rank the state
its waits take (``None``: keep the clock in force); waits shorter than ``min_wait_s`` keep it too.

Model (assumptions labelled)
----------------------------
- **One power controller per instruction** (simplification): an instruction's kernels are merged
  into chunks of consecutive same-category kernels and the instruction is costed once per clock
  state, then cached, instead of a kernel-by-kernel replay through
  :class:`~kdvfs_plugins.sim.gpu.VirtualGPU` (~150 us of CPU per kernel). The default state: the
  chunks replayed on a noise-free VirtualGPU until the controller's window has settled on them.
  A locked state: the model's steady-state mix (:meth:`H100Model.mix_time_energy`: one controller
  clock for the instruction, capped by the lock), host gaps at the locked clock. Both agree with a
  kernel-by-kernel replay within 0.05%. The controller's memory across instructions (a window
  that saw a wait or another instruction) is not modelled.
- **Waits** (receives, bubbles, the end of the iteration) draw the measured wait power
  (``data/h100-wait-power.json``): 124 W at the default clock (the card holds 1980 MHz while a
  communication kernel spins) and 72 W idle at 345 MHz. At a locked clock in between, the wait
  power is interpolated along the model's static power curve (V^2 f) between those two measured
  points: **a model assumption** (no waiting power was measured at a locked clock).
- **Point-to-point transfers** (activations forward, gradients backward) run over NVLink within a
  host at ``p2p_gbps`` (assumed equal to the measured all-reduce bus bandwidth, 329 GB/s on
  2 x H100 of one host) plus ``p2p_latency_s``; a send does not hold the sender (asynchronous),
  the receiver waits. One microbatch's activation is ``activation_bytes`` (2 x 2048 tokens x
  hidden 2048 x bf16 for the shipped GPT).
- **The gradient all-reduce** (replicas > 1) is a ring over ``allreduce_busbw_gbps`` (329 GB/s,
  measured): ``2 (D-1)/D x gradient bytes / bus bandwidth``, link-bound at any clock; the GPU
  draws the wait power at the clock in force while it runs (an assumption: the copy kernels'
  memory traffic is not modelled). It starts when every replica of the stage has finished its
  backward passes (no overlap with the backward: an assumption that makes it a clean barrier).
  A stage's gradient bytes: parameters x 2 bytes, parameters estimated from its optimizer time
  (1.0 B parameters over the shipped stages' total optimizer time).
- **Stragglers**: one rank's instructions take ``factor`` times as long at the same power.
- **Noise** (seeded): per rank a card factor on time and power, per instruction a jitter of the
  model's kernel sigma over the square root of its kernel count. Draws depend on the seed, the
  rank and the node only, so a plan and the default run see the same noise.
- **Switching**: with ``issue_ahead`` each change is requested one latency before its boundary as
  predicted from the previous iteration (the same plan run with the cards' persistent factors and
  no jitter), re-anchored at each boundary the GPU reaches, as an actuator sees its markers: the
  change after an instruction lands at its start plus its predicted length, the change after a
  wait at the wait's start plus its predicted length. Jitter moves the real boundary, and the
  instruction then starts at the previous clock or its predecessor ends at the new one. Without
  ``issue_ahead``, a change is requested at the boundary the GPU reaches and lands one latency
  later.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from ..clocks import ClockPair
from ..data import h100_clock_lists, wait_power
from ..errors import ConfigError
from .model import H100Model, Work, default_model
from .trace import Trace

__all__ = [
    "PHASES", "SCHEDULES", "Chunk", "InstructionWork", "StageWorkload", "shipped_stage_workloads",
    "Links", "Straggler", "Node", "Schedule", "build_schedule", "ClusterGraph", "ClusterPlan",
    "Segment", "RankRun", "ClusterRun", "VirtualCluster", "clock_states", "wait_power_w",
]

PHASES = ("forward", "backward", "optimizer")
SCHEDULES = ("1f1b", "gpipe", "interleaved")
#: Shipped GPT (1.0 B parameters): what a stage's gradient bytes are estimated from.
SHIPPED_PARAMS = 1.0e9
GRAD_BYTES_PER_PARAM = 2  # bf16 gradients
SOURCE = "kdvfs simulate"


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Consecutive kernels of one category, merged: time is linear in duration within a class."""

    category: str
    duration_s: float


@dataclass(frozen=True)
class InstructionWork:
    """One instruction's GPU work at default clocks: its chunks and the host gaps between them."""

    kind: str
    chunks: tuple[Chunk, ...]
    gap_s: float
    n_kernels: int

    @property
    def busy_s(self) -> float:
        return sum(c.duration_s for c in self.chunks)


def _instruction(kind: str, kernels) -> InstructionWork:
    chunks: list[Chunk] = []
    gap_s = 0.0
    for i, k in enumerate(kernels):
        if i > 0:  # the gap before an instruction's first kernel is the schedule's, not its own
            gap_s += k.gap_before_s
        if chunks and chunks[-1].category == k.category:
            chunks[-1] = Chunk(k.category, chunks[-1].duration_s + k.duration_s)
        else:
            chunks.append(Chunk(k.category, k.duration_s))
    return InstructionWork(kind, tuple(chunks), gap_s, len(kernels))


def _phase_of(kernel) -> str:
    head = kernel.region.split("/")[0]
    return head if head in PHASES else kernel.phase


@dataclass(frozen=True)
class StageWorkload:
    """One pipeline stage: one microbatch's forward and backward, and the optimizer step."""

    name: str
    forward: InstructionWork
    backward: InstructionWork
    optimizer: InstructionWork

    def work(self, kind: str) -> InstructionWork:
        return getattr(self, kind)

    @classmethod
    def from_trace(cls, trace: Trace, step: int = 1, name: Optional[str] = None) -> "StageWorkload":
        """A stage from a trace step holding forward/..., backward/... and optimizer kernels.

        The default step (1, the second repetition, or the only one) is the steady one after a
        warm-up, as the single-GPU planning uses."""
        ts = trace.steps[step % len(trace.steps)]
        by_phase: dict[str, list] = {p: [] for p in PHASES}
        for k in ts.kernels:
            ph = _phase_of(k)
            if ph in by_phase:
                by_phase[ph].append(k)
        label = name or trace.source
        missing = [p for p in PHASES if not by_phase[p]]
        if missing:
            raise ConfigError("--stage-traces", label,
                              f"each stage trace needs forward, backward and optimizer kernels (missing: "
                              f"{', '.join(missing)}); record one microbatch's forward and backward plus the "
                              f"optimizer step per stage with kdvfs trace", source=SOURCE)
        return cls(label, *(_instruction(p, by_phase[p]) for p in PHASES))

    @classmethod
    def merged(cls, a: "StageWorkload", b: "StageWorkload") -> "StageWorkload":
        """Two consecutive stages run as one (forward a then b, backward b then a)."""

        def join(kind: str, first: InstructionWork, second: InstructionWork) -> InstructionWork:
            return InstructionWork(kind, first.chunks + second.chunks, first.gap_s + second.gap_s,
                                   first.n_kernels + second.n_kernels)

        return cls(f"{a.name}+{b.name}", join("forward", a.forward, b.forward),
                   join("backward", b.backward, a.backward), join("optimizer", a.optimizer, b.optimizer))


def shipped_stage_workloads(stages: int) -> tuple[StageWorkload, ...]:
    """The shipped GPT stage traces for 4 stages, merged in pairs for 2, one whole model for 1."""
    four = tuple(StageWorkload.from_trace(Trace.load(f"gpt1b-stage{i}-of4"), name=f"gpt1b-stage{i}-of4")
                 for i in range(4))
    if stages == 4:
        return four
    if stages == 2:
        return (StageWorkload.merged(four[0], four[1]), StageWorkload.merged(four[2], four[3]))
    if stages == 1:
        return (StageWorkload.merged(StageWorkload.merged(four[0], four[1]),
                                     StageWorkload.merged(four[2], four[3])),)
    raise ConfigError("--pipeline", stages, "1, 2 or 4 with the shipped GPT stage traces (four stages, "
                      "merged in pairs for two); for other counts give one trace per stage with "
                      "--stage-traces a.csv,b.csv,...", source=SOURCE)


@lru_cache(maxsize=1)
def _shipped_optimizer_s() -> float:
    """The shipped stages' optimizer time in all: what 1.0 B parameters take to step."""
    return sum(w.optimizer.busy_s for w in shipped_stage_workloads(4))


# --------------------------------------------------------------------------------------------
# Links, stragglers, the schedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Links:
    """Modelled links within one host (see the module docstring for what is measured)."""

    #: Measured: NCCL all-reduce bus bandwidth on 2 x H100 of one host.
    allreduce_busbw_gbps: float = 329.0
    #: Assumption: point-to-point over NVLink at the all-reduce's bus bandwidth.
    p2p_gbps: float = 329.0
    #: Assumption: launch and synchronisation latency of one send/receive pair.
    p2p_latency_s: float = 10e-6
    #: One microbatch's activation (or its gradient): 2 x 2048 tokens x hidden 2048 x 2 bytes.
    activation_bytes: float = 2 * 2048 * 2048 * 2

    def p2p_s(self) -> float:
        return self.p2p_latency_s + self.activation_bytes / (self.p2p_gbps * 1e9)

    def allreduce_s(self, grad_bytes: float, replicas: int) -> float:
        if replicas <= 1:
            return 0.0
        return 2.0 * (replicas - 1) / replicas * grad_bytes / (self.allreduce_busbw_gbps * 1e9)


@dataclass(frozen=True)
class Straggler:
    """One rank's instructions ``factor`` times as long, at the same power."""

    rank: int
    factor: float


@dataclass(frozen=True)
class Node:
    """One instruction of one iteration on one rank."""

    index: int
    rank: int
    stage: int
    replica: int
    kind: str  # forward, backward, allreduce, optimizer
    microbatch: int  # -1 for allreduce and optimizer
    #: Interleaved schedules: which of the rank's model chunks (virtual stage chunk x stages + stage).
    chunk: int = 0

    @property
    def label(self) -> str:
        return f"{self.kind[0].upper()}{self.microbatch}" if self.microbatch >= 0 else self.kind


@dataclass(frozen=True)
class Schedule:
    """Nodes, each rank's program order, and the data dependences (pred, kind) of every node."""

    stages: int
    microbatches: int
    replicas: int
    name: str
    nodes: tuple[Node, ...]
    order: tuple[tuple[int, ...], ...]  # per rank: node indices in program order
    deps: tuple[tuple[tuple[int, str], ...], ...]  # per node: (pred, "p2p" | "local" | "collective")
    #: Model chunks per rank (interleaved 1F1B: > 1; virtual stages = chunks x stages).
    chunks: int = 1

    @property
    def ranks(self) -> int:
        return self.stages * self.replicas


def _stage_order(schedule: str, stage: int, stages: int, microbatches: int,
                 chunks: int = 1) -> list[tuple[str, int, int]]:
    """(kind, microbatch, chunk) in one stage's program order."""
    if schedule == "gpipe":
        return [("forward", m, 0) for m in range(microbatches)] + [("backward", m, 0) for m in range(microbatches)]
    if schedule == "interleaved":
        return _interleaved_order(stage, stages, microbatches, chunks)
    # 1F1B (PipeDream-flush, Megatron's default): warm-up forwards, then one forward one backward.
    warmup = min(stages - stage - 1, microbatches)
    out = [("forward", m, 0) for m in range(warmup)]
    for i in range(microbatches - warmup):
        out += [("forward", warmup + i, 0), ("backward", i, 0)]
    out += [("backward", m, 0) for m in range(microbatches - warmup, microbatches)]
    return out


def _interleaved_order(stage: int, stages: int, microbatches: int, chunks: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved 1F1B: microbatches in groups of ``stages``, each group through every
    model chunk in turn (backwards through the chunks in reverse), with a longer warm-up."""
    total = microbatches * chunks
    group = stages * chunks

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % group) // stages
        return c if forward else chunks - 1 - c

    def mb_of(k: int) -> int:
        return (k // group) * stages + k % stages

    if microbatches == stages:
        warmup = total
    else:
        warmup = min((stages - stage - 1) * 2 + (chunks - 1) * stages, total)
    out = [("forward", mb_of(k), chunk_of(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        out += [("forward", mb_of(k + warmup), chunk_of(k + warmup, True)), ("backward", mb_of(k), chunk_of(k, False))]
    out += [("backward", mb_of(k), chunk_of(k, False)) for k in range(total - warmup, total)]
    return out


def build_schedule(stages: int, microbatches: int, replicas: int = 1, schedule: str = "1f1b",
                   chunks: int = 1) -> Schedule:
    """One iteration: per rank its forwards and backwards in schedule order, the all-reduce
    (replicas > 1) and the optimizer step. ``chunks``: model chunks per rank (interleaved only)."""
    for key, v in (("--pipeline", stages), ("--microbatches", microbatches), ("--dp", replicas)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(key, v, "a whole number >= 1, e.g. --pipeline 4 --microbatches 8 --dp 1",
                              source=SOURCE)
    if schedule not in SCHEDULES:
        raise ConfigError("--schedule", schedule, f"one of {', '.join(SCHEDULES)}", source=SOURCE)
    if schedule == "interleaved":
        if chunks < 2 or stages < 2:
            raise ConfigError("--schedule", schedule, "interleaved needs at least 2 stages and 2 model chunks per "
                              "stage: give stages x chunks stage workloads (with the shipped traces: "
                              "--pipeline 2, four virtual stages), or use 1f1b", source=SOURCE)
        if microbatches % stages:
            raise ConfigError("--microbatches", microbatches, f"a multiple of the {stages} stages for the "
                              "interleaved schedule (Megatron's rule), e.g. --microbatches "
                              f"{stages * max(1, round(microbatches / stages))}", source=SOURCE)
    elif chunks != 1:
        raise ConfigError("--schedule", schedule, "one model chunk per stage (more need --schedule interleaved)",
                          source=SOURCE)
    nodes: list[Node] = []
    order: list[tuple[int, ...]] = []
    where: dict[tuple, int] = {}
    for d in range(replicas):
        for s in range(stages):
            rank = d * stages + s
            seq = []
            for kind, m, c in _stage_order(schedule, s, stages, microbatches, chunks):
                n = Node(len(nodes), rank, s, d, kind, m, c)
                nodes.append(n)
                where[(d, c * stages + s, kind, m)] = n.index
                seq.append(n.index)
            if replicas > 1:
                n = Node(len(nodes), rank, s, d, "allreduce", -1)
                nodes.append(n)
                seq.append(n.index)
            n = Node(len(nodes), rank, s, d, "optimizer", -1)
            nodes.append(n)
            seq.append(n.index)
            order.append(tuple(seq))
    virtual = stages * chunks
    deps: list[list[tuple[int, str]]] = [[] for _ in nodes]
    for n in nodes:
        d, v, m = n.replica, n.chunk * stages + n.stage, n.microbatch
        if n.kind == "forward" and v > 0:
            deps[n.index].append((where[(d, v - 1, "forward", m)], "p2p"))
        elif n.kind == "backward":
            if v < virtual - 1:
                deps[n.index].append((where[(d, v + 1, "backward", m)], "p2p"))
            deps[n.index].append((where[(d, v, "forward", m)], "local"))
        elif n.kind == "allreduce":
            for r in range(replicas):
                last_b = [i for i in order[r * stages + n.stage] if nodes[i].kind == "backward"][-1]
                deps[n.index].append((last_b, "collective"))
    return Schedule(stages, microbatches, replicas, schedule, tuple(nodes), tuple(order),
                    tuple(tuple(x) for x in deps), chunks)


# --------------------------------------------------------------------------------------------
# Clock states and costs
# --------------------------------------------------------------------------------------------


def clock_states() -> tuple[Optional[ClockPair], ...]:
    """``None`` (the driver's default) then every locked pair of the H100, highest clocks first."""
    mem, sm = h100_clock_lists()
    return (None,) + tuple(ClockPair(int(s), int(m)) for m in mem for s in sm)


def wait_power_w(states: Sequence[Optional[ClockPair]], model: Optional[H100Model] = None) -> np.ndarray:
    """What a waiting GPU draws at each state (W): measured at the default clock and idle at 345 MHz;
    in between interpolated along the model's static power curve (a model assumption)."""
    model = model or default_model()
    data = wait_power()
    spin_w = float(data["spin_blocks"]["1"]["power_w_median"])
    spin_mhz = float(data["spin_blocks"]["1"]["sm_mhz_median"])
    idle_w = float(data["idle"]["power_w"])
    idle_mhz = float(data["idle"]["sm_mhz"])
    top_mem = float(max(model.params.mem_mhz))
    lo = model.static_power_at(idle_mhz, top_mem)
    hi = model.static_power_at(spin_mhz, top_mem)
    out = []
    for st in states:
        if st is None:
            out.append(spin_w)
            continue
        f = min(max(float(st.sm_mhz), idle_mhz), spin_mhz)
        x = (model.static_power_at(f, top_mem) - lo) / (hi - lo)
        out.append(idle_w + (spin_w - idle_w) * x)
    return np.array(out)


#: An instruction is replayed for its default-state cost until this many power-controller windows
#: have passed, and then once more: that last repeat counts (the window has settled on its mix).
SETTLE_WINDOWS = 5


def _replayed_default(work: InstructionWork, model: H100Model) -> tuple[float, float, float]:
    """(time_s, energy_j, SM MHz weighted by time) of ``work`` at the driver's default clocks,
    replayed chunk by chunk on a noise-free VirtualGPU (host gaps spread evenly between chunks).

    In the default state the card's windowed power controller moves the clock inside the
    instruction (matrix products at the cap, memory-bound stretches higher); one clock for the mix
    misses that by 0.2-0.5% in time and 0.3-0.9% in energy on the shipped stages. A replay of the
    instruction's chunks (consecutive same-category kernels merged) keeps it; it matches a
    kernel-by-kernel replay within 0.02%."""
    from .gpu import VirtualGPU  # the virtual GPU the cluster is made of

    gpu = VirtualGPU(switch_latency_ms=0.0, noise=False, params=model)
    gap = work.gap_s / max(1, len(work.chunks) - 1)
    settle = SETTLE_WINDOWS * model.params.power_window_s / max(work.busy_s + work.gap_s, 1e-6)
    for _ in range(int(math.ceil(settle)) + 1):
        t0, e0, clocks = gpu.now_s, gpu.energy_j, 0.0
        for j, c in enumerate(work.chunks):
            if j:
                gpu.idle(gap)
            d, _ = gpu.run(Work(c.category, c.duration_s))
            clocks += d * gpu.last_sm_mhz
    busy = max(work.busy_s, 1e-12)
    return gpu.now_s - t0, gpu.energy_j - e0, clocks / busy if clocks else float(model.params.sm_max_mhz)


@lru_cache(maxsize=64)
def _instruction_costs(work: InstructionWork, states: tuple,
                       model: H100Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time_s, energy_j, SM MHz the kernels run at) of ``work`` at every state, cached.

    Locked states: the model's steady-state mix (one controller clock for the instruction, capped
    by the lock), with the host gaps at the locked clock. The default state: replayed
    (:func:`_replayed_default`)."""
    n = len(states)
    t, e, f = np.zeros(n), np.zeros(n), np.zeros(n)
    works = [Work(c.category, c.duration_s) for c in work.chunks]
    top_mem = float(max(model.params.mem_mhz))
    for i, st in enumerate(states):
        if st is None:
            t[i], e[i], f[i] = _replayed_default(work, model)
            continue
        ti, ei, ceiling = model.mix_time_energy([(w, st) for w in works], gap_s=work.gap_s)
        f[i] = min(ceiling, float(st.sm_mhz))
        # The mix draws its gaps at the controller's clock and the top memory clock; a lock holds
        # the card at the locked clocks while it waits for the host.
        ei += work.gap_s * (model.static_power_at(f[i], float(st.mem_mhz)) - model.static_power_at(ceiling, top_mem))
        t[i], e[i] = ti, ei
    for a in (t, e, f):
        a.setflags(write=False)
    return t, e, f


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ClusterGraph:
    """What a planner needs: nodes, program order, dependences with delays, costs per state."""

    schedule: Schedule
    states: tuple[Optional[ClockPair], ...]
    preds: tuple[tuple[tuple[int, float], ...], ...]  # per node: (pred, delay_s)
    time_s: np.ndarray  # [nodes, states]
    energy_j: np.ndarray  # [nodes, states]
    sm_mhz: np.ndarray  # [nodes, states]: the SM clock the kernels run at
    wait_power_w: np.ndarray  # [states]
    n_kernels: tuple[int, ...]  # per node: how many kernels its noise averages over
    noise: dict = field(default_factory=dict)  # the model's noise sigmas


@dataclass(frozen=True)
class ClusterPlan:
    """A state index per node; per rank the state of its waits (None: keep the clock in force)."""

    node_state: tuple[int, ...]
    wait_state: tuple[Optional[int], ...]
    min_wait_s: float = 0.0


@dataclass(frozen=True)
class Segment:
    """A stretch of one rank's timeline at one clock state: an instruction (or part) or a wait."""

    start_s: float
    end_s: float
    kind: str  # forward, backward, allreduce, optimizer, wait
    microbatch: int
    state: int
    sm_mhz: float
    chunk: int = 0
    #: what the rank's card drew over the stretch (a per-rank device reads its power from these)
    energy_j: float = 0.0


@dataclass(frozen=True)
class RankRun:
    rank: int
    stage: int
    replica: int
    busy_s: float
    wait_s: float
    energy_j: float
    wait_energy_j: float
    clock_changes: int


@dataclass(frozen=True)
class ClusterRun:
    """One iteration on the virtual cluster (a model prediction)."""

    time_s: float
    energy_j: float
    ranks: tuple[RankRun, ...]
    segments: tuple[tuple[Segment, ...], ...]
    node_start_s: tuple[float, ...]
    node_end_s: tuple[float, ...]
    model_prediction: bool = True


class VirtualCluster:
    """P stages x D replicas of the virtual H100 running one pipeline schedule."""

    def __init__(self, workloads: Sequence[StageWorkload], microbatches: int, *, replicas: int = 1,
                 schedule: str = "1f1b", links: Links = Links(), straggler: Optional[Straggler] = None,
                 model: Optional[H100Model] = None, states: Optional[Sequence[Optional[ClockPair]]] = None,
                 chunks: int = 1):
        workloads = tuple(workloads)
        if not workloads:
            raise ConfigError("--pipeline", 0, "at least one stage", source=SOURCE)
        if chunks < 1 or len(workloads) % chunks:
            raise ConfigError("--stage-traces", len(workloads), f"a multiple of the {chunks} model chunks per "
                              "stage: one trace per virtual stage, in order", source=SOURCE)
        #: One per virtual stage (chunk x stages + stage); with one chunk, one per stage.
        self.workloads = workloads
        self.schedule = build_schedule(len(workloads) // chunks, microbatches, replicas, schedule, chunks)
        stages = self.schedule.stages
        # A rank steps the optimizer once for all its chunks.
        self._optimizers = tuple(
            InstructionWork("optimizer", sum((workloads[c * stages + s].optimizer.chunks for c in range(chunks)), ()),
                            sum(workloads[c * stages + s].optimizer.gap_s for c in range(chunks)),
                            sum(workloads[c * stages + s].optimizer.n_kernels for c in range(chunks)))
            if chunks > 1 else workloads[s].optimizer
            for s in range(stages))
        self.links = links
        self.model = model or default_model()
        self.states = tuple(states) if states is not None else clock_states()
        if straggler is not None:
            if not (0 <= straggler.rank < self.schedule.ranks):
                raise ConfigError("--straggler", f"{straggler.rank}:{straggler.factor}",
                                  f"a rank from 0 to {self.schedule.ranks - 1} (stages x replicas = "
                                  f"{self.schedule.stages} x {replicas}; rank = replica x stages + stage), "
                                  "e.g. --straggler 1:1.1", source=SOURCE)
            if not (math.isfinite(straggler.factor) and straggler.factor > 0):
                raise ConfigError("--straggler", f"{straggler.rank}:{straggler.factor}",
                                  "a slowdown factor > 0, e.g. 1.1 for 10% slower", source=SOURCE)
        self.straggler = straggler
        self._graph: Optional[ClusterGraph] = None

    @property
    def ranks(self) -> int:
        return self.schedule.ranks

    def work_of(self, node: Node) -> InstructionWork:
        """The GPU work of a forward, backward or optimizer node."""
        if node.kind == "optimizer":
            return self._optimizers[node.stage]
        return self.workloads[node.chunk * self.schedule.stages + node.stage].work(node.kind)

    def stage_grad_bytes(self, stage: int) -> float:
        """Gradient bytes of a stage, from its share of optimizer time (see the module docstring)."""
        params = SHIPPED_PARAMS * self._optimizers[stage].busy_s / _shipped_optimizer_s()
        return params * GRAD_BYTES_PER_PARAM

    def graph(self, card_seed: Optional[int] = None) -> ClusterGraph:
        """The schedule's graph with its costs: the model's, or with ``card_seed`` each rank's as
        measured on its own card (the card factors of that noise seed)."""
        if card_seed is not None:
            return self._measured_graph(card_seed)
        if self._graph is not None:
            return self._graph
        sch = self.schedule
        n, c = len(sch.nodes), len(self.states)
        t, e, f = np.zeros((n, c)), np.zeros((n, c)), np.zeros((n, c))
        kernels = []
        wp = wait_power_w(self.states, self.model)
        top = np.array([float(self.model.params.sm_max_mhz) if s is None else float(s.sm_mhz)
                        for s in self.states])
        for node in sch.nodes:
            if node.kind == "allreduce":
                d = self.links.allreduce_s(self.stage_grad_bytes(node.stage), sch.replicas)
                t[node.index], e[node.index], f[node.index] = d, d * wp, top
                kernels.append(1)
                continue
            work = self.work_of(node)
            kernels.append(work.n_kernels)
            ti, ei, fi = _instruction_costs(work, self.states, self.model)
            factor = self.straggler.factor if self.straggler and self.straggler.rank == node.rank else 1.0
            t[node.index], e[node.index], f[node.index] = ti * factor, ei * factor, fi
        p2p = self.links.p2p_s()
        preds = tuple(tuple((p, p2p if kind == "p2p" else 0.0) for p, kind in sch.deps[i]) for i in range(n))
        for a in (t, e, f):
            a.setflags(write=False)
        self._graph = ClusterGraph(sch, self.states, preds, t, e, f, wp, tuple(kernels),
                                   dict(self.model.params.noise))
        return self._graph

    def _measured_graph(self, seed: int) -> ClusterGraph:
        g = self.graph()
        t, e = g.time_s.copy(), g.energy_j.copy()
        for r, seq in enumerate(g.schedule.order):
            ct, cp = card_factors(g.noise, seed, r)
            rows = [i for i in seq if g.schedule.nodes[i].kind != "allreduce"]  # link-bound
            t[rows] *= ct
            e[rows] *= ct * cp
        for a in (t, e):
            a.setflags(write=False)
        return ClusterGraph(g.schedule, g.states, g.preds, t, e, g.sm_mhz, g.wait_power_w, g.n_kernels, g.noise)

    def default_plan(self) -> ClusterPlan:
        return ClusterPlan(tuple(0 for _ in self.schedule.nodes), tuple(None for _ in range(self.ranks)))

    # --- execution -----------------------------------------------------------------------------
    def execute(self, plan: Optional[ClusterPlan] = None, *, noise: bool = True, seed: int = 0,
                switch_latency_s: float = 0.0, issue_ahead: bool = True,
                iteration: Optional[int] = None) -> ClusterRun:
        """One iteration of ``plan`` (default clocks if None), event by event.

        ``iteration``: one of many iterations run with the same ``seed``: the cards (their
        persistent factors) stay, each instruction's jitter is drawn anew (None: the seed's one
        draw, as a single comparison uses).

        The run is first made noise-free with every change landing on its boundary: the timeline
        an actuator predicts from the previous iteration. Then the run that counts: with noise,
        and changes landing one latency after their request (issued ahead of the predicted
        boundary, or at the boundary reached)."""
        plan = plan or self.default_plan()
        g = self.graph()
        if len(plan.node_state) != len(g.schedule.nodes) or len(plan.wait_state) != self.ranks:
            raise ConfigError("plan", "size", f"{len(g.schedule.nodes)} node states and {self.ranks} wait "
                              "states, one per rank", source=SOURCE)
        predicted = _Run(g, plan, None, noise="card" if noise else "off", seed=seed).go()
        if not noise and (switch_latency_s == 0 or issue_ahead):
            return predicted.result()
        return _Run(g, plan, predicted, noise="full" if noise else "off", seed=seed, latency_s=switch_latency_s,
                    issue_ahead=issue_ahead, iteration=iteration).go().result()


def card_factors(noise: dict, seed: int, rank: int) -> tuple[float, float]:
    """(time, power) factors of one rank's card for a noise seed: persistent, so a measurement of
    that GPU's instructions sees them (the per-instruction jitter it does not)."""
    card = random.Random(f"cluster-card-{seed}-{rank}")
    return 1.0 + card.gauss(0.0, noise["card_time_sigma"]), 1.0 + card.gauss(0.0, noise["card_power_sigma"])


class _Run:
    """One iteration's event simulation (see :meth:`VirtualCluster.execute`).

    ``noise``: ``"off"``, ``"card"`` (each rank's persistent card factors only: what the previous
    iteration shows an actuator) or ``"full"`` (card factors and per-instruction jitter).
    ``predicted``: None for a run whose changes land exactly on its own boundaries; else the
    run (card noise, on time) the actuator predicts from, and changes land when the switch model
    says."""

    def __init__(self, g: ClusterGraph, plan: ClusterPlan, predicted: Optional["_Run"], *, noise: str,
                 seed: int, latency_s: float = 0.0, issue_ahead: bool = True, iteration: Optional[int] = None):
        self.g, self.plan, self.predicted = g, plan, predicted
        self.latency_s, self.issue_ahead = latency_s, issue_ahead
        sch = g.schedule
        n = len(sch.nodes)
        self.ft, self.fp = np.ones(n), np.ones(n)
        if noise != "off":
            sig = g.noise
            for r in range(sch.ranks):
                ct, cp = card_factors(sig, seed, r)
                for i in sch.order[r]:
                    if sch.nodes[i].kind == "allreduce":  # link-bound: the card does not set its pace
                        continue
                    jt = jp = 1.0
                    if noise == "full":
                        rng = random.Random(f"cluster-{seed}-{r}-{i}" if iteration is None
                                            else f"cluster-{seed}-it{iteration}-{r}-{i}")
                        k = math.sqrt(max(1, g.n_kernels[i]))
                        jt = max(0.5, 1.0 + rng.gauss(0.0, sig["kernel_time_sigma"] / k))
                        jp = max(0.5, 1.0 + rng.gauss(0.0, sig["kernel_power_sigma"] / k))
                    self.ft[i], self.fp[i] = ct * jt, cp * jp
        self.start = np.zeros(n)
        self.end = np.zeros(n)
        self.segments: list[list[Segment]] = [[] for _ in range(sch.ranks)]
        self.energy = np.zeros(sch.ranks)
        self.wait_energy = np.zeros(sch.ranks)
        self.busy = np.zeros(sch.ranks)
        self.wait = np.zeros(sch.ranks)
        # Per rank: clock changes (land_s, state) in landing order; the state in force before them.
        self.changes: list[list[tuple[float, int]]] = [[] for _ in range(sch.ranks)]
        self.initial: list[int] = [0] * sch.ranks
        self.time_s = 0.0

    # --- the plan's intent, from the predicted run ----------------------------------------------
    def _gap_state(self, rank: int, k: int, gap_s: float) -> Optional[int]:
        """The state of the wait before the ``k``-th instruction of ``rank`` (``k == len``: the
        tail), or None where the wait keeps the clock in force."""
        ws = self.plan.wait_state[rank]
        if ws is None or gap_s <= 0 or gap_s < self.plan.min_wait_s:
            return None
        return ws

    def _predicted_gap(self, rank: int, k: int) -> float:
        p, order = self.predicted, self.g.schedule.order[rank]
        prev_end = p.end[order[k - 1]] if k > 0 else 0.0
        nxt = p.start[order[k]] if k < len(order) else p.time_s
        return nxt - prev_end

    # --- clock changes --------------------------------------------------------------------------
    def _state_at(self, rank: int, t: float) -> tuple[int, float]:
        """(state in force at ``t``, time of the next change after ``t`` or inf)."""
        st = self.initial[rank]
        for land, s in self.changes[rank]:
            if land <= t + 1e-15:
                st = s
            else:
                return st, land
        return st, math.inf

    def _land(self, rank: int, land_s: float, state: int) -> None:
        """A change that lands at ``land_s`` (a later request never lands before an earlier one)."""
        ch = self.changes[rank]
        cur = ch[-1][1] if ch else self.initial[rank]
        if state == cur:
            return
        land_s = max(land_s, ch[-1][0] if ch else 0.0)
        ch.append((land_s, state))

    # --- timeline -------------------------------------------------------------------------------
    def _seg(self, rank: int, t0: float, t1: float, kind: str, mb: int, st: int, node: Optional[int],
             energy_j: float) -> None:
        if t1 <= t0:
            return
        if node is not None:
            f = float(self.g.sm_mhz[node, st])
        else:
            f = 1980.0 if self.g.states[st] is None else float(self.g.states[st].sm_mhz)
        chunk = self.g.schedule.nodes[node].chunk if node is not None else 0
        segs = self.segments[rank]
        if segs and segs[-1].kind == kind and segs[-1].microbatch == mb and segs[-1].state == st \
                and segs[-1].chunk == chunk and abs(segs[-1].end_s - t0) < 1e-12:
            segs[-1] = Segment(segs[-1].start_s, t1, kind, mb, st, f, chunk, segs[-1].energy_j + energy_j)
        else:
            segs.append(Segment(t0, t1, kind, mb, st, f, chunk, energy_j))

    def _wait(self, rank: int, t0: float, t1: float, fixed_state: Optional[int]) -> None:
        if t1 <= t0:
            return
        wp = self.g.wait_power_w
        self.wait[rank] += t1 - t0
        e, now = 0.0, t0
        while now < t1 - 1e-15:
            if fixed_state is not None:
                st, stop = fixed_state, t1
            else:
                st, nxt = self._state_at(rank, now)
                stop = min(t1, nxt)
            e += wp[st] * (stop - now)
            self._seg(rank, now, stop, "wait", -1, st, None, float(wp[st] * (stop - now)))
            now = stop
        self.energy[rank] += e
        self.wait_energy[rank] += e

    def _work(self, rank: int, i: int, t0: float, fixed_state: Optional[int]) -> float:
        g, node = self.g, self.g.schedule.nodes[i]
        T, E = g.time_s[i] * self.ft[i], g.energy_j[i] * self.ft[i] * self.fp[i]
        now, left = t0, 1.0
        while left > 1e-12:
            if fixed_state is not None:
                st, nxt = fixed_state, math.inf
            else:
                st, nxt = self._state_at(rank, now)
            full = T[st]
            if full <= 0:
                break
            if now + left * full <= nxt:
                self.energy[rank] += left * E[st]
                self._seg(rank, now, now + left * full, node.kind, node.microbatch, st, i, float(left * E[st]))
                now += left * full
                left = 0.0
            else:
                frac = (nxt - now) / full
                self.energy[rank] += frac * E[st]
                self._seg(rank, now, nxt, node.kind, node.microbatch, st, i, float(frac * E[st]))
                left -= frac
                now = nxt
        self.busy[rank] += now - t0
        return now

    def go(self) -> "_Run":
        g, sch, plan = self.g, self.g.schedule, self.plan
        ideal = self.predicted is None
        late = not ideal and not self.issue_ahead and self.latency_s > 0
        free = np.zeros(sch.ranks)
        pos = [0] * sch.ranks
        done = np.zeros(len(sch.nodes), dtype=bool)
        last_state = [plan.node_state[sch.order[r][0]] for r in range(sch.ranks)]
        if not ideal:
            for r in range(sch.ranks):
                order = sch.order[r]
                if late:  # the last clock of the previous iteration is in force
                    tail = self._gap_state(r, len(order), self._predicted_gap(r, len(order)))
                    self.initial[r] = plan.node_state[order[-1]] if tail is None else tail
                else:  # issued in the previous iteration's tail: the first segment's clock
                    first = self._gap_state(r, 0, self._predicted_gap(r, 0))
                    self.initial[r] = plan.node_state[order[0]] if first is None else first
                    if first is not None:
                        self._raise(r, 0, 0.0)
        remaining = len(sch.nodes)
        while remaining:
            progressed = False
            for r in range(sch.ranks):
                order = sch.order[r]
                while pos[r] < len(order):
                    k = pos[r]
                    i = order[k]
                    if not all(done[p] for p, _ in g.preds[i]):
                        break
                    ready = max([self.end[p] + d for p, d in g.preds[i]] + [0.0])
                    start = max(ready, free[r])
                    st = plan.node_state[i]
                    if ideal:
                        low = self._gap_state(r, k, start - free[r])
                        self._wait(r, free[r], start, last_state[r] if low is None else low)
                    else:
                        if late:
                            self._land(r, start + self.latency_s, st)
                        self._wait(r, free[r], start, None)
                        if not late:
                            self._ahead_after(r, k, start)
                    self.start[i] = start
                    self.end[i] = self._work(r, i, start, st if ideal else None)
                    free[r] = self.end[i]
                    last_state[r] = st
                    if late:
                        nxt = self._gap_state(r, k + 1, self._predicted_gap(r, k + 1))
                        if nxt is not None:
                            self._land(r, free[r] + self.latency_s, nxt)
                    done[i] = True
                    pos[r] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:  # pragma: no cover - build_schedule makes acyclic schedules
                raise ConfigError("schedule", sch.name, "an acyclic schedule (this one deadlocks)", source=SOURCE)
        self.time_s = float(self.end.max())
        for r in range(sch.ranks):
            if ideal:
                low = self._gap_state(r, len(sch.order[r]), self.time_s - free[r])
                self._wait(r, free[r], self.time_s, last_state[r] if low is None else low)
            else:
                self._wait(r, free[r], self.time_s, None)
        return self

    def _ahead_after(self, rank: int, k: int, start_s: float) -> None:
        """Issue-ahead, re-anchored at the start of the ``k``-th instruction (as an actuator sees
        its marker): the change for what follows it lands at its predicted end; when a wait at the
        wait clock follows, the change back lands at the wait's predicted end, less a guard."""
        p, order = self.predicted, self.g.schedule.order[rank]
        i = order[k]
        end_s = start_s + (p.end[i] - p.start[i])
        gap_s = self._predicted_gap(rank, k + 1)
        low = self._gap_state(rank, k + 1, gap_s)
        if low is not None:
            self._land(rank, end_s, low)
            self._raise(rank, k + 1, end_s)
        elif k + 1 < len(order):
            self._land(rank, end_s + gap_s, self.plan.node_state[order[k + 1]])

    def _raise(self, rank: int, k: int, wait_start_s: float) -> None:
        """After a wait at the wait clock: the ``k``-th instruction's clock lands at the wait's
        predicted end (re-anchored at the wait's start)."""
        order = self.g.schedule.order[rank]
        if k >= len(order):
            return
        self._land(rank, wait_start_s + self._predicted_gap(rank, k), self.plan.node_state[order[k]])

    def result(self) -> ClusterRun:
        sch = self.g.schedule
        ranks = []
        for r in range(sch.ranks):
            segs = self.segments[r]
            changes = sum(1 for a, b in zip(segs, segs[1:]) if a.state != b.state)
            ranks.append(RankRun(r, r % sch.stages, r // sch.stages, float(self.busy[r]), float(self.wait[r]),
                                 float(self.energy[r]), float(self.wait_energy[r]), changes))
        return ClusterRun(self.time_s, float(self.energy.sum()), tuple(ranks),
                          tuple(tuple(s) for s in self.segments), tuple(float(x) for x in self.start),
                          tuple(float(x) for x in self.end))
