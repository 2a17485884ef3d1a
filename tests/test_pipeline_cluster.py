"""The virtual cluster: schedules, dependences, the longest path, waits and stragglers (model)."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.errors import ConfigError
from kdvfs_plugins.sim.cluster import (Chunk, ClusterPlan, InstructionWork, Links, StageWorkload, Straggler,
                                       VirtualCluster, build_schedule, shipped_stage_workloads, wait_power_w)

NO_LINK = Links(p2p_latency_s=0.0, activation_bytes=0.0)


def _uniform(stages: int) -> tuple[StageWorkload, ...]:
    """Identical stages of pure matrix products: forward 1 ms, backward 2 ms, optimizer 0.5 ms."""
    def work(kind, ms):
        return InstructionWork(kind, (Chunk("gemm", ms * 1e-3),), 0.0, 1)

    return tuple(StageWorkload(f"s{i}", work("forward", 1), work("backward", 2), work("optimizer", 0.5))
                 for i in range(stages))


STATES = (None, ClockPair(1980, 2619), ClockPair(1200, 2619), ClockPair(345, 2619))


def test_sim_imports_no_core_policy():
    """sim/ is the virtual hardware only."""
    tree = ast.parse(Path("kdvfs_plugins/sim/cluster.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    allowed = {"__future__", "dataclasses", "functools", "typing", "clocks", "data", "errors", "gpu", "model", "trace"}
    assert mods <= allowed, mods - allowed


def test_1f1b_holds_at_most_p_minus_s_microbatches_gpipe_all():
    p, m = 4, 8
    for name, bound in (("1f1b", lambda s: p - s), ("gpipe", lambda s: m)):
        sch = build_schedule(p, m, schedule=name)
        for s in range(p):
            kinds = [sch.nodes[i].kind for i in sch.order[s]]
            assert kinds.count("forward") == m and kinds.count("backward") == m and kinds[-1] == "optimizer"
            live = peak = 0
            for k in kinds:
                live += (k == "forward") - (k == "backward")
                peak = max(peak, live)
            assert peak == bound(s), (name, s, peak)


def test_uniform_stages_bubble_time_is_the_textbook_figure_for_both_schedules():
    p, m = 4, 8
    for name in ("1f1b", "gpipe"):
        c = VirtualCluster(_uniform(p), m, schedule=name, links=NO_LINK, states=STATES)
        g, seq = c.graph(), c.schedule.order[0]
        first_b = [i for i in seq if c.schedule.nodes[i].kind == "backward"][0]
        tf, tb, to = (float(g.time_s[i, 0]) for i in (seq[0], first_b, seq[-1]))
        run = c.execute(noise=False)
        assert run.time_s == pytest.approx((m + p - 1) * (tf + tb) + to, rel=1e-9)
        for r in run.ranks:  # every stage idles (P-1)(tF + tB): the pipeline bubble
            assert r.wait_s == pytest.approx((p - 1) * (tf + tb), rel=1e-9)
    gaps = {}
    for name in ("1f1b", "gpipe"):
        run = VirtualCluster(_uniform(p), m, schedule=name, links=NO_LINK, states=STATES).execute(noise=False)
        gaps[name] = [sum(1 for s in segs if s.kind == "wait") for segs in run.segments]
    # GPipe: stage 0 waits only between its forwards and backwards; the middle stages also before
    # their forwards and after their optimizer; the last stage before its forwards and at the end.
    # 1F1B breaks the same bubble time into more, shorter waits.
    assert gaps["gpipe"] == [1, 3, 3, 2]
    assert sum(gaps["1f1b"]) > sum(gaps["gpipe"])


def _longest_path(c: VirtualCluster, state: int = 0) -> float:
    g, sch = c.graph(), c.schedule
    prev = {b: a for seq in sch.order for a, b in zip(seq, seq[1:])}

    @lru_cache(maxsize=None)
    def finish(i: int) -> float:
        ins = [finish(p) + d for p, d in g.preds[i]] + ([finish(prev[i])] if i in prev else [])
        return max(ins, default=0.0) + float(g.time_s[i, state])

    return max(finish(i) for i in range(len(sch.nodes)))


@pytest.mark.parametrize("schedule,replicas", [("1f1b", 1), ("gpipe", 1), ("1f1b", 2)])
def test_dependences_respected_and_iteration_is_the_longest_path(schedule, replicas):
    c = VirtualCluster(shipped_stage_workloads(2), 4, replicas=replicas, schedule=schedule, states=STATES)
    run = c.execute(noise=False)
    g = c.graph()
    for i, preds in enumerate(g.preds):
        for p, d in preds:
            assert run.node_start_s[i] >= run.node_end_s[p] + d - 1e-12
    for seq in c.schedule.order:
        for a, b in zip(seq, seq[1:]):
            assert run.node_start_s[b] >= run.node_end_s[a] - 1e-12
    assert run.time_s == pytest.approx(_longest_path(c), rel=1e-12)
    if replicas > 1:  # the all-reduce waits for every replica of its stage
        ar = [n for n in c.schedule.nodes if n.kind == "allreduce"]
        assert len(ar) == c.ranks and all(g.time_s[n.index, 0] > 0 for n in ar)


def test_wait_power_is_the_measured_pair_at_the_ends():
    w = wait_power_w((None, ClockPair(1980, 2619), ClockPair(1200, 2619), ClockPair(345, 2619)))
    assert w[0] == pytest.approx(124.26) and w[1] == pytest.approx(124.26)
    assert w[3] == pytest.approx(71.664)
    assert w[3] < w[2] < w[1]


def test_waits_at_the_lowest_clock_cost_less_and_take_no_time():
    c = VirtualCluster(shipped_stage_workloads(2), 4, states=STATES)
    base = c.execute(noise=False)
    low = c.execute(ClusterPlan(c.default_plan().node_state, (3, 3)), noise=False)
    assert low.time_s == base.time_s and low.energy_j < base.energy_j


def test_straggler_slows_its_rank_only():
    w = shipped_stage_workloads(2)
    c = VirtualCluster(w, 4, straggler=Straggler(1, 1.1), states=STATES)
    h = VirtualCluster(w, 4, states=STATES)
    for n in c.schedule.nodes:
        f = 1.1 if n.rank == 1 else 1.0
        assert c.graph().time_s[n.index, 0] == pytest.approx(f * h.graph().time_s[n.index, 0])
    assert c.execute(noise=False).time_s > h.execute(noise=False).time_s


def test_shipped_pairs_merge_and_phases_come_from_region_names():
    four, two = shipped_stage_workloads(4), shipped_stage_workloads(2)
    for kind in ("forward", "backward", "optimizer"):
        assert two[0].work(kind).busy_s == pytest.approx(four[0].work(kind).busy_s + four[1].work(kind).busy_s)
    # The last stage carries the LM head and the loss: the heaviest forward and backward.
    assert four[3].backward.busy_s > 1.3 * four[1].backward.busy_s


@pytest.mark.parametrize("kw,match", [
    (dict(straggler=Straggler(9, 1.1)), "a rank from 0 to 3"),
    (dict(straggler=Straggler(1, 0.0)), "factor > 0"),
    (dict(schedule="zigzag"), "1f1b, gpipe"),
])
def test_bad_cluster_input_says_what_to_do(kw, match):
    with pytest.raises(ConfigError, match=match):
        VirtualCluster(_uniform(4), 8, states=STATES, **kw)
    with pytest.raises(ConfigError, match="whole number >= 1"):
        build_schedule(4, 0)


def test_noise_is_seeded_and_shared_by_plans():
    c = VirtualCluster(shipped_stage_workloads(2), 4, states=STATES)
    a = c.execute(noise=True, seed=3, switch_latency_s=0.006)
    b = c.execute(noise=True, seed=3, switch_latency_s=0.006)
    assert a.time_s == b.time_s and a.energy_j == b.energy_j
    assert c.execute(noise=True, seed=4).time_s != a.time_s


def test_interleaved_follows_megatron_and_shrinks_the_bubble_by_the_chunks():
    sch = build_schedule(2, 4, schedule="interleaved", chunks=2)
    labels = [f"{sch.nodes[i].label}.{sch.nodes[i].chunk}" for i in sch.order[0]]
    # Megatron's order on the first stage: (P-1)*2 + (v-1)*P = 4 warm-up forwards, then 1F1B.
    assert labels == ["F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1", "F3.0", "B1.1", "F2.1", "B0.0",
                      "F3.1", "B1.0", "B2.1", "B3.1", "B2.0", "B3.0", "optimizer.0"]
    four = _uniform(4)  # four virtual stages: 2 stages x 2 chunks, or merged in pairs for 1F1B
    inter = VirtualCluster(four, 4, schedule="interleaved", chunks=2, links=NO_LINK, states=STATES)
    plain = VirtualCluster((StageWorkload.merged(four[0], four[1]), StageWorkload.merged(four[2], four[3])), 4,
                           links=NO_LINK, states=STATES)
    # At a locked clock an instruction's cost is linear in its work, so merged stages cost the sum.
    locked = [ClusterPlan((2,) * len(c.schedule.nodes), (None, None)) for c in (inter, plain)]
    a, b = inter.execute(locked[0], noise=False), plain.execute(locked[1], noise=False)
    for ri, rp in zip(a.ranks, b.ranks):
        assert ri.busy_s == pytest.approx(rp.busy_s, rel=1e-9)
        assert ri.wait_s == pytest.approx(rp.wait_s / 2, rel=1e-9)  # (P-1)(tF+tB)/v
    assert inter.execute(noise=False).time_s == pytest.approx(_longest_path(inter), rel=1e-12)
    with pytest.raises(ConfigError, match="multiple of the 2 stages"):
        build_schedule(2, 3, schedule="interleaved", chunks=2)
    with pytest.raises(ConfigError, match="2 model chunks"):
        build_schedule(2, 4, schedule="interleaved", chunks=1)


def test_chunk_costs_match_a_kernel_by_kernel_replay():
    """The cached instruction costs against the virtual GPU replaying the recorded kernels (gaps
    where they were), both settled on the instruction repeated: within 0.05%."""
    import math

    from kdvfs_plugins.sim.cluster import _instruction_costs, _phase_of
    from kdvfs_plugins.sim.gpu import VirtualGPU
    from kdvfs_plugins.sim.model import Work, default_model
    from kdvfs_plugins.sim.trace import Trace

    model = default_model()
    ts = Trace.load("gpt1b-stage3-of4").steps[1]
    w = shipped_stage_workloads(4)[3]
    for kind in ("forward", "optimizer"):
        kernels = [k for k in ts.kernels if _phase_of(k) == kind]
        t, e, _ = _instruction_costs(w.work(kind), STATES, model)
        for k_state, lock in enumerate(STATES[::2]):
            gpu = VirtualGPU(switch_latency_ms=0.0, noise=False, params=model)
            if lock is not None:
                gpu.request_clocks(lock, 0.0)
            period = sum(k.duration_s for k in kernels) + sum(k.gap_before_s for k in kernels[1:])
            for _ in range(int(math.ceil(5 * model.params.power_window_s / period)) + 1):
                t0, e0 = gpu.now_s, gpu.energy_j
                for j, k in enumerate(kernels):
                    if j:
                        gpu.idle(k.gap_before_s)
                    gpu.run(Work(k.category, k.duration_s))
            s = 2 * k_state
            assert t[s] == pytest.approx(gpu.now_s - t0, rel=5e-4), (kind, lock)
            assert e[s] == pytest.approx(gpu.energy_j - e0, rel=5e-4), (kind, lock)
