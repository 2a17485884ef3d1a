"""A Vision Transformer training step for ``kdvfs trace``: patches, pre-norm blocks, GELU, a class token.

    kdvfs trace --script examples/trace_vit.py --out vit.csv

ViT-L/16 at 224 px (24 layers, d_model 1024, 16 heads, MLP 4096, 196 patches and a class token,
1000 classes; about 0.3 B parameters), batch 64, bf16 autocast, fused AdamW: short sequences and a
large batch, so more of the step is matrix products and element-wise work on activations than in
the language models, and the optimizer weighs less. Regions are the ones KernelDVFS reports: the
phases, and in forward and backward each block's children and the siblings of the block stack.
Kept out of the explorer's tuning (``kdvfs_plugins/data/README.md``).
Without a GPU set ``KDVFS_TRACE_TINY=1`` and pass ``--cpu`` to check the script.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from kdvfs_plugins.sim.capture import ModuleTagger, region

TINY = os.environ.get("KDVFS_TRACE_TINY") == "1"
CFG = (dict(image=32, patch=16, d=64, layers=2, heads=4, mlp=256, classes=10) if TINY
       else dict(image=224, patch=16, d=1024, layers=24, heads=16, mlp=4096, classes=1000))
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"
BATCH = 2 if TINY else 64


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.mlp_norm(x))


class ViT(nn.Module):
    def __init__(self, image: int, patch: int, d: int, layers: int, heads: int, mlp: int, classes: int):
        super().__init__()
        n = (image // patch) ** 2
        self.patches = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, images):
        x = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


torch.manual_seed(0)
model = ViT(**CFG).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
tagger = ModuleTagger(model)


def kdvfs_trace_step(i):
    g = torch.Generator().manual_seed(i)
    images = torch.randn(BATCH, 3, CFG["image"], CFG["image"], generator=g).to(DEVICE)
    labels = torch.randint(0, CFG["classes"], (BATCH,), generator=g).to(DEVICE)
    tagger.phase = "forward"
    with region("forward"), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        loss = F.cross_entropy(model(images).float(), labels)
    tagger.phase = "backward"
    with region("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with region("optimizer"):
        optimizer.step()
