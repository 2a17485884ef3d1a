"""The planner against brute force, and the properties its plans must have."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.errors import ConfigError, PlanError
from kdvfs_plugins.planner import (
    OBJECTIVES,
    PlanningProblem,
    SwitchModel,
    evaluate,
    plan,
    satisfies_min_interval,
)
from kdvfs_plugins.planner import _Units

NAME_POOL = ("forward/a", "forward/b", "backward/c", "optimizer/d")
SLOWDOWN = 0.1


def _clocks(c: int):
    return tuple([None] + [ClockPair(1980 - 150 * i, 2619) for i in range(c - 1)])


def brute_force(problem: PlanningProblem, switch: SwitchModel, objective: str, max_slowdown: float):
    """Best objective over every name -> clock assignment, by the planner's own evaluate."""
    names = list(dict.fromkeys(problem.names))
    default = evaluate(problem, {n: problem.clocks[problem.default_index] for n in names}, switch)
    budget = default.time_s * (1 + (0.0 if objective == "strict" else max_slowdown))
    best = math.inf
    for assignment in itertools.product(problem.clocks, repeat=len(names)):
        cb = dict(zip(names, assignment))
        if not satisfies_min_interval(problem, cb, switch):
            continue
        t, e, _ = evaluate(problem, cb, switch)
        if objective != "edp" and t > budget * (1 + 1e-12):
            continue
        best = min(best, e * t if objective == "edp" else e)
    return best


def objective_value(result):
    return result.energy_j * result.time_s if result.objective == "edp" else result.energy_j


@st.composite
def instances(draw):
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    pool = draw(st.permutations(NAME_POOL))[:k]
    names = tuple(draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)))
    vals = st.floats(0.1, 10.0, allow_nan=False, allow_infinity=False)
    t = np.array(draw(st.lists(vals, min_size=n * c, max_size=n * c))).reshape(n, c)
    e = np.array(draw(st.lists(vals, min_size=n * c, max_size=n * c))).reshape(n, c)
    gaps = draw(st.one_of(st.none(), st.lists(st.sampled_from([0.0, 0.2, 1.0]), min_size=n, max_size=n)))
    problem = PlanningProblem(names, t, e, _clocks(c), draw(st.integers(0, c - 1)),
                              gap_time_s=None if gaps is None else np.array(gaps),
                              gap_energy_j=None if gaps is None else 0.5 * np.array(gaps),
                              periodic=draw(st.booleans()))
    mode = draw(st.sampled_from(["stall", "late", "hidden"]))
    switch = SwitchModel(
        latency_s=draw(st.sampled_from([0.0, 0.05, 0.5, 2.0])),
        energy_j_per_switch=draw(st.sampled_from([None, 0.0, 0.3])),
        min_interval_s=draw(st.sampled_from([0.0, 0.0, 1.0, 4.0])),
        hide_latency=mode == "hidden",
        lands_late=mode == "late",
        stall_power_w=1.0,
    )
    return problem, switch


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.sampled_from(OBJECTIVES))
def test_exact_path_matches_brute_force(inst, objective):
    problem, switch = inst
    best = brute_force(problem, switch, objective, SLOWDOWN)
    r = plan(problem, objective=objective, max_slowdown=SLOWDOWN, switch=switch)
    assert r.exact and r.gap_bound == 0.0
    assert objective_value(r) == pytest.approx(best, rel=1e-9)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.sampled_from(OBJECTIVES))
def test_lagrangian_path_is_within_its_reported_bound(inst, objective):
    """With enumeration off, the DP/dual path must be feasible, never beat the optimum, bound it from
    below, and equal it wherever it claims exactness."""
    problem, switch = inst
    best = brute_force(problem, switch, objective, SLOWDOWN)
    r = plan(problem, objective=objective, max_slowdown=SLOWDOWN, switch=switch, exact_limit=0)
    found = objective_value(r)
    assert found >= best * (1 - 1e-9)
    assert r.lower_bound <= best * (1 + 1e-9) + 1e-12
    assert found * (1 - r.gap_bound) <= best * (1 + 1e-9) + 1e-12
    if r.exact:
        assert found == pytest.approx(best, rel=1e-9)
    # The prediction is the evaluator's, and the plan respects the actuator's floor.
    assert evaluate(problem, r.clocks_by_name, switch)[:2] == pytest.approx((r.time_s, r.energy_j), rel=1e-12)
    assert satisfies_min_interval(problem, r.clocks_by_name, switch)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.sampled_from(["strict", "relaxed"]), st.sampled_from([4096, 0]))
def test_time_budget_is_kept(inst, objective, exact_limit):
    problem, switch = inst
    r = plan(problem, objective=objective, max_slowdown=SLOWDOWN, switch=switch, exact_limit=exact_limit)
    limit = 1.0 if objective == "strict" else 1.0 + SLOWDOWN
    assert r.time_s <= r.default_time_s * limit * (1 + 1e-12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.sampled_from(OBJECTIVES), st.sampled_from([4096, 0]))
def test_finer_granularity_never_loses(inst, objective, exact_limit):
    problem, switch = inst
    res = {g: plan(problem, granularity=g, objective=objective, max_slowdown=SLOWDOWN, switch=switch,
                   exact_limit=exact_limit) for g in ("iteration", "pass", "kernel")}
    v = {g: objective_value(r) for g, r in res.items()}
    assert v["kernel"] <= v["pass"] * (1 + 1e-12) <= v["iteration"] * (1 + 1e-12) ** 2


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_relaxed_dp_is_exact_for_its_own_problem(inst):
    """Units free to choose their clocks: the DP equals brute force over unit assignments."""
    problem, switch = inst
    u = _Units(problem, list(problem.names), switch)
    if u.C ** u.m > 5000:
        return
    lams = np.array([0.0, 0.7, 3.0])
    values, paths = u.dp(np.ones(3), lams)
    X = np.array(list(itertools.product(range(u.C), repeat=u.m)))
    ok = np.array([u.interval_ok(x) for x in X])
    t, e, _ = u.evaluate(X, wrap=False)
    for i, lam in enumerate(lams):
        best = np.min((e + lam * t)[ok])
        # Periodic: free start relaxes the wrap-around switch, so the DP may only be lower.
        if problem.periodic:
            assert values[i] <= best + 1e-9
        else:
            assert values[i] == pytest.approx(best, rel=1e-9, abs=1e-12)
            tp, ep, _ = u.evaluate(paths[i], wrap=False)
            assert ep + lam * tp == pytest.approx(values[i], rel=1e-9, abs=1e-12)
            assert u.interval_ok(paths[i])


# ---- a structured instance: memory-bound and compute-bound regions, repeated layers -----------


def layered_problem(layers: int = 6, periodic: bool = True) -> PlanningProblem:
    """Forward/backward layers of a matrix product and an element-wise region, then an optimizer
    step. Element-wise work barely slows at a lower SM clock; matrix products slow in proportion."""
    # The default state (None) behaves like 1680 MHz: under the power cap the card holds one clock
    # for the whole mix, so locking the matrix products higher buys the time that lower clocks on
    # element-wise regions give up.
    sm = [1680, 1980, 1680, 1380, 1080]
    clocks = (None,) + tuple(ClockPair(s, 2619) for s in sm[1:])
    kinds = {"gemm": (4e-3, 0.95, 650.0), "elt": (1.5e-3, 0.1, 450.0), "opt": (10e-3, 0.05, 500.0)}
    names, t, e = [], [], []
    seq = [("forward", k) for _ in range(layers) for k in ("gemm", "elt")]
    seq += [("backward", k) for _ in range(layers) for k in ("elt", "gemm")]
    seq += [("optimizer", "opt")]
    for phase, kind in seq:
        t0, beta, p0 = kinds[kind]
        f = np.array(sm) / 1980
        time = t0 * (beta / f + (1 - beta))
        power = p0 * (0.3 + 0.7 * f ** 2.5)
        names.append(f"{phase}/layers.*.{kind}")
        t.append(time)
        e.append(time * power)
    return PlanningProblem(tuple(names), np.array(t), np.array(e), clocks, 0, periodic=periodic)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_zero_latency_orders_the_granularities(objective):
    p = layered_problem()
    sw = SwitchModel(latency_s=0.0)
    res = {g: plan(p, granularity=g, objective=objective, max_slowdown=0.05, switch=sw)
           for g in ("iteration", "pass", "kernel")}
    if objective != "edp":
        assert res["kernel"].energy_change <= res["pass"].energy_change <= res["iteration"].energy_change
        assert res["kernel"].energy_change < -0.05  # element-wise regions at a low SM clock
    else:
        v = {g: objective_value(r) for g, r in res.items()}
        assert v["kernel"] <= v["pass"] <= v["iteration"]
    # Per-layer names carry one clock each, wherever they occur.
    assert set(res["kernel"].clocks_by_name) == set(p.names)
    assert res["kernel"].clocks_for("forward/layers.*.elt").sm_mhz < 1980


@pytest.mark.parametrize("mode", ["stall", "hidden"])
def test_huge_latency_degenerates_to_one_clock(mode):
    p = layered_problem()
    sw = SwitchModel(latency_s=10.0, hide_latency=mode == "hidden")
    it = plan(p, granularity="iteration", objective="relaxed", max_slowdown=0.05, switch=sw)
    for g in ("pass", "kernel"):
        r = plan(p, granularity=g, objective="relaxed", max_slowdown=0.05, switch=sw)
        assert r.switches == 0
        assert len(set(r.clocks_by_name.values())) == 1
        assert r.energy_j == pytest.approx(it.energy_j, rel=1e-12)


def test_late_landing_makes_short_regions_not_worth_switching():
    """A lag longer than the element-wise regions leaves them at the matrix products' clock."""
    p = layered_problem()
    short = plan(p, objective="strict", switch=SwitchModel(latency_s=0.0, lands_late=True))
    lagged = plan(p, objective="strict", switch=SwitchModel(latency_s=0.003, lands_late=True))
    assert short.switches > 0
    assert lagged.energy_j > short.energy_j
    # Element-wise regions (1.5 ms) are shorter than the lag: their own clock would never land, and
    # a change may not be issued before the last one landed, so no layer switches.
    assert lagged.switches < short.switches
    assert lagged.clocks_for("forward/layers.*.elt") == lagged.clocks_for("forward/layers.*.gemm")


def test_min_interval_limits_switching():
    p = layered_problem()
    free = plan(p, objective="strict", switch=SwitchModel(latency_s=0.0))
    floor = SwitchModel(latency_s=0.0, min_interval_s=0.02)
    held = plan(p, objective="strict", switch=floor)
    assert satisfies_min_interval(p, held.clocks_by_name, floor)
    assert held.switches < free.switches
    assert held.energy_j >= free.energy_j


def test_gap_bound_is_reported_on_structured_instance():
    p = layered_problem(layers=16)
    r = plan(p, objective="strict", switch=SwitchModel(latency_s=0.0005))
    assert 0.0 <= r.gap_bound < 0.05
    assert r.lower_bound <= r.energy_j
    assert r.time_s <= r.default_time_s * (1 + 1e-12)


# ---- the evaluator -------------------------------------------------------------------------------


def _two_region_problem(periodic=False):
    t = np.array([[1.0, 2.0], [1.0, 1.5]])
    e = np.array([[4.0, 3.0], [4.0, 1.0]])
    return PlanningProblem(("forward/a", "backward/b"), t, e, (None, ClockPair(1000, 2619)), 0, periodic=periodic)


def test_evaluate_prices_each_switch_mode():
    p = _two_region_problem()
    low = ClockPair(1000, 2619)
    cb = {"forward/a": None, "backward/b": low}
    assert evaluate(p, cb, SwitchModel(latency_s=0.0)) == (2.5, 5.0, 1)
    assert evaluate(p, cb, SwitchModel(latency_s=0.1, stall_power_w=10.0)) == pytest.approx((2.6, 6.0, 1))
    assert evaluate(p, cb, SwitchModel(latency_s=0.1, hide_latency=True, stall_power_w=10.0)) == pytest.approx((2.5, 6.0, 1))
    # Late landing: the first 0.5 s (at the default clock) of backward/b still runs at the default
    # clock: half its work at each clock.
    late = evaluate(p, cb, SwitchModel(latency_s=0.5, lands_late=True))
    assert late == pytest.approx((1.0 + 0.5 * 1.0 + 0.5 * 1.5, 4.0 + 0.5 * 4.0 + 0.5 * 1.0, 1))
    # Periodic: the wrap-around back to forward's clock is a second switch.
    assert evaluate(_two_region_problem(periodic=True), cb, SwitchModel(latency_s=0.0)).switches == 2
    # Phase keys serve every region of the phase.
    assert evaluate(p, {"forward": None, "backward": low}, SwitchModel(latency_s=0.0)) == (2.5, 5.0, 1)


def test_min_interval_check():
    p = _two_region_problem()
    cb = {"forward/a": ClockPair(1000, 2619), "backward/b": None}
    assert satisfies_min_interval(p, cb, SwitchModel(min_interval_s=1.5))  # start run lasts 2 s
    assert not satisfies_min_interval(p, cb, SwitchModel(min_interval_s=2.5))
    assert satisfies_min_interval(p, {"step": None}, SwitchModel(min_interval_s=100.0))


def test_result_changes_and_lookup():
    p = layered_problem()
    r = plan(p, granularity="pass", objective="relaxed", max_slowdown=0.05, switch=SwitchModel(latency_s=0.0))
    assert set(r.clocks_by_name) == {"forward", "backward", "optimizer"}
    assert r.time_change <= 0.05 + 1e-12 and r.energy_change < 0
    assert r.clocks_for("backward/layers.*.gemm") == r.clocks_by_name["backward"]
    it = plan(p, granularity="iteration", objective="strict")
    assert set(it.clocks_by_name) == {"step"} and it.exact


# ---- errors say what to do -----------------------------------------------------------------------


def test_errors():
    with pytest.raises(PlanError, match="shape"):
        PlanningProblem(("forward",), np.ones((2, 2)), np.ones((1, 2)), (None, ClockPair(1, 1)), 0)
    with pytest.raises(PlanError, match="zeros"):
        PlanningProblem(("forward",), np.zeros((1, 2)), np.ones((1, 2)), (None, ClockPair(1, 1)), 0)
    with pytest.raises(PlanError, match="default_index"):
        PlanningProblem(("forward",), np.ones((1, 2)), np.ones((1, 2)), (None, ClockPair(1, 1)), 5)
    p = _two_region_problem()
    with pytest.raises(ConfigError, match="objective"):
        plan(p, objective="fastest")
    with pytest.raises(ConfigError, match="granularity"):
        plan(p, granularity="layer")
    with pytest.raises(ConfigError, match="max_slowdown"):
        plan(p, objective="relaxed", max_slowdown=-0.1)
    with pytest.raises(ConfigError, match="hide_latency"):
        SwitchModel(hide_latency=True, lands_late=True)
    with pytest.raises(PlanError, match="no clocks for region"):
        evaluate(p, {"forward/a": None}, SwitchModel())
    with pytest.raises(PlanError, match="not among"):
        evaluate(p, {"step": ClockPair(7, 7)}, SwitchModel())
