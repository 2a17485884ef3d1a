"""kdvfs with DeepSpeed: a tiny model, the ``kernel_dvfs`` block, region clocks on a virtual H100.

    python examples/deepspeed_train.py --deepspeed_config examples/deepspeed_config.json
    torchrun --nproc_per_node=2 examples/deepspeed_train.py --deepspeed_config examples/deepspeed_config.json

Runs on a CPU (DeepSpeed picks its CPU accelerator and gloo). The config's ``"device":
"simulated"`` drives a virtual H100, so the figures printed at the end are model predictions;
on a real GPU that you may change, drop that line (or write "observe" to measure only).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

import deepspeed
import deepspeed.comm as dist
import kdvfs_deepspeed


class TinyGPT(nn.Module):
    """Embedding, a few pre-norm transformer blocks, and a language-model head."""

    def __init__(self, vocab: int = 128, width: int = 64, layers: int = 2, heads: int = 4, seq: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        block = lambda: nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,  # noqa: E731
                                                   norm_first=True)
        self.layers = nn.ModuleList([block() for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens[:, :-1]) + self.pos[: tokens.shape[1] - 1]
        mask = self.mask[: h.shape[1], : h.shape[1]]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        logits = self.head(self.norm(h))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    if not args.deepspeed_config:
        parser.error("pass --deepspeed_config (e.g. examples/deepspeed_config.json)")
    # A plain `python` run has no launcher to describe the process group: make it a group of one,
    # so DeepSpeed does not go looking for MPI.
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)

    torch.manual_seed(0)
    model = TinyGPT()
    # Same arguments as deepspeed.initialize; a bad 'kernel_dvfs' key fails here, before the engine is built.
    engine, _, _, _ = kdvfs_deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())

    g = torch.Generator().manual_seed(dist.get_rank())
    micro_batch = engine.train_micro_batch_size_per_gpu()
    for _ in range(args.steps * engine.gradient_accumulation_steps()):
        tokens = torch.randint(0, 128, (micro_batch, 33), generator=g).to(engine.device)
        loss = engine(tokens)
        engine.backward(loss)
        engine.step()
    if dist.get_rank() == 0:
        print(f"trained {engine.global_steps} steps, last loss {loss.item():.3f}")

    kdvfs_deepspeed.close(engine)  # restores the clocks and writes the run directory (also done at exit)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    os._exit(0)  # a multi-rank gloo group can abort in interpreter teardown; everything is written by now
