"""Record a training step's kernels, tagged by kdvfs region, in the trace CSV format.

The training code marks regions with :func:`region` (a ``torch.profiler.record_function`` range
named ``kdvfs:<region>``); :func:`record` runs the step function under ``torch.profiler`` with each
step in a ``kdvfs_step:<n>`` range and writes ``step, phase, category, kernel, start_us, dur_us,
region``. On a GPU the ranges also appear on the GPU timeline (as user annotations), so kernels are
tagged by the range they run inside, not by when the CPU enqueued them.

The conversion from profiler events to rows, :func:`events_to_rows`, is a pure function over
plain records so it can be tested without a GPU. torch is imported only when recording.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from ..regions import Region

REGION_PREFIX = "kdvfs:"
STEP_PREFIX = "kdvfs_step:"
COLUMNS = ("step", "phase", "category", "kernel", "start_us", "dur_us", "region")

# Kernel name patterns -> trace category, first match wins (names as CUDA/cuBLAS/cuDNN report them).
_KERNEL_CATEGORIES = [
    (r"^Memset|^aten::(zeros|ones|fill|zero_|new_zeros)", "memset"),
    (r"^Memcpy", "memcpy"),
    (r"flash|fmha|sdpa|attention|_attn", "attention"),
    (r"nvjet|gemm|cutlass|cublas|sm90_xmma|ampere_.*s16816|mm_|matmul|addmm|\bmm\b|bmm|conv|aten::linear", "gemm"),
    (r"layer_norm|LayerNorm|rms_norm|RmsNorm|GammaBeta|batch_norm", "layernorm"),
    (r"softmax|SoftMax|nll_loss|cross_entropy", "softmax_loss"),
    (r"gelu|Gelu|GELU|silu|Silu", "gelu"),
    (r"multi_tensor_apply|adam|Adam|sgd|_foreach", "optimizer"),
    (r"embedding|Embedding", "embedding"),
    (r"reduce_kernel|Reduce|reduce|sum_|norm|aten::(sum|mean|amax|max|var)\b", "reduce"),
    (r"copy|Copy|cast|to_copy|clone|cat_|CatArray", "copy_cast"),
]
_KERNEL_RES = [(re.compile(p), c) for p, c in _KERNEL_CATEGORIES]


def categorize_kernel(name: str) -> str:
    """Trace category of a kernel (or CPU op) name."""
    for rx, cat in _KERNEL_RES:
        if rx.search(name):
            return cat
    return "elementwise"


@dataclass(frozen=True)
class Span:
    """A named interval on one timeline, in microseconds."""

    name: str
    start_us: float
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


def events_to_rows(kernels: Iterable[Span], ranges: Iterable[Span],
                   categorize: Callable[[str], str] = categorize_kernel) -> list[dict]:
    """Turn kernels and kdvfs ranges (one timeline) into trace rows.

    Each kernel belongs to the innermost ``kdvfs:<region>`` range that contains its midpoint and to
    the ``kdvfs_step:<n>`` range around it; kernels outside every step range are dropped. The
    phase is the region's phase (``step`` when outside any region). ``start_us`` counts from the
    first kernel of the step's range, as in the shipped trace.
    """
    ranges = list(ranges)
    steps = sorted((r for r in ranges if r.name.startswith(STEP_PREFIX)), key=lambda r: r.start_us)
    regions = [r for r in ranges if r.name.startswith(REGION_PREFIX)]
    rows: list[dict] = []
    by_step: dict[int, list[tuple[Span, str]]] = {}
    for k in sorted(kernels, key=lambda s: s.start_us):
        mid = k.start_us + k.dur_us / 2
        step = next((s for s in steps if s.start_us <= mid <= s.end_us), None)
        if step is None:
            continue
        inside = [r for r in regions if r.start_us <= mid <= r.end_us]
        region = min(inside, key=lambda r: r.dur_us).name[len(REGION_PREFIX):] if inside else "step"
        by_step.setdefault(int(step.name[len(STEP_PREFIX):]), []).append((k, region))
    for idx in sorted(by_step):
        items = by_step[idx]
        t0 = items[0][0].start_us
        for k, region in items:
            rows.append({
                "step": idx,
                "phase": Region.parse(region).phase,
                "category": categorize(k.name),
                "kernel": k.name.replace(",", ";")[:80],
                "start_us": round(k.start_us - t0, 3),
                "dur_us": round(k.dur_us, 3),
                "region": region,
            })
    return rows


#: Idle gaps between kernels longer than this are cut to it by :func:`correct_rows` (µs).
MAX_GAP_US = 20.0


def correct_rows(rows: Sequence[dict], max_gap_us: Optional[float] = MAX_GAP_US) -> list[dict]:
    """Two mechanical corrections of a recorded step, both seen on every GPU recording so far.

    - Kernels outside every region (``step``): autograd launches backward kernels from its own
      thread, outside the phase ranges of the training thread, and fused AdamW kernels lose their
      annotation. Each takes the phase of the next tagged kernel of its step (the loss backward and
      the attention backward lie before a module's backward region); kernels after the last tagged
      one, and every ``optimizer``-category kernel, go to ``optimizer``.
    - The profiler's per-module ranges slow the host and open idle gaps that the same step without
      the profiler does not have; gaps longer than ``max_gap_us`` are cut to it (None keeps them).
    """
    out = [dict(r) for r in rows]
    by_step: dict = {}
    for r in out:
        by_step.setdefault(r["step"], []).append(r)
    for items in by_step.values():
        items.sort(key=lambda r: float(r["start_us"]))
        nxt = "optimizer"
        for r in reversed(items):
            if r["category"] == "optimizer":
                r["region"] = "optimizer"
            elif r["region"] == "step":
                r["region"] = nxt
            else:
                nxt = Region.parse(r["region"]).phase
            r["phase"] = Region.parse(r["region"]).phase
        if max_gap_us is None:
            continue
        shift, end = 0.0, None
        for r in items:
            start = float(r["start_us"]) - shift
            if end is not None and start - end > max_gap_us:
                shift += start - end - max_gap_us
                start = end + max_gap_us
            r["start_us"] = round(start, 3)
            end = max(end if end is not None else start, start + float(r["dur_us"]))
    return out


def write_csv(rows: Sequence[dict], out: Union[str, Path]) -> Path:
    out = Path(out)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return out


def region(name: str):
    """Context manager that marks a kdvfs region for the recorder (``with region("forward"): ...``)."""
    import torch

    Region.parse(name)  # reject malformed names early
    return torch.profiler.record_function(REGION_PREFIX + name)


def profiler_spans(events, device: str = "cuda") -> tuple[list[Span], list[Span]]:
    """(kernels, kdvfs ranges) from ``prof.events()``.

    ``device="cuda"``: kernels are GPU events and ranges their GPU-timeline annotations (CPU
    ranges if the annotations are missing). ``device="cpu"``: CPU ops stand in for kernels (to
    test the pipeline without a GPU); outermost aten ops only, so nested ops are not counted twice.
    """
    kernels: list[Span] = []
    steps_cpu: list[Span] = []
    regions_gpu: list[Span] = []
    regions_cpu: list[Span] = []
    for e in events:
        name = e.name
        start, dur = float(e.time_range.start), float(e.time_range.elapsed_us())
        on_gpu = "cuda" in str(getattr(e, "device_type", "")).lower()
        if name.startswith(STEP_PREFIX):
            # A step's GPU annotation covers only the first kernels it launched (seen on an H100),
            # so steps come from the CPU range, which :func:`record` closes after synchronising.
            if not on_gpu:
                steps_cpu.append(Span(name, start, dur))
        elif name.startswith(REGION_PREFIX):
            (regions_gpu if on_gpu else regions_cpu).append(Span(name, start, dur))
        elif device == "cuda" and on_gpu:
            kernels.append(Span(name, start, dur))
        elif device == "cpu" and not on_gpu and name.startswith("aten::"):
            parent = getattr(e, "cpu_parent", None)
            if parent is None or not parent.name.startswith("aten::"):
                kernels.append(Span(name, start, dur))
    regions = regions_gpu if (device == "cuda" and regions_gpu) else regions_cpu
    return kernels, steps_cpu + regions


def record(step_fn: Callable[[int], object], steps: int = 2, warmup_steps: int = 1,
           out: Optional[Union[str, Path]] = None, device: str = "cuda",
           max_gap_us: Optional[float] = MAX_GAP_US) -> list[dict]:
    """Profile ``steps`` calls of ``step_fn(i)`` (after ``warmup_steps`` unprofiled ones) into rows.

    Regions inside the step are marked with :func:`region`; the rows are corrected by
    :func:`correct_rows`. Writes the CSV to ``out`` if given.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ..errors import DeviceUnavailableError

    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("recording GPU kernels needs a CUDA GPU; use device='cpu' "
                                     "(kdvfs trace --cpu) to record CPU ops instead")
    for i in range(warmup_steps):
        step_fn(i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            with record_function(f"{STEP_PREFIX}{i}"):
                step_fn(warmup_steps + i)
                if device == "cuda":
                    torch.cuda.synchronize()  # inside the range: it then spans the step's kernels
    kernels, ranges = profiler_spans(prof.events(), device)
    rows = correct_rows(events_to_rows(kernels, ranges), max_gap_us)
    if out is not None:
        write_csv(rows, out)
    return rows


class ModuleTagger:
    """Tags each kernel-group module's kernels with the region KernelDVFS reports for it.

    ``phase`` is the phase the step is in (``forward`` or ``backward``); set it before each pass.
    Regions are ``<phase>/<folded module path>`` (layer indices folded), as the adapters name them.
    """

    def __init__(self, model, modules=None):
        from ..module_regions import select_modules
        from ..regions import fold_module_path

        self.phase = "forward"
        self._open: dict = {}
        for path, module in (modules if modules is not None else select_modules(model)):
            group = fold_module_path(path)
            module.register_forward_pre_hook(lambda m, a, k=("f", path), g=group: self._enter(k, g))
            module.register_forward_hook(lambda m, a, o, k=("f", path): self._leave(k))
            module.register_full_backward_pre_hook(lambda m, g_, k=("b", path), g=group: self._enter(k, g))
            module.register_full_backward_hook(lambda m, gi, go, k=("b", path): self._leave(k))

    def _enter(self, key, group: str) -> None:
        self._open[key] = region(f"{self.phase}/{group}")
        self._open[key].__enter__()

    def _leave(self, key) -> None:
        rng = self._open.pop(key, None)
        if rng is not None:
            rng.__exit__(None, None, None)
