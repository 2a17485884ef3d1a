"""Online exploration across pipeline stages on the virtual cluster: ``kdvfs simulate --pipeline P --explore``.

Each seed runs a training run's own path on every rank: an :class:`~kdvfs_plugins.engine.Engine`
in mode ``auto`` with its plugin manager, actuator and meter (energy from power readings anchored
to the counter, as on a real card), which registers a
:class:`~kdvfs_plugins.pipeline_explore.PipelineExplorer` (:func:`~kdvfs_plugins.pipeline_explore.stage_explorer`)
on a :class:`~kdvfs_plugins.devices.cluster_rank.ClusterRankDevice`, one rank of the virtual
cluster. The explorers exchange through an all-gather over threads (one per rank, as the ranks of
a training run call theirs). :class:`PipelineDriver` plays the pipeline adapters: per iteration,
each rank's engine gets ``step_begin``, then each instruction of the rank's program order as its
region (``forward/pipe.mb3``, ``backward/pipe.mb3``, ``optimizer``), each receive before it as a
``communication/recv_activation.mbN`` or ``communication/recv_grad.mbN`` region (DeepSpeed's
names); once every rank has gone through the iteration the cluster executes it with every rank's
clock requests, and each device dates its markers and energy from its rank's timeline. Each
rank's ``step_end`` comes before the run, as a live step ends before the GPU gets there, and the
meter resolves the step at the next poll: the meter's records reach the explorer through the
normal hooks.

When every explorer is done (or the step budget is spent) the applied plan and the oracle's plan
(the critical-path planner on the true tables of each card, strict) run on the cluster beside the
default clocks, over ``EXECUTE_ITERATIONS`` iterations of the same seed. Every figure is a model
prediction of the simulated H100 cluster.
"""
from __future__ import annotations

import json
import tempfile
import time as _time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from ..config import KdvfsConfig
from ..devices.cluster_rank import ClusterPipeline
from ..distributed import LocalAllGather, run_ranks
from ..engine import Engine
from ..errors import ConfigError
from ..pipeline_explore import stage_explorer
from ..pipeline_explore_fit import PipelineShape
from ..pipeline_planner import plan_critical_path
from ..regions import BACKWARD, COMMUNICATION, FORWARD, OPTIMIZER, PIPE, instruction_region
from ..sim.cluster import ClusterPlan, Straggler, VirtualCluster
from .explore import seed_row, seeds_summary
from ..switching import DEFAULT_SWITCH_LATENCY_MS, ISSUE_AHEAD_MIN_INTERVAL_MS, check_latency_ms, switch_model
from .pipeline import LABEL, _graph, stage_workloads

__all__ = ["PipelineDriver", "cluster_shape", "explore_seed_engines",
           "pipeline_explore_report", "format_report", "run_command", "EXECUTE_ITERATIONS"]

SOURCE = "kdvfs simulate --pipeline --explore"
#: Iterations each plan (and the default) is executed for, after exploration.
EXECUTE_ITERATIONS = 20
#: Iterations per block and per meter window.
BLOCK_STEPS = 10
#: Steps each engine runs before exploring (allocator and autotuning warm-up in a live run); the
#: explorer starts at the next window boundary.
WARMUP_STEPS = 3


def _region(kind: str, microbatch: int, chunk: int) -> str:
    """The live pipeline adapters' region of an instruction (``forward/pipe.mb3``)."""
    group = PIPE if chunk == 0 else f"{PIPE}.c{chunk}"
    if kind == "forward":
        return instruction_region(FORWARD, group, microbatch)
    if kind == "backward":
        return instruction_region(BACKWARD, group, microbatch)
    if kind == "allreduce":
        return instruction_region(COMMUNICATION, "reduce_grads")
    return OPTIMIZER


def cluster_shape(cluster: VirtualCluster) -> PipelineShape:
    """The schedule as the pipeline adapters know it (transfer delays from the link model)."""
    g = cluster.graph()
    nodes = g.schedule.nodes
    return PipelineShape(g.schedule.order, g.preds, tuple(n.kind for n in nodes),
                         tuple(_region(n.kind, n.microbatch, n.chunk) for n in nodes))


class PipelineDriver:
    """Reports every rank's iteration to its engine the way the pipeline adapters report a
    training loop's (see the module docstring), then has the cluster run it.

    Each rank plays its iteration, ``step_end`` included, on its own thread of ``pool`` (an
    exchange inside ``step_begin`` waits for every rank); the cluster then runs the iteration, and
    each engine's meter resolves its steps at its next ``step_end`` (or when it closes)."""

    def __init__(self, pipeline: ClusterPipeline, engines: Sequence[Engine], pool: ThreadPoolExecutor,
                 gather: Optional[LocalAllGather] = None):
        self.pipeline, self.engines, self.pool, self.gather = pipeline, list(engines), pool, gather
        sch = pipeline.cluster.schedule
        shape = cluster_shape(pipeline.cluster)
        self._regions = shape.regions
        self._recv: list[Optional[str]] = []
        for node, deps in zip(sch.nodes, sch.deps):
            p2p = any(kind == "p2p" for _, kind in deps)
            group = "recv_activation" if node.kind == "forward" else "recv_grad"
            self._recv.append(instruction_region(COMMUNICATION, group, node.microbatch) if p2p else None)
        self.iterations = 0

    def _play(self, rank: int) -> None:
        eng, dev = self.engines[rank], self.pipeline.devices[rank]
        dev.at(0)
        eng.step_begin()
        for k, i in enumerate(self.pipeline.cluster.schedule.order[rank]):
            recv = self._recv[i]
            if recv is not None:  # the wait for the previous stage's activation or the next one's gradient
                dev.at(2 * k)
                eng.region_enter(recv)
                dev.at(2 * k + 1)
                eng.region_exit(recv)
            dev.at(2 * k + 1)
            eng.region_enter(self._regions[i])
            dev.at(2 * k + 2)
            eng.region_exit(self._regions[i])
        dev.at(2 * len(self.pipeline.cluster.schedule.order[rank]) + 1)
        # The step ends before the iteration has run, as a live step ends before the GPU gets
        # there: the engine puts in what it still holds (the last exit's restore) at its own marker,
        # and the meter resolves the step at a later poll, once the device has dated its markers.
        eng.step_end()

    def iteration(self) -> None:
        run_ranks(self.pool, self._play, len(self.engines), self.gather)
        self.pipeline.run()
        self.iterations += 1


def _engine_config(run_dir: str, seed: int, *, max_steps: int, max_slowdown: float, explore_max_slowdown: float,
                   block_steps: int, switch_latency_ms: float, issue_ahead: bool) -> KdvfsConfig:
    return KdvfsConfig.from_dict({
        "device": "simulated", "progress": False, "mode": "auto", "run_dir": run_dir, "warmup_steps": WARMUP_STEPS,
        "max_slowdown": max_slowdown, "explore_max_slowdown": explore_max_slowdown,
        "explore_max_steps": max_steps, "window_steps": block_steps, "switch_latency_ms": switch_latency_ms,
        "issue_ahead": issue_ahead, "sim_seed": seed}, source=SOURCE)


def explore_seed_engines(cluster: VirtualCluster, seed: int, *, max_steps: int = 1500, max_slowdown: float = 0.0,
                         explore_max_slowdown: float = 0.02, noise: bool = True,
                         switch_latency_ms: float = DEFAULT_SWITCH_LATENCY_MS, issue_ahead: bool = True,
                         cannot_write: Sequence[int] = (), block_steps: int = BLOCK_STEPS) -> dict:
    """One seed through an engine per rank (mode ``auto``) until every rank's exploration has
    ended or the step budget is spent. Returns the ranks' explorers and engines (closed), the
    iterations run, the exchanges, and the map from the explorers' clock states to the cluster's."""
    from .explore import _quiet_engines

    floor_ms = ISSUE_AHEAD_MIN_INTERVAL_MS if issue_ahead and switch_latency_ms > 0 else 0.0
    switch = switch_model(switch_latency_ms, issue_ahead=issue_ahead, min_interval_ms=floor_ms)
    shape = cluster_shape(cluster)
    ranks = shape.ranks
    pipeline = ClusterPipeline(cluster, seed=seed, noise=noise, switch_latency_s=switch.latency_s,
                               issue_ahead=issue_ahead, min_wait_s=switch.effective_min_interval_s,
                               cannot_write=cannot_write)
    gather = LocalAllGather(ranks)
    with tempfile.TemporaryDirectory() as run_dir, _quiet_engines(), ThreadPoolExecutor(ranks) as pool:
        cfg = _engine_config(run_dir, seed, max_steps=max_steps, max_slowdown=max_slowdown,
                             explore_max_slowdown=explore_max_slowdown, block_steps=block_steps,
                             switch_latency_ms=switch_latency_ms, issue_ahead=issue_ahead)
        engines = [Engine(cfg, framework="kdvfs simulate", rank=r, world_size=ranks, device=pipeline.devices[r],
                          explorer_factory=stage_explorer(shape, r, gather.for_rank(r))).start()
                   for r in range(ranks)]
        drive = PipelineDriver(pipeline, engines, pool, gather)
        # the exploration starts at the first window boundary after warm-up; a block's energy can
        # reach the exchange one block late
        limit = block_steps * (-(-WARMUP_STEPS // block_steps)) + max_steps + 3 * block_steps
        try:
            while drive.iterations < limit and not all(e.explore_result is not None for e in engines):
                drive.iteration()
        finally:
            for eng in engines:
                eng.close()
    explorers = [eng.explorer for eng in engines]
    return {"explorers": explorers, "engines": engines, "steps_run": drive.iterations,
            "exchanges": gather.calls, "to_cluster": _state_map(cluster, explorers[0].s.clocks)}


def _state_map(cluster: VirtualCluster, clocks) -> list[int]:
    index = {c: k for k, c in enumerate(cluster.states)}
    return [index[c] for c in clocks]


def _execute(cluster: VirtualCluster, plan: Optional[ClusterPlan], seed: int, noise: bool, switch,
             issue_ahead: bool, iterations: int, first: int) -> tuple[float, float]:
    """Mean iteration time and energy of ``plan`` over ``iterations`` iterations of ``seed``."""
    t = e = 0.0
    for it in range(iterations):
        run = cluster.execute(plan, noise=noise, seed=seed, switch_latency_s=switch.latency_s,
                              issue_ahead=issue_ahead, iteration=first + it)
        t += run.time_s
        e += run.energy_j
    return t / iterations, e / iterations


def _agree(explorers) -> bool:
    results = [ex.result for ex in explorers]
    return all(r is not None for r in results) and all(
        (r.status, r.assignment, r.steps) == (results[0].status, results[0].assignment, results[0].steps)
        for r in results)


def pipeline_explore_report(stages: int = 4, microbatches: int = 8, seeds: Sequence[int] = range(5), *,
                            schedule: str = "1f1b", replicas: int = 1, straggler: Optional[Straggler] = None,
                            stage_traces: Optional[Sequence[str]] = None, max_steps: int = 1500,
                            max_slowdown: float = 0.0, explore_max_slowdown: float = 0.02, noise: bool = True,
                            switch_latency_ms: float = DEFAULT_SWITCH_LATENCY_MS, issue_ahead: bool = True,
                            progress=None) -> dict:
    """Explore on each seed, execute the applied plans and the oracle's; the one-GPU contract."""
    t0 = _time.process_time()
    latency_ms = check_latency_ms(switch_latency_ms, "--switch-latency-ms", source=SOURCE)
    if not issue_ahead:
        raise ConfigError("--no-issue-ahead", True, "changes issued ahead for --explore on a pipeline (the "
                          "explorer plans with the latency hidden); drop --no-issue-ahead", source=SOURCE)
    workloads, chunks = stage_workloads(stages, stage_traces, schedule)
    cluster = VirtualCluster(workloads, microbatches, replicas=replicas, schedule=schedule, straggler=straggler,
                             chunks=chunks)
    floor_ms = ISSUE_AHEAD_MIN_INTERVAL_MS if latency_ms > 0 else 0.0
    switch = switch_model(latency_ms, issue_ahead=True, min_interval_ms=floor_ms)
    rows, orc_e, orc_t = [], [], []
    for seed in seeds:
        out = explore_seed_engines(cluster, seed, max_steps=max_steps, max_slowdown=max_slowdown,
                                   explore_max_slowdown=explore_max_slowdown, noise=noise,
                                   switch_latency_ms=latency_ms)
        exs = out["explorers"]
        res = exs[0].result
        first = 10 ** 6  # executed iterations draw jitter apart from the exploration's
        t_def, e_def = _execute(cluster, None, seed, noise, switch, True, EXECUTE_ITERATIONS, first)
        applied = res is not None and res.status == "applied"
        de = dt = 0.0
        if applied:
            to_c = out["to_cluster"]
            plan = ClusterPlan(tuple(to_c[s] for s in res.assignment.node_state),
                               tuple(None if w is None else to_c[w] for w in res.assignment.wait_state),
                               switch.effective_min_interval_s)
            t, e = _execute(cluster, plan, seed, noise, switch, True, EXECUTE_ITERATIONS, first)
            de, dt = e / e_def - 1.0, t / t_def - 1.0
        orc = plan_critical_path(_graph(cluster, seed if noise else None), max_slowdown=max_slowdown, switch=switch)
        t, e = _execute(cluster, ClusterPlan(orc.node_state, orc.wait_state, orc.min_wait_s), seed, noise, switch,
                        True, EXECUTE_ITERATIONS, first)
        orc_e.append(e / e_def - 1.0)
        orc_t.append(t / t_def - 1.0)
        rows.append({"seed": seed, "energy_change": de, "time_change": dt,
                     "steps": int(res.steps) if res is not None else out["steps_run"],
                     "exploration_time_change": float(res.exploration_time_change if res is not None
                                                      else exs[0].exploration_time_change),
                     "applied": applied, "status": res.status if res is not None else "unfinished",
                     "message": res.message if res is not None else "",
                     "predicted": dict(res.predicted) if res is not None else {},
                     "validated": dict(res.validated) if res is not None else {},
                     "exchanges": out["exchanges"], "ranks_agree": _agree(exs)})
        if progress is not None:
            progress(1)
    oe, ot = float(np.median(orc_e)), float(np.median(orc_t))
    for r in rows:
        r["share_of_oracle_saving"] = (r["energy_change"] / oe) if oe < 0 else None
    shares = [r["share_of_oracle_saving"] for r in rows if r["share_of_oracle_saving"] is not None]
    return {
        "label": LABEL, "model_prediction": True,
        "path": "live engine per rank (mode auto: actuator, meter, pipeline explorer) on a simulated rank of the "
                "virtual cluster, the pipeline adapters' regions per instruction, explorers exchanging through an "
                "all-gather",
        "stages": cluster.schedule.stages, "chunks": chunks, "microbatches": microbatches, "schedule": schedule,
        "replicas": replicas, "ranks": cluster.ranks, "stage_traces": [w.name for w in workloads],
        "straggler": None if straggler is None else {"rank": straggler.rank, "factor": straggler.factor},
        "max_slowdown": max_slowdown, "explore_max_slowdown": explore_max_slowdown, "explore_max_steps": max_steps,
        "switch_latency_ms": latency_ms, "issue_ahead": True, "noise": noise,
        "meter": "the engine's meter: instant power readings (100 ms field) integrated and anchored to the counter",
        "oracle": "critical_path " + ("strict" if max_slowdown == 0 else f"relaxed {max_slowdown:.0%}")
                  + " on each card's true tables, executed",
        "oracle_energy_change": oe, "oracle_time_change": ot,
        "seeds": rows,
        "summary": seeds_summary(rows, shares),
        "cpu_s": _time.process_time() - t0,
    }


def format_report(out: dict, fmt: str = "text") -> str:
    """The seeds as a table (``fmt``: ``text`` or ``markdown``), the oracle in a note."""
    from ..tables import Table

    chunks = f" x {out['chunks']} model chunks" if out.get("chunks", 1) > 1 else ""
    table = Table(["seed", "energy", "time", "plan", "iterations", "exploration slowdown", "share of oracle"],
                  [seed_row(r) for r in out["seeds"]],
                  align="lrrlrrr",
                  title=(f"{out['label']}: online exploration across stages, {out['stages']} stages{chunks} x "
                         f"{out['replicas']} replicas, {out['microbatches']} microbatches, {out['schedule']}, "
                         f"switch latency {out['switch_latency_ms']:g} ms"),
                  notes=[f"oracle plan ({out['oracle']}): energy {out['oracle_energy_change']:+.2%}, "
                         f"time {out['oracle_time_change']:+.2%}", out["meter"]])
    return table.render(fmt)


def run_command(args, stages: int, straggler: Optional[Straggler], traces: Optional[Sequence[str]],
                latency_ms: float) -> int:
    """``kdvfs simulate --pipeline P --explore``."""
    from ..progress import progress

    if args.seeds < 1:
        raise ConfigError("--seeds", args.seeds, "at least 1", source=SOURCE)
    with progress(args.seeds, "exploring seeds") as bar:
        out = pipeline_explore_report(stages, args.microbatches, range(args.seed, args.seed + args.seeds),
                                      schedule=args.schedule, replicas=args.dp, straggler=straggler,
                                      stage_traces=traces, max_steps=args.explore_max_steps,
                                      max_slowdown=args.explore_plan_slowdown,
                                      explore_max_slowdown=args.explore_max_slowdown, noise=not args.no_noise,
                                      switch_latency_ms=latency_ms, issue_ahead=not args.no_issue_ahead,
                                      progress=bar.update)
    fmt = "markdown" if getattr(args, "markdown", False) else "text"
    print(json.dumps(out, indent=1) if args.json else format_report(out, fmt))
    return 0
