"""Two-process DDP on CPU (gloo) with KernelDVFS on the simulated device."""
import json
import logging
import os
import sys

import torch
from torch import nn

import lightning.pytorch as pl

from kdvfs_lightning import KernelDVFS
from kdvfs_plugins import hookimpl
from kdvfs_plugins.devices import SimulatedDevice
from kdvfs_plugins.sim.gpu import Work


class RegionWork:
    """Every stretch between two markers is the same memory-bound work on the virtual GPU."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self):
        return [Work("copy", self.seconds)]


class RegionWorkDevice:
    """Each rank's simulated GPU, running RegionWork (a steady load: host time would jitter)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    @hookimpl
    def kdvfs_make_device(self, config, index):
        return SimulatedDevice(index, work_source=RegionWork(self.seconds), noise=True, seed=1, switch_latency_ms=1.0)


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
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # kdvfs configures no logging itself
    # arguments: run directory [, max steps, more KernelDVFS settings as JSON]; DDP_FIT_DEVICES=1
    # runs one process alone, for comparison
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    settings = {"mode": "observe", **(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})}
    work_s = settings.pop("region_work_s", None)
    if work_s is not None:
        settings["plugins"] = [RegionWorkDevice(work_s)]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8 * steps, 16)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=int(os.environ.get("DDP_FIT_DEVICES", "2")), strategy="ddp", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[KernelDVFS(device="simulated", run_dir=sys.argv[1], **settings)],
    )
    trainer.fit(Net(), data)
