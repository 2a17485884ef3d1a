import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from kdvfs_lightning import KernelDVFS
from kdvfs_plugins import ClockPair, ConfigError
from kdvfs_plugins.devices import SimulatedDevice

from helpers import RegionRecorder

ROOT = Path(__file__).resolve().parents[1]


class Net(pl.LightningModule):
    def __init__(self, manual=False, fail_at=None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(8, 1)
        self.manual = manual
        self.automatic_optimization = not manual
        self.fail_at = fail_at

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom")
        loss = self(batch[0]).pow(2).mean()
        if self.manual:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n=8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 8)), batch_size=1)


class SimDevice:
    """A plugin supplying a noise-free simulated device, and keeping it for inspection."""

    def __init__(self):
        self.device = None

    @__import__("kdvfs_plugins").hookimpl
    def kdvfs_make_device(self, config, index):
        self.device = SimulatedDevice(index, noise=False, switch_latency_ms=0)
        return self.device


def fit(tmp_path, model, steps=4, accumulate=1, callbacks=(), **kw):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                         callbacks=list(callbacks), default_root_dir=str(tmp_path))
    trainer.fit(model, loader())
    return trainer


def make_cb(tmp_path, **kw):
    rec, sim = RegionRecorder(), SimDevice()
    kw.setdefault("run_dir", str(tmp_path / "run"))
    kw.setdefault("mode", "observe")
    return KernelDVFS(plugins=[rec, sim], **kw), rec, sim


def test_phases_in_order_with_automatic_optimization(tmp_path):
    cb, rec, _ = make_cb(tmp_path)
    fit(tmp_path, Net(), steps=3, callbacks=[cb])
    assert [rec.phases(step=s) for s in range(3)] == [["forward", "backward", "optimizer"]] * 3
    groups = {r for k, r, s in rec.events if "/" in r}
    # blocks of the layer stack are split into their children; siblings of the stack stay whole
    assert {"forward/layers.*.*", "forward/head", "backward/layers.*.*", "backward/head"} <= groups
    assert len(cb.engine.meter.steps) == 3


def test_a_step_spans_the_micro_batches_under_gradient_accumulation(tmp_path):
    cb, rec, _ = make_cb(tmp_path)
    fit(tmp_path, Net(), steps=2, accumulate=2, callbacks=[cb])
    assert [rec.phases(step=s) for s in range(2)] == [["forward", "backward", "forward", "backward", "optimizer"]] * 2
    assert [s.step for s in cb.engine.meter.steps] == [0, 1]


def test_manual_optimization(tmp_path):
    cb, rec, _ = make_cb(tmp_path)
    fit(tmp_path, Net(manual=True), steps=2, callbacks=[cb])
    assert [rec.phases(step=s) for s in range(2)] == [["forward", "backward", "optimizer"]] * 2


def test_clocks_set_per_phase_and_restored_after_an_exception(tmp_path):
    cb, rec, sim = make_cb(tmp_path, mode="apply", region_clocks={"backward": [1200, 2619]})
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, Net(fail_at=2), steps=4, callbacks=[cb])
    asked = [c for _, c in sim.device.requests]
    assert asked[:2] == [ClockPair(1200, 2619), None] and asked[-1] is None
    assert not cb.engine.active


def test_bad_config_fails_when_the_callback_is_made():
    with pytest.raises(ConfigError, match=r"KernelDVFS\(\.\.\.\): granularity='layers'"):
        KernelDVFS(granularity="layers")


def test_plan_survives_a_checkpoint_resume(tmp_path):
    cb, _, _ = make_cb(tmp_path, mode="apply", region_clocks={"optimizer": [1500, 1593]})
    trainer = fit(tmp_path, Net(), steps=2, callbacks=[cb])
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    cb2, _, sim2 = make_cb(tmp_path, mode="auto", run_dir=str(tmp_path / "run2"))
    trainer2 = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[cb2])
    trainer2.fit(Net(), loader(), ckpt_path=str(ckpt))
    assert cb2.engine.plan is not None and cb2.engine.plan.regions["optimizer"] == ClockPair(1500, 1593)
    assert ClockPair(1500, 1593) in [c for _, c in sim2.device.requests]


def test_metrics_reach_the_trainers_loggers_under_kdvfs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb, _, _ = make_cb(tmp_path, window_steps=2)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         logger=CSVLogger(str(tmp_path), name="logs"), log_every_n_steps=1)
    trainer.fit(Net(), loader())
    text = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    assert {"kdvfs/gpu_time_ms", "kdvfs/clock_changes", "kdvfs/overhead_ms"} <= set(header)
    col = header.index("kdvfs/overhead_ms")
    logged_ms = [float(row.split(",")[col]) for row in text.splitlines()[1:] if row.split(",")[col]]
    # the host time counts the module hooks too; the logs spread it over the steps between them
    assert cb.host_time_s > cb._modules.host_time_s > 0
    assert logged_ms and all(v > 0 for v in logged_ms) and sum(logged_ms) <= cb.host_time_s * 1e3
    summary = json.loads((tmp_path / "run" / "rank0" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["model_prediction"] is True and summary["regions"]


@pytest.mark.slow
def test_ddp_two_processes_each_rank_reports_its_own_regions(tmp_path):
    env = dict(os.environ, KDVFS_STATE_DIR=str(tmp_path / "state"), PYTHONPATH=str(ROOT / "tests"))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_scripts" / "ddp_fit.py"), str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        s = json.loads((tmp_path / "run" / f"rank{rank}" / "summary.json").read_text())
        assert s["rank"] == rank and s["steps"] == 4
        assert {"forward", "backward", "optimizer"} <= {r["region"] for r in s["regions"]}
    assert "rank 0:" in out.stderr and "rank 1:" in out.stderr


@pytest.mark.slow
def test_ddp_ranks_explore_together_and_end_with_one_outcome(tmp_path):
    env = dict(os.environ, KDVFS_STATE_DIR=str(tmp_path / "state"), PYTHONPATH=str(ROOT / "tests"))
    settings = {"mode": "auto", "window_steps": 2, "warmup_steps": 1, "explore_max_steps": 300,
                "max_slowdown": 0.05, "progress": False, "region_work_s": 0.04}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_scripts" / "ddp_fit.py"), str(tmp_path / "run"),
                          "200", json.dumps(settings)], env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    ex = [json.loads((tmp_path / "run" / f"rank{r}" / "summary.json").read_text())["exploration"] for r in (0, 1)]
    # measurements exchanged inside Lightning's DDP loop: both ranks decided the same, at the same
    # step, and the plan is in force on both
    assert ex[0] is not None and ex[0] == ex[1]
    assert ex[0]["status"] == "applied" and ex[0]["clocks"] and ex[0]["validated"]["energy_change"] < 0
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["regions"] == ex[0]["clocks"]
