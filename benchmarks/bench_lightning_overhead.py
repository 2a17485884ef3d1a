"""Overhead of KernelDVFS on a Lightning GPT run, with and without the callback, alternating.

On a GPU run it with ``--device observe``: nothing on the GPU is changed; kdvfs reads clocks,
power and energy and records what it would have set. Prints the median step time with and
without the callback, the overhead, kdvfs's region table (GPU time per region from markers) and
how its sum compares with the measured step time.

    python benchmarks/bench_lightning_overhead.py --device observe          # GPT ~350 M, bf16
    python benchmarks/bench_lightning_overhead.py --tiny --device simulated # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from kdvfs_lightning import KernelDVFS
from kdvfs_lightning.demo import GPT_350M, RandomTokens, TinyGPT
from kdvfs_plugins.engine import format_region_table


class BlockTimer(pl.Callback):
    """Wall time of steps [warmup, warmup + n): synchronises only at the two ends."""

    def __init__(self, warmup: int, n: int):
        self.warmup, self.n = warmup, n
        self.step_s = None

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self._sync(module)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.warmup + self.n - 1:
            self._sync(module)
            self.step_s = (time.perf_counter() - self.t0) / self.n


def run_block(model, loader, args, with_kdvfs: bool):
    timer = BlockTimer(args.warmup, args.steps)
    callbacks = [timer]
    kd = None
    if with_kdvfs:
        kd = KernelDVFS(device=args.device, mode="observe", run_dir=args.run_dir, window_steps=5,
                        granularity=args.granularity, warmup_steps=args.warmup)
        callbacks.append(kd)
    trainer = pl.Trainer(
        max_steps=args.warmup + args.steps, accelerator="auto", devices=1, precision=args.precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    return timer.step_s, kd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="observe")
    p.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke run")
    p.add_argument("--rounds", type=int, default=4, help="blocks with and without, alternating")
    p.add_argument("--steps", type=int, default=30, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--granularity", default="kernel")
    p.add_argument("--run-dir", default="kdvfs_runs/bench_lightning")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        cfg = dict(vocab=256, d=64, layers=2, heads=4, seq=32)
        batch, args.precision = 4, "32-true"
        args.steps, args.warmup, args.rounds = min(args.steps, 5), min(args.warmup, 2), min(args.rounds, 2)
    else:
        cfg = dict(GPT_350M)
        batch, args.precision = 8, "bf16-mixed"
    model = TinyGPT(**cfg)
    params = sum(p.numel() for p in model.parameters())
    loader = torch.utils.data.DataLoader(RandomTokens(10**6, cfg["seq"], cfg["vocab"]), batch_size=batch, num_workers=2)
    print(f"GPT: {params / 1e6:.0f} M parameters, {cfg['layers']} layers, d={cfg['d']}, seq {cfg['seq']}, batch {batch}, {args.precision}")
    with_s, without_s, last = [], [], None
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for on in order:
            step_s, kd = run_block(model, loader, args, on)
            (with_s if on else without_s).append(step_s)
            if kd is not None:
                last = kd
            print(f"round {r} {'with   ' if on else 'without'} kdvfs: {step_s * 1e3:8.2f} ms/step", flush=True)
    med_with, med_without = statistics.median(with_s), statistics.median(without_s)
    overhead = med_with / med_without - 1
    print(f"\nmedian step time without kdvfs: {med_without * 1e3:.2f} ms")
    print(f"median step time with kdvfs:    {med_with * 1e3:.2f} ms")
    print(f"overhead: {overhead * 100:+.2f}%")
    s = last.engine.summary()
    rows = last.engine.region_table()
    region_sum_ms = sum(r[1] for r in rows)
    timed = [r for r in last.engine.meter.steps if r.step >= args.warmup]
    gpu_ms = statistics.median(r.gpu_time_ms for r in timed)
    profiled = [r.gpu_time_ms for r in timed if r.region_time_ms]
    print(f"\nkdvfs region table (last block, {s['device']} device):")
    print(format_region_table(rows, step_ms=med_with * 1e3, simulated=s["model_prediction"]))
    print(f"region sum / measured step time: {region_sum_ms / (med_with * 1e3):.3f}")
    print(f"median GPU step time from the step markers (every step): {gpu_ms:.2f} ms; "
          f"profiled steps: {', '.join(f'{x:.2f}' for x in profiled)} ms")
    if s["energy_j_per_step"]:
        print(f"energy per step {s['energy_j_per_step']:.1f} J, average power {s['avg_power_w']:.0f} W (device energy counter)")
    out = {
        "params": params, "median_with_ms": med_with * 1e3, "median_without_ms": med_without * 1e3,
        "overhead": overhead, "with_ms": [x * 1e3 for x in with_s], "without_ms": [x * 1e3 for x in without_s],
        "region_sum_ms": region_sum_ms, "median_gpu_step_ms": gpu_ms, "profiled_step_ms": profiled, "summary": s,
    }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
