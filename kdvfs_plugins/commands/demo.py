"""``kdvfs demo``: the main job on any machine, on the simulated H100.

1. Plans the shipped GPT trace at every granularity and objective, executes each plan on the
   virtual H100 with switch latency and noise, and prints planned beside executed (the reference
   paper's Table 2 for our workload); writes ``compare.json``.
2. Sweeps the slowdown budget (``sweep.json``, ``sweep.png``, the paper's Fig. 6) and the switch
   latency (``latency_sweep.json``, ``latency_sweep.png``).
3. Trains a small GPT with Lightning on the CPU with ``KernelDVFS(device="simulated")``, if the
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="kdvfs_runs/demo", help="where the demo writes its run directory")
    p.add_argument("--steps", type=int, default=30, help="Lightning training steps on the CPU")
    p.add_argument("--exec-steps", type=int, default=3, help="executed steps per plan on the virtual GPU (default 3)")
    p.add_argument("--switch-latency-ms", type=float, default=None,
                   help="clock switch latency (default: the stored measurement, else 6 ms)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the executed runs")
    p.add_argument("--no-sweeps", action="store_true", help="skip the budget and latency sweeps")
    p.add_argument("--no-lightning", action="store_true", help="skip the Lightning run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def lightning_part(run_dir: Path, steps: int) -> dict:
    """The Lightning run, if the Lightning adapter and its framework are installed."""
    try:
        demo = importlib.import_module("kdvfs_lightning.demo")
    except ImportError:
        return {"skipped": "install the [lightning] extra to include the Lightning run"}
    return demo.run_demo(str(run_dir / "lightning"), steps=steps).engine.summary()


def planning_part(run_dir: Path, args) -> dict:
    """Compare, sweeps and plots on the shipped GPT trace (one cached planning context)."""
    from ..latency import switch_latency_for
    from ..report import plot_latency_sweep, plot_sweep
    from ..sim.gpu import VirtualGPU
    from ..sim.planning import PlanningContext, compare, latency_sweep, sweep
    from ..sim.trace import Trace

    latency = args.switch_latency_ms if args.switch_latency_ms is not None else \
        switch_latency_for(VirtualGPU.name, "simulated")
    ctx = PlanningContext(Trace.gpt1b())
    out = {"compare": compare(ctx, switch_latency_ms=latency, steps=args.exec_steps, seed=args.seed)}
    (run_dir / "compare.json").write_text(json.dumps(out["compare"], indent=1))
    if not args.no_sweeps:
        out["sweep"] = sweep(ctx, slowdowns=DEMO_SLOWDOWNS, switch_latency_ms=latency)
        out["sweep"]["plot"] = str(plot_sweep(out["sweep"], run_dir / "sweep.png"))
        (run_dir / "sweep.json").write_text(json.dumps(out["sweep"], indent=1))
        out["latency_sweep"] = latency_sweep(ctx, latencies_ms=DEMO_LATENCIES_MS)
        out["latency_sweep"]["plot"] = str(plot_latency_sweep(out["latency_sweep"], run_dir / "latency_sweep.png"))
        (run_dir / "latency_sweep.json").write_text(json.dumps(out["latency_sweep"], indent=1))
    return out


def run(args) -> int:
    from ..report import format_compare, format_latency_sweep, format_sweep

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = {"model_prediction": True, **planning_part(run_dir, args)}
    result["lightning"] = {"skipped": "--no-lightning"} if args.no_lightning else lightning_part(run_dir, args.steps)
    (run_dir / "demo.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("kdvfs demo (model prediction: simulated H100)\n")
    print(format_compare(result["compare"]))
    if "sweep" in result:
        print("\n" + format_sweep(result["sweep"]))
        print("\n" + format_latency_sweep(result["latency_sweep"]))
    s = result["lightning"]
    if "skipped" in s:
        print("\n  Lightning run:", s["skipped"])
    else:
        print(f"\n  Lightning GPT on CPU: {s['steps']} steps, {s['gpu_time_ms_per_step']:.2f} simulated GPU ms/step")
        if s.get("energy_j_per_step"):
            print(f"  energy {s['energy_j_per_step']:.2f} J/step at {s['avg_power_w']:.0f} W")
    print(f"  run directory: {run_dir}")
    return 0
