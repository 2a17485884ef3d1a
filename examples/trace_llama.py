"""A Llama-class training step for ``kdvfs trace``: RMSNorm, SwiGLU, rotary embeddings, no biases.

    kdvfs trace --script examples/trace_llama.py --out llama.csv

About 1.1 B parameters (16 layers, d_model 2048, 16 heads, SwiGLU hidden 5632, vocabulary 32000),
sequence 2048, batch 4, bf16 autocast, fused AdamW. Regions are the ones KernelDVFS reports: the
phases, and in forward and backward each layer's children and the siblings of the layer stack.
It is the second architecture the explorer is checked on (``kdvfs_plugins/data/README.md``).
Without a GPU set ``KDVFS_TRACE_TINY=1`` and pass ``--cpu`` to check the script.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from kdvfs_plugins.sim.capture import ModuleTagger, region

TINY = os.environ.get("KDVFS_TRACE_TINY") == "1"
CFG = (dict(vocab=256, d=64, layers=2, heads=4, hidden=172, seq=32) if TINY
       else dict(vocab=32000, d=2048, layers=16, heads=16, hidden=5632, seq=2048))
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"
BATCH = 2 if TINY else 4


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.attn = Attention(d, heads)
        self.mlp_norm = nn.RMSNorm(d)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, hidden: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        half = d // heads // 2
        freq = 1.0 / (10000 ** (torch.arange(half) / half))
        angle = torch.outer(torch.arange(seq), freq)
        self.register_buffer("cos", torch.cat((angle.cos(), angle.cos()), -1)[:, :half], persistent=False)
        self.register_buffer("sin", torch.cat((angle.sin(), angle.sin()), -1)[:, :half], persistent=False)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.head(self.norm(x))


torch.manual_seed(0)
model = Llama(**CFG).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
tagger = ModuleTagger(model)


def kdvfs_trace_step(i):
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, CFG["vocab"], (BATCH, CFG["seq"] + 1), generator=g).to(DEVICE)
    tagger.phase = "forward"
    with region("forward"), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    tagger.phase = "backward"
    with region("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with region("optimizer"):
        optimizer.step()
