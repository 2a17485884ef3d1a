"""The Lightning GPT example's training step, for ``kdvfs trace``: kernels tagged by kdvfs region.

    kdvfs trace --script examples/trace_lightning_gpt.py --out lightning-gpt.csv

Regions are the ones KernelDVFS reports: the phases, and in forward and backward the children of
each layer block and the siblings of the layer stack (layer indices folded). The step is the
Lightning module's own ``training_step`` with the optimizer it configures, in bf16 autocast.
Without a GPU set ``KDVFS_TRACE_TINY=1`` and pass ``--cpu`` to check the script.
"""
import os

import torch

from kdvfs_lightning.demo import GPT_350M, RandomTokens, TinyGPT
from kdvfs_plugins.sim.capture import ModuleTagger, region

TINY = os.environ.get("KDVFS_TRACE_TINY") == "1"
CFG = dict(vocab=256, d=64, layers=2, heads=4, seq=32) if TINY else dict(GPT_350M)
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"
BATCH = 2 if TINY else 8

torch.manual_seed(0)
model = TinyGPT(**CFG).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
data = RandomTokens(1000, CFG["seq"], CFG["vocab"])
tagger = ModuleTagger(model)


def kdvfs_trace_step(i):
    idx, target = (t.unsqueeze(0).repeat(BATCH, 1).to(DEVICE) for t in data[i])
    tagger.phase = "forward"
    with region("forward"), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        loss = model.training_step((idx, target), i)
    tagger.phase = "backward"
    with region("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with region("optimizer"):
        optimizer.step()
