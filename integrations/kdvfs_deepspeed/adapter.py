"""Reports the phases of a DeepSpeed training step to the kdvfs engine.

DeepSpeed has no plugin registry, so the adapter wraps the bound methods of one engine
*instance* (never the class): ``forward``, ``backward``, ``step`` and ``allreduce_gradients``,
plus the ZeRO-1/2 optimizer's ``reduce_ipg_grads`` (gradient buckets reduced during backward).
A ``PipelineEngine`` gets an instance-level copy of its instruction map instead, since its
``forward``/``backward``/``step`` only raise: every executed instruction is a region of its own,
with its microbatch (``forward/pipe.mb3``, ``communication/recv_activation.mb3``).

A kdvfs step is one optimizer step: it begins at the first forward of an accumulation cycle and
ends after ``engine.step()`` at the accumulation boundary (``train_batch()`` for pipelines).
Nothing here synchronises the device; the engine places markers and returns.
"""
from __future__ import annotations

import atexit
import functools
import os
import sys
import time
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Optional

from kdvfs_plugins.config import KdvfsConfig
from kdvfs_plugins.distributed import WORLD, Replicas
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.log import logger
from kdvfs_plugins.module_regions import ModuleRegions
from kdvfs_plugins.progress import state_line
from kdvfs_plugins.regions import BACKWARD, COMMUNICATION, FORWARD, OPTIMIZER, PIPE, instruction_region
from kdvfs_plugins.step_metrics import StepMetrics

from .config import as_kdvfs_config, config_from_deepspeed, BLOCK_KEY

#: Attribute on the DeepSpeed engine that holds its adapter (so close(engine) finds it).
ATTR = "_kdvfs_adapter"

#: PipelineEngine instruction class names -> kdvfs phase. LoadMicroBatch stays at step level.
PIPE_PHASES = {
    "ForwardPass": FORWARD,
    "BackwardPass": BACKWARD,
    "SendActivation": COMMUNICATION,
    "RecvActivation": COMMUNICATION,
    "SendGrad": COMMUNICATION,
    "RecvGrad": COMMUNICATION,
    "ReduceGrads": COMMUNICATION,
    "ReduceTiedGrads": COMMUNICATION,
    "OptimizerStep": OPTIMIZER,
}
#: PipelineEngine instruction class names -> (region group, whether it carries a microbatch).
#: Receives are where a stage waits (for the previous stage, and in the schedule's bubbles), so
#: they are regions of their own that a plan can give the lowest clock.
PIPE_GROUPS = {
    "ForwardPass": (PIPE, True),
    "BackwardPass": (PIPE, True),
    "SendActivation": ("send_activation", True),
    "RecvActivation": ("recv_activation", True),
    "SendGrad": ("send_grad", True),
    "RecvGrad": ("recv_grad", True),
    "ReduceGrads": ("reduce_grads", False),
    "ReduceTiedGrads": ("reduce_tied_grads", False),
    "OptimizerStep": (None, False),  # the optimizer phase itself
}

_LIVE: "weakref.WeakSet[DeepSpeedAdapter]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for adapter in list(_LIVE):
        try:
            adapter.close()
        except Exception as exc:  # at exit, one failure must not keep the other GPUs' clocks locked
            logger.warning("restoring clocks at exit failed on rank %s: %s", adapter.engine.rank, exc)


atexit.register(_close_all_at_exit)


def _is_pipeline(ds_engine) -> bool:
    return "_INSTRUCTION_MAP" in dir(type(ds_engine)) and hasattr(ds_engine, "train_batch")


class DeepSpeedAdapter:
    """Wraps one DeepSpeed engine's methods and drives one kdvfs :class:`Engine` (this rank's GPU).

    Build it with :func:`attach`; end it with :meth:`close` (or :func:`close`, or at exit).
    """

    def __init__(self, ds_engine, config: KdvfsConfig, plugins: Iterable[object] = ()):
        self.ds = ds_engine
        self.config = config
        rank, world = _rank_and_world()
        local_rank = getattr(ds_engine, "local_rank", None)
        if local_rank is None or local_rank < 0:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.pipeline = _is_pipeline(ds_engine)
        # Without pipeline or model parallelism every rank is a data-parallel replica (ZeRO shards
        # state, not work): they explore together. Pipeline stages run different work.
        pure_dp = world > 1 and not self.pipeline and getattr(ds_engine, "mpu", None) is None
        self.engine = Engine(config, framework="deepspeed", rank=rank, local_rank=local_rank, world_size=world,
                             plugins=tuple(plugins), replicas=Replicas(WORLD, rank, world) if pure_dp else None)
        #: Finished steps (the latest ones: a long run must not grow without bound).
        self.records: deque = deque(maxlen=10_000)
        self._saved: list[tuple] = []  # (owner, name, had an instance attribute, old value, ours)
        self._modules: Optional[ModuleRegions] = None
        self._comm_depth = 0
        #: Instructions of each kind run so far in this train_batch(): the next one's microbatch.
        self._pipe_counts: dict[str, int] = {}
        self._host_s = 0.0
        self._metrics = StepMetrics()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> "DeepSpeedAdapter":
        self.engine.start()
        try:
            self._install()
        except BaseException as exc:
            self.close(exc)  # leave no half-wrapped engine and no changed clocks behind
            raise
        return self

    def _install(self) -> None:
        ds = self.ds
        if self.pipeline:
            self._wrap(ds, "train_batch", self._train_batch)
            self._install_instruction_map()
        else:
            self._wrap(ds, "forward", self._forward)
            self._wrap(ds, "backward", self._backward)
            self._wrap(ds, "step", self._step)
        self._wrap(ds, "allreduce_gradients", self._allreduce)
        opt = getattr(ds, "optimizer", None)
        # ZeRO-1/2 reduce full gradient buckets from gradient hooks during backward; only the
        # stage-1/2 optimizer exposes that as a public-looking method (ZeRO-3's is name-mangled).
        if opt is not None and callable(getattr(opt, "reduce_ipg_grads", None)):
            self._wrap(opt, "reduce_ipg_grads", self._reduce)
        # In a pipeline the instructions are the kernel groups: a module group opening inside
        # backward would take the place of the open instruction region (both are groups of the
        # backward phase), and its plan lookup would fall back to the phase, not the instruction.
        if self.engine.wants_module_regions and not self.pipeline:
            self._modules = ModuleRegions(self.engine, ds.module, self.config.module_depth).install()
        setattr(ds, ATTR, self)
        _LIVE.add(self)

    def close(self, error: Optional[BaseException] = None) -> None:
        """Unwrap the engine, restore the clocks and write the run directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        self._unwrap()
        if self._modules is not None:
            self._modules.remove()
        if getattr(self.ds, ATTR, None) is self:
            delattr(self.ds, ATTR)
        if not self.engine.active:
            return
        self.engine.finish(error)

    detach = close

    @property
    def active(self) -> bool:
        return not self._closed and self.engine.active

    @property
    def host_time_s(self) -> float:
        """Host seconds spent in kdvfs's wrappers and module hooks since attach (the monitor logs
        it per step)."""
        return self._host_s + (self._modules.host_time_s if self._modules is not None else 0.0)

    # ------------------------------------------------------------------ wrapping
    def _wrap(self, owner, name: str, make: Callable[[Any], Any]) -> None:
        """Set ``owner.name`` on the instance to ``make(current value)``; remember what was there."""
        original = getattr(owner, name, None)
        if original is None:
            return
        had = name in vars(owner)
        replacement = make(original)
        if callable(replacement) and callable(original):
            replacement = functools.wraps(original)(replacement)
        # object.__setattr__: the engine is an nn.Module; a plain instance attribute is all we want.
        object.__setattr__(owner, name, replacement)
        self._saved.append((owner, name, had, original if had else None, replacement))

    def _unwrap(self) -> None:
        for owner, name, had, old, replacement in reversed(self._saved):
            if vars(owner).get(name) is not replacement:
                continue  # someone wrapped on top of us: leave theirs; ours is a pass-through once closed
            if had:
                object.__setattr__(owner, name, old)
            else:
                object.__delattr__(owner, name)
        self._saved.clear()

    def _forward(self, original):
        def forward(*args, **kwargs):
            eng = self.engine
            # Evaluation forwards (no grad or eval mode) belong to no optimizer step.
            if self._closed or not self.ds.training or not _grad_enabled():
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            if not eng.in_step:
                eng.step_begin(self.ds.global_steps)
            eng.region_enter(FORWARD)
            self._host_s += time.perf_counter() - t0
            try:
                return original(*args, **kwargs)
            finally:
                self._timed(eng.region_exit, FORWARD)
        return forward

    def _backward(self, original):
        def backward(*args, **kwargs):
            if self._closed:
                return original(*args, **kwargs)
            self._timed(self.engine.region_enter, BACKWARD)
            try:
                return original(*args, **kwargs)
            finally:
                self._timed(self.engine.region_exit, BACKWARD)
        return backward

    def _allreduce(self, original):
        reduce = self._reduce(original)

        def allreduce_gradients(*args, **kwargs):
            ds = self.ds
            # Without gradient partitioning (ZeRO 0/1) DeepSpeed reduces only at the accumulation
            # boundary; an empty region on the other micro-steps would only cost a clock switch.
            if ds.is_gradient_accumulation_boundary() or ds.zero_optimization_partition_gradients():
                return reduce(*args, **kwargs)
            return original(*args, **kwargs)
        return allreduce_gradients

    def _reduce(self, original):
        def reduce(*args, **kwargs):
            # Nested reductions (the ZeRO epilogue calling reduce_ipg_grads, or a pipeline's
            # ReduceGrads instruction calling allreduce_gradients) stay one region.
            if self._closed or self._comm_depth:
                return original(*args, **kwargs)
            self._comm_depth += 1
            self._timed(self.engine.region_enter, COMMUNICATION)
            try:
                return original(*args, **kwargs)
            finally:
                self._comm_depth -= 1
                self._timed(self.engine.region_exit, COMMUNICATION)
        return reduce

    def _step(self, original):
        def step(*args, **kwargs):
            ds = self.ds
            if self._closed:
                return original(*args, **kwargs)
            # Read before the call: step() advances micro_steps, which moves the boundary.
            # Without managed accumulation every step() is a boundary (DeepSpeed's rule).
            boundary = ds.is_gradient_accumulation_boundary() or not _managed_accumulation(ds)
            if not boundary:
                return original(*args, **kwargs)
            self._timed(self.engine.region_enter, OPTIMIZER)
            try:
                return original(*args, **kwargs)
            finally:
                self._timed(self.engine.region_exit, OPTIMIZER)
                self._end_step()
        return step

    def _train_batch(self, original):
        def train_batch(*args, **kwargs):
            if self._closed or not _grad_enabled():
                return original(*args, **kwargs)
            self._timed(self.engine.step_begin, self.ds.global_steps)
            self._pipe_counts.clear()
            try:
                return original(*args, **kwargs)
            finally:
                self._end_step()
        return train_batch

    def _install_instruction_map(self) -> None:
        """An instance-level copy of ``_INSTRUCTION_MAP`` whose entries report regions."""
        ds = self.ds
        class_map = type(ds)._INSTRUCTION_MAP
        instance_map = {}
        for cmd_type, fn in class_map.items():
            kind = cmd_type.__name__
            instance_map[cmd_type] = fn if kind not in PIPE_PHASES else self._pipe_instruction(fn, kind)
        self._wrap(ds, "_INSTRUCTION_MAP", lambda _original: instance_map)

    def _pipe_region(self, kind: str) -> str:
        """The region of the next ``kind`` instruction. The engine runs DeepSpeed's TrainSchedule,
        in which every stage runs each kind of instruction in microbatch order, so the count of
        earlier ones in this batch is the microbatch (instructions carry only a buffer slot)."""
        phase = PIPE_PHASES[kind]
        group, per_microbatch = PIPE_GROUPS.get(kind, (None, False))
        if group is None:
            return phase
        if not per_microbatch:
            return instruction_region(phase, group)
        mb = self._pipe_counts.get(kind, 0)
        self._pipe_counts[kind] = mb + 1
        return instruction_region(phase, group, mb)

    def _pipe_instruction(self, fn, kind: str):
        phase = PIPE_PHASES[kind]

        # The map holds plain functions that the engine binds with MethodType; keep that shape.
        @functools.wraps(fn)
        def run(engine_self, *args, **kwargs):
            if self._closed:
                return fn(engine_self, *args, **kwargs)
            region = self._pipe_region(kind)
            if phase == COMMUNICATION:
                self._comm_depth += 1
            self._timed(self.engine.region_enter, region)
            try:
                return fn(engine_self, *args, **kwargs)
            finally:
                if phase == COMMUNICATION:
                    self._comm_depth -= 1
                self._timed(self.engine.region_exit, region)
        return run

    # ------------------------------------------------------------------ steps and metrics
    def _timed(self, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        self._host_s += time.perf_counter() - t0

    def _end_step(self) -> None:
        t0 = time.perf_counter()
        records = self.engine.step_end()
        self._host_s += time.perf_counter() - t0
        self.records.extend(records)
        self._log(records)
        self._log_state()

    def _log_state(self) -> None:
        """kdvfs's state ("kdvfs: exploring 340/1500") among DeepSpeed's own log lines: at its
        steps_per_print cadence, through its log_dist on rank 0."""
        every = getattr(self.ds, "steps_per_print", None)
        line = state_line(self.engine, self.ds.global_steps, every() if callable(every) else None)
        if line is None:
            return
        utils = sys.modules.get("deepspeed.utils")  # loaded with the engine; looking it up imports nothing
        if utils is not None and hasattr(utils, "log_dist"):
            utils.log_dist(line, ranks=[0])
        elif self.engine.rank == 0:
            logger.info(line)

    def _log(self, records) -> None:
        self._metrics.count(records)
        monitor = getattr(self.ds, "monitor", None)
        if not records or monitor is None or not getattr(monitor, "enabled", False):
            return
        if self.ds.global_steps % self.config.log_every_n_steps:
            return
        wins = self.engine.meter.windows if self.engine.meter else []
        metrics = self._metrics.take(records[-1], wins, self.host_time_s)
        samples = self.ds.global_samples
        monitor.write_events([(name, value, samples) for name, value in metrics.items()])  # rank 0 writes


# ---------------------------------------------------------------------- helpers
def _grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def _managed_accumulation(ds) -> bool:
    managed = getattr(ds, "managed_gradient_accumulation", None)  # added in recent DeepSpeed releases
    return True if managed is None else bool(managed())


def _rank_and_world() -> tuple[int, int]:
    # An engine exists, so DeepSpeed is imported already; looking it up imports nothing.
    dist = sys.modules.get("deepspeed.comm")
    if dist is not None and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------- public functions
def attach(ds_engine, config: Any = None, *, plugins: Iterable[object] = ()) -> Optional[DeepSpeedAdapter]:
    """Start kdvfs on an engine that ``deepspeed.initialize`` returned.

    ``config``: None reads the engine's own ``"kernel_dvfs"`` block (defaults when it has none);
    otherwise a ``kernel_dvfs`` block dict, a :class:`KdvfsConfig`, or a DeepSpeed config (dict
    or JSON path) holding the block. ``plugins``: extra kdvfs plugin objects (pluggy hooks).
    Returns the adapter, or None when the block says ``"enabled": false``. Attaching twice
    returns the adapter already attached.
    """
    existing = getattr(ds_engine, ATTR, None)
    if existing is not None and not existing._closed:
        return existing
    if config is None:
        raw = getattr(getattr(ds_engine, "_config", None), "_param_dict", None)  # the parsed config dict
        cfg = config_from_deepspeed(raw if isinstance(raw, dict) else None)
    else:
        cfg = as_kdvfs_config(config)
    if not cfg.enabled:
        logger.info("kdvfs disabled by the '%s' block", BLOCK_KEY)
        return None
    return DeepSpeedAdapter(ds_engine, cfg, plugins).install()


def close(ds_engine, error: Optional[BaseException] = None) -> None:
    """Restore the clocks and unwrap ``ds_engine``; a no-op when nothing is attached."""
    adapter = getattr(ds_engine, ATTR, None)
    if adapter is not None:
        adapter.close(error)


detach = close


def adapter_of(ds_engine) -> Optional[DeepSpeedAdapter]:
    """The adapter attached to ``ds_engine``, if any."""
    return getattr(ds_engine, ATTR, None)
