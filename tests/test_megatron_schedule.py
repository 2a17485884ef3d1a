"""The Megatron adapter inside megatron-core's own schedules, on the CPU (megatron-core 0.16.1).

A one-process gloo world, ``parallel_state.initialize_model_parallel()`` at size 1, and the
fixture's CPU shims (tests/megatron_fixtures/cpu.py) for the places where megatron-core assumes
CUDA. Megatron's ``train_step`` is mimicked: ``get_forward_backward_func()(...)``, then
``timers('optimizer').start(); optimizer.step(); timers('optimizer').stop()``.
"""
import argparse
import atexit
import sys
import types
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
pytest.importorskip("megatron.core")

from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func  # noqa: E402
from megatron.core.timers import Timers  # noqa: E402

import kdvfs_megatron  # noqa: E402
from kdvfs_megatron import KdvfsTimers, add_kernel_dvfs_args  # noqa: E402
from kdvfs_plugins import ClockPair  # noqa: E402
from kdvfs_plugins.hookspecs import hookimpl  # noqa: E402

from helpers import RegionRecorder  # noqa: E402
from megatron_fixtures.cpu import cpu_shims, free_env, one_process_world, sync_counter  # noqa: E402
from megatron_fixtures.models import (  # noqa: E402
    ToyModel, gpt_batches, gpt_forward_step, tiny_gpt, toy_batches, toy_forward_step,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:megatron")  # TE/Apex fallbacks, deprecations

CLOCKS = ["--kernel-dvfs-device", "simulated", "--kernel-dvfs-sm-mhz", "1500", "--kernel-dvfs-mem-mhz", "2619"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with one_process_world(str(tmp_path_factory.mktemp("dist") / "store")), cpu_shims():
        yield


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    free_env(monkeypatch)
    yield
    kdvfs_megatron.uninstall()  # a failed test must not leave an installation behind


def flags(tmp_path, *extra):
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    return parser.parse_args(["--kernel-dvfs", "--kernel-dvfs-run-dir", str(tmp_path / "runs"), *extra])


def train_step(model, optimizer, data, num_microbatches=2, forward_step=toy_forward_step):
    """What Megatron's train_step does around the schedule."""
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=num_microbatches,
        seq_length=1, micro_batch_size=1,
    )
    timers = model.config.timers
    if timers is not None:
        timers("optimizer", log_level=1).start(barrier=False)
    optimizer.step()
    if timers is not None:
        timers("optimizer").stop()
    return losses


def entered(rec, step=None):
    """Region names entered, in order (RegionRecorder.phases leaves out 'phase/group' names)."""
    return [r for kind, r, s in rec.events if kind == "enter" and (step is None or s == step)]


def toy(**config):
    model = ToyModel()
    model.config.finalize_model_grads_func = finalize_model_grads
    for k, v in config.items():
        setattr(model.config, k, v)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def test_regions_in_order_and_clocks_restored(world, tmp_path):
    model, opt = toy()
    rec = RegionRecorder()
    handle = kdvfs_megatron.install(flags(tmp_path, "--kernel-dvfs-mode", "apply", "--kernel-dvfs-granularity", "pass",
                                          *CLOCKS), model=[model], plugins=[rec])
    assert isinstance(model.config.timers, KdvfsTimers) and model.config.timers.inner is None
    data = toy_batches(4)
    for _ in range(2):
        losses = train_step(model, opt, data)
        assert len(losses) == 2 and all(torch.isfinite(l["loss"]) for l in losses)
    assert model.grad_syncs == 2  # finalize_model_grads ran, once per step

    one_step = (["forward", "backward"] * 2 + ["communication/grads"] * 4 + ["optimizer"])
    assert entered(rec, 0) == one_step and entered(rec, 1) == one_step
    enters_exits = [(kind, r) for kind, r, s in rec.events if s == 0]
    assert enters_exits[:4] == [("enter", "forward"), ("exit", "forward"), ("enter", "backward"), ("exit", "backward")]
    assert enters_exits[-1] == ("exit", "optimizer")
    assert handle.engine.step == 1 and not handle.engine._in_step  # the optimizer timer closed step 1

    device = handle.engine.device
    assert (ClockPair(1500, 2619) in [c for _, c in device.requests])
    kdvfs_megatron.uninstall()
    assert device.requests[-1][1] is None, "clocks not restored at the end"
    assert model.config.timers is None, "the model config keeps kdvfs' timer proxy after uninstall"
    assert (tmp_path / "runs" / "rank0" / "summary.json").exists()
    assert kdvfs_megatron.current() is None


def test_without_the_switch_nothing_is_installed(world, tmp_path):
    model, opt = toy()
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    assert kdvfs_megatron.install(parser.parse_args([]), model=[model]) is None
    assert model.config.timers is None
    train_step(model, opt, toy_batches(2))


@pytest.mark.parametrize("timing_log_level", [0, 2])
def test_proxy_adds_no_synchronisation(world, tmp_path, monkeypatch, timing_log_level):
    """Megatron's real Timer synchronises the device; the proxy must not add a single one."""
    syncs = sync_counter(monkeypatch)

    def run(with_kdvfs):
        model, opt = toy()
        model.config.timers = Timers(timing_log_level, "minmax")
        if with_kdvfs:
            kdvfs_megatron.install(flags(tmp_path, "--kernel-dvfs-mode", "observe", "--kernel-dvfs-device", "simulated"),
                                   model=[model])
        before = len(syncs)
        train_step(model, opt, toy_batches(2))
        kdvfs_megatron.uninstall()
        timers = model.config.timers
        assert type(timers) is Timers
        return len(syncs) - before, sorted(timers._timers)

    plain, plain_names = run(False)
    with_kdvfs, kdvfs_names = run(True)
    assert with_kdvfs == plain and kdvfs_names == plain_names
    assert (plain == 0) == (timing_log_level == 0)  # level 0: every watched timer is Megatron's DummyTimer


def test_kernel_granularity_adds_module_regions(world, tmp_path):
    model, opt = toy()
    rec = RegionRecorder()
    kdvfs_megatron.install(flags(tmp_path, "--kernel-dvfs-mode", "observe", "--kernel-dvfs-device", "simulated"),
                           model=[model], plugins=[rec])
    train_step(model, opt, toy_batches(2), num_microbatches=1)
    names = entered(rec)
    assert names[:6] == ["forward", "forward/layers.*.fc", "forward/layers.*.act", "forward/layers.*.fc",
                         "forward/layers.*.act", "forward/head"]
    # Backward groups are the core's business (how it detects them may change); the adapter's
    # part is that they fall inside the backward phase, before gradient sync and the optimizer.
    tail = names[6:]
    assert tail[0] == "backward" and tail[-5:] == ["communication/grads"] * 4 + ["optimizer"]
    assert {n.partition("/")[0] for n in tail[1:-5]} == {"backward"}
    assert {"backward/head", "backward/layers.*.fc"} <= set(tail)
    kdvfs_megatron.uninstall()
    rec.events.clear()
    train_step(model, opt, toy_batches(1), num_microbatches=1)
    assert rec.events == [], "module hooks still report after uninstall"


def test_custom_loop_with_explicit_steps(world, tmp_path):
    """A megatron-core loop without an 'optimizer' timer reports its steps itself."""
    model, opt = toy()
    rec = RegionRecorder()
    kdvfs_megatron.install(config={"mode": "observe", "device": "simulated", "granularity": "pass",
                                   "run_dir": str(tmp_path / "runs")}, model=model, plugins=[rec])
    for step in (10, 11):
        kdvfs_megatron.step_begin(step)
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=toy_forward_step, data_iterator=toy_batches(1), model=[model],
                                    num_microbatches=1, seq_length=1, micro_batch_size=1)
        with kdvfs_megatron.region("optimizer"):
            opt.step()
        kdvfs_megatron.step_end()
    steps = sorted({s for _, _, s in rec.events})
    assert steps == [10, 11]
    assert entered(rec, 11) == ["forward", "backward"] + ["communication/grads"] * 4 + ["optimizer"]


def test_global_timers_are_proxied_and_restored(world, tmp_path, monkeypatch):
    """With Megatron's training loop loaded, get_timers() must hand out the proxy (train_step times
    'optimizer' with it, train() copies it into the model config)."""
    args = flags(tmp_path, "--kernel-dvfs-mode", "observe", "--kernel-dvfs-device", "simulated")
    real = Timers(0, "minmax")
    gv = types.ModuleType("megatron.training.global_vars")
    gv._GLOBAL_TIMERS, gv._GLOBAL_ARGS = real, args
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", gv)
    exit_funcs = []
    monkeypatch.setattr(atexit, "register", exit_funcs.append)
    monkeypatch.setattr(atexit, "unregister", exit_funcs.remove)
    handle = kdvfs_megatron.install()  # args from Megatron's globals
    assert isinstance(gv._GLOBAL_TIMERS, KdvfsTimers) and gv._GLOBAL_TIMERS.inner is real
    assert exit_funcs == [handle.close]
    assert kdvfs_megatron.install() is handle  # idempotent
    model, opt = toy()
    model.config.timers = gv._GLOBAL_TIMERS  # what train() does
    train_step(model, opt, toy_batches(2))
    assert handle.engine.step == 0 and not handle.engine._in_step
    kdvfs_megatron.uninstall()
    assert gv._GLOBAL_TIMERS is real and exit_funcs == []


def test_install_without_targets_says_what_to_do(world, tmp_path):
    with pytest.raises(kdvfs_megatron.MegatronSetupError, match="parse_and_validate_args"):
        kdvfs_megatron.install(flags(tmp_path, "--kernel-dvfs-device", "simulated"))
    with pytest.raises(kdvfs_megatron.MegatronSetupError, match="args= .* or config="):
        kdvfs_megatron.install()


def test_ranks_from_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # before Megatron initialises it
    assert kdvfs_megatron.detect_ranks() == (5, 1, 8)
    assert kdvfs_megatron.detect_ranks(argparse.Namespace(rank=2, local_rank=0, world_size=4)) == (2, 0, 4)


class _Failure:
    def __init__(self):
        self.errors = []

    @hookimpl
    def kdvfs_session_end(self, session, error):
        self.errors.append(error)


def test_tiny_gpt_forward_backward(world, tmp_path):
    """megatron-core's GPTModel (local spec) through the schedule, with kernel-group regions."""
    torch.manual_seed(0)
    try:
        model = tiny_gpt()
    except Exception as exc:  # pragma: no cover - depends on the installed megatron-core
        pytest.skip(f"GPTModel cannot be built on the CPU here: {type(exc).__name__}: {exc}")
    model.config.finalize_model_grads_func = finalize_model_grads
    model.finish_grad_sync = lambda force_all_reduce=False: None  # Megatron's DDP wrapper provides it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec, ends = RegionRecorder(), _Failure()
    handle = kdvfs_megatron.install(flags(tmp_path, "--kernel-dvfs-mode", "apply", *CLOCKS), model=[model],
                                    plugins=[rec, ends])
    data = gpt_batches(4)
    for _ in range(2):
        losses = train_step(model, opt, data, forward_step=gpt_forward_step)
        assert all(torch.isfinite(l["lm loss"]) for l in losses)
    names = set(entered(rec))
    assert {"forward", "backward", "optimizer", "communication/grads"} <= names
    assert "forward/decoder.layers.*.self_attention" in names
    assert "backward/decoder.layers.*.mlp" in names
    device = handle.engine.device
    kdvfs_megatron.uninstall()
    assert device.requests[-1][1] is None and ends.errors == [None]
