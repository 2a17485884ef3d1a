"""``kdvfs trace``: record a training step's kernels, tagged by region, to a trace CSV.

    kdvfs trace --script train_step.py --out trace.csv [--steps 2] [--warmup-steps 1] [--cpu]

The script is run as ``__main__``-less module code and must define ``kdvfs_trace_step(i)``, which
runs training step ``i``, marking regions with ``kdvfs_plugins.sim.capture.region(name)``.
Recording GPU kernels needs a CUDA GPU; ``--cpu`` records CPU ops instead (to check a script).
The CSV replays with ``kdvfs simulate --trace trace.csv``.
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path

from ..errors import ConfigError

STEP_FUNCTION = "kdvfs_trace_step"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--script", required=True, help=f"Python file that defines {STEP_FUNCTION}(i)")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (default 2)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="unprofiled steps first (default 1)")
    parser.add_argument("--max-gap-us", type=float, default=20.0,
                        help="cut idle gaps between kernels longer than this (the profiler slows the host; "
                             "default 20; a negative value keeps every gap)")
    parser.add_argument("--cpu", action="store_true", help="record CPU ops instead of GPU kernels")


def run(args: argparse.Namespace) -> int:
    from ..sim.capture import record

    script = Path(args.script)
    if not script.is_file():
        raise ConfigError("--script", args.script, "an existing Python file", source="kdvfs trace")
    if args.steps < 1:
        raise ConfigError("--steps", args.steps, "at least 1", source="kdvfs trace")
    namespace = runpy.run_path(str(script), run_name="kdvfs_trace")
    step_fn = namespace.get(STEP_FUNCTION)
    if not callable(step_fn):
        raise ConfigError("--script", args.script, f"a file that defines {STEP_FUNCTION}(i)", source="kdvfs trace")
    rows = record(step_fn, steps=args.steps, warmup_steps=args.warmup_steps, out=args.out,
                  device="cpu" if args.cpu else "cuda",
                  max_gap_us=None if args.max_gap_us < 0 else args.max_gap_us)
    regions = sorted({r["region"] for r in rows})
    print(f"wrote {len(rows)} {'ops' if args.cpu else 'kernels'} of {args.steps} steps to {args.out} "
          f"({len(regions)} regions: {', '.join(regions[:8])}{' ...' if len(regions) > 8 else ''})")
    return 0
