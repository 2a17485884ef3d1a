"""``kdvfs demo``: the main job on any machine, on the simulated H100.

1. Plans the shipped GPT trace at every granularity and objective, executes each plan on the
   virtual H100 with switch latency and noise, and prints planned beside executed (the reference
   paper's Table 2 for our workload); writes ``compare.json``.
2. Sweeps the slowdown budget (``sweep.json``, ``sweep.png``, the paper's Fig. 6) and the switch
   latency (``latency_sweep.json``, ``latency_sweep.png``).
3. Writes one plan's per-region time and energy at default and planned clocks, and its clock
   timeline over one step (``plan_timeline.json``), for ``kdvfs report``.
4. Explores online on the fast stretch simulation of the trace, one seed (``exploration.json``:
   the explorer's blocks, phase by phase, and its validated result).
5. Trains a small GPT with Lightning on the CPU with ``KernelDVFS(device="simulated")``, if the
   Lightning adapter is installed.

Every figure is a model prediction of the virtual H100. The core imports no training framework:
the Lightning part comes from the adapter, when it is installed.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

#: Fewer points than the full commands, so that the demo stays quick on a small CPU.
DEMO_SLOWDOWNS = (0.0, 0.05, 0.1, 0.3)
DEMO_LATENCIES_MS = (0.0, 1.0, 6.0, 30.0)
#: Exploration step budget in the demo: below the config default (1500) so the demo stays quick;
#: enough to go through baseline, exploration and validation on the GPT trace.
DEMO_EXPLORE_MAX_STEPS = 800


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="kdvfs_runs/demo", help="where the demo writes its run directory")
    p.add_argument("--steps", type=int, default=30, help="Lightning training steps on the CPU")
    p.add_argument("--exec-steps", type=int, default=3, help="executed steps per plan on the virtual GPU (default 3)")
    p.add_argument("--switch-latency-ms", type=float, default=None,
                   help="clock switch latency (default: the stored measurement, else 6 ms)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the executed runs")
    p.add_argument("--no-sweeps", action="store_true", help="skip the budget and latency sweeps")
    p.add_argument("--no-lightning", action="store_true", help="skip the Lightning run")
    p.add_argument("--no-explore", action="store_true", help="skip the online exploration (exploration.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def lightning_part(run_dir: Path, steps: int) -> dict:
    """The Lightning run, if the Lightning adapter and its framework are installed."""
    try:
        demo = importlib.import_module("kdvfs_lightning.demo")
    except ImportError:
        return {"skipped": "install the [lightning] extra to include the Lightning run"}
    return demo.run_demo(str(run_dir / "lightning"), steps=steps).engine.summary()


def progress_units(args) -> int:
    """The demo's work in units of its progress bar: each objective of the compare, the plan
    timeline, each sweep point, the exploration and the Lightning run."""
    from ..planner import OBJECTIVES

    return (len(OBJECTIVES) + 1 + (0 if args.no_sweeps else len(DEMO_SLOWDOWNS) + len(DEMO_LATENCIES_MS))
            + (0 if args.no_explore else 1) + (0 if args.no_lightning else 1))


def planning_part(run_dir: Path, args, bar=None) -> dict:
    """Compare, sweeps and plots on the shipped GPT trace (one cached planning context).
    ``bar``: the demo's progress bar (:mod:`kdvfs_plugins.progress`), advanced as parts finish."""
    from ..latency import switch_latency_for
    from ..planner import OBJECTIVES
    from ..progress import Bar
    from ..report import plot_latency_sweep, plot_sweep
    from ..sim.gpu import VirtualGPU
    from ..studies.planning import PlanningContext, compare, latency_sweep, sweep
    from ..sim.trace import Trace
    from .simulate import in_parts

    bar = bar if bar is not None else Bar(None, "", "", None, enabled=False)
    latency = args.switch_latency_ms if args.switch_latency_ms is not None else \
        switch_latency_for(VirtualGPU.name, "simulated")
    ctx = PlanningContext(Trace.gpt1b())
    out = {"compare": in_parts(compare, ctx, key="objectives", values=OBJECTIVES, merge="rows", desc="compare",
                               unit="objective", bar=bar, switch_latency_ms=latency, steps=args.exec_steps,
                               seed=args.seed)}
    (run_dir / "compare.json").write_text(json.dumps(out["compare"], indent=1))
    bar.set_status("plan timeline")
    timeline = plan_timeline(ctx, switch_latency_ms=latency, max_slowdown=out["compare"]["max_slowdown"])
    bar.update(1)
    (run_dir / "plan_timeline.json").write_text(json.dumps(timeline, indent=1))
    out["plan_timeline"] = str(run_dir / "plan_timeline.json")
    if not args.no_sweeps:
        out["sweep"] = in_parts(sweep, ctx, key="slowdowns", values=DEMO_SLOWDOWNS, merge="points", desc="sweep",
                                unit="budget", bar=bar, switch_latency_ms=latency)
        out["sweep"]["plot"] = str(plot_sweep(out["sweep"], run_dir / "sweep.png"))
        (run_dir / "sweep.json").write_text(json.dumps(out["sweep"], indent=1))
        out["latency_sweep"] = in_parts(latency_sweep, ctx, key="latencies_ms", values=DEMO_LATENCIES_MS,
                                        merge="points", desc="latency sweep", unit="latency", bar=bar)
        out["latency_sweep"]["plot"] = str(plot_latency_sweep(out["latency_sweep"], run_dir / "latency_sweep.png"))
        (run_dir / "latency_sweep.json").write_text(json.dumps(out["latency_sweep"], indent=1))
    return out


def _stretches(ob, clocks_for, mem_default_mhz: int) -> list[dict]:
    """Each region stretch of an observed step: start, length, and the clocks it ran at (the lock,
    or the power controller's SM clock where that is lower, as the card does)."""
    out = []
    for region, start_s, time_s, energy_j, ceiling in zip(ob.regions, ob.offsets_s, ob.time_s, ob.energy_j,
                                                          ob.ceiling_sm_mhz):
        lock = clocks_for(region) if clocks_for is not None else None
        sm = float(ceiling) if lock is None else float(min(lock.sm_mhz, ceiling))
        out.append({"region": region, "start_ms": 1e3 * float(start_s), "time_ms": 1e3 * float(time_s),
                    "energy_j": float(energy_j), "sm_mhz": sm,
                    "mem_mhz": mem_default_mhz if lock is None else int(lock.mem_mhz), "locked": lock is not None})
    return out


def _per_region(default: list[dict], planned: list[dict]) -> list[dict]:
    """Stretch figures summed per region name (a region recurs in every layer)."""
    rows: dict = {}
    for which, stretches in (("default", default), ("planned", planned)):
        for s in stretches:
            r = rows.setdefault(s["region"], {"region": s["region"], "default_time_ms": 0.0, "default_energy_j": 0.0,
                                              "planned_time_ms": 0.0, "planned_energy_j": 0.0})
            r[f"{which}_time_ms"] += s["time_ms"]
            r[f"{which}_energy_j"] += s["energy_j"]
    return list(rows.values())


def plan_timeline(ctx, *, switch_latency_ms: float, max_slowdown: float, granularity: str = "kernel") -> dict:
    """One plan (relaxed at ``max_slowdown``, as in the compare) in detail: per-region time and energy at
    default and planned clocks, and the clocks of every stretch of one step (noise-free replays).
    Planned as the compare plans it (the coarser granularity's plan as a candidate), so the
    planning context's caches answer most of it."""
    from ..planner import GRANULARITIES
    from ..sim.gpu import VirtualGPU
    from ..studies.planning import plan_on_trace

    prev = None
    for g in GRANULARITIES[:GRANULARITIES.index(granularity) + 1]:
        prev = plan_on_trace(ctx, granularity=g, objective="relaxed", max_slowdown=max_slowdown,
                             switch_latency_ms=switch_latency_ms, issue_ahead=True,
                             candidates=[prev] if prev is not None else [])
    tp = prev
    mem_default = int(ctx.model.params.mem_max_mhz)
    default = _stretches(tp.default, None, mem_default)
    planned = _stretches(tp.observed, tp.clocks_for, mem_default)
    return {"model_prediction": True, "device": VirtualGPU.name, "trace": ctx.trace.source,
            "granularity": granularity, "objective": "relaxed", "max_slowdown": float(max_slowdown),
            "switch_latency_ms": float(switch_latency_ms), "issue_ahead": bool(tp.issue_ahead),
            "clocks": {k: ("default" if v is None else f"{v.sm_mhz}/{v.mem_mhz}") for k, v in tp.clocks_by_name.items()},
            "default_step_ms": 1e3 * tp.default.step_time_s, "default_step_energy_j": tp.default.step_energy_j,
            "planned_step_ms": 1e3 * tp.observed.step_time_s, "planned_step_energy_j": tp.observed.step_energy_j,
            "regions": _per_region(default, planned), "timeline": {"default": default, "planned": planned}}


def exploration_part(run_dir: Path, args, max_slowdown: float, switch_latency_ms: float) -> dict:
    """Online exploration through the live engine on the replayed GPT trace (one seed); writes
    ``exploration.json`` with the explorer's blocks (its progress, phase by phase) and result."""
    from ..sim.trace import Trace
    from ..studies.explore import run_seed

    seed_result, explorer = run_seed(Trace.gpt1b(), args.seed, max_steps=DEMO_EXPLORE_MAX_STEPS,
                                     max_slowdown=max_slowdown, switch_latency_ms=switch_latency_ms)
    res = explorer.result
    blocks = [{"index": b.index, "kind": b.kind, "first_step": b.first_step, "steps": b.steps,
               "time_ms": [float(t) for t in b.time_ms],
               "energy_j_per_step": (b.energy_j / b.energy_steps) if b.energy_steps else None} for b in explorer.blocks]
    out = {"model_prediction": True, "trace": "gpt1b", "seed": args.seed, "max_slowdown": max_slowdown,
           "explore_max_steps": DEMO_EXPLORE_MAX_STEPS, "switch_latency_ms": switch_latency_ms,
           "result": None if res is None else {
               "status": res.status, "message": res.message, "steps": res.steps, "knobs": list(res.knobs),
               "exploration_time_change": res.exploration_time_change, "predicted": dict(res.predicted),
               "validated": dict(res.validated),
               "clocks": {k: (None if v is None else f"{v.sm_mhz}/{v.mem_mhz}") for k, v in res.clocks_by_name.items()}},
           "executed": seed_result.to_dict(), "blocks": blocks}
    (run_dir / "exploration.json").write_text(json.dumps(out, indent=1))
    return {k: v for k, v in out.items() if k != "blocks"}


def run(args) -> int:
    from ..report import format_compare, format_latency_sweep, format_sweep

    from ..progress import progress

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One bar for the whole demo, on a terminal only (stdout keeps the tables alone).
    with progress(progress_units(args), "kdvfs demo", unit="part") as bar:
        result = {"model_prediction": True, **planning_part(run_dir, args, bar)}
        if not args.no_explore:
            bar.set_status("exploring online (one seed)")
            result["exploration"] = exploration_part(run_dir, args, result["compare"]["max_slowdown"],
                                                     result["compare"]["switch_latency_ms"])
            bar.update(1)
        if args.no_lightning:
            result["lightning"] = {"skipped": "--no-lightning"}
        else:
            bar.set_status(f"Lightning, {args.steps} steps on the CPU")
            result["lightning"] = lightning_part(run_dir, args.steps)
            bar.update(1)
    (run_dir / "demo.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("kdvfs demo (model prediction: simulated H100)\n")
    print(format_compare(result["compare"]))
    if "sweep" in result:
        print("\n" + format_sweep(result["sweep"]))
        print("\n" + format_latency_sweep(result["latency_sweep"]))
    if "exploration" in result and result["exploration"]["result"]:
        r = result["exploration"]["result"]
        print(f"\n  exploration (one seed, {result['exploration']['max_slowdown']:.0%} budget): {r['status']} "
              f"after {r['steps']} steps: {r['message']}")
    s = result["lightning"]
    if "skipped" in s:
        print("\n  Lightning run:", s["skipped"])
    else:
        print(f"\n  Lightning GPT on CPU: {s['steps']} steps, {s['gpu_time_ms_per_step']:.2f} simulated GPU ms/step")
        if s.get("energy_j_per_step"):
            print(f"  energy {s['energy_j_per_step']:.2f} J/step at {s['avg_power_w']:.0f} W")
    print(f"  run directory: {run_dir} (kdvfs report {run_dir} draws it)")
    return 0
