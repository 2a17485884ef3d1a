"""A 4-stage DeepSpeed PipelineModule under kdvfs_deepspeed on the CPU: per-instruction regions,
a plan by instruction on every stage, and (``--refuse RANK``) one stage whose clock writes are refused.

Usage: pipe_live.py OUT_DIR --gas N --steps N --block JSON [--refuse RANK]
Run under torchrun with one rank per stage. Writes OUT_DIR/rank<N>.json: the region events in
order, the clock requests (simulated device) or clock writes (fake NVML), and the device kind.
"""
from __future__ import annotations

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
from pipe_plugins import base_config, parse_args, plugins_for, write_result  # noqa: E402
from record_pipeline import Batches  # noqa: E402


def main() -> None:
    a = parse_args("--gas")
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # one block per stage; Batches gives (4 x 8) inputs and (4 x 1) labels
    layers = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(world - 1)] + [nn.Linear(8, 1)]
    model = PipelineModule(layers=layers, num_stages=world, loss_fn=nn.MSELoss(), partition_method="uniform")
    out = a.out
    block = base_config(out, rank, a.block)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": a.microbatches,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 1000,
        "kernel_dvfs": block,
    }
    recorder, fake, plugins = plugins_for(rank, world, a.refuse)
    engine, *_ = kdvfs_deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                            plugins=plugins)
    adapter = kdvfs_deepspeed.adapter_of(engine)
    data = Batches(seed=0)
    for _ in range(a.steps):
        engine.train_batch(data_iter=data)
        dist.barrier()  # the training loop's own collectives go on whatever a rank's clocks did
    device = adapter.engine.device
    kdvfs_deepspeed.close(engine)
    write_result(out, rank, recorder, device, fake, stage=engine.stage_id,
                 records=[r.step for r in adapter.records], instance_map_left="_INSTRUCTION_MAP" in vars(engine))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a multi-rank gloo group aborts in interpreter teardown otherwise


if __name__ == "__main__":
    main()
