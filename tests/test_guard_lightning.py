"""Lightning runs on the nvml device over the fake NVML: restore after an exception, fall back to
observe without permission, and reject unsupported clocks before training."""
import json

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from kdvfs_lightning import KernelDVFS
from kdvfs_plugins import ConfigError, KdvfsConfig, hookimpl
from kdvfs_plugins.config import default_state_dir
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.errors import PlanError
from kdvfs_plugins.guard import state_paths
from kdvfs_plugins.plan import Plan

from fakes.fake_nvml import FakeNvml

STATE_FILE_UUID = "GPU-fake-0000"


class FakeGpu:
    """A plugin answering ``kdvfs_make_device`` with an NvmlDevice on the fake NVML."""

    def __init__(self, fake):
        self.fake = fake

    @hookimpl
    def kdvfs_make_device(self, config, index):
        return NvmlDevice(index, nvml=self.fake, marker_factory=HostMarker)


class Net(pl.LightningModule):
    def __init__(self, fake=None, fail_at=None):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.fake, self.fail_at = fake, fail_at
        self.seen_locked = []

    def training_step(self, batch, batch_idx):
        if self.fake is not None:
            self.seen_locked.append(self.fake.gpu_state(0)["sm_locked"])
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in training_step")
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, model, steps=4, **kdvfs):
    kdvfs.setdefault("run_dir", str(tmp_path / "run"))
    cb = KernelDVFS(**kdvfs)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2)
    trainer.fit(model, data)
    return cb, trainer


def test_exception_in_training_step_restores_clocks(tmp_path):
    fake = FakeNvml()
    model = Net(fake, fail_at=2)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, model, device="nvml", mode="apply", sm_mhz=1500, mem_mhz=1593, plugins=[FakeGpu(fake)])
    assert model.seen_locked[1:] == [[1500, 1500], [1500, 1500]]  # the clocks were really locked
    g = fake.gpu_state(0)
    assert g["sm_locked"] is None and g["mem_locked"] is None
    assert not state_paths(default_state_dir(), STATE_FILE_UUID)[1].exists()


def test_no_permission_falls_back_to_observe_and_training_completes(tmp_path, kdvfs_log):
    fake = FakeNvml(privileged=False)
    cb, trainer = fit(tmp_path, Net(), steps=5, device="nvml", mode="apply",
                      region_clocks={"forward": [1200, 2619], "backward": [1500, 1593]}, plugins=[FakeGpu(fake)])
    assert trainer.global_step == 5
    warnings = [r.getMessage() for r in kdvfs_log if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no permission" in warnings[0] and "observe" in warnings[0], warnings
    assert cb.engine.device.kind == "observe" and len(cb.engine.device.would_set) > 0
    assert fake.gpu_state(0)["writes"] == 0
    assert json.loads((tmp_path / "run" / "rank0" / "summary.json").read_text())["device"] == "observe"


def test_unsupported_config_clock_is_rejected_before_training(tmp_path):
    fake = FakeNvml()
    model = Net(fake)
    with pytest.raises(ConfigError, match="1234") as err:
        fit(tmp_path, model, device="nvml", mode="apply", sm_mhz=1234, mem_mhz=2619, plugins=[FakeGpu(fake)])
    assert "SM clock 1234 MHz is not supported" in str(err.value) and "nearest" in str(err.value)
    assert model.seen_locked == [] and fake.gpu_state(0)["writes"] == 0


def _plan_file(tmp_path, table, clocks):
    plan = Plan("NVIDIA H100 80GB HBM3", table, {"step": None, "backward": clocks})
    data = plan.to_dict()
    data["regions"]["backward"] = {"sm_mhz": 1234, "mem_mhz": 2619}  # hand-edited to an unsupported clock
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def test_unsupported_plan_clock_is_rejected_before_training(tmp_path):
    fake = FakeNvml()
    dev = NvmlDevice(nvml=fake, marker_factory=HostMarker)
    info = dev.info()
    path = _plan_file(tmp_path, info.clocks, info.clocks.default)
    with pytest.raises(PlanError, match="region 'backward'.*SM clock 1234 MHz"):
        Plan.load(path).check_device(info.name, info.clocks, where=f"plan file {path}")
    cfg = KdvfsConfig.from_dict({"mode": "apply", "device": "nvml", "plan_path": str(path), "run_dir": str(tmp_path)})
    with pytest.raises(PlanError, match="1234"):
        Engine(cfg, device=dev).start()
    assert fake.gpu_state(0)["writes"] == 0
