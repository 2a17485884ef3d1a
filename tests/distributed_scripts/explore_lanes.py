"""Exploration on simulated GPUs, alone or shared by data-parallel ranks (gloo).

Run with ``torch.distributed.run --nproc_per_node N``: N = 1 explores alone, N = 2 splits the
exploration across two replicas. Arguments: output directory, scenario (``shared``, or
``refused``: the last rank's GPU refuses clock writes), steps at most, max_slowdown. Each rank
writes what it saw to ``<out>/rank<R>.json``.
"""
import json
import os
import sys

import torch.distributed as dist

from kdvfs_plugins import KdvfsConfig
from kdvfs_plugins.devices import NvmlDevice, SimulatedDevice
from kdvfs_plugins.distributed import WORLD, Replicas
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.sim.gpu import Work

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fakes.fake_nvml import FakeNvml  # noqa: E402

#: GPU work per region and step: matrix products (compute-bound) and a memory-bound optimizer.
WORK = {"forward": ("gemm", 0.15), "backward": ("gemm", 0.30), "optimizer": ("copy", 0.15)}


class RegionWork:
    """The work of the region a marker closes (set before each region's exit)."""

    def __init__(self):
        self.pending = []

    def __call__(self):
        out, self.pending = self.pending, []
        return out


out_dir, scenario, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
max_slowdown = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
work = RegionWork()
refused = scenario == "refused" and rank == world - 1
if refused:
    device = NvmlDevice(0, nvml=FakeNvml(privileged=False))
else:
    # each rank its own card: seeded card factors and noise differ by rank
    device = SimulatedDevice(rank, work_source=work, noise=True, seed=7, switch_latency_ms=1.0)
cfg = KdvfsConfig.from_dict({"mode": "auto", "device": "simulated", "window_steps": 2, "warmup_steps": 1,
                             "max_slowdown": max_slowdown, "explore_max_steps": 600, "progress": False,
                             "run_dir": os.path.join(out_dir, "run"), "state_dir": os.path.join(out_dir, f"state{rank}")})
replicas = Replicas(WORLD, rank, world) if world > 1 else None
eng = Engine(cfg, rank=rank, world_size=world, device=device, replicas=replicas).start()
step = 0
while step < max_steps and eng.explore_result is None:
    eng.step_begin(step)
    for region, (category, seconds) in WORK.items():
        eng.region_enter(region)
        work.pending = [Work(category, seconds)]
        eng.region_exit(region)
    eng.step_end()
    step += 1
eng.close()
res = eng.explore_result
result = {
    "rank": rank, "world": world, "steps_run": step, "device": eng.device.kind,
    "status": None if res is None else res.status,
    "message": None if res is None else res.message,
    "explore_steps": None if res is None else res.steps,
    "clocks": {} if res is None else {k: (None if v is None else v.to_dict()) for k, v in res.clocks_by_name.items()},
    "validated": {} if res is None else dict(res.validated),
    "exchanges": eng.explorer.exchanges if eng.explorer is not None else 0,
    "lane_blocks": sorted({b.lane for b in eng.explorer.blocks}) if eng.explorer is not None else [],
    # steps measured per lane, as every rank's explorer holds them after the exchanges
    "lane_steps": {} if eng.explorer is None else {
        str(lane): sum(len(b.time_ms) for b in eng.explorer.blocks if b.lane == lane) for lane in range(world)},
    # of those, the steps that ran a design (clocks other than the default)
    "lane_design_steps": {} if eng.explorer is None else {
        str(lane): sum(len(b.time_ms) for b in eng.explorer.blocks if b.lane == lane and b.design)
        for lane in range(world)},
}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
