"""What a run reads from and leaves on disk: the plan file's life cycle and the run directory.

- :func:`initial_plan`: the plan a run starts with: the config's clocks, else the plan file
  (``apply`` needs one; ``auto`` reuses one that fits this GPU and layout, else explores again).
- :func:`save_explored_plan`: the explorer's result as a plan file for the next run.
- :func:`write_run_dir`: ``<run_dir>/rank<N>/summary.json``, ``steps.jsonl``, ``windows.jsonl``.

The engine calls these; it keeps no file logic of its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import PlanError
from .log import logger
from .plan import Plan
from .regions import STEP


def initial_plan(config, info, key: dict) -> Optional[Plan]:
    """The plan in force at the start, or None (observe; or auto without a usable plan file)."""
    if config.mode == "observe":
        return None
    if config.region_clocks or config.fixed_clocks:
        regions = dict(config.region_clocks)
        if config.fixed_clocks:
            regions.setdefault(STEP, config.fixed_clocks)
        return Plan(info.name, info.clocks, regions, granularity=config.granularity, source="config")
    path = config.resolved_plan_path()
    if config.mode == "apply" or (config.mode == "auto" and path.exists()):
        plan = Plan.load(path)
        try:
            plan.check_device(info.name, info.clocks, where=f"plan file {path}")
            plan.check_key(key, where=f"plan file {path}")
        except PlanError as exc:
            if config.mode == "apply":
                raise
            logger.warning("%s -- exploring again", exc)
            return None
        return plan
    return None


def save_explored_plan(config, plan: Plan, rank: int) -> Path:
    """Write the explorer's plan where the next run looks for it (rank 0 writes a shared path)."""
    path = config.resolved_plan_path()
    if rank == 0 or config.plan_path is None:
        try:
            plan.save(path)
        except OSError as exc:
            logger.warning("could not save the plan to %s: %s", path, exc)
    return path


def write_run_dir(run_dir, rank: int, summary: dict, steps, windows) -> Path:
    """Write one rank's run directory; returns it."""
    out = Path(run_dir) / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "steps.jsonl", "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s.step, "gpu_time_ms": s.gpu_time_ms, "clock_changes": s.clock_changes,
                                "region_time_ms": s.region_time_ms}) + "\n")
    with open(out / "windows.jsonl", "w") as f:
        for w in windows:
            f.write(json.dumps({"first_step": w.first_step, "last_step": w.last_step, "energy_j": w.energy_j,
                                "duration_s": w.duration_s, "gpu_time_ms_per_step": w.gpu_time_ms_per_step}) + "\n")
    return out
