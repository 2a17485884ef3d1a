"""Train a tiny PipelineModule under kdvfs_deepspeed on the CPU and record the regions, per rank.

Usage: record_pipeline.py OUT_DIR --stages N --gas N --steps N
Run with as many ranks as stages (torchrun for more than one). Writes OUT_DIR/rank<N>.json.
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
from deepspeed.pipe import PipelineModule
import kdvfs_deepspeed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_regions import Recorder  # noqa: E402


class Batches:
    """An endless iterator of (input, label) micro-batches."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        return torch.randn(4, 8, generator=self.g), torch.randn(4, 1, generator=self.g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)]
    model = PipelineModule(layers=layers, num_stages=a.stages, loss_fn=nn.MSELoss(), partition_method="uniform")
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": a.gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 1000,
        "kernel_dvfs": {"device": "simulated", "sm_mhz": 1500, "mem_mhz": 2619, "granularity": "pass",
                        "run_dir": str(Path(a.out) / "run"), "sim_noise": False},
    }
    recorder = Recorder()
    engine, *_ = kdvfs_deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                            plugins=[recorder])
    adapter = kdvfs_deepspeed.adapter_of(engine)
    device = adapter.engine.device
    data = Batches(seed=0)
    for _ in range(a.steps):
        engine.train_batch(data_iter=data)
    kdvfs_deepspeed.close(engine)
    rank = dist.get_rank()
    out = {
        "rank": rank, "events": recorder.events, "records": [r.step for r in adapter.records],
        "requests": [None if c is None else [c.sm_mhz, c.mem_mhz] for _, c in device.requests],
        "instance_map_left": "_INSTRUCTION_MAP" in vars(engine),
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
