"""One pipeline stage of the 1 B GPT for ``kdvfs trace``: one microbatch's forward and backward, then
the optimizer step over the stage's parameters.

    KDVFS_STAGE=0 KDVFS_STAGES=4 kdvfs trace --script examples/trace_gpt_stage.py --out gpt1b-stage0.csv

The model is the measured GPT step's (16 layers, d_model 2048, 16 heads, sequence 2048) cut into
``KDVFS_STAGES`` slices of consecutive layers: the first stage also holds the embeddings, the last
the final norm, the LM head and the loss. A microbatch is 2 sequences, bf16 autocast, fused AdamW.
A stage other than the last runs its backward from a fixed gradient of its output's shape, as a
pipeline's receive would hand it over. ``kdvfs simulate --pipeline`` runs these traces as stages.
Without a GPU set ``KDVFS_TRACE_TINY=1`` and pass ``--cpu`` to check the script.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from kdvfs_lightning.demo import Block
from kdvfs_plugins.sim.capture import ModuleTagger, region

TINY = os.environ.get("KDVFS_TRACE_TINY") == "1"
CFG = dict(vocab=256, d=64, layers=4, heads=4, seq=32) if TINY else dict(vocab=50304, d=2048, layers=16, heads=16, seq=2048)
DEVICE = "cuda" if torch.cuda.is_available() and not TINY else "cpu"
MICROBATCH = 2
STAGE = int(os.environ.get("KDVFS_STAGE", "0"))
STAGES = int(os.environ.get("KDVFS_STAGES", "4"))
if not (0 <= STAGE < STAGES and CFG["layers"] % STAGES == 0):
    raise SystemExit(f"KDVFS_STAGE={STAGE} KDVFS_STAGES={STAGES}: need 0 <= stage < stages, "
                     f"and stages dividing {CFG['layers']} layers")
FIRST, LAST = STAGE == 0, STAGE == STAGES - 1


class Stage(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        if FIRST:
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(seq, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers // STAGES))
        if LAST:
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        if FIRST:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.layers:
            x = block(x)
        return self.head(self.ln_f(x)) if LAST else x


torch.manual_seed(STAGE)
model = Stage(**CFG).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
tagger = ModuleTagger(model)
shape = (MICROBATCH, CFG["seq"], CFG["d"])
received = torch.randn(shape, device=DEVICE, requires_grad=True)
grad_in = torch.randn(shape, device=DEVICE) * 1e-3


def kdvfs_trace_step(i):
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, CFG["vocab"], (MICROBATCH, CFG["seq"] + 1), generator=g).to(DEVICE)
    tagger.phase = "forward"
    with region("forward"), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        out = model(tokens[:, :-1] if FIRST else received)
        if LAST:
            loss = F.cross_entropy(out.float().view(-1, out.shape[-1]), tokens[:, 1:].reshape(-1))
    tagger.phase = "backward"
    with region("backward"):
        optimizer.zero_grad(set_to_none=True)
        if LAST:
            loss.backward()
        else:
            out.backward(grad_in)
    with region("optimizer"):
        optimizer.step()
