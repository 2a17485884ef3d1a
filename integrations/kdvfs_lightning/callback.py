"""``KernelDVFS``: a Lightning callback that reports phases and layers to the kdvfs engine.

Phases come from ``on_train_batch_start`` (forward), ``on_before_backward``/``on_after_backward``
(backward), ``on_before_optimizer_step`` and the optimizer's step post-hook (optimizer). A kdvfs
step is one optimizer step: under gradient accumulation it spans the micro-batches. Every rank
drives its own GPU. Clocks are restored in ``teardown`` and in ``on_exception`` (Lightning calls
the latter, not the former, when training raises).
"""
from __future__ import annotations

import time
from typing import Any, Optional

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone ``pytorch_lightning`` distribution
    from pytorch_lightning.callbacks import Callback

from kdvfs_plugins.config import KdvfsConfig
from kdvfs_plugins.distributed import WORLD, Replicas
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.log import logger
from kdvfs_plugins.module_regions import ModuleRegions
from kdvfs_plugins.plan import Plan
from kdvfs_plugins.progress import engine_status
from kdvfs_plugins.regions import BACKWARD, FORWARD, OPTIMIZER
from kdvfs_plugins.step_metrics import StepMetrics


class KernelDVFS(Callback):
    """Kernel-level GPU clock control for a Lightning run.

    Keyword arguments are the kdvfs configuration (see ``docs/configuration.md``), validated here,
    before training starts: ``KernelDVFS(mode="apply", plan_path="plan.json")``.
    """

    def __init__(self, plugins=(), **config: Any):
        super().__init__()
        self.config = KdvfsConfig.from_dict(config, source="KernelDVFS(...)")
        self.config.check_plan_file(source="KernelDVFS(...)")  # a missing plan fails here, not at fit
        self.plugins = tuple(plugins)
        self.engine: Optional[Engine] = None
        self._modules: Optional[ModuleRegions] = None
        self._opt_handles: list = []
        self._stepped = False
        self._restored_plan: Optional[dict] = None
        self._host_s = 0.0
        self._metrics = StepMetrics()
        self.records: list = []
        self._bar = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer, pl_module, stage) -> None:
        if str(stage) not in ("fit", "TrainerFn.FITTING") or not self.config.enabled or self.engine is not None:
            return
        self.engine = Engine(
            self.config, framework="lightning", rank=trainer.global_rank, local_rank=trainer.local_rank,
            world_size=trainer.world_size, plugins=self.plugins,
            # every rank holds a replica of the model and runs the same work
            replicas=Replicas(WORLD, trainer.global_rank, trainer.world_size) if trainer.world_size > 1 else None,
        ).start()
        if self.engine.wants_module_regions:
            self._modules = ModuleRegions(self.engine, pl_module, self.config.module_depth).install()
        self._show_state_in(trainer.progress_bar_callback)

    def _show_state_in(self, bar) -> None:
        """kdvfs's state ("exploring 340/1500", "validating", "applied -6.7% energy") as the item
        ``kdvfs`` of the progress bar. ``get_metrics`` is the progress bar's documented place for
        extra items (a string is fine there; ``self.log`` takes numbers only); it is wrapped on
        this one bar instance and unwrapped at the end."""
        if bar is None or "get_metrics" in vars(bar):
            return
        original = bar.get_metrics

        def get_metrics(trainer, pl_module):
            items = original(trainer, pl_module)
            state = engine_status(self.engine)
            return {**items, "kdvfs": state} if state else items

        bar.get_metrics = get_metrics
        self._bar = bar

    def on_train_start(self, trainer, pl_module) -> None:
        if self.engine is None:
            return
        if self._restored_plan is not None:
            self.engine.set_plan(Plan.from_dict(self._restored_plan, where="checkpointed kdvfs plan"))
        for opt in trainer.optimizers:
            self._opt_handles.append(opt.register_step_post_hook(self._after_optimizer_step))

    def teardown(self, trainer, pl_module, stage) -> None:
        self._finish(trainer, None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish(trainer, exception)

    def _finish(self, trainer, error) -> None:
        if self.engine is None or not self.engine.active:
            return
        for h in self._opt_handles:
            h.remove()
        self._opt_handles.clear()
        if self._modules is not None:
            self._modules.remove()
        if self._bar is not None:
            vars(self._bar).pop("get_metrics", None)
            self._bar = None
        self.engine.finish(error)

    @property
    def host_time_s(self) -> float:
        """Host seconds spent in the callback's hooks and the module hooks since setup (the
        logged ``kdvfs/overhead_ms`` is its increase per step between logs)."""
        return self._host_s + (self._modules.host_time_s if self._modules is not None else 0.0)

    # ------------------------------------------------------------------ phases
    def _timed(self, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        self._host_s += time.perf_counter() - t0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        eng = self.engine
        if eng is None:
            return
        t0 = time.perf_counter()
        if not eng.in_step:
            eng.step_begin(trainer.global_step)
            self._stepped = False
        eng.region_enter(FORWARD)
        self._host_s += time.perf_counter() - t0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.engine is not None:
            self._timed(self._switch, FORWARD, BACKWARD)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.engine is not None:
            self._timed(self.engine.region_exit, BACKWARD)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.engine is not None:
            self._timed(self._switch, FORWARD, OPTIMIZER)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.engine is not None:
            self._timed(self.engine.region_exit, OPTIMIZER)
            self._stepped = True

    def _switch(self, leaving: str, entering: str) -> None:
        self.engine.region_exit(leaving)
        self.engine.region_enter(entering)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        eng = self.engine
        if eng is None:
            return
        t0 = time.perf_counter()
        eng.region_exit(FORWARD)
        if self._stepped or not trainer.optimizers:
            records = eng.step_end()
            self.records.extend(records)
            self._host_s += time.perf_counter() - t0
            self._log(trainer, records)
        else:
            self._host_s += time.perf_counter() - t0

    def _log(self, trainer, records) -> None:
        self._metrics.count(records)
        if not records or not trainer.loggers or trainer.global_step % self.config.log_every_n_steps:
            return
        metrics = self._metrics.take(records[-1], self.engine.meter.windows, self.host_time_s)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        plan = self.engine.plan if self.engine is not None else None
        return {"plan": plan.to_dict() if plan is not None else self._restored_plan}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_plan = state_dict.get("plan")
