"""Run megatron-core 0.16 schedules (and a tiny GPTModel) on the CPU, in one gloo process.

megatron-core assumes CUDA in a few places that a CPU test reaches:

- the schedules allocate ``torch.zeros([], ..., device="cuda")`` for the token count;
- ``GlobalMemoryBuffer`` (used by attention) allocates on ``torch.cuda.current_device()``;
- attention forks the CUDA RNG tracker, which needs CUDA RNG state.

:func:`cpu_shims` swaps, for the duration of a test, the ``torch`` name inside those Megatron
modules for a stand-in that answers "cpu" there, and installs an RNG tracker whose ``fork`` does
nothing. Torch itself and every other module are left alone.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


class _TorchCpuZeros:
    """``torch`` for schedules.py: ``zeros(device="cuda")`` allocates on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


class _CudaCpuDevice:
    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"


class _TorchCpuDevice:
    """``torch`` for megatron.core.utils: ``torch.cuda.current_device()`` is the CPU."""

    cuda = _CudaCpuDevice()

    def __getattr__(self, name):
        return getattr(torch, name)


class _NoRngTracker:
    """Stands in for CudaRNGStatesTracker: forking is a no-op (dropout is off in the tests)."""

    def fork(self, name=None):
        return contextlib.nullcontext()

    def add(self, name, seed):
        pass

    def reset(self):
        pass

    def get_states(self):
        return {}

    def set_states(self, states):
        pass

    def is_initialized(self):
        return True


@contextlib.contextmanager
def cpu_shims() -> Iterator[None]:
    from megatron.core import utils as mutils
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as trandom

    saved = (schedules.torch, mutils.torch, trandom._CUDA_RNG_STATE_TRACKER, trandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    schedules.torch = _TorchCpuZeros()
    mutils.torch = _TorchCpuDevice()
    trandom._CUDA_RNG_STATE_TRACKER = _NoRngTracker()
    trandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    try:
        yield
    finally:
        (schedules.torch, mutils.torch, trandom._CUDA_RNG_STATE_TRACKER,
         trandom._CUDA_RNG_STATE_TRACKER_INITIALIZED) = saved


@contextlib.contextmanager
def one_process_world(store_path: str) -> Iterator[None]:
    """torch.distributed (gloo, world size 1, file store) and Megatron's model-parallel groups at 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def sync_counter(monkeypatch) -> list:
    """Replace torch.cuda.synchronize by a counter (on the CPU the real one raises)."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    return calls


def free_env(monkeypatch) -> None:
    """No launcher variables leak into rank detection."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    os.environ.setdefault("KDVFS_DISABLE_ENTRYPOINTS", "1")
