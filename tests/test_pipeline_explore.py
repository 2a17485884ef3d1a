"""Online exploration across pipeline stages (kdvfs_plugins/pipeline_explore.py) on the virtual cluster."""
from __future__ import annotations

import json
import threading

import pytest

from kdvfs_plugins.distributed import LocalAllGather
from kdvfs_plugins.pipeline_explore import PipelineExploreSettings, PipelineExplorer, default_grid
from kdvfs_plugins.studies.pipeline_explore import (cluster_shape, explore_seed_engines,
                                                     pipeline_explore_report)


def test_every_rank_ends_with_the_same_plan_at_the_same_iteration(pipeline_explored):
    results = [ex.result for ex in pipeline_explored["explorers"]]
    assert all(r is not None for r in results)
    assert len({(r.status, r.assignment, r.steps, r.node_clocks) for r in results}) == 1
    assert results[0].status == "applied", results[0].message
    assert results[0].validated["energy_change"] < 0
    assert pipeline_explored["exchanges"] >= 10


def test_exchange_carries_every_ranks_measurements(pipeline_explored):
    ex = pipeline_explored["explorers"][0]
    measured = [b for b in ex.blocks if b.data]
    assert measured and all(set(b.data) == {0, 1} for b in measured)
    # rank 0 holds rank 1's times and energies, which it never measured itself
    other = ex.s.shape.order[1]
    assert (ex.tables.time_n[list(other), 0] > 0).all()
    assert len(ex.tables.rows[1]) > 10


def test_a_plan_that_is_too_slow_is_refused(pipeline_cluster):
    out = explore_seed_engines(pipeline_cluster, 0, max_steps=400)
    ex = out["explorers"][0]
    # the same measurements judged against a budget the plan cannot meet
    vb = [b for b in ex.blocks if b.kind.startswith("validate")]
    for e in out["explorers"]:
        e.result = None
        e.replans = 1
        e.s = type(e.s)(**{**e.s.__dict__, "time_tolerance": -0.05})
        e._judge(ex.blocks[-1].first_step)
    r = out["explorers"][0].result
    assert vb and r.status == "rejected" and "slowdown exceeds the budget" in r.message
    assert all(e.result.assignment is None for e in out["explorers"])


def test_several_ranks_need_an_exchange(pipeline_cluster):
    shape = cluster_shape(pipeline_cluster)
    from kdvfs_plugins.clocks import ClockTable
    from kdvfs_plugins.data import h100_clock_lists

    s = PipelineExploreSettings(shape=shape, rank=0, clocks=default_grid(ClockTable.from_lists(*h100_clock_lists())))
    with pytest.raises(ValueError, match="exchange"):
        PipelineExplorer(s)


def test_local_all_gather_gives_every_rank_all_items_in_rank_order():
    g = LocalAllGather(3, timeout_s=10)
    got = {}

    def run(r):
        got[r] = g.for_rank(r)([r * 10])

    threads = [threading.Thread(target=run, args=(r,)) for r in (2, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == [[0], [10], [20]] for v in got.values())


def test_report_contract(pipeline_cluster):
    out = pipeline_explore_report(2, 3, seeds=[0], max_steps=400)
    json.dumps(out)
    assert out["model_prediction"] is True and out["oracle_energy_change"] < 0
    row = out["seeds"][0]
    for key in ("seed", "energy_change", "time_change", "steps", "exploration_time_change", "applied", "status",
                "share_of_oracle_saving"):
        assert key in row
    assert row["ranks_agree"] and row["steps"] <= 400
    assert row["exploration_time_change"] <= 0.02
    assert set(out["summary"]) >= {"energy_change", "share_of_oracle_saving", "exploration_time_change"}
