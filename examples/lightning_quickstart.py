"""Lightning quick start: add ``KernelDVFS()`` to the Trainer's callbacks.

Runs anywhere: without an NVIDIA driver kdvfs uses the simulated H100 and its figures are model
predictions. On a GPU, ``--device observe`` measures without changing anything; ``--device nvml``
(root or CAP_SYS_ADMIN) sets clocks.
"""
from __future__ import annotations

import argparse
import logging

import torch

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from kdvfs_lightning import KernelDVFS
from kdvfs_lightning.demo import TinyGPT, random_tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="simulated", help="kdvfs device: auto, nvml, observe, simulated")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--run-dir", default="kdvfs_runs/quickstart")
    args = p.parse_args(argv)
    # kdvfs logs through the "kdvfs" logger and leaves the configuration to the script: show its
    # INFO lines (the device it picked, each rank's region table at the end).
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        callbacks=[KernelDVFS(device=args.device, mode="observe", run_dir=args.run_dir)],
    )
    trainer.fit(TinyGPT(), torch.utils.data.DataLoader(random_tokens(), batch_size=8))


if __name__ == "__main__":
    main()
