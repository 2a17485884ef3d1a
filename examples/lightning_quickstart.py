"""Lightning quick start: a small GPT-style model trained with KernelDVFS.

Runs anywhere: on a machine without an NVIDIA driver kdvfs uses the simulated H100, and the
figures it prints are model predictions. On a GPU pass ``--device observe`` to measure without
changing anything.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from kdvfs_lightning import KernelDVFS


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln_1(x)
        seq = x.shape[1]
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=x.device), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyGPT(pl.LightningModule):
    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, seq: int = 32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_f(x))

    def training_step(self, batch, batch_idx):
        idx, target = batch
        logits = self(idx)
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def random_tokens(n: int = 64, seq: int = 32, vocab: int = 256):
    data = torch.randint(0, vocab, (n, seq + 1))
    return torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="simulated", help="kdvfs device: auto, nvml, observe, simulated")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--run-dir", default="kdvfs_runs/quickstart")
    args = p.parse_args(argv)
    loader = torch.utils.data.DataLoader(random_tokens(), batch_size=8)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[KernelDVFS(device=args.device, mode="observe", run_dir=args.run_dir)],
    )
    trainer.fit(TinyGPT(), loader)


if __name__ == "__main__":
    main()
