"""kdvfs's state where each framework shows progress: the Lightning progress bar's items, and
lines beside DeepSpeed's and Megatron's own log lines."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))

from kdvfs_plugins.progress import engine_status, state_line  # noqa: E402

pl = pytest.importorskip("lightning.pytorch")


class Seen(pl.Callback):
    """What the progress bar would show after each step (its get_metrics), kdvfs's item only."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(trainer.progress_bar_callback.get_metrics(trainer, pl_module).get("kdvfs"))


@pytest.mark.slow
def test_lightning_progress_bar_shows_exploring_validating_applied(tmp_path):
    from test_explore_lightning import Net, SimDevice

    from kdvfs_lightning import KernelDVFS

    cb = KernelDVFS(plugins=[SimDevice()], window_steps=2, warmup_steps=1, progress=False, mode="auto",
                    explore_max_steps=300, max_slowdown=0.05, run_dir=str(tmp_path / "run"))
    seen = Seen()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(320, 4)), batch_size=1)
    trainer = pl.Trainer(max_steps=320, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=True, enable_model_summary=False, callbacks=[cb, seen],
                         default_root_dir=str(tmp_path))
    trainer.fit(Net(), data)
    states = [s for s in seen.states if s]
    assert any(s.startswith("exploring ") and s.endswith("/300") for s in states), set(states)
    assert any(s.startswith("validating ") for s in states), set(states)
    assert states[-1].startswith("applied -") and states[-1].endswith("% energy (model prediction)"), states[-1]
    # the bar is unwrapped at the end of training
    assert "get_metrics" not in vars(trainer.progress_bar_callback)


def test_state_lines_follow_the_frameworks_log_interval():
    engine = SimpleNamespace(device=SimpleNamespace(kind="simulated"), explorer=None, explore_result=None,
                             plan=None, config=SimpleNamespace(mode="observe"), step=9)
    assert engine_status(engine) == "observing"
    assert state_line(engine, 10, 10) == "kdvfs: observing"
    assert state_line(engine, 11, 10) is None and state_line(engine, 10, None) is None
    result = SimpleNamespace(status="applied", validated={"energy_change": -0.0671}, predicted={})
    applied = SimpleNamespace(**{**vars(engine), "explore_result": result})
    assert engine_status(applied) == "applied -6.7% energy (model prediction)"


def test_deepspeed_logs_the_state_with_its_own_lines(monkeypatch, tmp_path):
    import kdvfs_deepspeed
    from test_deepspeed_adapter import BLOCK, FakeDeepSpeedEngine, SimDevice, train

    lines = []
    monkeypatch.setitem(sys.modules, "deepspeed.utils",
                        SimpleNamespace(log_dist=lambda message, ranks=None: lines.append((message, ranks))))
    ds = FakeDeepSpeedEngine(gas=1, block={**BLOCK, "run_dir": str(tmp_path), "mode": "observe",
                                           "sm_mhz": None, "mem_mhz": None})
    ds.steps_per_print = lambda: 2
    kdvfs_deepspeed.attach(ds, plugins=[SimDevice()])
    train(ds, 6)
    kdvfs_deepspeed.close(ds)
    assert lines == [("kdvfs: observing", [0])] * 3


def test_megatron_prints_the_state_every_log_interval(tmp_path, capsys):
    pytest.importorskip("megatron.core")
    from kdvfs_megatron.install import MegatronKdvfs

    from kdvfs_plugins.config import KdvfsConfig

    handle = MegatronKdvfs(KdvfsConfig.from_dict({"mode": "observe", "device": "simulated", "run_dir": str(tmp_path)}),
                           rank=0, local_rank=0, world_size=1).start()
    handle.log_interval = 2
    try:
        for _ in range(4):
            handle.step_begin()
            handle.step_end()
    finally:
        handle.close()
    assert capsys.readouterr().out.count("kdvfs: observing\n") == 2
