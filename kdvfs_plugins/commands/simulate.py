"""``kdvfs simulate``: run a kernel trace on the virtual H100 at fixed or default clocks.

    kdvfs simulate --sm-mhz auto --mem-mhz auto            # the shipped GPT trace, default clocks
    kdvfs simulate --trace gpt1b --sm-mhz 1500 --json      # one locked SM clock, JSON out
    kdvfs simulate --trace my.csv --sm-mhz 1200 --mem-mhz 2619 --steps 20 --no-noise

Noise, the switch latency and the 100 ms energy counter are on by default: energy and power are
read from the counter the way a real measurement must be (between two of its refreshes inside the
measured steps). Every number is a model prediction, and the output says so.

The command is built from small functions so that further modes (comparisons, sweeps, plans) can
be added as one more entry in :data:`MODES`.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from ..clocks import ClockPair
from ..errors import ConfigError

LABEL = "model prediction (simulated H100)"
DEFAULT_STEPS = 10
DEFAULT_WARMUP_STEPS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default="gpt1b",
                        help="kernel trace CSV (step,phase,category,kernel,start_us,dur_us[,region]); "
                             "default: gpt1b, the shipped GPT trace measured on an H100")
    parser.add_argument("--sm-mhz", default="auto", help="locked SM clock in MHz, or auto (default)")
    parser.add_argument("--mem-mhz", default="auto", help="locked memory clock in MHz, or auto (default)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"measured steps (the trace's steps repeat; default {DEFAULT_STEPS})")
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS,
                        help=f"steps run before measuring (default {DEFAULT_WARMUP_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0); with --explore, the first of --seeds seeds")
    parser.add_argument("--no-noise", action="store_true", help="exact model values, no measurement noise")
    parser.add_argument("--switch-latency-ms", type=float, default=None,
                        help="clock switch latency of the virtual GPU (default 6 ms, published for H200)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--markdown", action="store_true",
                        help="--compare/--sweep/--latency-sweep: print the table as Markdown (as the docs show it)")
    # explore: online exploration through the live engine (kdvfs_plugins/studies/explore.py)
    parser.add_argument("--explore", action="store_true", help="explore, plan, validate, apply; compare with the oracle")
    parser.add_argument("--seeds", type=int, default=5, help="--explore: noise seeds to run (default 5)")
    parser.add_argument("--explore-plan-slowdown", type=float, default=0.0,
                        help="--explore: the plan's slowdown budget (default 0: strict, the config default)")
    parser.add_argument("--explore-max-slowdown", type=float, default=0.02, help="--explore: exploration slowdown bound")
    parser.add_argument("--explore-max-steps", type=int, default=1500, help="--explore: step budget (default 1500)")
    parser.add_argument("--lanes", type=int, default=1,
                        help="--explore: data-parallel replicas exploring together, each an engine on a card of "
                             "its own (default 1)")
    parser.add_argument("--compare", action="store_true",
                        help="plan each granularity x objective, execute on the virtual GPU, print planned vs executed")
    parser.add_argument("--sweep", action="store_true", help="energy saved vs slowdown budget 0..30%% (and a plot)")
    parser.add_argument("--latency-sweep", action="store_true",
                        help="kernel-level saving at switch latencies 0..30 ms (and a plot)")
    parser.add_argument("--max-slowdown", type=float, default=0.05,
                        help="slowdown budget of the relaxed objective, a fraction (default 0.05)")
    parser.add_argument("--min-interval-ms", type=float, default=0.0,
                        help="floor between clock changes the planner keeps (default 0: the replay has none; "
                             "a live actuator's default is 1)")
    parser.add_argument("--no-issue-ahead", action="store_true",
                        help="request each change at its boundary (it lands one latency late) instead of ahead")
    parser.add_argument("--plot", default=None, help="PNG path for --sweep/--latency-sweep (default under --out-dir)")
    parser.add_argument("--out-dir", default="kdvfs_runs/simulate", help="where plots go (default kdvfs_runs/simulate)")
    # pipeline: P stages x D replicas on the virtual cluster (kdvfs_plugins/studies/pipeline.py).
    # A string, so that --pipeline 0 reaches the mode and gets its error rather than being falsy.
    parser.add_argument("--pipeline", default=None, metavar="P",
                        help="pipeline stages: plan per (stage, instruction, microbatch) on a virtual H100 "
                             "cluster and compare default, per_gpu, envpipe and critical_path")
    parser.add_argument("--microbatches", type=int, default=8, help="--pipeline: microbatches per iteration (default 8)")
    parser.add_argument("--schedule", default="1f1b",
                        help="--pipeline: 1f1b (default), gpipe or interleaved (two or more model chunks per stage)")
    parser.add_argument("--dp", type=int, default=1, help="--pipeline: data-parallel replicas (default 1)")
    parser.add_argument("--straggler", default=None, metavar="RANK:FACTOR",
                        help="--pipeline: one rank's work slower by FACTOR, e.g. 1:1.1 "
                             "(rank = replica x stages + stage)")
    parser.add_argument("--stage-traces", default=None, metavar="A.csv,B.csv,...",
                        help="--pipeline: one kernel trace per stage (default: the shipped GPT stage traces)")


def parse_clock(value, name: str) -> Optional[int]:
    """``auto`` -> None, else an int in MHz (ConfigError otherwise)."""
    if value is None or str(value).lower() == "auto":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(name, value, "a clock in MHz or 'auto'", source="kdvfs simulate") from None


def lock_for(sm_mhz: Optional[int], mem_mhz: Optional[int], table) -> Optional[ClockPair]:
    """The lock that --sm-mhz/--mem-mhz ask for; None when both are auto.

    An auto SM clock with a locked memory clock locks SM at the top clock: the power cap still
    lowers it, as the driver's default would.
    """
    if sm_mhz is None and mem_mhz is None:
        return None
    pair = ClockPair(sm_mhz if sm_mhz is not None else table.default.sm_mhz,
                     mem_mhz if mem_mhz is not None else table.default.mem_mhz)
    return table.check(pair, where="--sm-mhz/--mem-mhz")


@dataclass(frozen=True)
class SimulationResult:
    trace: str
    steps: int
    sm_mhz: str
    mem_mhz: str
    step_time_s: float
    energy_j: float
    avg_power_w: float
    energy_source: str
    median_sm_mhz: float
    min_sm_mhz: float
    noise: bool
    seed: int
    switch_latency_ms: float
    model_prediction: bool = True
    device: str = "Simulated NVIDIA H100 80GB HBM3"

    def to_dict(self) -> dict:
        return asdict(self)


def simulate_trace(trace_name: str = "gpt1b", sm_mhz: Optional[int] = None, mem_mhz: Optional[int] = None,
                   steps: int = DEFAULT_STEPS, warmup_steps: int = DEFAULT_WARMUP_STEPS, noise: bool = True,
                   seed: int = 0, switch_latency_ms: Optional[float] = None,
                   clocks_for: Optional[Callable[[str], Optional[ClockPair]]] = None) -> SimulationResult:
    """Replay a trace at one clock setting (or per-region clocks via ``clocks_for``)."""
    from ..sim.gpu import VirtualGPU
    from ..sim.trace import Trace, replay

    if steps < 1:
        raise ConfigError("--steps", steps, "at least 1", source="kdvfs simulate")
    if warmup_steps < 0:
        raise ConfigError("--warmup-steps", warmup_steps, "0 or more", source="kdvfs simulate")
    trace = Trace.load(trace_name)
    gpu = VirtualGPU(switch_latency_ms=switch_latency_ms, noise=noise, seed=seed)
    lock = lock_for(sm_mhz, mem_mhz, gpu.clock_table)
    if lock is not None:
        gpu.request_clocks(lock, 0.0)
    res = replay(gpu, trace, steps=steps, warmup_steps=warmup_steps, clocks_for=clocks_for)
    if res.counter_power_w is not None:
        power, source = res.counter_power_w, "energy counter (100 ms refresh), averaged between refreshes"
    else:
        # Too short a run for two counter refreshes: no real measurement could read it.
        power, source = res.avg_power_w, "model (run too short for two counter refreshes)"
    return SimulationResult(
        trace=trace.source, steps=steps,
        sm_mhz="auto" if sm_mhz is None else str(sm_mhz), mem_mhz="auto" if mem_mhz is None else str(mem_mhz),
        step_time_s=res.step_time_s, energy_j=power * res.step_time_s, avg_power_w=power,
        energy_source=source, median_sm_mhz=res.median_sm_mhz, min_sm_mhz=res.min_sm_mhz,
        noise=noise, seed=seed, switch_latency_ms=gpu.switch_latency_s * 1e3,
    )


def format_table(r: SimulationResult) -> str:
    rows = [
        ("trace", f"{r.trace} ({r.steps} steps measured)"),
        ("clocks", f"SM {r.sm_mhz} MHz, memory {r.mem_mhz} MHz"),
        ("step time", f"{r.step_time_s * 1e3:.2f} ms"),
        ("energy per step", f"{r.energy_j:.1f} J"),
        ("average power", f"{r.avg_power_w:.1f} W"),
        ("SM clock (median / min)", f"{r.median_sm_mhz:.0f} / {r.min_sm_mhz:.0f} MHz"),
        ("energy from", r.energy_source),
        ("noise", f"seed {r.seed}" if r.noise else "off"),
        ("switch latency", f"{r.switch_latency_ms:g} ms"),
    ]
    from ..tables import Table

    return Table(["quantity", "value"], rows, title=LABEL, align="ll").text()


def run_single(args: argparse.Namespace) -> int:
    r = simulate_trace(
        args.trace, parse_clock(args.sm_mhz, "--sm-mhz"), parse_clock(args.mem_mhz, "--mem-mhz"),
        steps=args.steps, warmup_steps=args.warmup_steps, noise=not args.no_noise, seed=args.seed,
        switch_latency_ms=args.switch_latency_ms,
    )
    print(json.dumps(r.to_dict(), indent=1) if args.json else format_table(r))
    return 0


def _latency(args: argparse.Namespace) -> float:
    """--switch-latency-ms, else the stored measurement for the simulated device, else the default
    (:func:`kdvfs_plugins.switching.resolve_switch_latency_ms`, as a training run resolves it)."""
    from types import SimpleNamespace

    from ..sim.gpu import VirtualGPU
    from ..switching import check_latency_ms, resolve_switch_latency_ms

    if args.switch_latency_ms is not None:
        check_latency_ms(args.switch_latency_ms, "--switch-latency-ms", source="kdvfs simulate")
    return resolve_switch_latency_ms(SimpleNamespace(switch_latency_ms=args.switch_latency_ms, state_dir=None),
                                     device_name=VirtualGPU.name, driver="simulated").ms


def _context(args: argparse.Namespace):
    from ..studies.planning import PlanningContext
    from ..sim.trace import Trace

    return PlanningContext(Trace.load(args.trace))


def in_parts(fn: Callable[..., dict], ctx, *, key: str, values, merge: str, desc: str, unit: str, bar=None,
             **kw) -> dict:
    """``fn(ctx, key=values, **kw)`` run one value at a time, with a progress bar on a terminal,
    and merged into the one result (``merge``: the list the parts add up). For studies whose
    values are independent of each other (compare's objectives, the sweeps' budgets and
    latencies): the result is the same as one call's. ``bar``: a caller's bar to advance (one
    unit per value) instead of a bar of its own."""
    from contextlib import nullcontext

    from ..progress import progress

    parts = []
    with (nullcontext(bar) if bar is not None else progress(len(values), desc, unit=unit)) as shown:
        for value in values:
            shown.set_status(f"{desc}: {key} {value}" if bar is not None else f"{key} {value}")
            parts.append(fn(ctx, **{key: [value]}, **kw))
            shown.update(1)
    out = dict(parts[0])
    out[merge] = [item for part in parts for item in part[merge]]
    return out


def run_compare(args: argparse.Namespace) -> int:
    from ..planner import OBJECTIVES
    from ..report import format_compare
    from ..studies.planning import compare

    if not (0 <= args.max_slowdown <= 1):
        raise ConfigError("--max-slowdown", args.max_slowdown, "a fraction between 0 and 1, e.g. 0.05",
                          source="kdvfs simulate")
    data = in_parts(compare, _context(args), key="objectives", values=OBJECTIVES, merge="rows",
                    desc="compare", unit="objective",
                    switch_latency_ms=_latency(args), issue_ahead=not args.no_issue_ahead,
                    max_slowdown=args.max_slowdown, noise=not args.no_noise, seed=args.seed, steps=args.steps,
                    warmup_steps=args.warmup_steps, min_interval_ms=args.min_interval_ms)
    print(json.dumps(data, indent=1) if args.json else format_compare(data, _table_format(args)))
    return 0


def _table_format(args: argparse.Namespace) -> str:
    return "markdown" if getattr(args, "markdown", False) else "text"


def _plot_note(args: argparse.Namespace, data: dict) -> str:
    # Markdown output is what a docs page shows: the plot's path there would be this machine's.
    return "" if _table_format(args) == "markdown" else f"\n  plot: {data['plot']}"


def _plot_path(args: argparse.Namespace, name: str):
    from pathlib import Path

    return Path(args.plot) if args.plot else Path(args.out_dir) / name


def run_sweep(args: argparse.Namespace) -> int:
    from ..report import format_sweep, plot_sweep
    from ..studies.planning import SWEEP_SLOWDOWNS, sweep

    data = in_parts(sweep, _context(args), key="slowdowns", values=SWEEP_SLOWDOWNS, merge="points",
                    desc="sweep", unit="budget",
                    switch_latency_ms=_latency(args), issue_ahead=not args.no_issue_ahead,
                    min_interval_ms=args.min_interval_ms)
    data["plot"] = str(plot_sweep(data, _plot_path(args, "sweep.png")))
    print(json.dumps(data, indent=1) if args.json else format_sweep(data, _table_format(args)) + _plot_note(args, data))
    return 0


def run_latency_sweep(args: argparse.Namespace) -> int:
    from ..report import format_latency_sweep, plot_latency_sweep
    from ..studies.planning import LATENCY_SWEEP_MS, latency_sweep

    data = in_parts(latency_sweep, _context(args), key="latencies_ms", values=LATENCY_SWEEP_MS, merge="points",
                    desc="latency sweep", unit="latency", min_interval_ms=args.min_interval_ms)
    data["plot"] = str(plot_latency_sweep(data, _plot_path(args, "latency_sweep.png")))
    print(json.dumps(data, indent=1) if args.json else
          format_latency_sweep(data, _table_format(args)) + _plot_note(args, data))
    return 0


#: (argument attribute, handler): the first whose attribute is set handles the command.
#: Further modes (for example --explore) register here.
def run_pipeline(args: argparse.Namespace) -> int:
    from ..pipeline_report import format_pipeline, plot_pipeline_timeline
    from ..studies.pipeline import parse_straggler, pipeline_compare

    try:
        stages = int(args.pipeline)
    except (TypeError, ValueError):
        stages = args.pipeline
    traces = [p for p in args.stage_traces.split(",") if p] if args.stage_traces else None
    if getattr(args, "explore", False):
        from ..studies.pipeline_explore import run_command

        return run_command(args, stages, parse_straggler(args.straggler), traces, _latency(args))
    study = pipeline_compare(stages, args.microbatches, schedule=args.schedule, replicas=args.dp,
                             straggler=parse_straggler(args.straggler), stage_traces=traces,
                             switch_latency_ms=_latency(args), issue_ahead=not args.no_issue_ahead,
                             min_interval_ms=args.min_interval_ms, noise=not args.no_noise, seed=args.seed,
                             max_slowdown=args.max_slowdown)
    data = study.data
    data["plot"] = str(plot_pipeline_timeline(study.runs, data, _plot_path(args, "pipeline_timeline.png")))
    print(json.dumps(data, indent=1) if args.json else format_pipeline(data, _table_format(args)))
    return 0


MODES: list[tuple[str, Callable[[argparse.Namespace], int]]] = [
    ("pipeline", run_pipeline),
    ("compare", run_compare),
    ("sweep", run_sweep),
    ("latency_sweep", run_latency_sweep),
]


def _run_explore(args: argparse.Namespace) -> int:
    from ..studies.explore import run_command

    return run_command(args)


MODES.append(("explore", _run_explore))


def check_trace(value) -> None:
    """``--trace``: the shipped trace's name or an existing CSV file; a missing file says so
    before any mode starts (ConfigError)."""
    from pathlib import Path

    from ..sim.trace import is_workload_name

    if is_workload_name(value):
        return
    path = Path(value)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ConfigError("--trace", str(value), f"{what}: {path.resolve()}; give a kernel trace CSV "
                          "(kdvfs trace records one) or gpt1b, the shipped GPT trace", source="kdvfs simulate")


def run(args: argparse.Namespace) -> int:
    check_trace(args.trace)
    for attr, handler in MODES:
        if getattr(args, attr, None):
            return handler(args)
    return run_single(args)
