"""Pipeline exploration through an engine per rank, on simulated ranks of the virtual cluster."""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.config import KdvfsConfig
from kdvfs_plugins.devices.cluster_rank import ClusterPipeline
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.errors import ConfigError
from kdvfs_plugins.pipeline_explore import PipelineExplorer, StageExploreResult
from kdvfs_plugins.regions import STEP
from kdvfs_plugins.sim.cluster import VirtualCluster
from kdvfs_plugins.studies.pipeline import stage_workloads
from kdvfs_plugins.studies.pipeline_explore import PipelineDriver, cluster_shape, explore_seed_engines


def _fixed_engines(cluster, region_clocks_by_rank, tmp, **pipeline_kw):
    pipeline = ClusterPipeline(cluster, **pipeline_kw)
    engines = []
    for r, dev in enumerate(pipeline.devices):
        regions = {k: v.to_dict() for k, v in region_clocks_by_rank.get(r, {}).items()}
        cfg = KdvfsConfig.from_dict({"device": "simulated", "progress": False, "run_dir": tmp, "warmup_steps": 0,
                                     "mode": "apply" if regions else "observe", "region_clocks": regions})
        engines.append(Engine(cfg, rank=r, device=dev).start())
    return pipeline, engines


def test_every_engine_explores_with_a_pipeline_explorer_and_all_end_with_one_plan(pipeline_explored):
    engines = pipeline_explored["engines"]
    assert all(isinstance(e.explorer, PipelineExplorer) for e in engines)
    results = [e.explore_result for e in engines]
    assert all(isinstance(r, StageExploreResult) for r in results)
    assert len({(r.status, r.pipeline.assignment, r.steps) for r in results}) == 1
    assert results[0].status == "applied", results[0].message
    assert results[0].validated["energy_change"] < 0
    assert pipeline_explored["exchanges"] >= 10
    # each engine keeps its own regions' clocks, its waits under the step
    shape = engines[0].explorer.s.shape
    for r, res in enumerate(results):
        assert set(res.clocks_by_name) == {shape.regions[i] for i in shape.order[r]} | {STEP}


def test_the_meter_windows_reach_every_rank_through_the_exchange(pipeline_explored):
    ex = pipeline_explored["explorers"][0]
    # every rank's window energies became rows of the power fit on rank 0
    assert set(ex.tables.rows) == {0, 1} and all(len(rows) > 10 for rows in ex.tables.rows.values())
    measured = [b for b in ex.blocks if b.data]
    assert measured and all(set(b.data) == {0, 1} for b in measured)
    # the engines' records are the meter's: instruction times from markers, windows from power readings
    eng = pipeline_explored["engines"][1]
    assert eng.meter.windows and eng.meter.sampler is not None and eng.meter.sampler.reads > 100


def test_instruction_times_and_energy_are_the_clusters(pipeline_cluster):
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        pipeline, engines = _fixed_engines(pipeline_cluster, {}, tmp, seed=3)
        drive = PipelineDriver(pipeline, engines, pool)
        drive.iteration()  # the first step is profiled
        run = pipeline.last_run
        assert not engines[1].meter.steps  # resolved at the next poll, as a live step
        drive.iteration()
        rec = engines[1].meter.steps[0]
        shape = cluster_shape(pipeline_cluster)
        for i in shape.order[1]:
            assert rec.region_time_ms[shape.regions[i]] == pytest.approx((run.node_end_s[i] - run.node_start_s[i]) * 1e3)
        assert rec.gpu_time_ms == pytest.approx(run.time_s * 1e3)
        dev = pipeline.devices[1]
        assert dev.energy_j == pytest.approx(run.ranks[1].energy_j + pipeline.last_run.ranks[1].energy_j)
        assert dev.now_s == pytest.approx(run.time_s + pipeline.last_run.time_s)
        for e in engines:
            e.close()


def test_requested_clocks_become_the_clusters_plan(pipeline_cluster):
    low = ClockPair(990, 2619)
    wait = ClockPair(345, 1593)
    shape = cluster_shape(pipeline_cluster)
    fwd = [shape.regions[i] for i in shape.order[0] if shape.kinds[i] == "forward"]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        pipeline, engines = _fixed_engines(pipeline_cluster, {0: {**{r: low for r in fwd}, STEP: wait}}, tmp, noise=False)
        drive = PipelineDriver(pipeline, engines, pool)
        drive.iteration()
        states = {c: k for k, c in enumerate(pipeline_cluster.states)}
        run = pipeline.last_run
        segs = run.segments[0]
        assert {s.state for s in segs if s.kind == "forward"} == {states[low]}
        # a region without clocks of its own takes the step's (the plan's fallback), as the waits do
        assert {s.state for s in segs if s.kind == "backward"} == {states[wait]}
        assert {s.state for s in segs if s.kind == "wait"} == {states[wait]}
        assert {s.state for s in run.segments[1]} == {0}  # rank 1 asked for nothing
        for e in engines:
            e.close()


def test_a_rank_whose_waits_ask_for_two_clocks_is_refused_with_what_to_do(pipeline_cluster):
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        regions = {STEP: ClockPair(345, 1593), "communication": ClockPair(990, 2619)}
        pipeline, engines = _fixed_engines(pipeline_cluster, {1: regions}, tmp, noise=False)
        with pytest.raises(ConfigError, match="one clock for all of a rank's waits"):
            PipelineDriver(pipeline, engines, pool).iteration()
        for e in engines:
            e.close()


def test_a_rank_that_cannot_write_clocks_is_left_out_and_nothing_deadlocks(pipeline_cluster):
    out = explore_seed_engines(pipeline_cluster, 1, max_steps=400, cannot_write=(1,))
    results = [e.explore_result for e in out["engines"]]
    assert all(r is not None for r in results) and len({r.steps for r in results}) == 1
    assert out["explorers"][1].measuring is False
    ex = out["explorers"][0]
    assert 1 not in ex.tables.rows  # its energies are left out
    a = results[0].pipeline.assignment
    if a is not None:
        assert all(a.node_state[i] == 0 for i in ex.s.shape.order[1]) and a.wait_state[1] is None


def test_a_window_that_closes_after_the_boundary_goes_out_one_boundary_later():
    from kdvfs_plugins.clocks import ClockTable
    from kdvfs_plugins.data import h100_clock_lists
    from kdvfs_plugins.pipeline_explore import PipelineExploreSettings, default_grid

    w, _ = stage_workloads(1)
    shape = cluster_shape(VirtualCluster(w, 2))
    s = PipelineExploreSettings(shape=shape, rank=0, clocks=default_grid(ClockTable.from_lists(*h100_clock_lists())),
                                block_steps=2)
    ex = PipelineExplorer(s)
    regions = {shape.regions[i]: 5.0 for i in shape.order[0]}
    for step in (0, 1):
        ex.begin_step(step)
        ex.observe_step(step, 20.0, regions)
    ex.begin_step(2)
    assert not ex.blocks[0].data  # its window is not in yet: held back
    ex.observe_window(0, 1, 30.0)  # the meter closes it once a reading after its end came in
    for step in (2, 3):
        ex.observe_step(step, 20.0, regions)
    ex.observe_window(2, 3, 30.0)
    ex.begin_step(4)
    sent = ex.blocks[0].data[0]
    assert sent.energy_steps == 2 and len(sent.step_ms) == 2 and ex.blocks[1].data[0].energy_steps == 2
    ex.observe_window(0, 1, 99.0)  # anything later for a block sent is dropped
    ex.begin_step(6)
    assert ex.blocks[0].data[0] is sent
