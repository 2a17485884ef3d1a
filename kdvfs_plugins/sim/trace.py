"""Kernel traces: load the CSV format, derive regions, replay on the virtual GPU.

CSV columns: ``step, phase, category, kernel, start_us, dur_us`` (``start_us`` from the start of
the step's forward pass), and optionally ``region`` (written by :mod:`.capture`). The gaps between
kernels are kept: they are time the GPU waited for the host, and stay the same at any clock
(an assumption: the host does not catch up when the GPU slows down, which makes slowdowns
conservative).

Without a ``region`` column, regions are derived: ``phase/group`` with the group named after the
kind of kernel (``matmul``, ``attention``, ``norm``, ``loss``, ``activation``, ``elementwise``),
and the optimizer step as one region ``optimizer``. Memsets and memcpys belong to the kernel that
follows them (cuBLAS and cuDNN zero their workspace right before they run).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ..clocks import ClockPair
from ..errors import ConfigError
from .model import Work

REQUIRED_COLUMNS = ("step", "phase", "category", "kernel", "start_us", "dur_us")

#: Trace category -> region group (the part after ``phase/``) when the CSV has no region column.
GROUP_OF_CATEGORY = {
    "gemm": "matmul",
    "attention": "attention",
    "layernorm": "norm",
    "softmax_loss": "loss",
    "gelu": "activation",
    "copy_cast": "elementwise",
    "elementwise": "elementwise",
    "reduce": "elementwise",
    "embedding": "embedding",
    "optimizer": "optimizer",
}
ATTACHED_CATEGORIES = ("memset", "memcpy")
#: Names accepted for the shipped GPT trace.
GPT1B_NAMES = ("gpt1b", "gpt", "h100-gpt1b-step-kernels.csv")


def is_workload_name(name) -> bool:
    """Whether ``name`` names a shipped trace (``gpt1b``, ``llama1b``, ...) rather than a file."""
    from ..data import WORKLOAD_TRACES

    return name is None or str(name) in GPT1B_NAMES or str(name) in WORKLOAD_TRACES


@dataclass(frozen=True)
class TraceKernel:
    step: int
    phase: str
    category: str
    kernel: str
    start_s: float
    duration_s: float
    #: Idle time on the GPU between the previous kernel's end (or the step start) and this one.
    gap_before_s: float
    region: str

    def work(self) -> Work:
        return Work(self.category, self.duration_s)


@dataclass(frozen=True)
class TraceStep:
    index: int
    kernels: tuple[TraceKernel, ...]
    #: Idle time after the last kernel until the next step starts.
    tail_gap_s: float = 0.0

    @property
    def span_s(self) -> float:
        k = self.kernels[-1]
        return k.start_s + k.duration_s

    @property
    def period_s(self) -> float:
        return self.span_s + self.tail_gap_s

    @property
    def busy_s(self) -> float:
        return sum(k.duration_s for k in self.kernels)

    def stretches(self) -> list[tuple[str, list[TraceKernel]]]:
        """Consecutive kernels of one region, in order: (region, kernels)."""
        out: list[tuple[str, list[TraceKernel]]] = []
        for k in self.kernels:
            if out and out[-1][0] == k.region:
                out[-1][1].append(k)
            else:
                out.append((k.region, [k]))
        return out


@dataclass(frozen=True)
class Trace:
    steps: tuple[TraceStep, ...]
    source: str = ""

    @property
    def regions(self) -> list[str]:
        """Region names in first-seen order."""
        seen: dict[str, None] = {}
        for s in self.steps:
            for k in s.kernels:
                seen.setdefault(k.region, None)
        return list(seen)

    @classmethod
    def from_csv(cls, path: Union[str, Path], step_period_s: Optional[float] = None,
                 region_of: Optional[Callable[[Mapping[str, str]], str]] = None) -> "Trace":
        """Load a trace. ``step_period_s`` (if known) sets the gap after each step's last kernel."""
        path = Path(path)
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError("trace", str(path.name), f"a CSV with columns {', '.join(REQUIRED_COLUMNS)} "
                                  f"(missing: {', '.join(missing)})", source="kdvfs trace")
            rows = list(reader)
        return cls.from_rows(rows, step_period_s=step_period_s, region_of=region_of, source=path.name)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, str]], step_period_s: Optional[float] = None,
                  region_of: Optional[Callable[[Mapping[str, str]], str]] = None, source: str = "") -> "Trace":
        by_step: dict[int, list[Mapping[str, str]]] = {}
        for r in rows:
            by_step.setdefault(int(r["step"]), []).append(r)
        if not by_step:
            raise ConfigError("trace", source, "at least one kernel row", source="kdvfs trace")
        steps = []
        for idx in sorted(by_step):
            rs = sorted(by_step[idx], key=lambda r: float(r["start_us"]))
            regions = _regions(rs, region_of)
            kernels = []
            prev_end = 0.0
            for r, region in zip(rs, regions):
                start = float(r["start_us"]) * 1e-6
                dur = float(r["dur_us"]) * 1e-6
                kernels.append(TraceKernel(idx, r["phase"], r["category"], r["kernel"], start, dur,
                                           max(0.0, start - prev_end), region))
                prev_end = max(prev_end, start + dur)
            step = TraceStep(idx, tuple(kernels))
            if step_period_s is not None:
                step = TraceStep(idx, step.kernels, max(0.0, step_period_s - step.span_s))
            steps.append(step)
        return cls(tuple(steps), source)

    @classmethod
    def gpt1b(cls) -> "Trace":
        """The shipped GPT trace (2 steps), with the measured step period (0.2261 s)."""
        from ..data import GPT1B_TRACE_CSV, h100_default_clocks, path

        period = h100_default_clocks()["gpt_training_step"]["s_per_step"]
        return cls.from_csv(path(GPT1B_TRACE_CSV), step_period_s=period)

    @classmethod
    def load(cls, name_or_path: Union[None, str, Path], step_period_s: Optional[float] = None) -> "Trace":
        """A trace by name (``gpt1b``, ``llama1b``, ...; None means gpt1b) or CSV path."""
        from ..data import WORKLOAD_TRACES, path

        if name_or_path is None or str(name_or_path) in GPT1B_NAMES:
            return cls.gpt1b()
        if str(name_or_path) in WORKLOAD_TRACES:
            return cls.from_csv(path(WORKLOAD_TRACES[str(name_or_path)][0]), step_period_s=step_period_s)
        p = Path(name_or_path)
        if not p.exists():
            raise ConfigError("--trace", str(name_or_path),
                              f"a CSV file or one of: {', '.join(WORKLOAD_TRACES)}", source="kdvfs simulate")
        return cls.from_csv(p, step_period_s=step_period_s)


def _regions(rows: Sequence[Mapping[str, str]], region_of) -> list[str]:
    if region_of is not None:
        return [region_of(r) for r in rows]
    if rows and rows[0].get("region"):
        return [r["region"] for r in rows]
    out: list[Optional[str]] = []
    for r in rows:
        if r["category"] in ATTACHED_CATEGORIES:
            out.append(None)
        else:
            out.append(derive_region(r["phase"], r["category"]))
    # Attach memset/memcpy to the next kernel of the same phase (else the previous one).
    nxt: Optional[str] = None
    for i in range(len(rows) - 1, -1, -1):
        if out[i] is None:
            if nxt is not None and nxt.split("/")[0] == rows[i]["phase"]:
                out[i] = nxt
        else:
            nxt = out[i]
    prev: Optional[str] = None
    for i in range(len(rows)):
        if out[i] is None:
            out[i] = prev or rows[i]["phase"]
        prev = out[i]
    return out  # type: ignore[return-value]


def derive_region(phase: str, category: str) -> str:
    """Region name of a kernel from its phase and category (no region column in the trace)."""
    if phase == "optimizer":
        return "optimizer"
    return f"{phase}/{GROUP_OF_CATEGORY.get(category, 'elementwise')}"


# --- replay ---------------------------------------------------------------------------------------

ClocksFor = Callable[[str], Optional[ClockPair]]


def planned_changes(regions: Sequence[str], clocks_for: ClocksFor, current: list) -> list:
    """(stretch index, clocks) of each change a step at ``clocks_for`` makes, in order;
    ``current[0]`` (the clocks in force) ends at the step's last clocks."""
    todo = []
    for j, region in enumerate(regions):
        want = clocks_for(region)
        if want != current[0]:
            todo.append((j, want))
            current[0] = want
    return todo


def issue_due_changes(gpu, todo: list, offsets: Sequence[float], k: int, lead_s: float) -> None:
    """At stretch ``k``'s start, request the changes due before the next boundary, each ``lead_s``
    ahead of its boundary as predicted by ``offsets`` (stretch starts of the step before).

    Re-anchored at every boundary the GPU reaches, as an actuator sees its markers. The first
    boundaries' changes are due before the step starts: they stand for changes issued in the
    previous step's tail. Issued changes leave ``todo``.
    """
    now = gpu.now_s
    nxt = now + offsets[k + 1] - offsets[k] if k + 1 < len(offsets) else math.inf
    while todo:
        j, want = todo[0]
        at = now + offsets[j] - offsets[k] - lead_s
        if at >= nxt:
            break
        gpu.request_clocks(want, at)
        todo.pop(0)


@dataclass(frozen=True)
class StepResult:
    step: int
    time_s: float
    energy_j: float
    #: SM clocks the kernels ran at, weighted by time: median and minimum (MHz).
    median_sm_mhz: float
    min_sm_mhz: float
    #: (region, GPU time s, energy J) per region stretch, in order.
    regions: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class ReplayResult:
    steps: tuple[StepResult, ...]
    #: Average power from the energy counter between its first and last refresh inside the
    #: measured steps (how a 100 ms counter must be read); None if no two refreshes fell inside.
    counter_power_w: Optional[float]
    clock_changes: int

    @property
    def step_time_s(self) -> float:
        return float(np.mean([s.time_s for s in self.steps]))

    @property
    def energy_j(self) -> float:
        """True model energy per step (J)."""
        return float(np.mean([s.energy_j for s in self.steps]))

    @property
    def avg_power_w(self) -> float:
        return sum(s.energy_j for s in self.steps) / sum(s.time_s for s in self.steps)

    @property
    def median_sm_mhz(self) -> float:
        return float(np.median([s.median_sm_mhz for s in self.steps]))

    @property
    def min_sm_mhz(self) -> float:
        return float(min(s.min_sm_mhz for s in self.steps))

    def region_totals(self) -> dict[str, tuple[float, float]]:
        """Per region: (GPU time s, energy J) per step, averaged over the measured steps."""
        acc: dict[str, list[float]] = {}
        for s in self.steps:
            for name, t, e in s.regions:
                a = acc.setdefault(name, [0.0, 0.0])
                a[0] += t
                a[1] += e
        n = len(self.steps)
        return {k: (v[0] / n, v[1] / n) for k, v in acc.items()}


def replay(gpu, trace: Trace, steps: Optional[int] = None, clocks_for: Optional[ClocksFor] = None,
           warmup_steps: int = 1, on_region: Optional[Callable[[str, float], None]] = None,
           lead_s: float = 0.0, lead_offsets_s: Optional[Sequence[float]] = None) -> ReplayResult:
    """Replay ``steps`` steps of ``trace`` (cycling its steps) on ``gpu`` after ``warmup_steps``.

    ``clocks_for(region)`` gives the clocks for each region (None: default); a change is requested
    at the region boundary (when the GPU reaches it) and lands after the switch latency. Returns
    per-step time and energy (true model values) and the counter-based average power.

    ``lead_s`` > 0 issues each change ahead of its boundary ("issue ahead"): steps repeat, so a
    boundary's time is predicted as the step's start plus that boundary's offset in the previous
    step (when it had the same regions), and the change is requested ``lead_s`` before it. With
    ``lead_s`` equal to the switch latency the change lands on the predicted boundary; prediction
    errors (noise, a plan that changes the step's timing) make it land a little early or late.
    The prediction is re-anchored at every boundary the GPU reaches, so errors do not add up
    over the step. A change for a boundary less than ``lead_s`` after the step's start is issued
    in the tail of the previous step. ``lead_offsets_s`` (one offset per region stretch) seeds the
    prediction for the first step, e.g. from the plan's own predicted timing; without it the first
    step requests at the boundaries.
    """
    n = len(trace.steps) if steps is None else steps
    if n < 1:
        raise ConfigError("steps", n, "at least 1", source="kdvfs simulate")
    if not (lead_s >= 0.0):
        raise ConfigError("lead_s", lead_s, "a lead in seconds >= 0", source="kdvfs simulate")
    current: list[Optional[ClockPair]] = [None]
    changes = [0]
    #: Boundary offsets from the step's start, per recorded step (the issue-ahead prediction):
    #: the replay cycles the trace's recorded steps, and a repeat of one is predicted from its last
    #: repeat, as a steady training run's step is predicted from the step before it.
    seed_offsets = None if lead_offsets_s is None else [float(x) for x in lead_offsets_s]
    last_offsets: dict[int, list[float]] = {}

    def run_step(ts: TraceStep) -> StepResult:
        t0, e0 = gpu.now_s, gpu.energy_j
        clocks_w: list[tuple[float, float]] = []
        regions: list[tuple[str, float, float]] = []
        stretches = ts.stretches()
        prev = last_offsets.get(ts.index, seed_offsets)
        ahead = clocks_for is not None and lead_s > 0 and prev is not None and len(prev) == len(stretches)
        todo: list[tuple[int, Optional[ClockPair]]] = []  # (stretch index, clocks) of each change
        if ahead:
            todo = planned_changes([region for region, _ in stretches], clocks_for, current)
            changes[0] += len(todo)
        offsets: list[float] = []
        for k, (region, kernels) in enumerate(stretches):
            offsets.append(gpu.now_s - t0)
            if ahead:
                issue_due_changes(gpu, todo, prev, k, lead_s)
            if on_region is not None:
                on_region(region, gpu.now_s)
            if clocks_for is not None and not ahead:
                want = clocks_for(region)
                if want != current[0]:
                    gpu.request_clocks(want, gpu.now_s)
                    current[0] = want
                    changes[0] += 1
            rt = re = 0.0
            for k in kernels:
                if k.gap_before_s > 0:
                    ge = gpu.energy_j
                    gpu.idle(k.gap_before_s)
                    rt += k.gap_before_s
                    re += gpu.energy_j - ge
                d, e = gpu.run(Work(k.category, k.duration_s))
                clocks_w.append((gpu.last_sm_mhz, d))
                rt += d
                re += e
            regions.append((region, rt, re))
        if ts.tail_gap_s > 0:
            gpu.idle(ts.tail_gap_s)
        last_offsets[ts.index] = offsets
        f = np.array([c for c, _ in clocks_w])
        w = np.array([d for _, d in clocks_w])
        order = np.argsort(f)
        cum = np.cumsum(w[order])
        median = float(f[order][np.searchsorted(cum, cum[-1] / 2)])
        return StepResult(ts.index, gpu.now_s - t0, gpu.energy_j - e0, median, float(f.min()), tuple(regions))

    for i in range(warmup_steps):
        run_step(trace.steps[i % len(trace.steps)])
    results = []
    for i in range(n):
        results.append(run_step(trace.steps[(warmup_steps + i) % len(trace.steps)]))
    # Counter-based power: first refresh after the measured steps began, last refresh before the end.
    start_s = gpu.now_s - sum(r.time_s for r in results)
    readings = _counter_readings(gpu, start_s)
    counter_power = None
    if readings is not None:
        (c_t0, c_e0), (c_t1, c_e1) = readings
        if c_t1 > c_t0:
            counter_power = (c_e1 - c_e0) / 1e3 / (c_t1 - c_t0)
    return ReplayResult(tuple(results), counter_power, changes[0])


def _counter_readings(gpu, start_s: float):
    hist = getattr(gpu, "counter_history", None)
    if hist is None:
        return None
    inside = [(t, mj) for t, mj in hist if t >= start_s - 1e-12]
    if len(inside) < 2:
        return None
    return inside[0], inside[-1]


def works_of(trace: Trace, step: int = 0) -> list[Work]:
    """The step's kernels as Work items (gaps dropped)."""
    return [k.work() for k in trace.steps[step % len(trace.steps)].kernels]
