"""A mixture-of-experts training step for ``kdvfs trace``: top-2 routing over eight SwiGLU experts.

    kdvfs trace --script examples/trace_moe.py --out moe.csv

Mixtral-style layers at about 1.4 B parameters, 0.5 B active per token (8 layers, d_model 2048,
16 heads, RMSNorm, rotary embeddings, eight SwiGLU experts of hidden 2816 per layer, each token
routed to two; vocabulary 32000), sequence 2048, batch 4, bf16 autocast, fused AdamW. The experts
run one after another on the tokens routed to them (gather, matrix products, weighted scatter-add),
so the step holds many smaller matrix products, index kernels and host synchronisations, and the
optimizer updates three times the parameters the forward pass uses. Regions are the ones KernelDVFS
reports: the phases, and in forward and backward each layer's children and the siblings of the
layer stack. Kept out of the explorer's tuning (``kdvfs_plugins/data/README.md``).
Without a GPU set ``KDVFS_TRACE_TINY=1`` and pass ``--cpu`` to check the script.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from kdvfs_plugins.sim.capture import ModuleTagger, region

TINY = os.environ.get("KDVFS_TRACE_TINY") == "1"
CFG, BATCH = ((dict(vocab=256, d=64, layers=2, heads=4, experts=4, top_k=2, hidden=96, seq=32), 2) if TINY
              else (dict(vocab=32000, d=2048, layers=8, heads=16, experts=8, top_k=2, hidden=2816, seq=2048), 4))
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"


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


class Expert(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(nn.Module):
    def __init__(self, d: int, experts: int, top_k: int, hidden: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, hidden) for _ in range(experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weight, chosen = torch.topk(F.softmax(self.router(x).float(), dim=-1), self.top_k, dim=-1)
        weight = (weight / weight.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            out.index_add_(0, token, expert(x[token]) * weight[token, slot, None])
        return out.view(shape)


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, experts: int, top_k: int, hidden: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.attn = Attention(d, heads)
        self.moe_norm = nn.RMSNorm(d)
        self.moe = MoE(d, experts, top_k, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.moe(self.moe_norm(x))


class Mixtral(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, experts: int, top_k: int, hidden: int,
                 seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, heads, experts, top_k, hidden) for _ in range(layers))
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
model = Mixtral(**CFG).to(DEVICE)
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
