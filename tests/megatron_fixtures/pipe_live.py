"""megatron-core's 1F1B schedule (pp = world size) under kdvfs_megatron on the CPU, one stage per rank.

Usage: pipe_live.py OUT_DIR --microbatches N --steps N --block JSON [--refuse RANK] [--chunks V]
(``--chunks`` above 1: V model chunks per stage, the interleaved schedule).
Run under torchrun. Megatron's train_step is mimicked around ``get_forward_backward_func()``: the
``optimizer`` timer brackets ``optimizer.step()``. Writes OUT_DIR/rank<N>.json: the region events in
order, the clock requests (simulated device) or the fake GPU's writes (``--refuse``), the device kind.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")  # TE/Apex fallbacks, deprecations

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "integrations"))
sys.path.insert(0, str(TESTS / "deepspeed_scripts"))  # pipe_plugins: shared with the DeepSpeed run

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func  # noqa: E402

import kdvfs_megatron  # noqa: E402

from pipe_plugins import base_config, parse_args, plugins_for, write_result  # noqa: E402
from megatron_fixtures.pipeline import (  # noqa: E402
    MICRO_BATCH, SEQ, PipeStage, pipe_batches, pipe_forward_step, pipeline_config, pipeline_cpu_shims,
)


def main() -> None:
    a = parse_args("--microbatches", "--chunks")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    vp = a.chunks  # model chunks per stage: above 1, Megatron runs the interleaved schedule
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world,
                                             virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
    out = a.out
    torch.manual_seed(rank)
    config = pipeline_config(world, vp)
    config.finalize_model_grads_func = finalize_model_grads
    # chunk i of every stage runs after chunk i of the previous stage; the first stage's chunk 0 reads
    model = [PipeStage(config, first=parallel_state.is_pipeline_first_stage() and i == 0) for i in range(vp)]
    opt = torch.optim.SGD([p for chunk in model for p in chunk.parameters()], lr=0.01)
    kd = base_config(out, rank, a.block)
    recorder, fake, plugins = plugins_for(rank, world, a.refuse)
    handle = kdvfs_megatron.install(config=kd, model=model, plugins=plugins)
    data = pipe_batches(a.microbatches * a.steps)
    data = data if vp == 1 else [data] * vp  # one iterator per chunk; only the first stage's chunk 0 reads
    with pipeline_cpu_shims():
        for _ in range(a.steps):
            opt.zero_grad()
            get_forward_backward_func()(forward_step_func=pipe_forward_step, data_iterator=data, model=model,
                                        num_microbatches=a.microbatches, seq_length=SEQ,
                                        micro_batch_size=MICRO_BATCH)
            timers = config.timers
            timers("optimizer", log_level=1).start(barrier=False)
            opt.step()
            timers("optimizer").stop()
            dist.barrier()  # the training loop's own collectives go on whatever a rank's clocks did
    device = handle.engine.device
    kdvfs_megatron.uninstall()
    write_result(out, rank, recorder, device, fake, stage=parallel_state.get_pipeline_model_parallel_rank(),
                 records=[r.step for r in handle.records], proxy_left=config.timers is not None)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
