"""Lightning on CPU with the simulated device: explore -> plan -> validate -> apply in one fit; the
next fit in mode="apply" loads the saved plan and does not explore."""
import json

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from kdvfs_lightning import KernelDVFS
from kdvfs_plugins import PlanError, hookimpl
from kdvfs_plugins.devices import SimulatedDevice
from kdvfs_plugins.sim.gpu import Work


class RegionWork:
    """Every stretch between two markers is 40 ms of memory-bound work on the virtual GPU: a stable
    GPU load (host time would make the step times jitter with the CPU)."""

    def __call__(self):
        return [Work("copy", 0.04)]


class SimDevice:
    def __init__(self, switch_latency_ms=1.0):
        self.device = None
        self.switch_latency_ms = switch_latency_ms

    @hookimpl
    def kdvfs_make_device(self, config, index):
        self.device = SimulatedDevice(index, work_source=RegionWork(), noise=True, seed=1,
                                      switch_latency_ms=self.switch_latency_ms)
        return self.device


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, steps, extra_plugins=(), switch_latency_ms=1.0, **cfg):
    sim = SimDevice(switch_latency_ms)
    cfg.setdefault("run_dir", str(tmp_path / "run"))
    cb = KernelDVFS(plugins=[sim, *extra_plugins], window_steps=2, warmup_steps=1, progress=False, **cfg)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(steps, 4)), batch_size=1)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=str(tmp_path))
    trainer.fit(Net(), data)
    return cb, sim


def test_explore_then_apply_in_one_fit_and_reuse_in_the_next(tmp_path):
    cb, sim = fit(tmp_path, 320, mode="auto", explore_max_steps=300, max_slowdown=0.05)
    eng = cb.engine
    res = eng.explore_result
    assert res is not None and res.status == "applied", res
    assert res.steps <= 300 and res.clocks_by_name
    assert res.validated["energy_change"] < 0
    assert eng.plan is not None and eng.plan.source == "explore"
    plan_file = tmp_path / "run" / "plan.json"
    saved = json.loads(plan_file.read_text())
    assert saved["key"]["gpu"] == sim.device.info().name and "regions" in saved["key"]
    # after exploration the plan's clocks are in force
    planned = set(res.clocks_by_name.values())
    late = [c for t, c in sim.device.requests[-10:]]
    assert planned & set(late)
    summary = json.loads((tmp_path / "run" / "rank0" / "summary.json").read_text())
    assert summary["exploration"]["status"] == "applied"

    cb2, sim2 = fit(tmp_path, 12, mode="apply", max_slowdown=0.05)
    assert cb2.engine.explorer is None and cb2.engine.explore_result is None
    assert cb2.engine.plan.regions == eng.plan.regions
    assert set(c for _, c in sim2.device.requests) & planned


def test_apply_rejects_a_plan_for_another_region_set(tmp_path):
    from kdvfs_plugins.plan import Plan, plan_key

    dev = SimulatedDevice(0)
    info = dev.info()
    key = plan_key(info.name, info.driver, 1, regions=["forward", "forward/other.*"])
    Plan(info.name, info.clocks, {"forward": None}, key=key, source="explore").save(tmp_path / "run" / "plan.json")
    with pytest.raises(PlanError, match=r"region set \(hash\) was .*explore again"):
        fit(tmp_path, 6, mode="apply", max_slowdown=0.05)


class StepRegions:
    """The regions each measured step reports."""

    def __init__(self):
        self.by_step = {}

    @hookimpl
    def kdvfs_step_measured(self, record):
        self.by_step[record.step] = set(record.region_time_ms)


def test_exploration_marks_module_boundaries_in_the_baseline_only(tmp_path):
    rec = StepRegions()
    # a 20 ms switch: the 40 ms module stretches are too short to be knobs, the phases are
    cb, _ = fit(tmp_path, 60, extra_plugins=[rec], switch_latency_ms=20.0, mode="auto", explore_max_steps=300,
                max_slowdown=0.05)
    ex = cb.engine.explorer
    assert ex.knobs and not any("/" in k for k in ex.knobs)
    assert not ex.done and ex.baseline_detailed and len(ex.blocks) >= 3
    baseline = ex.blocks[0]
    later = [s for s in rec.by_step if s > baseline.last_step + 1]
    assert any("/" in r for r in rec.by_step[baseline.first_step])  # forward/layers.* in the baseline
    assert later and all(rec.by_step[s] and not any("/" in r for r in rec.by_step[s]) for s in later)
    # the knobs still get their times, and the default blocks anchor them
    assert ex.blocks[1].kind == "default"
    assert set(ex._time_table()) == set(ex.knobs) and all(0 in d for d in ex._time_table().values())
