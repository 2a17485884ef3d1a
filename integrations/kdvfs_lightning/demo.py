"""A small GPT-style LightningModule and a CPU run with KernelDVFS, for the demo and examples."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from .callback import KernelDVFS


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


#: The GPT-style model of the GPU benchmarks and the shipped Lightning trace (about 350 M parameters).
GPT_350M = dict(vocab=50304, d=1024, layers=24, heads=16, seq=1024)


class TinyGPT(pl.LightningModule):
    """A GPT-style model: tiny by default, ``TinyGPT(**GPT_350M)`` for GPU runs."""

    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, seq: int = 32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_f(x))

    def training_step(self, batch, batch_idx):
        idx, target = batch
        return F.cross_entropy(self(idx).flatten(0, 1).float(), target.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=self.device.type == "cuda")


class RandomTokens(torch.utils.data.Dataset):
    """Endless-looking random token sequences, generated per item (no big tensor in memory)."""

    def __init__(self, n: int, seq: int, vocab: int):
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.randint(0, self.vocab, (self.seq + 1,), generator=torch.Generator().manual_seed(i))
        return x[:-1], x[1:]


def random_tokens(n: int = 256, seq: int = 32, vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])


def run_demo(run_dir: str, steps: int = 30, **kdvfs) -> KernelDVFS:
    """Train TinyGPT on the CPU with KernelDVFS (simulated device by default); returns the callback."""
    torch.manual_seed(0)
    kdvfs = {"device": "simulated", "mode": "observe", "run_dir": run_dir, "window_steps": 5, **kdvfs}
    cb = KernelDVFS(**kdvfs)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
    )
    trainer.fit(TinyGPT(), torch.utils.data.DataLoader(random_tokens(), batch_size=8))
    return cb
