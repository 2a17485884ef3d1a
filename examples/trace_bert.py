"""A BERT-style masked-language-model training step for ``kdvfs trace``: a bidirectional encoder.

    kdvfs trace --script examples/trace_bert.py --out bert.csv

BERT-large (24 layers, d_model 1024, 16 heads, GELU feed-forward 4096, post-norm LayerNorm,
learned positions, vocabulary 30522; about 0.34 B parameters), sequence 512, batch 32, 15% of
the tokens predicted, bf16 autocast, fused AdamW: attention without a causal mask over short
sequences, a large batch, and an output layer applied to the masked tokens only. Regions are the
ones KernelDVFS reports: the phases, and in forward and backward each layer's children and the
siblings of the layer stack. Kept out of the explorer's tuning (``kdvfs_plugins/data/README.md``).
Without a GPU set ``KDVFS_TRACE_TINY=1`` and pass ``--cpu`` to check the script.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from kdvfs_plugins.sim.capture import ModuleTagger, region

TINY = os.environ.get("KDVFS_TRACE_TINY") == "1"
CFG, BATCH = ((dict(vocab=256, d=64, layers=2, heads=4, ff=256, seq=32), 2) if TINY
              else (dict(vocab=30522, d=1024, layers=24, heads=16, ff=4096, seq=512), 32))
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"
MASKED = 0.15


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.ff_norm = nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = self.attn_norm(x + self.o(y))
        return self.ff_norm(x + self.ff(x))


class Bert(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ff: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.embed_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(Layer(d, heads, ff) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, vocab))

    def forward(self, idx, where):
        x = self.embed_norm(self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        for layer in self.layers:
            x = layer(x)
        return self.head(x[where])


torch.manual_seed(0)
model = Bert(**CFG).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
tagger = ModuleTagger(model)


def kdvfs_trace_step(i):
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, CFG["vocab"], (BATCH, CFG["seq"]), generator=g)
    where = torch.rand(BATCH, CFG["seq"], generator=g) < MASKED
    tokens, where = tokens.to(DEVICE), where.to(DEVICE)
    tagger.phase = "forward"
    with region("forward"), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        logits = model(tokens.masked_fill(where, 0), where)
        loss = F.cross_entropy(logits.float(), tokens[where])
    tagger.phase = "backward"
    with region("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with region("optimizer"):
        optimizer.step()
