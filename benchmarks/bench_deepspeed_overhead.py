"""Step-time overhead of kdvfs under DeepSpeed: the same engine, kdvfs attached and detached.

A GPT-style model (default ~406M parameters, bf16, ZeRO-2, one GPU) is trained through
``kdvfs_deepspeed.initialize`` with ``"device": "observe"`` (reads the GPU, never writes a clock).
Blocks of steps alternate between kdvfs attached and detached (rounds ordered on/off, off/on, ...),
so both arms see the same warm-up, allocator state and thermal history; the first steps of each
block are dropped. Besides the medians over all steps of each arm, the overhead of each round (its
two blocks, run back to back) is printed: on a host whose step time drifts during the run, the
median of those is the steadier figure; it comes with a bootstrap interval and with how much
adjacent blocks of the same arm differ, the noise of one round (see overhead_stats.py). Short
blocks and many rounds beat drift best. Each block's kdvfs session is too short to profile a
step after its first (dropped with the settle steps), so ``--continuous-steps`` ends the run with
one long session and prints what its profiled steps cost by kdvfs's own measure:

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_deepspeed_overhead.py \
        --blocks 40 --steps-per-block 8 --settle-steps 1 --mode observe --continuous-steps 300

    python benchmarks/bench_deepspeed_overhead.py                     # one GPU
    python benchmarks/bench_deepspeed_overhead.py --tiny --steps-per-block 3 --blocks 4   # CPU check
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_deepspeed_overhead.py      # two GPUs, data parallel
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 benchmarks/bench_deepspeed_overhead.py --tiny \
        --steps-per-block 3 --blocks 2                                 # two processes on the CPU (gloo)

Every step ends with a device synchronisation in *both* arms (the benchmark's, not kdvfs's), so
the step time includes the CPU time kdvfs adds even when the GPU would otherwise hide it: an
upper bound on the overhead a real run sees. It also puts every hiccup of the host on the
critical path: on shared two-GPU hosts steps of one arm ranged from 72 to 128 ms. ``--sync block``
synchronises only around each block's timed steps, as a training loop runs, and times their mean
(on the one host it ran on, its noise was 3.45%, within the per-step runs' 3.2-9.1%, and both
arms' steps took 131 ms against 76-89 ms elsewhere, so per-step timing stays the default):

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_deepspeed_overhead.py \
        --blocks 40 --steps-per-block 10 --settle-steps 2 --mode observe --sync block

``--alt-kdvfs`` adds a third arm, kdvfs with more keys, to the rounds (rotated so that each arm
takes each place in turn): two settings compared on one host, within the same rounds, where runs
after each other would each meet a different host:

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_deepspeed_overhead.py \
        --blocks 60 --steps-per-block 10 --settle-steps 2 --mode observe \
        --alt-kdvfs '{"power_readings": "step_end"}'

Under torchrun every rank runs kdvfs on its own GPU (the micro-batch is per GPU, so each GPU
does the same work as on one); the step times printed are rank 0's timer, and rank 0 prints
every rank's region table, energy per step, average power and which GPU it read.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdvfs_plugins.engine import format_region_table
from overhead_stats import (cpu_caveat, format_long_run_estimate, format_long_session,  # next to this script
                            format_step_quantiles, format_summary, long_run_estimate, long_session_figures,
                            rotated_arm, step_quantiles, summarise)
from rank_gpu import describe_gpu, gpu_identity  # benchmarks/rank_gpu.py, next to this script


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
    p.add_argument("--window-steps", type=int, default=None,
                   help="steps per kdvfs energy window (default: kdvfs's own; 1 with --tiny)")
    p.add_argument("--kdvfs", default="{}", type=json.loads, help="more keys for the kernel_dvfs block, as JSON")
    p.add_argument("--alt-kdvfs", default=None, type=json.loads,
                   help="a third arm: kdvfs with these keys too, as JSON; rounds of three blocks then compare "
                        "two settings on the same host")
    p.add_argument("--continuous-steps", type=int, default=0,
                   help="after the blocks, this many steps with one kdvfs session, for what its profiled "
                        "steps cost in a long run (each block's session is too short to see a second one)")
    p.add_argument("--sync", choices=["step", "block"], default="step",
                   help="step: synchronise the device around every step (each step timed; kdvfs's host time "
                        "lands on the critical path even where the GPU would hide it: an upper bound); block: "
                        "only around each block's timed steps, as a training loop runs (their mean is timed)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    a = p.parse_args()
    if a.tiny:
        a.vocab, a.width, a.layers, a.heads, a.seq, a.micro_batch = 256, 64, 2, 4, 64, 2
        a.device = a.device or "simulated"
        # The simulated GPU's energy counter refreshes every 100 ms of its clock (host time here),
        # and a window gets energy only once a refresh follows its end: with blocks of a few steps
        # of a few tens of ms, only short windows get any.
        a.window_steps = a.window_steps or 1
    a.device = a.device or "observe"
    return a


def rank_figures(kd_engines: list, first_block_step: int, rank: int, local_rank: int, times: dict) -> dict:
    """This rank's figures, plain data for all_gather_object.

    Every block with kdvfs has its own kdvfs engine (detach closes it). The region table is the
    last one that profiled a step; energy pools the windows of all of them from the first block
    on (the warm-up before it is left out), which is ``summary()``'s formula over more steps.
    """
    profiled = [e for e in kd_engines if e.region_table()] or kd_engines
    last = profiled[-1]
    wins = [w for e in kd_engines for w in (e.meter.windows if e.meter else []) if w.first_step >= first_block_step]
    energy_j, steps, duration_s = (sum(w.energy_j for w in wins), sum(w.steps for w in wins),
                                   sum(w.duration_s for w in wins))
    return {
        "rank": rank, "local_rank": local_rank, "gpu": gpu_identity(last),
        "median_step_ms_with_kdvfs": statistics.median(times["on"]) * 1e3,
        "median_step_ms_without_kdvfs": statistics.median(times["off"]) * 1e3,
        "region_table_block": kd_engines.index(last), "blocks_with_kdvfs": len(kd_engines),
        "regions": [list(r) for r in last.region_table()],
        "model_prediction": last.summary()["model_prediction"],
        "energy_j_per_step": energy_j / steps if steps else None,
        "avg_power_w": energy_j / duration_s if duration_s > 0 else None,
        "energy_steps": steps,
        "summaries": [e.summary() for e in kd_engines],
    }


def cost_figures(host_ms: dict, engines: list, steps: int) -> dict:
    """What one arm's kdvfs cost this rank: host time in its hooks per kept step (what kdvfs can add
    to a step the CPU paces) and, beside the training thread, its threads' CPU time (the power
    sampler and the worker) over every step of its blocks."""
    every = host_ms["profiled"] + host_ms["plain"]
    return {
        "host_ms_per_step": statistics.fmean(every) if every else 0.0,
        "host_ms_plain_step_median": statistics.median(host_ms["plain"]) if host_ms["plain"] else None,
        "host_ms_profiled_step_mean": statistics.fmean(host_ms["profiled"]) if host_ms["profiled"] else None,
        "profiled_steps": len(host_ms["profiled"]),
        "thread_cpu_ms_per_step": sum(e.thread_cpu_s for e in engines) * 1e3 / steps,
    }


def print_rank(fig: dict) -> None:
    rows, step_ms = [tuple(r) for r in fig["regions"]], fig["median_step_ms_with_kdvfs"]
    g = fig["gpu"]
    print(f"\n=== rank {fig['rank']} (local rank {fig['local_rank']}) on {g['host']}: {describe_gpu(g)}")
    print(f"its own timer: median step time {step_ms:.3f} ms with kdvfs, "
          f"{fig['median_step_ms_without_kdvfs']:.3f} ms without")
    print(f"kdvfs region table (rank {fig['rank']}, block {fig['region_table_block'] + 1} of "
          f"{fig['blocks_with_kdvfs']} with kdvfs):")
    print(format_region_table(rows, step_ms=step_ms, simulated=fig["model_prediction"]))
    if rows:
        print(f"region sum / measured step time: {sum(r[1] for r in rows) / step_ms:.3f}")
    if fig["energy_j_per_step"]:
        print(f"energy per step {fig['energy_j_per_step']:.3f} J, average power {fig['avg_power_w']:.0f} W "
              f"(device energy counter, {fig['energy_steps']} steps of the blocks with kdvfs)")
    else:
        print("energy per step: none (no energy window of the blocks with kdvfs closed)")
    plain, profiled = fig["host_ms_plain_step_median"], fig["host_ms_profiled_step_mean"]
    print(f"host time in kdvfs's hooks: {fig['host_ms_per_step']:.3f} ms per step "
          f"({fig['host_ms_per_step'] / step_ms:.2%} of the step)"
          + ("" if plain is None else f"; median {plain:.3f} ms on a plain step")
          + ("" if profiled is None else f", {profiled:.2f} ms on a profiled one ({fig['profiled_steps']} steps)"))
    print(f"CPU time of kdvfs's threads: {fig['thread_cpu_ms_per_step']:.3f} ms per step "
          f"({fig['thread_cpu_ms_per_step'] / step_ms:.2%} of the step)")
    if fig.get("alt"):
        alt = fig["alt"]
        print(f"third arm: median step time {alt['median_step_ms']:.3f} ms; host time in kdvfs's hooks "
              f"{alt['host_ms_per_step']:.3f} ms per step; CPU time of kdvfs's threads "
              f"{alt['thread_cpu_ms_per_step']:.3f} ms per step")
    if fig.get("continuous"):
        print(format_long_session(fig["continuous"]))


def main() -> None:
    a = parse_args()
    # One process without a launcher: describe a process group of one so DeepSpeed needs no MPI.
    # Under torchrun these are set already and stay as they are.
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
    if a.window_steps:
        ds_config["kernel_dvfs"]["window_steps"] = a.window_steps
    ds_config["kernel_dvfs"].update(a.kdvfs)
    torch.manual_seed(0)
    model = GPT(a.vocab, a.width, a.layers, a.heads, a.seq + 1)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = kdvfs_deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=g).to(engine.device) for _ in range(4)]

    per_step = a.sync == "step"

    def one_step(i: int) -> float:
        if per_step:
            accel.synchronize()
        t0 = time.perf_counter()
        for m in range(a.gas):
            loss = engine(batches[(i * a.gas + m) % len(batches)])
            engine.backward(loss)
            engine.step()
        if per_step:
            accel.synchronize()
        return time.perf_counter() - t0

    # Python's collector pauses the training thread; a pause in one arm only would pass for overhead.
    gc_pauses: list[dict] = []
    gc_t0 = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        elif info["generation"] == 2:
            gc_pauses.append({"step": step, "ms": (time.perf_counter() - gc_t0[0]) * 1e3})

    gc.callbacks.append(on_gc)
    step = 0
    for _ in range(a.warmup_steps):
        one_step(step)
        step += 1
    # the kernel_dvfs block of each arm with kdvfs
    blocks_of = {"on": ds_config["kernel_dvfs"]}
    if a.alt_kdvfs:
        blocks_of["alt"] = {**ds_config["kernel_dvfs"], **a.alt_kdvfs}
    names = ("on", "off", "alt") if a.alt_kdvfs else ("on", "off")
    times: dict[str, list[float]] = {n: [] for n in names}  # per step, or per block with --sync block
    timed_steps = {n: 0 for n in names}
    first_block_step = engine.global_steps
    # each arm's kdvfs engine of each of its blocks; detach closes one, its figures stay
    kd_engines: dict[str, list] = {n: [] for n in blocks_of}
    # host time in kdvfs's hooks per kept step of each arm with kdvfs, split by whether kdvfs profiled it
    host_ms = {n: {"profiled": [], "plain": []} for n in blocks_of}
    # Rounds of one block per arm, each round's order the last one's turned by one (ABBA for two
    # arms): a drift of the step time over the run (seen: block medians from 72 to 93 ms on one
    # host) then falls on every arm alike.
    block_ms: dict[str, list[float]] = {n: [] for n in names}
    arms, all_block_ms, block_steps_ms, block_profiled = [], [], [], []
    attached = None  # the arm whose kdvfs is attached
    for block in range(len(names) * a.blocks):
        arm = rotated_arm(block, names)
        # Attach/detach between blocks, outside the timed steps: the arms differ only in kdvfs.
        # Two blocks of one arm in a row (where rounds meet) keep one kdvfs engine.
        if arm != attached:
            kdvfs_deepspeed.detach(engine)
            attached = None
        if arm in blocks_of and attached is None:
            adapter = kdvfs_deepspeed.attach(engine, blocks_of[arm])
            attached = arm
            kd_engines[arm].append(adapter.engine)
        kept, profiled = [], []
        for k in range(a.steps_per_block):
            if k == a.settle_steps and not per_step:
                accel.synchronize()
                block_t0 = time.perf_counter()
            host_s0 = adapter.host_time_s if attached else 0.0
            dt = one_step(step)
            step += 1
            if k >= a.settle_steps:
                kept.append(dt)
                profiled.append(bool(attached) and adapter.engine.profiling)
                if attached:
                    host_ms[arm]["profiled" if profiled[-1] else "plain"].append((adapter.host_time_s - host_s0) * 1e3)
        if kept and not per_step:
            # Without a synchronisation per step a step's wall time is only its host time: the
            # block's mean is what was timed.
            accel.synchronize()
            kept = [(time.perf_counter() - block_t0) / len(kept)]
        timed_steps[arm] += len(profiled)
        times[arm].extend(kept)
        med = statistics.median(kept) * 1e3 if kept else float("nan")
        block_ms[arm].append(med)
        arms.append(arm)
        all_block_ms.append(med)
        block_steps_ms.append([x * 1e3 for x in kept])
        block_profiled.append(profiled)
    kdvfs_deepspeed.close(engine)
    gc.callbacks.remove(on_gc)
    continuous = None
    if a.continuous_steps:
        # Each block's session profiles its first step (installing the module hooks, dropped with
        # the settle steps) and ends before its cadence judges a second: a long run's profiled
        # steps are measured here, by kdvfs's own account of what they add to a step.
        adapter = kdvfs_deepspeed.attach(engine, blocks_of["on"])
        for _ in range(a.continuous_steps):
            one_step(step)
            step += 1
        kdvfs_deepspeed.close(engine)  # the engine's figures stay readable after closing
        continuous = long_session_figures(adapter.engine, a.continuous_steps)

    on_ms, off_ms = statistics.median(times["on"]) * 1e3, statistics.median(times["off"]) * 1e3
    stats = summarise(block_ms["on"], block_ms["off"], all_block_ms, arms)
    result = {
        "params_m": n_params / 1e6, "dtype": a.dtype, "zero": a.zero, "gas": a.gas, "micro_batch": a.micro_batch,
        "seq": a.seq, "device": a.device, "mode": a.mode, "granularity": a.granularity,
        "accelerator": accel.device_name(), "sync": a.sync, "kdvfs_extra": a.kdvfs, "steps_per_arm": timed_steps["on"],
        "median_step_ms_with_kdvfs": on_ms, "median_step_ms_without_kdvfs": off_ms,
        "overhead_pct": (on_ms / off_ms - 1.0) * 100.0,
        **stats,
        "block_median_ms": block_ms, "block_arms": arms, "block_steps_ms": block_steps_ms,
        "block_steps_profiled": block_profiled, "gc_gen2_pauses": gc_pauses,
        "mean_step_ms_with_kdvfs": statistics.fmean(times["on"]) * 1e3,
        "mean_step_ms_without_kdvfs": statistics.fmean(times["off"]) * 1e3,
        # per-step times only where each step was timed: a block's mean has no quantiles to speak of
        "step_quantiles": (step_quantiles([x * 1e3 for x in times["on"]], [x * 1e3 for x in times["off"]])
                           if per_step else None),
    }
    if a.alt_kdvfs:
        result["alt"] = {
            "kdvfs_extra": a.alt_kdvfs, "median_step_ms": statistics.median(times["alt"]) * 1e3,
            "against_without": summarise(block_ms["alt"], block_ms["off"], all_block_ms, arms),
            "against_with": summarise(block_ms["alt"], block_ms["on"], all_block_ms, arms),
            "step_quantiles": (step_quantiles([x * 1e3 for x in times["alt"]], [x * 1e3 for x in times["off"]])
                               if per_step else None),
        }
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rank_figures(kd_engines["on"], first_block_step, rank, int(os.environ.get("LOCAL_RANK", "0")), times)
    mine.update(cost_figures(host_ms["on"], kd_engines["on"], a.blocks * a.steps_per_block))
    if a.alt_kdvfs:
        mine["alt"] = {"median_step_ms": statistics.median(times["alt"]) * 1e3,
                       # what its kdvfs engines ran with, read back: the keys reached them
                       "config": {k: getattr(kd_engines["alt"][-1].config, k, None) for k in a.alt_kdvfs},
                       **cost_figures(host_ms["alt"], kd_engines["alt"], a.blocks * a.steps_per_block)}
    mine["continuous"] = continuous
    result["long_run_estimate"] = (long_run_estimate(stats, continuous, mine["profiled_steps"])
                                   if continuous else None)
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        # DeepSpeed set this rank's GPU as the current device, where NCCL carries the objects.
        torch.distributed.all_gather_object(ranks, mine)
    result.update(world_size=world, step_times_from="rank 0", ranks=ranks)
    if rank == 0:
        print(f"model {result['params_m']:.1f}M params, {a.dtype}, ZeRO-{a.zero}, GAS {a.gas}, "
              f"micro-batch {a.micro_batch} x {a.seq} tokens{f' per GPU x {world} GPUs' if world > 1 else ''}, "
              f"kdvfs device={a.device} mode={a.mode} granularity={a.granularity}, {timed_steps['on']} steps per arm, "
              f"synchronised per {a.sync}" + (f", kernel_dvfs also {json.dumps(a.kdvfs)}" if a.kdvfs else ""))
        of = "" if per_step else " (median of the blocks' means)"
        print(f"median step time with kdvfs    {on_ms:10.3f} ms{of}")
        print(f"median step time without kdvfs {off_ms:10.3f} ms{of}")
        print(f"overhead                       {result['overhead_pct']:+10.3f} %"
              + cpu_caveat(result["accelerator"] == "cpu"))
        print(format_summary(stats))
        if result["step_quantiles"]:
            print(format_step_quantiles(result["step_quantiles"]))
        if a.alt_kdvfs:
            alt = result["alt"]
            print(f"third arm, kdvfs with {json.dumps(a.alt_kdvfs)} too: median step time {alt['median_step_ms']:.3f} ms")
            print(format_summary(alt["against_without"], label="against without kdvfs", noise=False))
            print(format_summary(alt["against_with"], label="against kdvfs without those keys", noise=False))
            if alt["step_quantiles"]:
                print(format_step_quantiles(alt["step_quantiles"], label="third arm / without kdvfs"))
        if result["long_run_estimate"]:
            print(format_long_run_estimate(result["long_run_estimate"]))
        print(f"Python's full collections on rank 0: {len(gc_pauses)}, "
              f"{sum(g['ms'] for g in gc_pauses):.0f} ms in all")
        if world > 1:
            print("(step times are rank 0's timer; each rank's own is in its section below)")
        for fig in ranks:
            print_rank(fig)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skips interpreter teardown, where gloo and DeepSpeed's leftovers can abort a clean run.
    os._exit(0)


if __name__ == "__main__":
    main()
