"""Megatron-core 0.16 pipeline schedules on the CPU across gloo ranks: the P2P shim and a toy stage.

Beyond :func:`megatron_fixtures.cpu.cpu_shims`, the pipeline's point-to-point layer allocates its
receive buffers on ``torch.cuda.current_device()``; :func:`pipeline_cpu_shims` answers "cpu"
there too. Use ``batch_p2p_comm=False`` (plain isend/irecv; the batched path would synchronise CUDA).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .cpu import _TorchCpuDevice, cpu_shims

HIDDEN, SEQ, MICRO_BATCH = 8, 4, 2


@contextlib.contextmanager
def pipeline_cpu_shims() -> Iterator[None]:
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    saved = p2p.torch
    p2p.torch = _TorchCpuDevice()
    try:
        with cpu_shims():
            yield
    finally:
        p2p.torch = saved


def pipeline_config(stages: int, virtual: int = 1):
    """One layer per model chunk; ``virtual`` > 1: the interleaved schedule's chunks per stage."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=stages * virtual, hidden_size=HIDDEN, num_attention_heads=1,
                             pipeline_model_parallel_size=stages, pipeline_dtype=torch.float32,
                             virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
                             batch_p2p_comm=False)


class PipeStage(nn.Module):
    """One pipeline stage: the first reads the batch, the others the tensor Megatron received.

    ``finalize_model_grads`` also asks what Megatron's DDP wrapper and GPTModel answer
    (``ddp_config``, ``pre_process``, ``share_embeddings_and_output_weights``): no shared
    embedding here, so the first and last stages have nothing to all-reduce.
    """

    share_embeddings_and_output_weights = False

    def __init__(self, config, first: bool):
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.enums import ModelType

        super().__init__()
        self.config = config
        self.ddp_config = DistributedDataParallelConfig()
        self.model_type = ModelType.encoder_or_decoder
        self.first = self.pre_process = first
        self.fc = nn.Linear(HIDDEN, HIDDEN)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def finish_grad_sync(self, force_all_reduce=False):
        pass  # one data-parallel replica: nothing to reduce

    def forward(self, x):
        return torch.relu(self.fc(x if self.first else self.input_tensor))


def pipe_forward_step(data_iterator, model):
    """forward_step_func: (output, loss_func); the schedule calls loss_func on the last stage only."""
    x = next(data_iterator) if model.first else None
    out = model(x)

    def loss_func(output):
        loss = output.pow(2).mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def pipe_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return iter([torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=g) for _ in range(n)])
