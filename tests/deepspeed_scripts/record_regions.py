"""Train a tiny model under kdvfs_deepspeed on the CPU and record what kdvfs saw, per rank.

Usage: record_regions.py OUT_DIR --zero N --gas N --steps N [--attach] [--monitor DIR] [--block JSON]
Writes OUT_DIR/rank<N>.json: the region events in order, the step boundaries, and the simulated
device's clock requests. Run under torchrun for several ranks (gloo on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

import deepspeed
import deepspeed.comm as dist
import kdvfs_deepspeed
from kdvfs_plugins import hookimpl


class Recorder:
    """A kdvfs plugin that keeps every region boundary in program order."""

    def __init__(self):
        self.events: list[list] = []

    @hookimpl
    def kdvfs_region_enter(self, event):
        self.events.append(["enter", event.region, event.step])

    @hookimpl
    def kdvfs_region_exit(self, event):
        self.events.append(["exit", event.region, event.step])


class TinyNet(nn.Module):
    def __init__(self, width: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
        self.head = nn.Linear(width, 1)

    def forward(self, x, y):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return nn.functional.mse_loss(self.head(h), y)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--attach", action="store_true", help="deepspeed.initialize, then attach()")
    p.add_argument("--monitor", default=None, help="enable DeepSpeed's csv monitor under this directory")
    p.add_argument("--block", default="{}", help="JSON merged into the kernel_dvfs block")
    a = p.parse_args()

    torch.manual_seed(0)
    block = {"device": "simulated", "sm_mhz": 1500, "mem_mhz": 2619, "granularity": "kernel",
             "run_dir": str(Path(a.out) / "run"), "sim_noise": False}
    block.update(json.loads(a.block))
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": a.gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": a.zero},
        "steps_per_print": 1000,
        "kernel_dvfs": block,
    }
    if a.monitor:
        ds_config["csv_monitor"] = {"enabled": True, "output_path": a.monitor, "job_name": "job"}
    recorder = Recorder()
    model = TinyNet()
    if a.attach:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        adapter = kdvfs_deepspeed.attach(engine, plugins=[recorder])
    else:
        engine, *_ = kdvfs_deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                                plugins=[recorder])
        adapter = kdvfs_deepspeed.adapter_of(engine)
    device = adapter.engine.device
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    for _ in range(a.steps * a.gas):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    kdvfs_deepspeed.close(engine)
    wrapped_left = [n for n in ("forward", "backward", "step", "allreduce_gradients") if n in vars(engine)]
    out = {
        "rank": rank, "world_size": dist.get_world_size(), "events": recorder.events,
        "records": [r.step for r in adapter.records],
        "meter_steps": [s.step for s in adapter.engine.meter.steps],
        "requests": [None if c is None else [c.sm_mhz, c.mem_mhz] for _, c in device.requests],
        "global_steps": engine.global_steps,
        "wrapped_left": wrapped_left,
        "weight_sum": float(sum(p.detach().float().sum() for p in engine.module.parameters())),
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a 2-rank gloo group aborts in interpreter teardown otherwise


if __name__ == "__main__":
    main()
