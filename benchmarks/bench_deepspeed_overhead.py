"""Step-time overhead of kdvfs under DeepSpeed: the same engine, kdvfs attached and detached.

A GPT-style model (default ~355M parameters, bf16, ZeRO-2, one GPU) is trained through
``kdvfs_deepspeed.initialize`` with ``"device": "observe"`` (reads the GPU, never writes a clock).
Blocks of steps alternate between kdvfs attached and detached, so both arms see the same
warm-up, allocator state and thermal history; the first steps of each block are dropped.

    python benchmarks/bench_deepspeed_overhead.py                     # one GPU
    python benchmarks/bench_deepspeed_overhead.py --tiny --steps-per-block 3 --blocks 4   # CPU check

Every step ends with a device synchronisation in *both* arms (the benchmark's, not kdvfs's), so
the step time includes the CPU time kdvfs adds even when the GPU would otherwise hide it: an
upper bound on the overhead a real run sees.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq, width)
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        h = self.embed(inputs) + self.pos(torch.arange(inputs.shape[1], device=inputs.device))
        for layer in self.layers:
            h = layer(h)
        logits = self.head(self.norm(h)).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few-thousand-parameter model that runs on a CPU")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--gas", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--blocks", type=int, default=10, help="blocks per arm (kdvfs on, kdvfs off)")
    p.add_argument("--steps-per-block", type=int, default=20)
    p.add_argument("--settle-steps", type=int, default=2, help="steps dropped at the start of each block")
    p.add_argument("--warmup-steps", type=int, default=10, help="steps before the first block, not measured")
    p.add_argument("--device", default=None, help="kdvfs device (default: observe; simulated with --tiny)")
    p.add_argument("--mode", default="auto", help="kdvfs mode")
    p.add_argument("--granularity", default="kernel", help="kdvfs granularity (kernel installs module hooks)")
    p.add_argument("--run-dir", default="kdvfs_runs/bench_deepspeed_overhead")
    p.add_argument("--energy-period-ms", type=float, default=100.0, help="energy counter read period (0: off)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    a = p.parse_args()
    if a.tiny:
        a.vocab, a.width, a.layers, a.heads, a.seq, a.micro_batch = 256, 64, 2, 4, 64, 2
        a.device = a.device or "simulated"
    a.device = a.device or "observe"
    return a


def main() -> None:
    a = parse_args()
    # One process without a launcher: describe a process group of one so DeepSpeed needs no MPI.
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    import kdvfs_deepspeed

    accel = get_accelerator()
    ds_config = {
        "train_micro_batch_size_per_gpu": a.micro_batch,
        "gradient_accumulation_steps": a.gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": a.zero},
        "bf16": {"enabled": a.dtype == "bf16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "kernel_dvfs": {"device": a.device, "mode": a.mode, "granularity": a.granularity, "run_dir": a.run_dir,
                        "energy_sample_period_ms": a.energy_period_ms},
    }
    torch.manual_seed(0)
    model = GPT(a.vocab, a.width, a.layers, a.heads, a.seq + 1)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = kdvfs_deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=g).to(engine.device) for _ in range(4)]

    def one_step(i: int) -> float:
        accel.synchronize()
        t0 = time.perf_counter()
        for m in range(a.gas):
            loss = engine(batches[(i * a.gas + m) % len(batches)])
            engine.backward(loss)
            engine.step()
        accel.synchronize()
        return time.perf_counter() - t0

    step = 0
    for _ in range(a.warmup_steps):
        one_step(step)
        step += 1
    times: dict[str, list[float]] = {"on": [], "off": []}
    for block in range(2 * a.blocks):
        arm = "on" if block % 2 == 0 else "off"
        # Attach/detach between blocks, outside the timed steps: the arms differ only in kdvfs.
        if arm == "on" and kdvfs_deepspeed.adapter_of(engine) is None:
            kdvfs_deepspeed.attach(engine)
        elif arm == "off":
            kdvfs_deepspeed.detach(engine)
        for k in range(a.steps_per_block):
            dt = one_step(step)
            step += 1
            if k >= a.settle_steps:
                times[arm].append(dt)
    kdvfs_deepspeed.close(engine)

    on_ms, off_ms = statistics.median(times["on"]) * 1e3, statistics.median(times["off"]) * 1e3
    result = {
        "params_m": n_params / 1e6, "dtype": a.dtype, "zero": a.zero, "gas": a.gas, "micro_batch": a.micro_batch,
        "seq": a.seq, "device": a.device, "mode": a.mode, "granularity": a.granularity,
        "accelerator": accel.device_name(), "steps_per_arm": len(times["on"]),
        "median_step_ms_with_kdvfs": on_ms, "median_step_ms_without_kdvfs": off_ms,
        "overhead_pct": (on_ms / off_ms - 1.0) * 100.0,
        "mean_step_ms_with_kdvfs": statistics.fmean(times["on"]) * 1e3,
        "mean_step_ms_without_kdvfs": statistics.fmean(times["off"]) * 1e3,
    }
    if dist.get_rank() == 0:
        print(f"model {result['params_m']:.1f}M params, {a.dtype}, ZeRO-{a.zero}, GAS {a.gas}, "
              f"micro-batch {a.micro_batch} x {a.seq} tokens, kdvfs device={a.device} mode={a.mode} "
              f"granularity={a.granularity}, {len(times['on'])} steps per arm")
        print(f"median step time with kdvfs    {on_ms:10.3f} ms")
        print(f"median step time without kdvfs {off_ms:10.3f} ms")
        print(f"overhead                       {result['overhead_pct']:+10.3f} %")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
