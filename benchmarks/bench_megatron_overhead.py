"""Step-time overhead of kdvfs in a Megatron training loop, measured with and without it in one run.

A small megatron-core GPTModel (local layer spec, bf16, tensor and pipeline parallel size 1) is
trained for a few hundred steps through ``get_forward_backward_func()``, the way Megatron's
``train_step`` drives it (a real ``Timers`` object in ``config.timers`` at
``--timing-log-level`` 0, the ``optimizer`` timer around ``optimizer.step()``). Blocks of steps
run in ABBA rounds, "with kdvfs" and "without" (``kdvfs_megatron.install`` at the block's start,
``uninstall`` at its end), as the DeepSpeed benchmark does: each round compares its two adjacent
blocks, so drift in clocks and temperature falls on both arms alike, and the figure is the median
of the rounds with a 95% bootstrap interval; adjacent blocks of the same arm show the noise. The
first steps of every block are dropped (engine start-up, allocator warm-up).

On one H100 (measuring only: the observe device never writes a clock)::

    python benchmarks/bench_megatron_overhead.py --kernel-dvfs --kernel-dvfs-mode observe \\
        --kernel-dvfs-device observe

On a CPU, to check that it runs (a 2-layer model; uses the CPU shims of the test fixtures; the
simulated device's markers cost milliseconds of CPU each, so the CPU figures say nothing about
the overhead on a GPU)::

    python benchmarks/bench_megatron_overhead.py --tiny --kernel-dvfs --kernel-dvfs-mode observe \\
        --kernel-dvfs-device simulated

Prints the median step time with and without kdvfs and the overhead in percent; ``--json-out``
writes every step time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    from kdvfs_megatron import add_kernel_dvfs_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("benchmark")
    g.add_argument("--tiny", action="store_true", help="CPU run with a 2-layer model (checks that it works)")
    g.add_argument("--steps", type=int, default=None, help="steps in total (default 1000; --tiny 24)")
    g.add_argument("--block-steps", type=int, default=None, help="steps per block (default 25; --tiny 4)")
    g.add_argument("--skip-steps", type=int, default=2, help="steps dropped at the start of every block")
    g.add_argument("--warmup-steps", type=int, default=None, help="steps before the first block (default 20; --tiny 2)")
    g.add_argument("--num-layers", type=int, default=12)
    g.add_argument("--hidden-size", type=int, default=768)
    g.add_argument("--num-attention-heads", type=int, default=12)
    g.add_argument("--seq-length", type=int, default=1024)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--num-microbatches", type=int, default=2)
    g.add_argument("--vocab-size", type=int, default=32768)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--continuous-steps", type=int, default=0,
                   help="after the rounds, one kdvfs session of this many steps: what its profiled steps cost "
                        "a long run (every block starts a session, which profiles a step early)")
    g.add_argument("--json-out", default=None, help="write the step times and the summary here")
    return add_kernel_dvfs_args(p)


def apply_tiny_defaults(args) -> None:
    tiny = args.tiny
    defaults = dict(steps=(24, 1000), block_steps=(4, 25), warmup_steps=(2, 20))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if tiny:
        args.num_layers, args.hidden_size, args.num_attention_heads = 2, 32, 4
        args.seq_length, args.micro_batch_size, args.vocab_size = 16, 2, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def megatron_world(use_cuda: bool):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def cpu_context(tiny: bool):
    """The CPU shims live with the test fixtures; only ``--tiny`` uses them."""
    if not tiny:
        return contextlib.nullcontext()
    sys.path.insert(0, str(ROOT / "tests"))
    from megatron_fixtures.cpu import cpu_shims

    return cpu_shims()


def build_model(args, device):
    import torch
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.timers import Timers
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=dtype is torch.bfloat16, params_dtype=dtype,
        use_cpu_initialization=device.type == "cpu",
    )
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=args.vocab_size,
                     max_sequence_length=args.seq_length).to(device)
    if dtype is torch.bfloat16:
        # As Megatron's training loop does: the wrapper casts inputs and outputs around bf16 weights.
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(cfg, model)
    # What pretrain() sets up: timers at --timing-log-level 0 and the gradient finaliser.
    cfg.timers = Timers(0, "minmax")
    cfg.finalize_model_grads_func = finalize_model_grads
    # Megatron's DDP wrapper provides finish_grad_sync; in one process there is nothing to reduce.
    model.finish_grad_sync = lambda force_all_reduce=False: None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, opt


def make_forward_step(args, device):
    import torch

    seq = args.seq_length
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(args.micro_batch_size, seq)
    attention_mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).triu(1)  # True = masked

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        per_token_loss = model(tokens, position_ids, attention_mask, labels=torch.roll(tokens, -1, dims=1))

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach()}

        return per_token_loss, loss_func

    return forward_step


class Batches:
    """Endless random tokens, made once on the device so data loading costs nothing."""

    def __init__(self, args, device, n=16):
        import torch

        g = torch.Generator().manual_seed(args.seed)
        self.items = [torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=g).to(device)
                      for _ in range(n)]
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.items[self.i % len(self.items)]


def run(args) -> dict:
    import torch

    import kdvfs_megatron
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    use_cuda = not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)

    torch.manual_seed(args.seed)
    if use_cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)
    cfg = kdvfs_megatron.config_from_args(args)
    model, opt = build_model(args, device)
    forward_step = make_forward_step(args, device)
    data = Batches(args, device)
    fb = get_forward_backward_func()

    def step() -> float:
        """One Megatron step; returns its wall time in ms, the GPU drained at both ends."""
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fb(forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=args.num_microbatches,
           seq_length=args.seq_length, micro_batch_size=args.micro_batch_size)
        timers = model.config.timers
        timers("optimizer", log_level=1).start(barrier=False)
        opt.step()
        timers("optimizer").stop()
        sync()  # the benchmark's own measurement point, in both arms alike
        return (time.perf_counter() - t0) * 1e3

    for _ in range(args.warmup_steps):
        step()
    sync()
    from overhead_stats import abba_arm, long_run_estimate, long_session_figures, summarise

    times = {"without": [], "with": []}
    block_ms = {"on": [], "off": []}
    all_block_ms, arms = [], []
    overhead_cpu_ms = []
    n_blocks = max(2, round(args.steps / args.block_steps))
    n_blocks += n_blocks % 2  # whole rounds: one block of each arm
    for b in range(n_blocks):
        arm = "with" if abba_arm(b) == "on" else "without"
        handle = kdvfs_megatron.install(args, model=[model], rank=0, local_rank=device.index or 0, world_size=1) \
            if arm == "with" else None
        try:
            block = [step() for _ in range(args.block_steps)]
        finally:
            if handle is not None:
                overhead_cpu_ms.append(handle.host_time_s * 1e3 / args.block_steps)
                kdvfs_megatron.uninstall()
        kept = block[args.skip_steps:]
        times[arm].extend(kept)
        all_block_ms.append(statistics.median(kept))
        arms.append("on" if arm == "with" else "off")
        block_ms[arms[-1]].append(all_block_ms[-1])

    continuous = None
    if args.continuous_steps:
        handle = kdvfs_megatron.install(args, model=[model], rank=0, local_rank=device.index or 0, world_size=1)
        try:
            for _ in range(args.continuous_steps):
                step()
            handle.engine.meter.poll(wait=True)
            continuous = long_session_figures(handle.engine, args.continuous_steps)
        finally:
            kdvfs_megatron.uninstall()

    med_without = statistics.median(times["without"])
    med_with = statistics.median(times["with"])
    summary = {
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        "model": {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                                                "micro_batch_size", "num_microbatches", "vocab_size")},
        "kdvfs": {k: getattr(cfg, k) for k in ("mode", "device", "granularity")},
        "blocks": n_blocks, "block_steps": args.block_steps, "skip_steps": args.skip_steps,
        "steps_measured": {k: len(v) for k, v in times.items()},
        "median_step_ms_without": med_without,
        "median_step_ms_with": med_with,
        "overhead_pct": (med_with / med_without - 1.0) * 100.0,
        "kdvfs_cpu_ms_per_step": statistics.mean(overhead_cpu_ms) if overhead_cpu_ms else None,
        "p10_p90_ms_without": _quantiles(times["without"]),
        "p10_p90_ms_with": _quantiles(times["with"]),
        "rounds": summarise(block_ms["on"], block_ms["off"], all_block_ms, arms),
        "continuous": continuous,
    }
    # a block's session profiles its step at warm-up (kdvfs's warmup_steps); dropped steps cover it or not
    profiled_timed = 0 if args.skip_steps > cfg.warmup_steps else n_blocks // 2
    summary["long_run_estimate"] = long_run_estimate(summary["rounds"], continuous, profiled_timed) if continuous else None
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "step_ms": times}, indent=1))
    return summary


def _quantiles(values):
    if len(values) < 2:
        return [values[0], values[0]] if values else None
    q = statistics.quantiles(values, n=10, method="inclusive")
    return [q[0], q[-1]]


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    apply_tiny_defaults(args)
    os.environ.setdefault("KDVFS_DISABLE_ENTRYPOINTS", "1")  # measure kdvfs itself, not third-party plugins
    import logging

    import torch

    import kdvfs_megatron
    from overhead_stats import (cpu_caveat, format_long_run_estimate, format_long_session,  # next to this script
                                format_summary)  # (here, not at the top: tests load this file alone)

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny for a CPU check")
    if kdvfs_megatron.config_from_args(args) is None:
        raise SystemExit("this benchmark compares steps with and without kdvfs: pass --kernel-dvfs "
                         "(on a shared GPU with --kernel-dvfs-mode observe --kernel-dvfs-device observe)")
    logging.getLogger("kdvfs").setLevel(logging.WARNING)  # one summary per block would drown the result
    with megatron_world(use_cuda=not args.tiny), cpu_context(args.tiny):
        s = run(args)
    print(f"device: {s['device']}   kdvfs: " + " ".join(f"{k}={v}" for k, v in s["kdvfs"].items()))
    print(f"blocks: {s['blocks']} x {s['block_steps']} steps (first {s['skip_steps']} of each dropped)")
    print(f"median step time without kdvfs: {s['median_step_ms_without']:.3f} ms "
          f"(p10-p90 {s['p10_p90_ms_without'][0]:.3f}-{s['p10_p90_ms_without'][1]:.3f})")
    print(f"median step time with kdvfs:    {s['median_step_ms_with']:.3f} ms "
          f"(p10-p90 {s['p10_p90_ms_with'][0]:.3f}-{s['p10_p90_ms_with'][1]:.3f})")
    print(format_summary(s["rounds"]))
    if s["continuous"]:
        print(format_long_session(s["continuous"]))
    if s["long_run_estimate"]:
        print(format_long_run_estimate(s["long_run_estimate"]) + cpu_caveat(args.tiny))
    print(f"overhead: {s['overhead_pct']:+.2f} % of the pooled medians   (kdvfs CPU time at boundaries: "
          f"{s['kdvfs_cpu_ms_per_step']:.3f} ms/step)" + cpu_caveat(args.tiny))  # --tiny runs on the CPU (gloo, no CUDA)
    return 0


if __name__ == "__main__":
    sys.exit(main())
