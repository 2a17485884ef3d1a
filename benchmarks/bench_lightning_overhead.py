"""Overhead of KernelDVFS on a Lightning GPT run, with and without the callback, alternating.

On a GPU run it with ``--device observe``: nothing on the GPU is changed; kdvfs reads clocks,
power and energy and records what it would have set. Prints the median step time with and
without the callback, the overhead, kdvfs's region table (GPU time per region from markers) and
how its sum compares with the measured step time.

    python benchmarks/bench_lightning_overhead.py --device observe          # GPT ~350 M, bf16
    python benchmarks/bench_lightning_overhead.py --tiny --device simulated # CPU smoke run

Data parallel on the GPUs of one host (DDP, the same batch per GPU as on one GPU); every rank
runs kdvfs on its own GPU, and rank 0 prints each rank's region table, energy and GPU:

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_lightning_overhead.py --devices 2 --device observe
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_lightning_overhead.py --devices 2 --tiny --device simulated

Each block with the callback is a new kdvfs session, which installs its module hooks in the
warm-up and profiles one more step 25 steps in, before its cadence has learnt what profiled steps
cost; a long run spaces them further. ``--continuous-steps N`` ends the run with one fit of N
steps and prints what its profiled steps cost by kdvfs's own measure.
"""
from __future__ import annotations

import argparse
import json
import os
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
from overhead_stats import (abba_arm, cpu_caveat, format_long_run_estimate, format_long_session,  # next to this script
                            format_summary, long_run_estimate, long_session_figures, summarise)
from rank_gpu import describe_gpu, gpu_identity  # benchmarks/rank_gpu.py, next to this script


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


class HostTimeSampler(pl.Callback):
    """kdvfs's host time in each timed step, and whether kdvfs profiled it.

    Listed before the kdvfs callback, so the reading at one batch start comes before kdvfs's own
    hooks of that batch: the difference to the next start is all kdvfs spent on the batch.
    """

    def __init__(self, kd, warmup: int):
        self.kd, self.warmup = kd, warmup
        self._last_s = None
        self.ms = {"plain": [], "profiled": []}
        self._profiled = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now_s = self.kd.host_time_s
        if self._last_s is not None and batch_idx > self.warmup:
            self.ms["profiled" if self._profiled else "plain"].append((now_s - self._last_s) * 1e3)
        self._last_s = now_s

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        engine = self.kd.engine
        self._profiled = engine is not None and engine.profiling


def run_block(model, loader, args, with_kdvfs: bool):
    timer = BlockTimer(args.warmup, args.steps)
    callbacks = [timer]
    kd = None
    if with_kdvfs:
        # kdvfs's first profiled step installs the module hooks, once in a run: at step 0 it falls
        # in the block's untimed warm-up. Its cadence profiles again 25 steps later, and a block
        # ends before it would space the next: a block profiles more often than a long run does.
        kd = KernelDVFS(device=args.device, mode="observe", run_dir=args.run_dir, window_steps=args.window_steps,
                        granularity=args.granularity, warmup_steps=0)
        kd.host_sampler = HostTimeSampler(kd, args.warmup)
        callbacks += [kd.host_sampler, kd]
    # A new Trainer per block; the process group the first DDP fit opens stays up and is reused.
    parallel = dict(strategy="ddp", num_nodes=1) if args.devices > 1 else {}
    trainer = pl.Trainer(
        max_steps=args.warmup + args.steps, accelerator="auto", devices=args.devices,
        precision=args.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **parallel,
    )
    trainer.fit(model, loader)
    return timer.step_s, kd


def timed_records(kd, warmup: int) -> list:
    """The step records of a block's timed steps (those after its warm-up)."""
    return [r for r in kd.engine.meter.steps if r.step >= warmup]


def rank_figures(kd, args, rank: int, local_rank: int, with_s, without_s) -> dict:
    """This rank's figures from its last block with kdvfs, plain data for all_gather_object."""
    eng = kd.engine
    s = eng.summary()
    timed = timed_records(kd, args.warmup)
    plain, profiled = kd.host_sampler.ms["plain"], kd.host_sampler.ms["profiled"]
    return {
        "rank": rank, "local_rank": local_rank, "gpu": gpu_identity(eng),
        "median_with_ms": statistics.median(with_s) * 1e3, "median_without_ms": statistics.median(without_s) * 1e3,
        "with_ms": [x * 1e3 for x in with_s], "without_ms": [x * 1e3 for x in without_s],
        "regions": [list(r) for r in eng.region_table()],
        "median_gpu_step_ms": statistics.median(r.gpu_time_ms for r in timed) if timed else None,
        "profiled_step_ms": [r.gpu_time_ms for r in timed if r.region_time_ms],
        "energy_j_per_step": s["energy_j_per_step"], "avg_power_w": s["avg_power_w"], "summary": s,
        # every step of the block, its warm-up steps (and the hook installation) included
        "host_ms_per_step": kd.host_time_s * 1e3 / (args.warmup + args.steps),
        # beside the training thread: the power sampler and the worker, over the same steps
        "thread_cpu_ms_per_step": eng.thread_cpu_s * 1e3 / (args.warmup + args.steps),
        # the timed steps (but the last), split by whether kdvfs profiled them
        "host_ms_plain_step_median": statistics.median(plain) if plain else None,
        "host_ms_profiled_steps": profiled,
    }


def print_rank(fig: dict) -> None:
    g, step_ms = fig["gpu"], fig["median_with_ms"]
    rows = [tuple(r) for r in fig["regions"]]
    print(f"\n=== rank {fig['rank']} (local rank {fig['local_rank']}) on {g['host']}: {describe_gpu(g)}")
    print(f"its own timer: median step time {fig['median_with_ms']:.2f} ms with kdvfs, "
          f"{fig['median_without_ms']:.2f} ms without")
    print(f"kdvfs region table (rank {fig['rank']}, last block):")
    print(format_region_table(rows, step_ms=step_ms, simulated=fig["summary"]["model_prediction"]))
    print(f"region sum / measured step time: {sum(r[1] for r in rows) / step_ms:.3f}")
    if fig["median_gpu_step_ms"] is not None:
        print(marker_step_times(fig))
    if fig["energy_j_per_step"]:
        print(f"energy per step {fig['energy_j_per_step']:.1f} J, average power {fig['avg_power_w']:.0f} W "
              "(device energy counter)")
    else:
        print("energy per step: none (no energy window closed in the last block)")
    print(host_time_line(fig))
    if fig.get("continuous"):
        print(format_long_session(fig["continuous"]))


def marker_step_times(fig: dict) -> str:
    profiled = fig["profiled_step_ms"]
    return (f"median GPU step time from the step markers (timed steps of the last block): "
            f"{fig['median_gpu_step_ms']:.2f} ms; "
            + (f"profiled ones: {', '.join(f'{x:.2f}' for x in profiled)} ms" if profiled
               else "none of them profiled"))


def host_time_line(fig: dict) -> str:
    plain, profiled = fig["host_ms_plain_step_median"], fig["host_ms_profiled_steps"]
    return (f"host time in kdvfs's hooks (last block): {fig['host_ms_per_step']:.3f} ms per step with the "
            "warm-up's hook installation"
            + ("" if plain is None else f"; median {plain:.3f} ms on a plain timed step")
            + ("" if not profiled else f", {statistics.fmean(profiled):.2f} ms on a profiled one ({len(profiled)})")
            + f"; CPU time of kdvfs's threads {fig['thread_cpu_ms_per_step']:.3f} ms per step")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="observe")
    p.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke run")
    p.add_argument("--devices", type=int, default=1,
                   help="GPUs of this host, data parallel; more than 1 needs torchrun --nproc_per_node N")
    p.add_argument("--rounds", type=int, default=None, help="blocks with and without, alternating (4; --tiny: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per block (30; --tiny: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of a block (5; --tiny: 2)")
    p.add_argument("--granularity", default="kernel")
    p.add_argument("--run-dir", default="kdvfs_runs/bench_lightning")
    p.add_argument("--continuous-steps", type=int, default=0,
                   help="after the blocks, one fit of this many steps with kdvfs, for what its profiled steps "
                        "cost in a long run (a block's session ends before its cadence has spaced them)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.devices > 1 and int(os.environ.get("WORLD_SIZE", "1")) != args.devices:
        # Lightning would re-launch this script itself at every fit; one torchrun launch keeps
        # one process per GPU alive across the blocks.
        p.error(f"--devices {args.devices}: launch with torchrun --standalone --nproc_per_node {args.devices} "
                f"(WORLD_SIZE is {os.environ.get('WORLD_SIZE')})")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    multi = args.devices > 1
    torch.manual_seed(0)
    if args.tiny:
        cfg = dict(vocab=256, d=64, layers=2, heads=4, seq=32)
        batch, args.precision = 4, "32-true"
        defaults = dict(steps=5, warmup=2, rounds=2)
    else:
        cfg = dict(GPT_350M)
        batch, args.precision = 8, "bf16-mixed"
        defaults = dict(steps=30, warmup=5, rounds=4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # The simulated GPU's energy counter refreshes every 100 ms of its clock (host time here), and
    # a window gets energy only once a refresh follows its end: the tiny model's few short steps
    # per block rarely see one after a 5-step window. The one-GPU run keeps its 5-step windows.
    args.window_steps = 1 if args.tiny and multi else 5
    model = TinyGPT(**cfg)
    params = sum(p.numel() for p in model.parameters())
    loader = torch.utils.data.DataLoader(RandomTokens(10**6, cfg["seq"], cfg["vocab"]), batch_size=batch, num_workers=2)
    say = print if rank == 0 else (lambda *a, **k: None)
    per_gpu = f" per GPU x {args.devices} GPUs (DDP)" if multi else ""
    say(f"GPT: {params / 1e6:.0f} M parameters, {cfg['layers']} layers, d={cfg['d']}, seq {cfg['seq']}, batch {batch}{per_gpu}, {args.precision}")
    with_s, without_s, last = [], [], None
    blocks_ms, arms = [], []
    profiled_timed = 0  # timed steps that kdvfs profiled, over every block with it
    for block in range(2 * args.rounds):
        arm = abba_arm(block)
        on = arm == "on"
        step_s, kd = run_block(model, loader, args, on)
        (with_s if on else without_s).append(step_s)
        blocks_ms.append(step_s * 1e3)
        arms.append(arm)
        if kd is not None:
            last = kd
            profiled_timed += sum(1 for rec in timed_records(kd, args.warmup) if rec.region_time_ms)
        say(f"round {block // 2} {'with   ' if on else 'without'} kdvfs: {step_s * 1e3:8.2f} ms/step", flush=True)
    med_with, med_without = statistics.median(with_s), statistics.median(without_s)
    overhead = med_with / med_without - 1
    mine = rank_figures(last, args, rank, local_rank, with_s, without_s)
    if args.continuous_steps:
        long_args = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": args.continuous_steps})
        _, kd = run_block(model, loader, long_args, True)
        mine["continuous"] = long_session_figures(kd.engine, args.continuous_steps)
    ranks = [mine]
    if multi:
        ranks = [None] * torch.distributed.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # NCCL carries the pickled objects on the current device
        torch.distributed.all_gather_object(ranks, mine)
    if rank == 0:
        say(f"\nmedian step time without kdvfs: {med_without * 1e3:.2f} ms")
        say(f"median step time with kdvfs:    {med_with * 1e3:.2f} ms")
        say(f"overhead: {overhead * 100:+.2f}%{cpu_caveat(not torch.cuda.is_available())}")
        stats = summarise([x * 1e3 for x in with_s], [x * 1e3 for x in without_s], blocks_ms, arms)
        say(format_summary(stats))
        estimate = (long_run_estimate(stats, mine["continuous"], profiled_timed)
                    if mine.get("continuous") else None)
        if estimate:
            say(format_long_run_estimate(estimate))
        if multi:
            say("(step times are rank 0's timer; each rank's own is in its section below)")
            for fig in ranks:
                print_rank(fig)
        else:
            s = last.engine.summary()
            rows = last.engine.region_table()
            print(f"\nkdvfs region table (last block, {s['device']} device):")
            print(format_region_table(rows, step_ms=med_with * 1e3, simulated=s["model_prediction"]))
            print(f"region sum / measured step time: {sum(r[1] for r in rows) / (med_with * 1e3):.3f}")
            if mine["median_gpu_step_ms"] is not None:
                print(marker_step_times(mine))
            if s["energy_j_per_step"]:
                print(f"energy per step {s['energy_j_per_step']:.1f} J, average power {s['avg_power_w']:.0f} W (device energy counter)")
            print(host_time_line(mine))
            if mine.get("continuous"):
                print(format_long_session(mine["continuous"]))
        out = {
            "params": params, "median_with_ms": med_with * 1e3, "median_without_ms": med_without * 1e3,
            "overhead": overhead, "with_ms": [x * 1e3 for x in with_s], "without_ms": [x * 1e3 for x in without_s],
            "region_sum_ms": sum(r[1] for r in mine["regions"]), "median_gpu_step_ms": mine["median_gpu_step_ms"],
            "profiled_step_ms": mine["profiled_step_ms"], "summary": mine["summary"],
            "world_size": len(ranks), "batch_per_gpu": batch, "step_times_from": "rank 0", "ranks": ranks,
            "long_run_estimate": estimate, **stats,
        }
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(out, f, indent=1)
    if multi:
        # gloo aborts at interpreter exit while its group is still up (Lightning destroys only NCCL's).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
