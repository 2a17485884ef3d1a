"""Installing kdvfs into a Megatron run after its arguments are parsed, and taking it out again.

:func:`install` starts one engine per process (every tensor-, pipeline- and data-parallel rank
drives its own GPU) and puts a :class:`~kdvfs_megatron.timers.KdvfsTimers` proxy where Megatron
looks up its timers:

- ``megatron.training.global_vars._GLOBAL_TIMERS`` when Megatron's training loop is loaded
  (``get_timers()`` reads it at call time; ``train()`` copies it into the model config and
  ``train_step`` times ``optimizer`` with it), and
- ``config.timers`` of the model config(s) given through ``model=`` or ``model_config=``, for
  loops written on megatron-core alone (a proxy with no Megatron timers behind it if it was None).

With pipeline parallelism the same timers mark each instruction of the schedule, which becomes a
region of its own with its microbatch (``forward/pipe.mb3``, ``communication/recv_forward.mb3``;
table in ``timers.PIPE_INSTRUCTION_OF_TIMER``), and module groups are left out.

A kdvfs step is one ``forward_backward_func`` call plus the optimizer step: the
``forward-backward`` timer's start begins it, the ``optimizer`` timer's stop ends it. Loops that
do not time their optimizer step with ``optimizer`` call :func:`step_begin`/:func:`step_end`
(which turn the automatic boundaries off) and may bracket their optimizer with
``region("optimizer")``.

Plans: the ranks of one tensor-parallel group must run with the same clocks, or the fastest
waits for the slowest at every collective. Today that holds when they load the same plan file
(``--kernel-dvfs-plan``); checking agreement across ranks is not done here yet.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from collections import deque
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

from kdvfs_plugins.config import KdvfsConfig
from kdvfs_plugins.distributed import Replicas
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.errors import KdvfsError
from kdvfs_plugins.log import logger
from kdvfs_plugins.module_regions import ModuleRegions
from kdvfs_plugins.progress import state_line
from kdvfs_plugins.regions import OPTIMIZER, PIPE, instruction_region

from .args import config_from_args
from .timers import (
    PIPE_INSTRUCTION_OF_TIMER, REGION_OF_TIMER, STEP_BEGIN_TIMER, STEP_END_TIMER, KdvfsTimers, unwrap_timers,
)

_GLOBAL_VARS_MODULE = "megatron.training.global_vars"


class MegatronSetupError(KdvfsError):
    """kdvfs cannot be installed into this Megatron run as called; the message says what to pass."""


class MegatronKdvfs:
    """kdvfs in one Megatron process: the engine, the timer proxies, the module hooks."""

    def __init__(self, config: KdvfsConfig, *, rank: int, local_rank: int, world_size: int,
                 plugins: Iterable[object] = (), device: Any = None):
        self.config = config
        self.engine = Engine(config, framework="megatron", rank=rank, local_rank=local_rank,
                             world_size=world_size, plugins=tuple(plugins), device=device,
                             plan_group=_tensor_parallel_group(), replicas=_replicas())
        #: False once the loop reports steps itself through step_begin()/step_end().
        self.auto_steps = True
        self._host_s = 0.0
        self.records: deque = deque(maxlen=10_000)
        self._configs: list[Any] = []
        self._global_proxy: Optional[KdvfsTimers] = None
        self._modules: list[ModuleRegions] = []
        self._hooked_models: set[int] = set()
        self._closed = False
        #: Megatron's --log-interval (set by install from its args); None: no state lines.
        self.log_interval: Optional[int] = None
        #: --pipeline-model-parallel-size from Megatron's args, for when install() runs before
        #: Megatron has made its process groups (set by install); None: unknown.
        self.pipeline_size_arg: Optional[int] = None
        self._pipelined: Optional[bool] = None
        #: Forward / backward computations started in this forward_backward_func call.
        self._counts = {"f": 0, "b": 0}
        #: Watched timer -> the region its start entered (its stop exits that one).
        self._open: dict[str, str] = {}

    @property
    def active(self) -> bool:
        return self.engine.active and not self._closed

    @property
    def host_time_s(self) -> float:
        """Host seconds spent in kdvfs at timer boundaries and in the module hooks, for overhead reports."""
        return self._host_s + sum(m.host_time_s for m in self._modules)

    # ------------------------------------------------------------------ setup
    def start(self) -> "MegatronKdvfs":
        self.engine.start()
        atexit.register(self.close)  # clocks back to default however the script ends
        return self

    def attach(self, model: Any = None, model_config: Any = None, global_timers: bool = True) -> None:
        """Put the timer proxy into Megatron's timers and these configs; hook the model's modules."""
        if global_timers:
            self._attach_global_timers()
        for cfg in _as_list(model_config) + [_model_config(m) for m in _as_list(model)]:
            if cfg is not None:
                self._attach_config(cfg)
        # In a pipeline the schedule's instructions are the kernel groups: a module group opening
        # inside backward would take the place of the open instruction region (both are groups of
        # the backward phase), and its plan lookup would fall back to the phase.
        if self.engine.wants_module_regions and not self.pipelined:
            for chunk in _as_list(model):
                inner = _unwrap_module(chunk)
                if id(inner) not in self._hooked_models:
                    self._hooked_models.add(id(inner))
                    self._modules.append(ModuleRegions(self.engine, inner, self.config.module_depth).install())

    def _attach_global_timers(self) -> None:
        gv = sys.modules.get(_GLOBAL_VARS_MODULE)
        current = getattr(gv, "_GLOBAL_TIMERS", None) if gv is not None else None
        if current is None or self._owns(current):
            return
        self._global_proxy = KdvfsTimers(current, self)
        gv._GLOBAL_TIMERS = self._global_proxy

    def _attach_config(self, cfg: Any) -> None:
        if not hasattr(cfg, "timers"):
            raise MegatronSetupError(
                f"model_config {type(cfg).__name__} has no 'timers' field; pass Megatron's "
                "ModelParallelConfig/TransformerConfig (or the model, whose .config is used)"
            )
        if self._owns(cfg.timers):
            return
        cfg.timers = KdvfsTimers(cfg.timers, self)
        self._configs.append(cfg)

    def _owns(self, timers: Any) -> bool:
        return isinstance(timers, KdvfsTimers) and timers._kdvfs_sink is self

    @property
    def has_targets(self) -> bool:
        return self._global_proxy is not None or bool(self._configs)

    @property
    def pipelined(self) -> bool:
        """Whether this rank is one stage of a pipeline (pipeline-parallel size above 1)."""
        if self._pipelined is None:
            size = _pipeline_size()
            if size is None:  # Megatron has not made its groups yet: its args say, but ask again later
                return (self.pipeline_size_arg or 1) > 1
            self._pipelined = size > 1
        return self._pipelined

    # ------------------------------------------------------------------ timer events
    def timer_started(self, name: str) -> None:
        if not self.active:
            return
        t0 = time.perf_counter()
        if name == STEP_BEGIN_TIMER:
            self._counts["f"] = self._counts["b"] = 0  # every schedule call starts at microbatch 0
            self._open.clear()
            if self.auto_steps:
                self.engine.step_begin()
        else:
            region = self._open[name] = self._region_of(name)
            self.engine.region_enter(region)
        self._host_s += time.perf_counter() - t0

    def _region_of(self, name: str) -> str:
        """The region a watched timer's start enters: per instruction and microbatch in a pipeline."""
        if name in PIPE_INSTRUCTION_OF_TIMER and self.pipelined:
            phase, group, count, offset = PIPE_INSTRUCTION_OF_TIMER[name]
            mb = self._counts[count] + offset
            if group == PIPE:
                self._counts[count] += 1  # a computation starts: the next one is the next microbatch
            return instruction_region(phase, group, mb)
        return REGION_OF_TIMER[name]

    def timer_stopped(self, name: str) -> None:
        if not self.active:
            return
        t0 = time.perf_counter()
        region = self._open.pop(name, None) or REGION_OF_TIMER.get(name)
        if region is not None:
            self.engine.region_exit(region)
        if name == STEP_END_TIMER and self.auto_steps:
            self.records.extend(self.engine.step_end())
            self._log_state()
        self._host_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ explicit boundaries
    def step_begin(self, step: Optional[int] = None) -> None:
        self.auto_steps = False
        self.engine.step_begin(step)

    def step_end(self) -> list:
        self.auto_steps = False
        records = self.engine.step_end()
        self.records.extend(records)
        self._log_state()
        return records

    def _log_state(self) -> None:
        """kdvfs's state ("kdvfs: exploring 340/1500") as a line beside Megatron's own, every
        ``--log-interval`` iterations, printed by rank 0 as Megatron prints its lines."""
        line = state_line(self.engine, self.engine.step + 1, self.log_interval)
        if line is not None and self.engine.rank == 0:
            print(line, flush=True)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        self.engine.region_enter(name)
        try:
            yield
        finally:
            self.engine.region_exit(name)

    # ------------------------------------------------------------------ teardown
    def close(self, error: Optional[BaseException] = None) -> None:
        """Take the proxies and hooks out, restore the clocks, write the run directory. Idempotent."""
        global _ACTIVE
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if _ACTIVE is self:
            _ACTIVE = None
        gv = sys.modules.get(_GLOBAL_VARS_MODULE)
        if gv is not None and self._global_proxy is not None and gv._GLOBAL_TIMERS is self._global_proxy:
            gv._GLOBAL_TIMERS = self._global_proxy.inner
        for cfg in self._configs:
            if isinstance(cfg.timers, KdvfsTimers):
                cfg.timers = unwrap_timers(cfg.timers)
        for mr in self._modules:
            mr.remove()
        self._modules.clear()
        if not self.engine.active:
            return
        # Every rank writes its run directory; rank 0 alone prints its table.
        self.engine.finish(error, quiet=self.engine.rank != 0)


def _pipeline_size() -> Optional[int]:
    """The pipeline-parallel size once Megatron has made its process groups; None before."""
    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover - megatron-core is this adapter's dependency
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_pipeline_model_parallel_world_size()


def _tensor_parallel_group():
    """The ranks that must share one plan: this rank's tensor-parallel group, once Megatron made it."""
    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover - megatron-core is this adapter's dependency
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None  # a group of one decides alone: no collective needed
    return parallel_state.get_tensor_model_parallel_group()


def _replicas() -> Optional[Replicas]:
    """The ranks of this pipeline stage explore together: a data-parallel index is a lane, and
    the ranks of one tensor-parallel group share it (they run in lockstep on one design)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover - megatron-core is this adapter's dependency
        return None
    if not ps.model_parallel_is_initialized():
        return None
    group = ps.get_tensor_and_data_parallel_group()
    if ps.get_tensor_model_parallel_world_size() * ps.get_data_parallel_world_size() == 1:
        return None
    return Replicas(group, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


# ---------------------------------------------------------------------- module-level API
_ACTIVE: Optional[MegatronKdvfs] = None


def install(args: Any = None, *, config: Union[KdvfsConfig, Mapping[str, Any], None] = None, model: Any = None,
            model_config: Any = None, rank: Optional[int] = None, local_rank: Optional[int] = None,
            world_size: Optional[int] = None, plugins: Iterable[object] = (), device: Any = None,
            ) -> Optional[MegatronKdvfs]:
    """Start kdvfs for this process after Megatron has parsed its arguments.

    ``args``: Megatron's parsed arguments (default: ``get_args()`` when Megatron's training loop is
    loaded). ``config``: a :class:`KdvfsConfig` or dict instead of flags, for scripts without
    Megatron's parser. ``model``: the model or list of model chunks (its config gets the timer
    proxy; its modules become kernel-group regions at ``granularity="kernel"``).
    ``model_config``: a ModelParallelConfig/TransformerConfig to proxy as well.

    Returns None when kdvfs is not enabled (no ``--kernel-dvfs``). Calling it again adds models
    and configs to the running installation (Megatron calls ``model_provider`` once per virtual
    pipeline chunk).
    """
    global _ACTIVE
    if _ACTIVE is not None and not _ACTIVE._closed:
        _ACTIVE.attach(model=model, model_config=model_config)
        return _ACTIVE
    cfg = _resolve_config(args, config)
    if cfg is None or not cfg.enabled:
        return None
    args = args if args is not None else _megatron_args()
    r, lr, ws = detect_ranks(args, rank=rank, local_rank=local_rank, world_size=world_size)
    handle = MegatronKdvfs(cfg, rank=r, local_rank=lr, world_size=ws, plugins=plugins, device=device)
    handle.log_interval = getattr(args, "log_interval", None)
    handle.pipeline_size_arg = getattr(args, "pipeline_model_parallel_size", None)
    if not (_global_timers_ready() or model is not None or model_config is not None):
        raise MegatronSetupError(
            "nothing to install into: Megatron's global timers do not exist yet and no model or "
            "model_config was given. Call install() after parse_and_validate_args() (Megatron-core >= 0.18) "
            "or from your model_provider (<= 0.17), or pass model=/model_config= in a megatron-core loop"
        )
    handle.start()
    try:
        handle.attach(model=model, model_config=model_config)
    except BaseException as exc:
        handle.close(exc)
        raise
    _ACTIVE = handle
    return handle


def uninstall(error: Optional[BaseException] = None) -> None:
    """Restore the clocks and take kdvfs out of Megatron (also runs at interpreter exit)."""
    if _ACTIVE is not None:
        _ACTIVE.close(error)


close = uninstall


def current() -> Optional[MegatronKdvfs]:
    """The running installation, if any."""
    return _ACTIVE


def step_begin(step: Optional[int] = None) -> None:
    """Begin a kdvfs step in a custom loop (turns off the automatic ``forward-backward`` boundary)."""
    if _ACTIVE is not None:
        _ACTIVE.step_begin(step)


def step_end() -> list:
    """End the kdvfs step in a custom loop; returns the steps the GPU has finished since the last call."""
    return _ACTIVE.step_end() if _ACTIVE is not None else []


@contextlib.contextmanager
def region(name: str = OPTIMIZER) -> Iterator[None]:
    """Bracket a region by hand, e.g. ``with kdvfs_megatron.region("optimizer"): optimizer.step()``."""
    if _ACTIVE is None:
        yield
        return
    with _ACTIVE.region(name):
        yield


# ---------------------------------------------------------------------- helpers
def _resolve_config(args: Any, config: Any) -> Optional[KdvfsConfig]:
    if args is not None and config is not None:
        raise MegatronSetupError("pass either args= (parsed --kernel-dvfs flags) or config=, not both")
    if isinstance(config, KdvfsConfig):
        return config
    if config is not None:
        return KdvfsConfig.from_dict(config, source="kdvfs_megatron.install(config=...)")
    if args is None:
        args = _megatron_args()
    if args is None:
        raise MegatronSetupError(
            "no arguments: pass args= (Megatron's parsed args, with add_kernel_dvfs_args as extra_args_provider) "
            "or config= (a KdvfsConfig or dict)"
        )
    return config_from_args(args)


def _megatron_args() -> Any:
    gv = sys.modules.get(_GLOBAL_VARS_MODULE)
    return getattr(gv, "_GLOBAL_ARGS", None) if gv is not None else None


def _global_timers_ready() -> bool:
    gv = sys.modules.get(_GLOBAL_VARS_MODULE)
    return gv is not None and getattr(gv, "_GLOBAL_TIMERS", None) is not None


def detect_ranks(args: Any = None, *, rank: Optional[int] = None, local_rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size): explicit values, then torch.distributed, Megatron's args, the
    launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE), then the current CUDA device.

    install() usually runs before Megatron initialises torch.distributed and picks the CUDA
    device, so the local rank comes from ``args.local_rank``/``LOCAL_RANK`` first.
    """
    dist_rank = dist_world = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist_rank, dist_world = dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    r = _first(rank, dist_rank, getattr(args, "rank", None), _env_int("RANK"), 0)
    ws = _first(world_size, dist_world, getattr(args, "world_size", None), _env_int("WORLD_SIZE"), 1)
    lr = _first(local_rank, getattr(args, "local_rank", None), _env_int("LOCAL_RANK"), _cuda_device(), 0)
    return int(r), int(lr), int(ws)


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _cuda_device() -> Optional[int]:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _unwrap_module(module: Any) -> Any:
    # Megatron wraps chunks in DDP / Float16Module, each keeping the wrapped model in .module.
    while hasattr(module, "module") and hasattr(module.module, "named_modules"):
        module = module.module
    return module


def _model_config(model: Any) -> Any:
    from megatron.core.utils import get_model_config

    return get_model_config(model)
