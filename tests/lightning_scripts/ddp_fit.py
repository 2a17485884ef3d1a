"""Two-process DDP on CPU (gloo) with KernelDVFS on the simulated device."""
import sys

import torch
from torch import nn

import lightning.pytorch as pl

from kdvfs_lightning import KernelDVFS


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def training_step(self, batch, batch_idx):
        x = batch[0]
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[KernelDVFS(device="simulated", mode="observe", run_dir=sys.argv[1])],
    )
    trainer.fit(Net(), data)
