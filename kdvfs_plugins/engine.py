"""The shared engine the adapters call: step and region boundaries in program order.

An adapter reports ``step_begin``, ``region_enter(name)``, ``region_exit(name)`` and ``step_end``
as the CPU enqueues work. At each boundary the engine records a marker, asks
``kdvfs_choose_clocks`` for the region now innermost, and hands any change to the actuator,
which applies it when the GPU gets there. Nothing here synchronises the training thread.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .actuator import Actuator
from .cadence import ProfileCadence
from .config import KdvfsConfig
from .devices import BuiltinDevices
from .errors import ConfigError, InvalidClockError, StateDirError
from .events import ClockChange, RegionEvent, SessionInfo, StepRecord, WindowRecord
from .distributed import Replicas, agree, all_gather
from .guard import ClockGuard
from .log import logger
from .meter import Meter
from .plan import Plan, UnmatchedRegionKeys, plan_key
from .plugins import make_plugin_manager
from .policy import PlanPolicy, as_clocks
from .regions import STEP
from .run_files import initial_plan, save_explored_plan, write_run_dir


#: "leave the clocks as they are" (observe mode chooses nothing).
_KEEP = object()

#: Host seconds between step markers that the actuator's worker waits on, where markers can be
#: dated from one another (CUDA events): the other steps' times follow from those anchors on the
#: GPU's own clock, which drifts from the host's by parts per million. Each wait wakes the worker,
#: which then takes the GIL from a training thread that the CPU may pace.
ANCHOR_PERIOD_S = 2.0


class _LayoutMeter(Meter):
    """A meter that can also hand over one profiled step's stretches in order (the explorer's layout).

    The stretch list is read before the markers go back to the device's pool.
    """

    want_layout_from: Optional[int] = None
    on_layout = None

    def _resolve(self, st):
        if (self.want_layout_from is not None and st.profiled and st.step >= self.want_layout_from
                and self.on_layout is not None):
            marks = st.marks + [(st.end, None)]
            layout = [(region, m0.elapsed_ms(m1)) for (m0, region), (m1, _) in zip(marks, marks[1:])]
            self.want_layout_from = None
            self.on_layout(st.step, layout)
        return super()._resolve(st)


class Engine:
    """One per rank (per GPU). Build, :meth:`start` before training, :meth:`close` after."""

    def __init__(self, config: KdvfsConfig, *, framework: str = "custom", rank: int = 0, local_rank: int = 0,
                 world_size: int = 1, plugin_manager=None, device=None, plugins=(), plan_group=None,
                 replicas: Optional[Replicas] = None, explorer_factory=None):
        self.config = config
        #: Builds the explorer of mode auto/explore in place of the one-GPU Explorer, called as
        #: ``factory(engine, start_step, on_done)``: a pipeline's stages explore together
        #: (:func:`kdvfs_plugins.pipeline_explore.stage_explorer`). None: the one-GPU Explorer.
        self.explorer_factory = explorer_factory
        #: Ranks that must share one plan (a tensor-parallel group, or "world"); None: this rank alone.
        self.plan_group = plan_group
        #: Ranks that explore together (config ``explore_across_ranks``); None: this rank alone.
        self.replicas = replicas
        self.framework = framework
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.policy = PlanPolicy()
        self.builtin_devices = BuiltinDevices()
        self.pm = plugin_manager or make_plugin_manager(builtins=[self.policy, self.builtin_devices], extra=plugins)
        self.device = device
        self.guard: Optional[ClockGuard] = None
        self.actuator: Optional[Actuator] = None
        self.meter: Optional[Meter] = None
        self.plan: Optional[Plan] = None
        self.session: Optional[SessionInfo] = None
        self.step: int = -1
        self._stack: list[str] = []
        self._in_step = False
        self._started = False
        self._closed = False
        self.changes: list[ClockChange] = []
        self._hook = self.pm.hook
        #: Whether this step records every boundary (a profiled step) or only clock changes.
        self.profiling = True
        #: Whether this step marks module boundaries (module hooks on), not only phases.
        self._detail = True
        #: Whether the plan in force sets clocks by module group (then every step needs the hooks).
        self._plan_by_module = False
        self._region_hooks = False
        #: The explorer while mode auto/explore runs without a valid plan (None otherwise).
        self.explorer = None
        self.explore_result = None
        #: Parallel layout for the plan key, where the adapter knows it: {"tp": 2, "pp": 1, "dp": 4}.
        self.parallel: dict = {}
        self._plan_key: dict = {}
        self._regions_checked = False
        self._progress = None
        self._last_anchor_s: Optional[float] = None
        self._last_step_changed = False
        #: Which steps are profiled outside exploration (set at start).
        self.cadence: Optional[ProfileCadence] = None
        self._region_keys = UnmatchedRegionKeys(config.region_clocks) if config.region_clocks else None

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        return self._started and not self._closed

    @property
    def in_step(self) -> bool:
        """Whether a step is open (between step_begin and step_end)."""
        return self._in_step

    @property
    def current_phase(self) -> Optional[str]:
        """The open phase region (forward, backward, ...), if any."""
        return self._stack[1].partition("/")[0] if len(self._stack) > 1 else None

    @property
    def profiling_or_switching(self) -> bool:
        """Whether module boundaries matter in this step: it is profiled at module level, the plan
        sets clocks by module group, or exploration needs them (its baseline, module knobs)."""
        return self._detail

    @property
    def wants_module_regions(self) -> bool:
        return self.config.granularity == "kernel"

    def start(self) -> "Engine":
        """Open the device, check every configured clock and the plan, take ownership of the GPU."""
        if self._started:
            return self
        cfg = self.config
        self._hook.kdvfs_configure.call_historic(kwargs=dict(config=cfg))
        if self.device is None:
            self.device = self._hook.kdvfs_make_device(config=cfg, index=self.local_rank)
        try:
            self._start_on_device(cfg)
        except BaseException:
            # Nothing was written yet, but the GPU's lock and the device session must not leak.
            if self.guard is not None:
                self.guard.release()
            self.device.close()
            raise
        return self

    def _start_on_device(self, cfg: KdvfsConfig) -> None:
        info = self.device.info()
        self._check_config_clocks(info)
        self.plan = agree(self.plan_group, lambda: self._initial_plan(info))
        self._plan_by_module = plan_by_module(self.plan)
        if self.plan is not None and self.plan_group is not None:
            self.plan.check_device(info.name, info.clocks, where="the group's plan")
        if self.device.can_write_clocks and not self.device.simulated:
            try:
                self.guard = ClockGuard(self.device, cfg.state_dir)
                self.guard.acquire()
            except StateDirError as exc:
                # Nothing was written; without a safe record no clock is written either.
                from .devices.observe import observe_instead

                logger.warning("%s Falling back to observe: training goes on, clocks are measured, not set.", exc)
                self.guard = None
                self.device = observe_instead(self.device)
        self.actuator = Actuator(
            self.device, self.guard, min_interval_s=cfg.min_switch_interval_ms / 1e3,
            on_applied=self._on_applied, on_device_changed=self._on_device_changed,
            lead_s=self._switch_latency_ms() / 1e3 if cfg.issue_ahead else 0.0,
        )
        self.meter = _LayoutMeter(self.device, window_steps=cfg.window_steps, on_step=self._on_step, on_window=self._on_window,
                           energy_period_s=cfg.energy_sample_period_ms / 1e3,
                           counter_period_s=cfg.energy_counter_period_ms / 1e3,
                           power_on_steps=cfg.power_readings == "step_end")
        self.meter.warmup_steps = cfg.warmup_steps
        self.meter.start()
        self.cadence = ProfileCadence(cfg.profile_every_n_steps, first_step=cfg.warmup_steps)
        self.session = SessionInfo(
            framework=self.framework, rank=self.rank, local_rank=self.local_rank, world_size=self.world_size,
            device_kind=self.device.kind, device_name=info.name, device_index=self.local_rank,
            mode=cfg.mode, run_dir=cfg.run_dir,
        )
        self._region_hooks = bool(self._hook.kdvfs_region_enter.get_hookimpls() or self._hook.kdvfs_region_exit.get_hookimpls())
        self._started = True
        if self.plan is not None:
            self._hook.kdvfs_plan_ready.call_historic(kwargs=dict(plan=self.plan))
        self._hook.kdvfs_session_start(session=self.session)

    def _check_config_clocks(self, info) -> None:
        cfg = self.config
        for key, clocks in ([("sm_mhz/mem_mhz", cfg.fixed_clocks)] if cfg.fixed_clocks else []) + [
            (f"region_clocks[{r!r}]", c) for r, c in cfg.region_clocks.items()
        ]:
            try:
                info.clocks.check(clocks, where=f"{key} on {info.name}")
            except InvalidClockError as exc:
                raise ConfigError(key, clocks.to_dict(), str(exc)) from None

    def _initial_plan(self, info) -> Optional[Plan]:
        self._plan_key = plan_key(info.name, info.driver, self.world_size, self.parallel)
        return initial_plan(self.config, info, self._plan_key)

    # ------------------------------------------------------------------ exploration
    def _switch_latency_ms(self) -> float:
        """:func:`kdvfs_plugins.switching.resolve_switch_latency_ms` for this run's device."""
        from .switching import resolve_switch_latency_ms

        return resolve_switch_latency_ms(self.config, self.device).ms

    def _start_explorer(self) -> None:
        """Mode auto/explore without a plan: explore from the first window boundary after warm-up."""
        from .progress import ProgressLine, wants_progress

        cfg = self.config
        ws = cfg.window_steps
        # the meter's windows count from the first step; blocks must start on a window boundary
        first = self.step + ws * (-(-cfg.warmup_steps // ws))
        if self.explorer_factory is not None:
            self.explorer = self.explorer_factory(self, first, self._explore_done)
        else:
            self.explorer = self._one_gpu_explorer(first)
        self.explorer.measuring = self.device.can_write_clocks
        # plugins that watch every region keep module boundaries on for the whole exploration
        self.explorer.phase_level_after_baseline = not self._region_hooks
        # Both the explorer and the plan policy are ``trylast`` (a third-party policy answers first);
        # among trylast implementations the earlier registered is asked first, so the explorer goes
        # in before the policy while it explores.
        policy_name = self.pm.get_name(self.policy)
        if policy_name is not None:
            self.pm.unregister(self.policy)
        self.pm.register(self.explorer, name=f"kdvfs-explorer-{id(self)}")
        if policy_name is not None:
            self.pm.register(self.policy, name=policy_name)
        self.meter.want_layout_from = first
        self.meter.on_layout = self._on_layout
        self._progress = ProgressLine(wants_progress(cfg.progress))

    def _one_gpu_explorer(self, first: int):
        from .explore import ExploreSettings, Explorer

        cfg, info = self.config, self.device.info()
        latency = self._switch_latency_ms()
        shared = self.replicas if cfg.explore_across_ranks else None
        settings = ExploreSettings(
            clock_table=info.clocks, max_slowdown=cfg.max_slowdown, objective=cfg.effective_objective,
            explore_max_slowdown=cfg.explore_max_slowdown,
            explore_max_steps=cfg.explore_max_steps, window_steps=cfg.window_steps, switch_latency_ms=float(latency),
            min_switch_interval_ms=cfg.min_switch_interval_ms, start_step=first,
            # replicas must draw the same designs: one seed for all of them
            seed=cfg.sim_seed + (0 if shared else self.rank),
            issue_ahead=cfg.issue_ahead,
            lanes=shared.lanes if shared else 1, lane=shared.lane if shared else 0,
        )
        exchange = (lambda items, group=shared.group: all_gather(group, items)) if shared else None
        return Explorer(settings, on_done=self._explore_done, apply=cfg.mode == "auto", exchange=exchange)

    def _on_layout(self, step: int, layout) -> None:
        from .explore import Occurrence

        if self.explorer is not None:
            self.explorer.set_layout([Occurrence(r, ms) for r, ms in layout if r is not None])
        self._check_regions([r for r, _ in layout])

    def _check_regions(self, regions) -> None:
        """The region set is known after the first profiled step: complete the key, check a loaded plan."""
        if self._regions_checked:
            return
        self._regions_checked = True
        self._plan_key = plan_key(self._plan_key["gpu"], self._plan_key["driver"], self.world_size, self.parallel,
                                  regions=[r for r in regions if r != STEP])
        if self.plan is not None and self.plan.source == "explore":
            self.plan.check_key(self._plan_key, where=f"plan file {self.config.resolved_plan_path()}")

    def _explore_done(self, result) -> None:
        from .progress import format_summary

        self.explore_result = result
        info = self.device.info()
        plan = Plan(info.name, info.clocks, dict(result.clocks_by_name), granularity=self.config.granularity,
                    objective=self.config.effective_objective, max_slowdown=self.config.max_slowdown,
                    key=dict(self._plan_key),
                    predicted={**{f"predicted_{k}": v for k, v in result.predicted.items()},
                               **{f"validated_{k}": v for k, v in result.validated.items()},
                               "exploration_time_change": result.exploration_time_change,
                               "exploration_steps": float(result.steps)},
                    source="explore")
        path = save_explored_plan(self.config, plan, self.rank)
        if result.status == "applied":
            self.set_plan(plan)
        if self._progress is not None:
            self._progress.close()
        logger.info("%s\nplan file: %s", format_summary(result, simulated=self.device.simulated), path)

    def set_plan(self, plan: Plan) -> None:
        """Put a plan in force (from the planner or the explorer)."""
        plan.check_device(self.device.info().name, self.device.info().clocks)
        self.plan = plan
        self._plan_by_module = plan_by_module(plan)
        self._hook.kdvfs_plan_ready.call_historic(kwargs=dict(plan=plan))

    def close(self, error: Optional[BaseException] = None) -> None:
        """Finish measuring and restore the clocks. Safe to call more than once, from any end."""
        if not self._started or self._closed:
            return
        self._closed = True
        try:
            if self._in_step:
                self._in_step = False
                self._stack.clear()
            self.actuator.flush()
            self.actuator.stop()
            if self.guard is not None:
                self.guard.release()
            elif self.actuator.requested is not None:
                self.device.reset_clocks()
            self.meter.finish()
            self.meter.stop()
        finally:
            if self.explorer is not None and not self.explorer.done:
                if self._progress is not None:
                    self._progress.close()
                logger.info("kdvfs exploration did not finish: training ended after %d of up to %d exploration "
                            "steps; the next run (mode='auto') explores again",
                            max(0, self.step + 1 - self.explorer.s.start_step), self.explorer.s.explore_max_steps)
            self._hook.kdvfs_session_end(session=self.session, error=error)
            self.device.close()

    # ------------------------------------------------------------------ boundaries
    def step_begin(self, step: Optional[int] = None) -> None:
        if not self.active:
            return
        if self._in_step:
            self.step_end()
        self.step = self.step + 1 if step is None else step
        self._in_step = True
        if self.explorer is None and self.plan is None and self.config.mode in ("auto", "explore") \
                and self.explore_result is None:
            self._start_explorer()
        if self.explorer is not None:
            self.explorer.begin_step(self.step)  # lays out blocks; shares measurements between replicas
        exploring = self.explorer is not None and not self.explorer.done
        self.profiling = exploring or self._region_hooks or self.cadence.due(self.step)
        if exploring and not (self.explorer.wants_module_regions or self._region_hooks):
            # Every step of exploration is measured, at phase level once the knobs are known:
            # module hooks and markers at every boundary made a CPU-bound step 14-30% slower
            # (DeepSpeed ZeRO-2 on an H200, measured), far more than the clocks being explored.
            self._detail = False
        else:
            self._detail = self.profiling or self._plan_by_module
        if exploring and self._progress is not None and self._progress.enabled:
            from .progress import explore_status

            self._progress.update(explore_status(self.explorer))
        elif not self._regions_checked and self.profiling and self.plan is not None and self.plan.source == "explore":
            self.meter.want_layout_from = self.step
            self.meter.on_layout = self._on_layout
        self._stack = [STEP]
        marker = self.device.marker()
        st = self.meter.step_begin(self.step, marker, STEP, profiled=self.profiling, detailed=self._detail)
        st.begin_stamped = self._stamp_due(marker)
        if st.begin_stamped:
            self._stamp(st, "begin", marker)
        self._apply(marker, STEP)

    def _stamp(self, st, which: str, marker) -> None:
        """Have the worker note when the GPU reaches the step's ``which`` ("begin"/"end") marker."""
        self.actuator.stamp(marker, lambda t: self.meter.reached(st, which, t, marker))

    def _stamp_due(self, marker) -> bool:
        """Whether the worker waits on this step's begin marker: always where markers cannot be
        dated from one another or the last step changed clocks (the boundary predictor anchors
        each step cycle on it), else once per ``ANCHOR_PERIOD_S``."""
        if not marker.dated_by_anchor or self._last_step_changed:
            return True
        now = time.perf_counter()
        if self._last_anchor_s is not None and now - self._last_anchor_s < ANCHOR_PERIOD_S:
            return False
        self._last_anchor_s = now
        return True

    def region_enter(self, name: str) -> None:
        if not (self.active and self._in_step):
            return
        self._stack.append(name)
        self._boundary(name, True)

    def region_exit(self, name: str) -> None:
        if not (self.active and self._in_step):
            return
        if name not in self._stack[1:]:
            return  # an exit without its enter (hooks installed mid-step): nothing to close
        while self._stack[-1] != name:
            self._stack.pop()
        self._stack.pop()
        self._boundary(name, False)

    def region_switch(self, name: str) -> None:
        """Enter ``name`` in place of the kernel group now open in the same phase.

        For boundaries known only as starts (backward gradients arriving at a module's output):
        the previous group ends where the next begins.
        """
        if not (self.active and self._in_step):
            return
        top = self._stack[-1]
        if "/" in top and top.partition("/")[0] == name.partition("/")[0]:
            if top == name:
                return
            self._stack.pop()
        self._stack.append(name)
        self._boundary(name, True)

    def step_end(self) -> list[StepRecord]:
        """Close the step; returns the steps the GPU has finished since the last call."""
        if not (self.active and self._in_step):
            return []
        self._in_step = False
        self._stack = []
        marker = self.device.marker()
        st = self.meter.step_end(marker)
        if st is not None:
            self._last_step_changed = st.clock_changes > 0
            # A step that changed clocks has its end stamped: the worker reaches it only after
            # those changes, so its markers are not reused while a change still waits on one.
            st.end_stamped = st.begin_stamped or self._last_step_changed or not marker.dated_by_anchor
            if st.end_stamped:
                self._stamp(st, "end", marker)
        return self.meter.poll()

    def _boundary(self, name: str, enter: bool) -> None:
        current = self._stack[-1]
        clocks = self._choose(current)
        change = clocks is not _KEEP and clocks != self.actuator.requested
        if not (self.profiling or change):
            return  # nothing to time and nothing to change: no marker, no cost
        marker = self.device.marker()
        if self.profiling:
            self.meter.boundary(marker, current)
        if self._region_hooks:
            ev = RegionEvent(name, self.step, enter, time.perf_counter())
            (self._hook.kdvfs_region_enter if enter else self._hook.kdvfs_region_exit)(event=ev)
        if change and self.actuator.submit(marker, clocks, current, self.step):
            self.meter.count_change()

    def _choose(self, region: str):
        if self.config.mode == "observe":
            return _KEEP
        return as_clocks(self._hook.kdvfs_choose_clocks(region=region, step=self.step))

    def _apply(self, marker, region: str) -> None:
        clocks = self._choose(region)
        if clocks is not _KEEP and self.actuator.submit(marker, clocks, region, self.step):
            self.meter.count_change()

    # ------------------------------------------------------------------ callbacks
    def _on_applied(self, change: ClockChange) -> None:
        self.changes.append(change) if len(self.changes) < 100_000 else None
        self._hook.kdvfs_clocks_applied(change=change)

    def _on_device_changed(self, device) -> None:
        self.device = device
        if self.explorer is not None and not device.can_write_clocks:
            self.explorer.measuring = False  # it keeps exchanging, so the other ranks do not wait
        if self.guard is not None:
            self.guard.device = device
        if self.session is not None:
            from dataclasses import replace

            self.session = replace(self.session, device_kind=device.kind)

    def _on_step(self, record: StepRecord) -> None:
        self.cadence.measured(record.step, record.gpu_time_ms, profiled=bool(record.region_time_ms))
        if record.region_time_ms and self._region_keys is not None:
            note = self._region_keys.seen(record.region_time_ms)  # region_clocks keys no region matches
            if note:
                logger.warning("%s", note)
        self._hook.kdvfs_step_measured(record=record)

    def _on_window(self, window: WindowRecord) -> None:
        self._hook.kdvfs_window_measured(window=window)

    # ------------------------------------------------------------------ results
    def region_table(self) -> list[tuple[str, float, float]]:
        return self.meter.region_table() if self.meter else []

    @property
    def thread_cpu_s(self) -> float:
        """CPU seconds used by kdvfs's own threads (energy sampler, actuator worker) so far: the
        part of its cost that the adapters' host time, spent on the training thread, leaves out."""
        sampler = self.meter.sampler if self.meter else None
        return (sampler.cpu_time_s if sampler else 0.0) + (self.actuator.worker_cpu_s if self.actuator else 0.0)

    def summary(self) -> dict:
        """Figures for logs and the run directory."""
        m = self.meter
        steps = m.steps if m else []
        energy = m.energy_j_total if m else 0.0
        nsteps = m.energy_steps_total if m else 0
        duration_s = m.energy_duration_s_total if m else 0.0
        return {
            "rank": self.rank,
            "device": self.device.kind if self.device else None,
            "steps": m.steps_seen if m else 0,
            "gpu_time_ms_per_step": (sum(s.gpu_time_ms for s in steps) / len(steps)) if steps else None,
            "energy_j_per_step": energy / nsteps if nsteps else None,
            "avg_power_w": energy / duration_s if duration_s > 0 else None,
            "clock_changes": self.actuator.changes_applied if self.actuator else 0,
            "thread_cpu_ms": self.thread_cpu_s * 1e3,
            "profile_interval_steps": self.cadence.interval if self.cadence else None,
            "clock_errors": list(self.actuator.errors) if self.actuator else [],
            "regions": [{"region": r, "gpu_ms_per_step": ms, "share": sh} for r, ms, sh in self.region_table()],
            "model_prediction": bool(self.device is not None and self.device.simulated),
            "exploration": None if self.explore_result is None else {
                "status": self.explore_result.status, "steps": self.explore_result.steps,
                "exploration_time_change": self.explore_result.exploration_time_change,
                "predicted": dict(self.explore_result.predicted), "validated": dict(self.explore_result.validated),
                "clocks": {k: (None if v is None else v.to_dict()) for k, v in self.explore_result.clocks_by_name.items()},
                "message": self.explore_result.message,
            },
        }

    def finish(self, error: Optional[BaseException] = None, *, quiet: bool = False) -> Optional[Path]:
        """End of training, for every adapter: restore the clocks, write the run directory, and log
        this rank's summary and region table (at debug level when ``quiet``). Returns the run
        directory, or None when the engine had already closed."""
        if not self.active:
            return None
        self.close(error)
        path = self.write_run_dir()
        s = self.summary()
        step_ms = f"{s['gpu_time_ms_per_step']:.2f}" if s["gpu_time_ms_per_step"] else "-"
        (logger.debug if quiet else logger.info)(
            "rank %d: %d steps, %s GPU ms/step, %d clock changes; run directory %s\n%s",
            self.rank, s["steps"], step_ms, s["clock_changes"], path,
            format_region_table(self.region_table(), simulated=s["model_prediction"]),
        )
        return path

    def write_run_dir(self) -> Optional[Path]:
        """Write ``<run_dir>/rank<N>/``; returns the path (None if not started)."""
        if not self._started:
            return None
        return write_run_dir(self.config.run_dir, self.rank, self.summary(), self.meter.steps, self.meter.windows)


def plan_by_module(plan: Optional[Plan]) -> bool:
    """Whether ``plan`` gives a module group clocks of its own (``forward/layers.*.mlp``), so that
    steps must mark module boundaries; a plan by phase needs only the phase boundaries."""
    # a module group at None (default clocks inside a phase that has others) counts as well
    return plan is not None and any("/" in region for region in plan.regions)


def format_region_table(rows, step_ms: Optional[float] = None, simulated: bool = False) -> str:
    """A plain-text table of GPU time per region (the shared table formatter)."""
    from .tables import Table

    cells = [[region, f"{ms:.3f}", f"{share:.1%}"] for region, ms, share in rows]
    cells.append(["total", f"{sum(r[1] for r in rows):.3f}", ""])
    if step_ms:
        cells.append(["measured step time", f"{step_ms:.3f}", ""])
    title = "(model prediction: simulated H100)" if simulated else None
    return Table(["region", "GPU ms/step", "share"], cells, title=title).text(indent="")
