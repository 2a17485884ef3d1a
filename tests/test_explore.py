"""The explorer's statistics and bounds on synthetic data, and plan keys."""
import math

import numpy as np
import pytest

from kdvfs_plugins import ClockPair, PlanError
from kdvfs_plugins.clocks import ClockTable
from kdvfs_plugins.data import h100_clock_lists
from kdvfs_plugins import explore as explore_mod
from kdvfs_plugins.explore import ExploreSettings, Explorer, Occurrence
from kdvfs_plugins.explore_model import Effect
from kdvfs_plugins.explore_plan import PlanDraft
from kdvfs_plugins.plan import Plan, plan_key
from kdvfs_plugins.policy import DEFAULT_CLOCKS, as_clocks


def voltage(f_mhz, f_max_mhz):
    """A DVFS voltage curve for the synthetic world: flat at 0.7 up to 45% of the top clock."""
    return np.clip(0.7 + 0.3 * (f_mhz / f_max_mhz - 0.45) / 0.55, 0.7, 1.0)


def table():
    mem, sm = h100_clock_lists()
    return ClockTable.from_lists(mem, sm)


class World:
    """Two knobs with known physics: a compute-bound 'forward' and a memory-bound 'optimizer'.

    Time: roofline-like in the clocks. Energy per step: A_k V(f)^2 + t * S(f, m) + B, the model the
    explorer fits, plus a reading error per window like the 100 ms counter's.
    """

    F_D = 1650.0  # the default state's SM clock

    def __init__(self, seed=0, window_error_j=3.0, time_error=0.0):
        self.rng = np.random.default_rng(seed)
        self.err = window_error_j
        self.time_err = time_error  # relative scatter of a step's time
        self.a = {"forward": 60.0, "optimizer": 8.0}       # J per step at V = 1
        self.t0 = {"forward": 0.080, "optimizer": 0.020}    # s per step at default
        self.sm_share = {"forward": 0.95, "optimizer": 0.15}

    def knob_time_s(self, k, c):
        f = self.F_D if c is None else min(c.sm_mhz, self.F_D)
        m = 2619 if c is None else c.mem_mhz
        s = self.sm_share[k]
        return self.t0[k] * (s * self.F_D / f + (1 - s) * max(1.0, 2619 / m * 0.8))

    def knob_energy_j(self, k, c):
        f = self.F_D if c is None else min(c.sm_mhz, self.F_D)
        m = 2619 if c is None else c.mem_mhz
        v2 = float(voltage(f, 1980.0)) ** 2
        static = 60 + 40 * v2 + 50 * f / 1980 * v2 + 40 * m / 2619
        return self.a[k] * v2 + self.knob_time_s(k, c) * static + 5.0

    def step(self, clocks):
        t = {k: self.knob_time_s(k, clocks[k]) for k in self.a}
        e = sum(self.knob_energy_j(k, clocks[k]) for k in self.a)
        step_ms = sum(t.values()) * 1e3 * (1.0 + (self.rng.normal(0, self.time_err) if self.time_err else 0.0))
        return {k: v * 1e3 for k, v in t.items()}, step_ms, e


def drive(world, settings, steps, apply=True):
    ex = Explorer(settings, apply=apply)
    ex.set_layout([Occurrence("forward", 80.0), Occurrence("optimizer", 20.0)])
    win_e, win_first = 0.0, 0
    for step in range(steps):
        if ex.done:
            break
        clocks = {k: as_clocks(ex.clocks_for(k, step)) for k in ("forward", "optimizer")}
        region_ms, step_ms, e = world.step(clocks)
        ex.observe_step(step, step_ms, region_ms)
        win_e += e
        if (step + 1) % settings.window_steps == 0:
            ex.observe_window(win_first, step, win_e + world.rng.normal(0, world.err))
            win_e, win_first = 0.0, step + 1
    return ex


def settings(**kw):
    kw.setdefault("clock_table", table())
    kw.setdefault("max_slowdown", 0.05)
    kw.setdefault("objective", "relaxed")
    kw.setdefault("window_steps", 5)
    kw.setdefault("explore_max_steps", 1200)
    kw.setdefault("switch_latency_ms", 1.0)
    kw.setdefault("block_steps", 10)
    return ExploreSettings(**kw)


def test_each_lock_is_measured_against_the_default_blocks_next_to_it():
    world = World(seed=1)
    ex = drive(world, settings(), 1300)
    assert ex.result is not None
    effects = ex._model.step_effects(ex._samples())
    errs = []
    for k, by_state in effects.items():
        for st, eff in by_state.items():
            c = ex.states[st]
            clocks = {j: None for j in world.a}
            clocks[k] = c
            true_j = world.step(clocks)[2] - world.step({j: None for j in world.a})[2]
            errs.append(abs(eff.energy_j - true_j))
    assert len(errs) >= 10
    # Window error 3 J per 5 steps: a block's one kept window (its first follows another design)
    # against two neighbours is good to about 0.7 J per step; the effects span several joules.
    assert np.median(errs) < 0.6, errs


def test_the_first_window_after_another_design_is_left_out():
    """The meter's power readings trail the GPU: a block's first window holds its predecessor's power."""
    ex = Explorer(settings(block_steps=10, window_steps=5))
    ex.set_layout([Occurrence("forward", 80.0), Occurrence("optimizer", 20.0)])
    step = 0
    while not any(b.kind == "explore" and b.design for b in ex.blocks):
        ex.begin_step(step)
        ex.observe_step(step, 100.0, {"forward": 80.0, "optimizer": 20.0})
        if (step + 1) % 5 == 0:
            ex.observe_window(step - 4, step, 500.0)
        step += 1
    b = next(b for b in ex.blocks if b.kind == "explore" and b.design)
    for first in range(b.first_step, b.last_step + 1, 5):
        ex.observe_window(first, first + 4, 1000.0 if first == b.first_step else 400.0)
    assert b.energy_steps == 5 and b.energy_j == 400.0


def test_a_saving_below_what_the_blocks_resolve_is_declined_early():
    """Locks that change the step's energy by less than the readings resolve: no plan, well before
    the step budget runs out (within 400 steps, not after 1000)."""
    world = World(seed=5, window_error_j=3.0)
    world.a = {"forward": 0.0, "optimizer": 0.0}  # no switching energy to save

    def flat(k, c):  # energy does not depend on the clocks: nothing to save
        return 40.0 if k == "forward" else 10.0

    world.knob_energy_j = flat
    ex = drive(world, settings(max_slowdown=0.0, objective="strict"), 1300)
    assert ex.result is not None and ex.result.status == "rejected", ex.result
    assert ex.result.steps <= 400, ex.result
    assert "early look" in ex.result.message and ex.result.clocks_by_name == {}


def test_auto_finds_validates_and_applies_a_saving():
    ex = drive(World(seed=2), settings(), 1300)
    r = ex.result
    assert r.status == "applied", r.message
    assert r.validated["energy_change"] < -0.02 and r.validated["time_change"] <= 0.05 + 1e-3
    assert r.clocks_by_name


def test_explore_mode_writes_but_does_not_apply():
    ex = drive(World(seed=2), settings(), 1300, apply=False)
    assert ex.result.status == "explored" and ex.result.clocks_by_name


@pytest.mark.parametrize("optimizer_saves_j, kept", [(0.1, False), (0.5, True)])
def test_a_lock_that_pays_less_than_the_fit_resolves_goes_back_to_default(optimizer_saves_j, kept):
    from kdvfs_plugins.explore_plan import MIN_PREDICTED_SAVING, drop_unproven_locks
    from kdvfs_plugins.planner import PlanningProblem, SwitchModel, plan

    floor_j = MIN_PREDICTED_SAVING * 100.0  # 0.2% of a 100 J step
    lock = ClockPair(1200, 2619)
    # forward's lock saves 5 J, the optimizer's saves optimizer_saves_j; neither costs time
    problem = PlanningProblem(("forward", "optimizer"), np.array([[0.08, 0.08], [0.02, 0.02]]),
                              np.array([[50.0, 45.0], [10.0, 10.0 - optimizer_saves_j]]), (None, lock), 0)
    kw = dict(granularity="kernel", objective="strict", max_slowdown=0.0, switch=SwitchModel(latency_s=0.0),
              exact_limit=1000)
    best = plan(problem, **kw)
    assert best.clocks_by_name == {"forward": lock, "optimizer": lock}
    chosen = drop_unproven_locks(problem, best, kw, ("forward", "optimizer"), floor_j)
    assert chosen.clocks_by_name["forward"] == lock
    assert (chosen.clocks_by_name["optimizer"] == lock) is kept


@pytest.mark.parametrize("bound", [0.02, 0.04])
def test_exploration_slowdown_stays_within_its_bound(bound):
    # the plan's own validation blocks count as exploration too: keep its budget below the bound
    # readings good enough that exploration goes on to the end (no early decline)
    ex = drive(World(seed=3, window_error_j=0.5), settings(explore_max_slowdown=bound, max_slowdown=bound / 2), 1300)
    assert ex.explore_steps > 500
    assert ex.exploration_time_change <= bound + 1e-9
    # and exploration did move the clocks (it is not idle)
    assert sum(1 for b in ex.blocks if b.kind == "explore" and b.design) >= 10


def test_strict_budget_rejects_a_plan_that_only_saves_by_slowing_down():
    world = World(seed=4)
    world.sm_share = {"forward": 1.0, "optimizer": 1.0}  # every lower clock costs time
    ex = drive(world, settings(max_slowdown=0.0, objective="strict"), 1300)
    assert ex.result.status == "rejected"
    assert ex.result.clocks_by_name == {}


def test_knobs_merge_regions_shorter_than_the_switch_allows():
    ex = Explorer(settings(switch_latency_ms=6.0))
    ex.set_layout([Occurrence("forward/mm", 1.0), Occurrence("forward/ew", 0.5)] * 40
                  + [Occurrence("optimizer", 30.0)])
    for step in range(5):  # the baseline block: one window at default clocks
        assert ex.clocks_for("forward/mm", step) is DEFAULT_CLOCKS
        ex.observe_step(step, 90.0, {"forward/mm": 40.0, "forward/ew": 20.0, "optimizer": 30.0})
    ex.clocks_for("forward/mm", 5)  # the first block after the baseline sets the knobs
    assert set(ex.knobs) == {"forward", "optimizer"}


def test_plan_key_change_names_what_changed():
    key = plan_key("NVIDIA H100 80GB HBM3", "580.1", 8, {"tp": 2, "pp": 1, "dp": 4}, regions=["forward", "backward"])
    plan = Plan("NVIDIA H100 80GB HBM3", table(), {"forward": ClockPair(1500, 2619)}, key=key, source="explore")
    plan.check_key(key)
    now = plan_key("NVIDIA H100 80GB HBM3", "590.2", 8, {"tp": 4, "pp": 1, "dp": 2}, regions=["forward", "backward"])
    with pytest.raises(PlanError, match=r"the driver was '580.1', now '590.2'.*parallel layout.*explore again"):
        plan.check_key(now)
    other = plan_key("NVIDIA H100 80GB HBM3", "580.1", 8, {"tp": 2, "pp": 1, "dp": 4}, regions=["forward", "optimizer"])
    with pytest.raises(PlanError, match=r"region set"):
        plan.check_key(other)
    # a hand-written plan without a key passes
    Plan("NVIDIA H100 80GB HBM3", table(), {}).check_key(now)


def test_engine_apply_with_a_plan_for_another_driver_fails_before_training(tmp_path):
    from kdvfs_plugins import KdvfsConfig
    from kdvfs_plugins.devices import SimulatedDevice
    from kdvfs_plugins.engine import Engine

    dev = SimulatedDevice(0, noise=False)
    info = dev.info()
    Plan(info.name, info.clocks, {"forward": None}, key=plan_key(info.name, "old-driver", 1),
         source="explore").save(tmp_path / "plan.json")
    cfg = KdvfsConfig.from_dict({"mode": "apply", "plan_path": str(tmp_path / "plan.json"), "run_dir": str(tmp_path)})
    with pytest.raises(PlanError, match="driver was 'old-driver'"):
        Engine(cfg, device=dev).start()
    # auto explores again instead
    eng = Engine(cfg.replace(mode="auto"), device=SimulatedDevice(0, noise=False)).start()
    assert eng.plan is None
    eng.close()


def test_a_baseline_slowed_by_its_own_instrumentation_gives_way_to_the_default_blocks():
    from kdvfs_plugins.sim.gpu import VirtualGPU

    s = ExploreSettings(clock_table=VirtualGPU(noise=False).clock_table, window_steps=2, block_steps=4,
                        explore_max_steps=400)
    ex = Explorer(s)
    ex.phase_level_after_baseline = True  # module hooks in the baseline made its steps 10% slower
    step = 0
    while len(ex.blocks) < 6 and not ex.done:
        ex.begin_step(step)
        b = ex.schedule.find(step, 0)
        ex.observe_step(step, 110.0 if b.kind == "baseline" else 100.0, {"forward": 60.0, "optimizer": 40.0})
        step += 1
    assert [b.kind for b in ex.blocks][:2] == ["baseline", "default"]
    assert ex.default_step_ms == pytest.approx(100.0)
    # blocks at default measured like the designs ran exactly at the default: no excess
    assert ex.excess_ms == pytest.approx(0.0, abs=1e-6)
    assert 0 not in ex._time_table()["forward"] or ex._time_table()["forward"][0] == pytest.approx(60.0)


def test_effects_against_neighbouring_blocks_cancel_drift_and_follow_the_reference():
    """A block that moves one knob is compared with the reference blocks next to it: a steady drift
    of the card's power cancels, and against an incumbent design the effect is of the one change."""
    from kdvfs_plugins.explore_model import ResponseModel, Sample

    ex = Explorer(settings())
    model = ResponseModel(ex.states, table().mem_mhz, ("forward", "optimizer"))
    lock, low = 30, 40  # two state indices
    # single locks against the default, then changes against the optimizer's lock
    designs = [{}, {"optimizer": lock}, {}, {"forward": low}, {},
               {"optimizer": lock}, {"optimizer": lock, "forward": low}, {"optimizer": lock}]
    true_j = {"optimizer": -2.0, "forward": -1.0}
    together_j = -4.0  # forward saves more once the optimizer is locked: the effects interact
    samples = []
    for i, d in enumerate(designs):
        e = 100.0 + 0.5 * i  # the card's power drifts up by half a joule per block
        e += together_j if len(d) == 2 else sum(true_j[k] for k in d)
        samples.append(Sample(d, {}, e * 10, 10, 0, 200.0, first_step=10 * i))
    alone = model.step_effects(samples[:5])
    assert alone["optimizer"][lock].energy_j == pytest.approx(-2.0)
    assert alone["forward"][low].energy_j == pytest.approx(-1.0)
    refined = model.step_effects(samples[5:], {"optimizer": lock})
    assert refined["forward"][low].energy_j == pytest.approx(-2.0)  # -4 together, -2 of it the optimizer's


def test_steps_for_noise_shortens_to_the_target_but_never_below_two_windows():
    from kdvfs_plugins.explore_blocks import steps_for_noise

    # unit scatter 0.4% per counted step: 0.05% per effect needs 64 counted steps, 10 uncounted
    assert steps_for_noise(200, 10, 0.004, 0.0005) == 80
    assert steps_for_noise(50, 10, 0.004, 0.0005) == 50     # never longer than the first blocks
    assert steps_for_noise(200, 10, 1e-6, 0.0005) == 20     # a quiet card: two windows
    assert steps_for_noise(7, 10, 0.0, 0.0005) == 20        # a window is the least a block counts


@pytest.mark.parametrize("window_error_j, shorter", [(0.2, True), (30.0, False)])
def test_blocks_are_shortened_only_where_the_readings_are_quiet(window_error_j, shorter):
    """The first blocks are long (about 6 s of GPU time); once default blocks show the scatter,
    blocks are as short as it allows: more exploring blocks where the card reads quietly."""
    world = World(seed=3, window_error_j=window_error_j)
    s = settings(block_steps=None, window_steps=5, explore_max_steps=3000)
    ex = Explorer(s)
    ex.set_layout([Occurrence("forward", 80.0), Occurrence("optimizer", 20.0)])
    win_e, win_first = 0.0, 0
    for step in range(900):
        ex.begin_step(step)
        clocks = {k: as_clocks(ex.clocks_for(k, step)) for k in ("forward", "optimizer")}
        region_ms, step_ms, e = world.step(clocks)
        ex.observe_step(step, step_ms, region_ms)
        win_e += e
        if (step + 1) % 5 == 0:
            ex.observe_window(win_first, step, win_e + world.rng.normal(0, world.err))
            win_e, win_first = 0.0, step + 1
    first = ex._first_block_steps
    assert first >= 40
    assert (ex.block_steps < first) == shorter, (first, ex.block_steps)
    if shorter:
        assert ex.block_steps == 10  # two windows
        assert max(b.steps for b in ex.blocks[-5:]) == 10


def test_refinement_goes_on_from_the_change_that_paid():
    """A change measured around the incumbent that pays replaces it, and the next round refines
    around the new one (one change in all before)."""
    ex = drive(World(seed=2), settings(explore_max_steps=2400), 2600)
    designs = [tuple(sorted(b.design.items())) for b in ex.blocks if b.kind == "reference"]
    assert ex.result.status == "applied", ex.result.message
    assert len(set(designs)) >= 2, designs


def test_steps_that_alternate_are_no_exploration_slowdown():
    """A step that alternates between two lengths (two different trace steps, gradient
    accumulation) at every clock: the exploration costs nothing, and the explorer says so (a
    median default step landed on the shorter one and counted the difference as slowdown)."""
    # a baseline of one 10-step window: nine steady steps, five of one length, four of the other
    ex = Explorer(settings(block_steps=None, window_steps=10, explore_max_steps=1500))
    ex.set_layout([Occurrence("forward", 80.0), Occurrence("optimizer", 20.0)])
    rng = np.random.default_rng(0)
    for step in range(400):
        ex.begin_step(step)
        if ex.done:
            break
        for k in ("forward", "optimizer"):
            ex.clocks_for(k, step)
        long = step % 2 == 1
        ex.observe_step(step, 110.0 if long else 100.0, {"forward": 90.0 if long else 80.0, "optimizer": 20.0})
        if (step + 1) % 10 == 0:
            ex.observe_window(step - 9, step, 10 * 600.0 + rng.normal(0, 1.0))
    assert ex.explore_steps > 100
    assert abs(ex.exploration_time_change) < 0.005, ex.exploration_time_change


def _settled(**kw):
    """An explorer after a whole run on the synthetic world (step times scattering by 0.05%):
    blocks, noise estimates and a grid."""
    ex = drive(World(seed=2, time_error=5e-4), settings(**kw), 1300)
    assert ex.result is not None
    return ex


def test_strict_plans_may_spend_what_the_time_measurement_cannot_resolve(monkeypatch):
    """Strict plans are planned to the time validation can tell from the default (a lock measured
    a fraction of a standard error slower is no slower as far as any measurement shows); a re-plan
    after validation found a plan slow spends nothing beyond the budget."""
    ex = _settled(max_slowdown=0.0, objective="strict")
    budget = ex._plan_budget()
    assert budget == pytest.approx(explore_mod.PLAN_TIME_SE * ex._effect_se(time=True) / math.sqrt(2))
    assert budget > 0
    seen = []

    def fake_make_plan(T, E, **kw):
        seen.append((kw["max_slowdown"], kw["objective"]))
        return PlanDraft({}, 0.0, 0.0, T)

    monkeypatch.setattr(explore_mod, "make_plan", fake_make_plan)
    samples = ex._samples()
    table = ex._model.time_table(samples)
    ex._plan_draft(samples, table, time_se=0.0)
    ex._plan_draft(samples, table, time_se=0.0, slow_scale_factor=1.5)
    assert seen == [(budget, "relaxed"), (0.0, "strict")]


def _refine_setup(ex):
    """The incumbent: forward at a grid clock with a grid clock below and above it."""
    grid = sorted((ex.states[st].sm_mhz, st) for st in ex.grid
                  if ex.states[st].mem_mhz == max(c.mem_mhz for c in ex.states if c is not None))
    (_, lower), (_, here), (_, upper) = grid[len(grid) // 2 - 1: len(grid) // 2 + 2]
    ex.incumbent = {"forward": here}
    ex._early_draft = PlanDraft({"forward": here}, 0.0, -0.01, np.zeros((2, len(ex.states))))
    ex._incumbent_ms = lambda margin_se=0.0: 0.0
    floor_j = explore_mod.LOCK_FLOOR_SE * ex._effect_se() * ex._default_step_energy()
    return lower, here, upper, floor_j



@pytest.mark.parametrize("lowered, taken", [(True, True), (False, False)])
def test_refinement_takes_a_lowered_clock_that_saves_less_than_a_block_resolves(lowered, taken):
    """A clock one step lower saves energy wherever time allows, so a measured saving below the
    blocks' resolution still moves the plan down; the same saving measured for a clock one step
    higher (no such prior) must clear the floor."""
    ex = _settled()
    lower, here, upper, floor_j = _refine_setup(ex)
    st = lower if lowered else upper
    ex._effects = lambda samples, refined=False: {"forward": {st: Effect(0.0, -0.3 * floor_j, 1)}}
    draft = ex._refined(ex._samples())
    assert (draft.design == {"forward": st}) is taken, draft.design
    if not taken:
        assert draft.design == {"forward": here}


def test_half_steps_are_offered_only_where_a_grid_step_is_resolved():
    """Refinement offers the clock halfway to a grid neighbour only where that grid step moved the
    knob's measured energy by more than a block resolves: elsewhere half a step is noise."""
    ex = _settled()
    lower, here, upper, floor_j = _refine_setup(ex)
    effects = {"forward": {here: Effect(0.0, -5.0, 2), lower: Effect(0.5, -5.0 - 3 * floor_j, 2),
                           upper: Effect(-0.5, -5.0 + 0.5 * floor_j, 2)}}
    between = ex._between({"forward": here}, effects)["forward"]
    assert len(between) == 1
    mid = ex.states[between[0]].sm_mhz
    assert ex.states[lower].sm_mhz < mid < ex.states[here].sm_mhz
    # neither neighbour measured: nothing to judge a half step by
    assert ex._between({"forward": here}, {"forward": {here: Effect(0.0, -5.0, 2)}}) == {}


@pytest.mark.parametrize("slower, tolerance, applied", [(0.0002, 0.0003, True), (0.0002, 0.0, False),
                                                        (0.0010, 0.0003, False)])
def test_validation_holds_a_strict_plan_to_the_oracles_own_tolerance(slower, tolerance, applied):
    """A strict plan measured 0.02% slower than the default blocks next to it passes with the
    tolerance the oracle's own plans execute at (0.03%), not without it; 0.1% slower fails."""
    from dataclasses import replace

    from kdvfs_plugins.explore_blocks import Block

    ex = _settled(max_slowdown=0.0, objective="strict")
    ex.s = replace(ex.s, time_tolerance=tolerance)
    ex.result, ex.replans, ex.plan_clocks = None, 1, {"optimizer": ClockPair(1200, 2619)}
    for b in ex.blocks:
        if b.kind.startswith("validate"):
            b.kind = "superseded-" + b.kind
    rng = np.random.default_rng(0)
    for i in range(4):
        for kind, ms, j in (("validate-plan", 100.0 * (1 + slower), 97.0), ("validate-default", 100.0, 100.0)):
            times = list(ms * (1 + rng.normal(0, 2e-5, 10)))
            ex.blocks.append(Block(len(ex.blocks), 10_000 + 20 * len(ex.blocks), 10, kind, {}, energy_j=10 * j,
                                   energy_steps=10, time_ms=times))
    ex._judge()
    assert (ex.result.status == "applied") is applied, ex.result.message
