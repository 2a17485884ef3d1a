"""A 4-stage DeepSpeed PipelineModule under kdvfs_deepspeed on the CPU: per-instruction regions,
a plan by instruction on every stage, and (``--refuse RANK``) one stage whose clock writes are refused.

Usage: pipe_live.py OUT_DIR --gas N --steps N --block JSON [--refuse RANK]
Run under torchrun with one rank per stage. Writes OUT_DIR/rank<N>.json: the region events in
order, the clock requests (simulated device) or clock writes (fake NVML), and the device kind.
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
from kdvfs_plugins import hookimpl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakes.fake_nvml import FakeNvml  # noqa: E402
from record_pipeline import Batches  # noqa: E402
from record_regions import Recorder as RegionRecorder  # noqa: E402


class Recorder(RegionRecorder):
    """Every region boundary and every clock change, in program order."""

    def __init__(self):
        super().__init__()
        self.changes: list = []

    @hookimpl
    def kdvfs_clocks_applied(self, change):
        c = change.clocks
        self.changes.append([change.region, None if c is None else [c.sm_mhz, c.mem_mhz]])


class FakeGpus:
    """Each rank drives its own fake GPU (one writer per GPU); ``privileged`` False refuses writes."""

    def __init__(self, rank: int, gpus: int, privileged: bool):
        self.fake = FakeNvml(gpus=gpus, privileged=privileged)
        self.rank = rank

    @hookimpl(tryfirst=True)
    def kdvfs_make_device(self, config, index):
        from kdvfs_plugins.devices import NvmlDevice

        return NvmlDevice(self.rank, nvml=self.fake)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--gas", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--block", default="{}", help="JSON merged into the kernel_dvfs block")
    p.add_argument("--refuse", type=int, default=None, help="this rank's fake GPU refuses clock writes")
    a = p.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # one block per stage; Batches gives (4 x 8) inputs and (4 x 1) labels
    layers = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(world - 1)] + [nn.Linear(8, 1)]
    model = PipelineModule(layers=layers, num_stages=world, loss_fn=nn.MSELoss(), partition_method="uniform")
    out = Path(a.out)
    block = {"device": "simulated", "mode": "apply", "granularity": "kernel", "sim_noise": False,
             "run_dir": str(out / "run"), "state_dir": str(out / f"state{rank}")}
    block.update(json.loads(a.block))
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": a.gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 1000,
        "kernel_dvfs": block,
    }
    recorder = Recorder()
    plugins = [recorder]
    fake = None
    if a.refuse is not None:
        fake = FakeGpus(rank, world, privileged=rank != a.refuse)
        plugins.append(fake)
    engine, *_ = kdvfs_deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                            plugins=plugins)
    adapter = kdvfs_deepspeed.adapter_of(engine)
    data = Batches(seed=0)
    for _ in range(a.steps):
        engine.train_batch(data_iter=data)
        dist.barrier()  # the training loop's own collectives go on whatever a rank's clocks did
    device = adapter.engine.device
    kdvfs_deepspeed.close(engine)
    result = {
        "rank": rank, "stage": engine.stage_id, "events": recorder.events, "changes": recorder.changes,
        "records": [r.step for r in adapter.records], "device": device.kind,
        "instance_map_left": "_INSTRUCTION_MAP" in vars(engine),
    }
    if hasattr(device, "requests"):
        result["requests"] = [None if c is None else [c.sm_mhz, c.mem_mhz] for _, c in device.requests]
    if fake is not None:
        gpu = fake.fake.gpu_state(rank)
        result["writes"] = gpu["writes"]
        result["restored"] = gpu["sm_locked"] is None and gpu["mem_locked"] is None
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a multi-rank gloo group aborts in interpreter teardown otherwise


if __name__ == "__main__":
    main()
