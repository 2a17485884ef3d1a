"""The DeepSpeed adapter's logic against a stand-in engine: fast, no DeepSpeed import.

The stand-in has the methods and attributes the adapter touches, with DeepSpeed's call structure
(backward -> allreduce_gradients, boundary from micro_steps); the real engine is exercised in
test_deepspeed.py.
"""
from __future__ import annotations

import json
import base64
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

try:
    import kdvfs_deepspeed
except ImportError:  # the package is new: an editable install made before it existed lacks it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    import kdvfs_deepspeed

from kdvfs_deepspeed.adapter import _close_all_at_exit
from kdvfs_plugins import ConfigError, KdvfsConfig, hookimpl
from kdvfs_plugins.devices import SimulatedDevice

from helpers import FixedWork, RegionRecorder


class SimDevice:
    """A plugin supplying a noise-free simulated device, kept for inspection."""

    def __init__(self):
        self.device = None

    @hookimpl
    def kdvfs_make_device(self, config, index):
        self.device = SimulatedDevice(index, work_source=FixedWork([0.001]), noise=False)
        return self.device


class Monitor:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events.extend(events)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x).pow(2).mean()


class FakeZeroOptimizer:
    """Stage-1/2 shape: the epilogue reduces the last bucket through reduce_ipg_grads."""

    def __init__(self):
        self.reduced = 0

    def reduce_ipg_grads(self):
        self.reduced += 1

    def overlapping_partition_gradients_reduce_epilogue(self):
        self.reduce_ipg_grads()


class FakeDeepSpeedEngine(nn.Module):
    """DeepSpeed's call structure in miniature."""

    def __init__(self, gas=2, zero=0, block=None, monitor=None, managed=True):
        super().__init__()
        self.module = Net()
        self.optimizer = FakeZeroOptimizer() if zero >= 1 else None
        self.gas, self.zero, self.managed = gas, zero, managed
        self.micro_steps = self.global_steps = self.global_samples = 0
        self.local_rank = 0
        self.monitor = monitor or type("Off", (), {"enabled": False})()
        self.reduces = 0
        self._config = type("Cfg", (), {"_param_dict": {"train_batch_size": 4, **({"kernel_dvfs": block} if block is not None else {})}})()

    def forward(self, x):
        return self.module(x)

    def backward(self, loss):
        loss.backward()
        self.allreduce_gradients()
        return loss

    def allreduce_gradients(self):
        if self.zero_optimization_partition_gradients():
            self.optimizer.overlapping_partition_gradients_reduce_epilogue()
        elif self.is_gradient_accumulation_boundary():
            self.reduces += 1

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.gas == 0

    def zero_optimization_partition_gradients(self):
        return self.zero >= 2

    def managed_gradient_accumulation(self):
        return self.managed

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.global_steps += 1
            self.global_samples += 4 * self.gas
        self.micro_steps += 1


def train(engine, optimizer_steps):
    for _ in range(optimizer_steps * engine.gas):
        loss = engine(torch.randn(2, 4))
        engine.backward(loss)
        engine.step()


def expected_phases(gas, zero, steps):
    out = []
    for _ in range(steps):
        for micro in range(gas):
            out += ["forward", "backward"]
            if zero >= 2 or micro == gas - 1:
                out.append("communication")
        out.append("optimizer")
    return out


BLOCK = {"sm_mhz": 1500, "mem_mhz": 2619, "granularity": "pass", "sim_noise": False}


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


# ---------------------------------------------------------------------- config block
def test_block_maps_onto_the_shared_schema(tmp_path):
    ds = {"train_batch_size": 8, "kernel_dvfs": {"mode": "observe", "max_slowdown": 0.01}}
    cfg = kdvfs_deepspeed.config_from_deepspeed(ds)
    assert cfg == KdvfsConfig.from_dict({"mode": "observe", "max_slowdown": 0.01})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    assert kdvfs_deepspeed.load_deepspeed_config(str(path)) == ds
    b64 = base64.urlsafe_b64encode(json.dumps(ds).encode()).decode()
    assert kdvfs_deepspeed.load_deepspeed_config(b64) == ds
    assert kdvfs_deepspeed.config_from_deepspeed({"train_batch_size": 8}) == KdvfsConfig()


@pytest.mark.parametrize("block, key", [
    ({"granularty": "pass"}, "granularty"),
    ({"mode": "fast"}, "mode"),
    ({"sm_mhz": 1500}, "mem_mhz"),
    ("observe", "kernel_dvfs"),
])
def test_bad_block_names_the_key(block, key):
    with pytest.raises(ConfigError) as err:
        kdvfs_deepspeed.config_from_deepspeed({"kernel_dvfs": block})
    assert err.value.key == key
    assert key in str(err.value)


def test_misspelt_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'granularity'"):
        kdvfs_deepspeed.config_from_deepspeed({"kernel_dvfs": {"granularty": "pass"}})


@pytest.mark.parametrize("name", ["kernel_dvfs_", "kernelDVFS", "kernel-dvfs", "KERNEL_DVFS", "kernal_dvfs",
                                  "kernel_dvsf", "kdvfs"])
def test_misspelt_block_name_is_an_error_not_defaults(name):
    # DeepSpeed ignores unknown top-level keys: a misspelt block would run kdvfs with its defaults
    # (mode auto, device auto: clock writes where permitted).
    ds = {"train_batch_size": 8, name: {"mode": "observe"}}
    with pytest.raises(ConfigError, match=f"DeepSpeed config: {name}=.*unknown top-level key; did you mean 'kernel_dvfs'"):
        kdvfs_deepspeed.config_from_deepspeed(ds)
    engine = FakeDeepSpeedEngine()
    engine._config._param_dict[name] = {"mode": "observe"}
    with pytest.raises(ConfigError, match="did you mean 'kernel_dvfs'"):
        kdvfs_deepspeed.attach(engine)
    with pytest.raises(ConfigError, match="did you mean 'kernel_dvfs'"):
        kdvfs_deepspeed.attach(FakeDeepSpeedEngine(), ds)
    assert "forward" not in vars(engine)


def test_deepspeeds_own_keys_are_not_taken_for_the_block():
    ds = {"train_batch_size": 8, "kernel": 1, "dvfs": 1, "kernel_inject": True, "zero_optimization": {"stage": 2}}
    assert kdvfs_deepspeed.config_from_deepspeed(ds) == KdvfsConfig()


# ---------------------------------------------------------------------- regions
@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("gas", [1, 2])
def test_phases_in_order_and_one_kdvfs_step_per_optimizer_step(zero, gas, run_dir):
    ds = FakeDeepSpeedEngine(gas=gas, zero=zero, block={**BLOCK, "run_dir": run_dir})
    rec, sim = RegionRecorder(), SimDevice()
    adapter = kdvfs_deepspeed.attach(ds, plugins=[rec, sim])
    train(ds, 3)
    assert rec.phases() == expected_phases(gas, zero, 3)
    assert [s for kind, r, s in rec.events if kind == "enter" and r == "optimizer"] == [0, 1, 2]
    assert [r.step for r in adapter.records] == [0, 1, 2]
    kdvfs_deepspeed.close(ds)
    assert sim.device.requests[0][1] is not None and sim.device.requests[-1][1] is None
    assert (Path(run_dir) / "rank0" / "summary.json").exists()


def test_module_regions_nest_inside_phases(run_dir):
    ds = FakeDeepSpeedEngine(gas=2, block={**BLOCK, "granularity": "kernel", "run_dir": run_dir})
    rec = RegionRecorder()
    kdvfs_deepspeed.attach(ds, plugins=[rec, SimDevice()])
    train(ds, 1)
    kdvfs_deepspeed.close(ds)
    # Phases nest and close in order; a kernel group opens only inside its own phase (groups may
    # be closed by the next group or by their phase's exit, so their exits are not checked).
    phases = []
    for kind, region, _ in rec.events:
        if "/" in region:
            if kind == "enter":
                assert phases and region.split("/")[0] == phases[-1], (region, phases)
        elif kind == "enter":
            phases.append(region)
        else:
            assert phases.pop() == region
    assert not phases
    groups = {r for _, r, _ in rec.events if "/" in r}
    assert {"forward/layers.*.*", "forward/head"} <= groups and any(g.startswith("backward/") for g in groups)


def test_eval_forward_is_not_a_training_region(run_dir):
    ds = FakeDeepSpeedEngine(block={**BLOCK, "run_dir": run_dir})
    rec = RegionRecorder()
    kdvfs_deepspeed.attach(ds, plugins=[rec, SimDevice()])
    with torch.no_grad():
        ds(torch.randn(2, 4))
    ds.eval()
    ds(torch.randn(2, 4))
    assert rec.events == []
    kdvfs_deepspeed.close(ds)


def test_unmanaged_accumulation_every_step_is_a_boundary(run_dir):
    ds = FakeDeepSpeedEngine(gas=1, block={**BLOCK, "run_dir": run_dir}, managed=False)
    ds.is_gradient_accumulation_boundary = lambda: False  # DeepSpeed says True only inside step()
    rec = RegionRecorder()
    adapter = kdvfs_deepspeed.attach(ds, plugins=[rec, SimDevice()])
    ds.backward(ds(torch.randn(2, 4)))
    ds.step()
    assert rec.phases() == ["forward", "backward", "optimizer"]
    assert [r.step for r in adapter.records] == [0]
    kdvfs_deepspeed.close(ds)


def test_pipeline_instruction_map_is_per_instance(run_dir):
    class ForwardPass: pass  # noqa: E701
    class ReduceGrads: pass  # noqa: E701
    class LoadMicroBatch: pass  # noqa: E701
    calls = []

    class FakePipe(FakeDeepSpeedEngine):
        _INSTRUCTION_MAP = {
            ForwardPass: lambda self: calls.append("fwd"),
            ReduceGrads: lambda self: self.allreduce_gradients(),
            LoadMicroBatch: lambda self: calls.append("load"),
        }

        def train_batch(self):
            from types import MethodType
            for cmd in (LoadMicroBatch, ForwardPass, ReduceGrads):
                MethodType(self._INSTRUCTION_MAP[cmd], self)()
            self.global_steps += 1

    class_map = dict(FakePipe._INSTRUCTION_MAP)
    ds = FakePipe(gas=1, block={**BLOCK, "run_dir": run_dir})
    rec = RegionRecorder()
    adapter = kdvfs_deepspeed.attach(ds, plugins=[rec, SimDevice()])
    assert adapter.pipeline and "_INSTRUCTION_MAP" in vars(ds)
    ds.train_batch()
    ds.train_batch()
    # every instruction is a region of its own (forward/pipe.mb0, communication/reduce_grads), and
    # ReduceGrads calls allreduce_gradients: one communication region, not two nested ones.
    entered = [r for kind, r, s in rec.events if kind == "enter"]
    assert [r.partition("/")[0] for r in entered] == ["forward", "communication"] * 2
    assert entered[:2] == ["forward/pipe.mb0", "communication/reduce_grads"]
    assert [r.step for r in adapter.records] == [0, 1]
    assert FakePipe._INSTRUCTION_MAP == class_map  # the class is untouched
    kdvfs_deepspeed.close(ds)
    assert "_INSTRUCTION_MAP" not in vars(ds)


# ---------------------------------------------------------------------- lifecycle
def test_detach_restores_the_instance_and_never_touches_the_class(run_dir):
    ds = FakeDeepSpeedEngine(zero=2, block={**BLOCK, "run_dir": run_dir})
    before = {n: getattr(FakeDeepSpeedEngine, n) for n in ("forward", "backward", "step", "allreduce_gradients")}
    adapter = kdvfs_deepspeed.attach(ds, plugins=[SimDevice()])
    assert kdvfs_deepspeed.attach(ds) is adapter  # attaching twice gives the same adapter
    assert {"forward", "backward", "step", "allreduce_gradients"} <= set(vars(ds))
    assert "reduce_ipg_grads" in vars(ds.optimizer)
    assert {n: getattr(FakeDeepSpeedEngine, n) for n in before} == before
    kdvfs_deepspeed.detach(ds)
    assert not {"forward", "backward", "step", "allreduce_gradients"} & set(vars(ds))
    assert "reduce_ipg_grads" not in vars(ds.optimizer)
    assert kdvfs_deepspeed.adapter_of(ds) is None
    train(ds, 1)  # still trains
    kdvfs_deepspeed.close(ds)  # no-op


def test_a_wrapper_added_later_survives_detach(run_dir):
    ds = FakeDeepSpeedEngine(block={**BLOCK, "run_dir": run_dir})
    rec = RegionRecorder()
    kdvfs_deepspeed.attach(ds, plugins=[rec, SimDevice()])
    ours = ds.step
    theirs = lambda *a, **k: ours(*a, **k)  # noqa: E731
    ds.step = theirs
    kdvfs_deepspeed.close(ds)
    assert ds.step is theirs
    train(ds, 1)  # our wrapper is now a pass-through
    assert ds.global_steps == 1


def test_reattach_after_detach_starts_a_new_session(run_dir):
    ds = FakeDeepSpeedEngine(block={**BLOCK, "run_dir": run_dir})
    rec = RegionRecorder()
    first = kdvfs_deepspeed.attach(ds, plugins=[SimDevice()])
    train(ds, 1)
    kdvfs_deepspeed.detach(ds)
    train(ds, 1)
    second = kdvfs_deepspeed.attach(ds, plugins=[rec, SimDevice()])
    train(ds, 1)
    kdvfs_deepspeed.close(ds)
    assert second is not first
    assert [s for kind, r, s in rec.events if r == "optimizer" and kind == "enter"] == [2]


def test_clocks_restored_at_exit_without_close(run_dir):
    ds = FakeDeepSpeedEngine(block={**BLOCK, "run_dir": run_dir})
    sim = SimDevice()
    adapter = kdvfs_deepspeed.attach(ds, plugins=[sim])
    train(ds, 1)
    _close_all_at_exit()  # what atexit runs
    assert not adapter.active
    assert sim.device.requests[-1][1] is None


def test_disabled_block_attaches_nothing():
    ds = FakeDeepSpeedEngine(block={"enabled": False})
    assert kdvfs_deepspeed.attach(ds) is None
    assert "forward" not in vars(ds)


def test_metrics_go_to_the_deepspeed_monitor(run_dir):
    mon = Monitor()
    ds = FakeDeepSpeedEngine(gas=2, block={**BLOCK, "run_dir": run_dir, "window_steps": 2}, monitor=mon)
    kdvfs_deepspeed.attach(ds, plugins=[SimDevice()])
    train(ds, 4)
    kdvfs_deepspeed.close(ds)
    names = {name for name, _, _ in mon.events}
    # Energy comes per window of steps, once the device's counter has refreshed: not asserted here.
    assert {"kdvfs/gpu_time_ms", "kdvfs/clock_changes", "kdvfs/overhead_ms"} <= names
    samples = sorted({s for _, _, s in mon.events})
    assert samples and all(s % 8 == 0 and s > 0 for s in samples)  # DeepSpeed's x axis: global_samples


def test_host_time_counts_the_module_hooks_and_the_logged_overhead_spreads_it_over_steps(run_dir):
    mon = Monitor()
    block = {**BLOCK, "granularity": "kernel", "run_dir": run_dir, "profile_every_n_steps": 2, "warmup_steps": 0}
    ds = FakeDeepSpeedEngine(gas=1, block=block, monitor=mon)
    adapter = kdvfs_deepspeed.attach(ds, plugins=[SimDevice()])
    train(ds, 6)
    modules_s = adapter._modules.host_time_s
    # the module hooks ran on the profiled steps, outside the phase wrappers' own timing
    assert modules_s > 0 and adapter.host_time_s > modules_s
    logged_ms = [v for name, v, _ in mon.events if name == "kdvfs/overhead_ms"]
    resolved = len(adapter.records)
    kdvfs_deepspeed.close(ds)
    # one log per resolved step (each step_end resolved one): the logged figures add up to the
    # host time up to the last log
    assert len(logged_ms) == resolved >= 4 and all(v > 0 for v in logged_ms)
    assert sum(logged_ms) == pytest.approx(adapter._metrics.logged_host_s * 1e3)
    assert adapter._metrics.logged_host_s <= adapter.host_time_s
