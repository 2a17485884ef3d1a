"""A Llama-class training step for ``kdvfs trace``: RMSNorm, SwiGLU, rotary embeddings, no biases.

    kdvfs trace --script examples/trace_llama.py --out llama.csv
    KDVFS_LLAMA=gqa2b kdvfs trace --script examples/trace_llama.py --out llama-gqa2b.csv

``1b`` (default): about 1.1 B parameters (16 layers, d_model 2048, 16 heads, SwiGLU hidden 5632,
vocabulary 32000), sequence 2048, batch 4. ``gqa2b``: the Llama-3 layout at about 2 B parameters
(12 layers, d_model 3072, 24 query heads sharing 8 key/value heads, SwiGLU hidden 8192, vocabulary
128256, so the LM head and the loss weigh more), sequence 4096, batch 2. Both bf16 autocast, fused
AdamW. Regions are the ones KernelDVFS reports: the phases, and in forward and backward each
layer's children and the siblings of the layer stack. These are the architectures the explorer is
checked on besides the GPT (``kdvfs_plugins/data/README.md``).
Without a GPU set ``KDVFS_TRACE_TINY=1`` and pass ``--cpu`` to check the script.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from kdvfs_plugins.sim.capture import ModuleTagger, region

TINY = os.environ.get("KDVFS_TRACE_TINY") == "1"
SIZE = os.environ.get("KDVFS_LLAMA", "1b")
SIZES = {  # (model, batch)
    "1b": (dict(vocab=32000, d=2048, layers=16, heads=16, kv_heads=16, hidden=5632, seq=2048), 4),
    "gqa2b": (dict(vocab=128256, d=3072, layers=12, heads=24, kv_heads=8, hidden=8192, seq=4096), 2),
}
if SIZE not in SIZES:
    raise SystemExit(f"KDVFS_LLAMA={SIZE!r}: choose one of {', '.join(SIZES)}")
CFG, BATCH = ((dict(vocab=256, d=64, layers=2, heads=4, kv_heads=2 if SIZE == "gqa2b" else 4, hidden=172, seq=32), 2)
              if TINY else SIZES[SIZE])
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.qkv = nn.Linear(d, d + 2 * kv_heads * (d // heads), bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        hd = d // self.heads
        if self.kv_heads == self.heads:
            q, k, v = self.qkv(x).view(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        else:  # grouped-query attention: key/value heads shared by heads // kv_heads query heads
            q, k, v = self.qkv(x).split([d, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
            q = q.view(b, t, self.heads, hd).transpose(1, 2)
            k, v = (z.view(b, t, self.kv_heads, hd).transpose(1, 2) for z in (k, v))
        y = F.scaled_dot_product_attention(rotary(q, cos, sin), rotary(k, cos, sin), v, is_causal=True,
                                           enable_gqa=self.kv_heads != self.heads)
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
    def __init__(self, d: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.attn = Attention(d, heads, kv_heads)
        self.mlp_norm = nn.RMSNorm(d)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, kv_heads: int, hidden: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, heads, kv_heads, hidden) for _ in range(layers))
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
