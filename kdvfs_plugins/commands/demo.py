"""``kdvfs demo``: the main job on any machine, on the simulated H100.

Trains a small GPT with Lightning on the CPU with ``KernelDVFS(device="simulated")`` and prints
its region table and energy; every figure is a model prediction. The core imports no training
framework: the Lightning part comes from the adapter, when it is installed.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="kdvfs_runs/demo", help="where the demo writes its run directory")
    p.add_argument("--steps", type=int, default=30, help="Lightning training steps on the CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def lightning_part(run_dir: Path, steps: int) -> dict:
    """The Lightning run, if the Lightning adapter and its framework are installed."""
    try:
        demo = importlib.import_module("kdvfs_lightning.demo")
    except ImportError:
        return {"skipped": "install the [lightning] extra to include the Lightning run"}
    return demo.run_demo(str(run_dir / "lightning"), steps=steps).engine.summary()


def run(args) -> int:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = {"model_prediction": True, "lightning": lightning_part(run_dir, args.steps)}
    (run_dir / "demo.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        s = result["lightning"]
        print("\nkdvfs demo (model prediction: simulated H100)")
        if "skipped" in s:
            print("  Lightning run:", s["skipped"])
        else:
            print(f"  Lightning GPT on CPU: {s['steps']} steps, {s['gpu_time_ms_per_step']:.2f} simulated GPU ms/step")
            if s.get("energy_j_per_step"):
                print(f"  energy {s['energy_j_per_step']:.2f} J/step at {s['avg_power_w']:.0f} W")
        print(f"  run directory: {run_dir}")
    return 0
