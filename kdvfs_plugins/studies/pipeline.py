"""Pipeline study: plans for a pipeline-parallel iteration, executed on the virtual cluster.

``kdvfs simulate --pipeline P --microbatches M [--schedule 1f1b|gpipe] [--dp D]
[--straggler RANK:FACTOR] [--stage-traces a.csv,...] --compare --json`` prints what
:func:`pipeline_compare` returns. Every figure is a model prediction of the simulated H100 cluster.

API
---
``pipeline_compare(stages=4, microbatches=8, *, schedule="1f1b", replicas=1, straggler=None,
stage_traces=None, switch_latency_ms=DEFAULT, issue_ahead=True, min_interval_ms=0.0, noise=True,
seed=0) -> PipelineStudy``
    ``PipelineStudy.data``: the JSON contract (``rows``: one per planner, ``default``, ``per_gpu``,
    ``envpipe``, ``critical_path``, each with ``objective``, ``planned_time_change``,
    ``executed_time_change``, ``executed_energy_change`` and ``per_rank``; ``model_prediction``:
    true). ``PipelineStudy.runs``: the executed :class:`~kdvfs_plugins.sim.cluster.ClusterRun` of each
    planner (for the timeline figure).

"Planned" is the plan evaluated on the schedule's graph (no noise, changes on their boundaries);
"executed" is the plan run on the virtual cluster, with the switch latency and seeded noise,
against the default clocks run with the same seed.

With a straggler, every planner plans on the cluster as it is (re-planned to the straggler's pace),
and each row also gives ``without_replanning``: the plan made for the healthy cluster, executed on
the cluster with the straggler.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..errors import ConfigError
from ..pipeline_planner import (PipelineGraph, PipelinePlan, clocks_summary, default_plan, plan_critical_path,
                                plan_envpipe, plan_per_gpu)
from ..switching import DEFAULT_SWITCH_LATENCY_MS, ISSUE_AHEAD_MIN_INTERVAL_MS, check_latency_ms, switch_model
from ..sim.cluster import (ClusterPlan, ClusterRun, Links, StageWorkload, Straggler, VirtualCluster,
                           shipped_stage_workloads)
from ..sim.trace import Trace

__all__ = ["LABEL", "PipelineStudy", "pipeline_compare", "parse_straggler", "stage_workloads", "ASSUMPTIONS"]

LABEL = "model prediction (simulated H100 cluster)"
SOURCE = "kdvfs simulate"

ISSUED_AHEAD = ("clock changes are issued ahead, re-anchored at each boundary the GPU reaches, from the previous "
                "iteration's timing (its card factors, not its jitter)")
AT_THE_BOUNDARY = ("clock changes are requested at the boundary the GPU reaches and land one switch latency later "
                   "(the planners plan for that; waits keep the clock in force)")
#: Printed with every result: what the figures rest on besides the calibrated H100 model.
ASSUMPTIONS = (
    "one power controller per instruction: each instruction is costed once per clock state (consecutive "
    "same-category kernels merged; the default replayed until the controller settles, a lock as the "
    "steady-state mix), with no memory of the instruction before it",
    "a wait draws the measured 124 W at the default clock and 72 W idle at 345 MHz; at a locked clock "
    "in between it is interpolated along the model's static power curve (not measured)",
    "point-to-point transfers at 329 GB/s (the measured all-reduce bus bandwidth of 2 x H100 of one "
    "host) plus 10 us; the gradient all-reduce is a ring at 329 GB/s after the last backward",
    ISSUED_AHEAD,
    "instruction clocks per (stage, instruction, microbatch); no clock changes inside an instruction",
)


@dataclass(frozen=True)
class PipelineStudy:
    data: dict
    runs: Mapping[str, ClusterRun]


def parse_straggler(value: Optional[str]) -> Optional[Straggler]:
    """``RANK:FACTOR`` (e.g. ``1:1.1``: rank 1 10% slower) -> Straggler; None -> None."""
    if value is None:
        return None
    rank, sep, factor = str(value).partition(":")
    try:
        if not sep:
            raise ValueError
        return Straggler(int(rank), float(factor))
    except ValueError:
        raise ConfigError("--straggler", value, "RANK:FACTOR, e.g. 1:1.1 for rank 1 running 10% slower",
                          source=SOURCE) from None


def stage_workloads(stages: int, stage_traces: Optional[Sequence[str]] = None,
                    schedule: str = "1f1b") -> tuple[tuple[StageWorkload, ...], int]:
    """(workloads, model chunks per stage): the user's traces (one per stage; for ``interleaved``
    one per virtual stage, a multiple of the stages) or the shipped GPT stage traces."""
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ConfigError("--pipeline", stages, "a number of stages >= 1, e.g. --pipeline 4", source=SOURCE)
    interleaved = schedule == "interleaved"
    if not stage_traces:
        if not interleaved:
            return shipped_stage_workloads(stages), 1
        if stages != 2:
            raise ConfigError("--pipeline", stages, "2 for the interleaved schedule on the shipped GPT stage traces "
                              "(their four stages become two model chunks per stage); for more stages give "
                              "stages x chunks traces with --stage-traces", source=SOURCE)
        return shipped_stage_workloads(4), 2
    paths = [str(p) for p in stage_traces]
    if interleaved and (len(paths) % stages or len(paths) < 2 * stages):
        raise ConfigError("--stage-traces", ",".join(paths),
                          f"for --schedule interleaved, one trace per virtual stage: a multiple of {stages} and at "
                          f"least {2 * stages} files for --pipeline {stages} (got {len(paths)}), "
                          "in virtual-stage order",
                          source=SOURCE)
    if not interleaved and len(paths) != stages:
        raise ConfigError("--stage-traces", ",".join(paths),
                          f"one trace per stage: {stages} files for --pipeline {stages} (got {len(paths)}); "
                          "give them comma-separated in stage order, or change --pipeline", source=SOURCE)
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError("--stage-traces", p, f"not found: {Path(p).resolve()}; give kernel trace CSVs "
                              "(kdvfs trace records one), one per stage", source=SOURCE)
        out.append(StageWorkload.from_trace(Trace.from_csv(p), name=Path(p).name))
    return tuple(out), len(paths) // stages


def _graph(cluster: VirtualCluster, card_seed: Optional[int]) -> PipelineGraph:
    g = cluster.graph(card_seed)
    return PipelineGraph(g.schedule.order, g.preds, g.time_s, g.energy_j, g.wait_power_w,
                         tuple(n.kind for n in g.schedule.nodes))


#: The key of the optional relaxed critical-path row.
RELAXED = "critical_path_relaxed"


def _plans(cluster: VirtualCluster, switch, card_seed: Optional[int],
           max_slowdown: Optional[float] = None) -> dict[str, PipelinePlan]:
    """Every planner's plan, on the costs as each GPU would measure them (its card factors with
    noise; the model's without); with ``max_slowdown``, also the critical path within that budget."""
    pg = _graph(cluster, card_seed)
    states = cluster.states
    top_mem = max(s.mem_mhz for s in states if s is not None)
    sm_states = [k for k, s in enumerate(states) if s is not None and s.mem_mhz == top_mem]
    plans = {
        "default": default_plan(pg),
        "per_gpu": plan_per_gpu(pg, clocks=states, switch=switch),
        "envpipe": plan_envpipe(pg, sm_states=sm_states, switch=switch),
        "critical_path": plan_critical_path(pg, switch=switch),
    }
    if max_slowdown:
        plans[RELAXED] = plan_critical_path(pg, max_slowdown=max_slowdown, switch=switch)
    return plans


def _cluster_plan(p: PipelinePlan) -> ClusterPlan:
    return ClusterPlan(p.node_state, p.wait_state, p.min_wait_s)


def _per_rank(run: ClusterRun, base: ClusterRun, clocks: list) -> list[dict]:
    return [{"rank": r.rank, "stage": r.stage, "replica": r.replica, "busy_s": round(r.busy_s, 6),
             "wait_s": round(r.wait_s, 6), "energy_j": round(r.energy_j, 3),
             "executed_energy_change": r.energy_j / b.energy_j - 1.0, "clock_changes": r.clock_changes,
             "clocks": {"instructions": c["instructions"], "waits": c["waits"]}}
            for r, b, c in zip(run.ranks, base.ranks, clocks)]


def pipeline_compare(stages: int = 4, microbatches: int = 8, *, schedule: str = "1f1b", replicas: int = 1,
                     straggler: Optional[Straggler] = None, stage_traces: Optional[Sequence[str]] = None,
                     switch_latency_ms: float = DEFAULT_SWITCH_LATENCY_MS, issue_ahead: bool = True,
                     min_interval_ms: float = 0.0, noise: bool = True, seed: int = 0,
                     max_slowdown: Optional[float] = None, links: Links = Links()) -> PipelineStudy:
    """Plan with every planner, execute on the virtual cluster, compare with the default clocks.

    ``max_slowdown`` (a fraction > 0): one more ``critical_path`` row within that budget."""
    if max_slowdown is not None and not (0 <= max_slowdown <= 1):
        raise ConfigError("--max-slowdown", max_slowdown, "a fraction between 0 and 1, e.g. 0.05", source=SOURCE)
    latency_ms = check_latency_ms(switch_latency_ms, "--switch-latency-ms", source=SOURCE)
    floor_ms = check_latency_ms(min_interval_ms, "--min-interval-ms", source=SOURCE)
    if issue_ahead and latency_ms > 0:
        # Changes issued ahead rely on the previous iteration's timing: the actuator's floor.
        floor_ms = max(floor_ms, ISSUE_AHEAD_MIN_INTERVAL_MS)
    switch = switch_model(latency_ms, issue_ahead=issue_ahead, min_interval_ms=floor_ms)
    workloads, chunks = stage_workloads(stages, stage_traces, schedule)
    cluster = VirtualCluster(workloads, microbatches, replicas=replicas, schedule=schedule, links=links,
                             straggler=straggler, chunks=chunks)
    healthy = VirtualCluster(workloads, microbatches, replicas=replicas, schedule=schedule, links=links,
                             chunks=chunks) if straggler is not None else cluster

    def run(p: PipelinePlan) -> ClusterRun:
        return cluster.execute(_cluster_plan(p), noise=noise, seed=seed, switch_latency_s=switch.latency_s,
                               issue_ahead=issue_ahead)

    card_seed = seed if noise else None
    plans = _plans(cluster, switch, card_seed, max_slowdown)
    healthy_plans = _plans(healthy, switch, card_seed, max_slowdown) if straggler is not None else plans
    runs = {name: run(p) for name, p in plans.items()}
    base = runs["default"]
    graph = cluster.graph()
    pg = _graph(cluster, None)
    rows = []
    for name in plans:
        p, r = plans[name], runs[name]
        row = {"planner": p.planner, "objective": p.objective,
               "planned_time_change": p.time_change, "planned_energy_change": p.energy_change,
               "executed_time_change": r.time_s / base.time_s - 1.0,
               "executed_energy_change": r.energy_j / base.energy_j - 1.0,
               "executed_time_s": r.time_s, "executed_energy_j": r.energy_j,
               "clock_changes": sum(x.clock_changes for x in r.ranks),
               "per_rank": _per_rank(r, base, clocks_summary(p, pg, graph.states))}
        if straggler is not None:
            hp = healthy_plans[name]
            hr = run(hp)
            row["without_replanning"] = {
                "planned_time_change": hp.time_change, "planned_energy_change": hp.energy_change,
                "executed_time_change": hr.time_s / base.time_s - 1.0,
                "executed_energy_change": hr.energy_j / base.energy_j - 1.0}
        rows.append(row)
    g = graph
    data = {
        "label": LABEL, "model_prediction": True,
        "stages": cluster.schedule.stages, "chunks": chunks, "microbatches": microbatches, "schedule": schedule,
        "replicas": replicas,
        "ranks": cluster.ranks, "stage_traces": [w.name for w in workloads],
        "switch_latency_ms": latency_ms, "issue_ahead": issue_ahead, "min_interval_ms": switch.min_interval_s * 1e3,
        "noise": noise, "seed": seed,
        "default": {"iteration_time_s": base.time_s, "energy_j": base.energy_j},
        "wait_power_w": {"default": float(g.wait_power_w[0]), "lowest": float(g.wait_power_w.min())},
        "straggler": None,
        "rows": rows,
        "assumptions": [a if a != ISSUED_AHEAD or issue_ahead or latency_ms == 0 else AT_THE_BOUNDARY
                        for a in ASSUMPTIONS],
    }
    if straggler is not None:
        plain = healthy.execute(noise=noise, seed=seed)
        data["straggler"] = {"rank": straggler.rank, "factor": straggler.factor,
                             "default_time_change": base.time_s / plain.time_s - 1.0,
                             "default_energy_change": base.energy_j / plain.energy_j - 1.0}
    return PipelineStudy(data, runs)
