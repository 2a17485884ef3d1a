"""Profiled steps: one in N at most, spaced further where what they add to a step would cost more
than the budget."""
from __future__ import annotations

import pytest

from kdvfs_plugins import KdvfsConfig
from kdvfs_plugins.cadence import MAX_STRETCH, PROFILE_BUDGET, ProfileCadence
from kdvfs_plugins.devices import SimulatedDevice
from kdvfs_plugins.devices.simulated import VirtualMarker
from kdvfs_plugins.engine import Engine


def drive(cadence: ProfileCadence, steps: int, plain_ms: float, profiled_ms: float) -> list[int]:
    profiled = []
    for step in range(steps):
        p = cadence.due(step)
        if p:
            profiled.append(step)
        cadence.measured(step, profiled_ms if p else plain_ms, profiled=p)
    return profiled


def test_cheap_profiling_keeps_one_step_in_n():
    c = ProfileCadence(5, first_step=2)
    assert drive(c, 40, plain_ms=100.0, profiled_ms=100.05) == list(range(2, 40, 5))
    assert c.interval == 5


def test_costly_profiling_is_spaced_to_the_budget_after_the_first_profiled_step():
    c = ProfileCadence(5, first_step=0)
    # 20 ms more on a 100 ms step: at 0.2% a profiled step may come once in 100 steps
    steps = drive(c, 400, plain_ms=100.0, profiled_ms=120.0)
    assert round(20.0 / (PROFILE_BUDGET * 100.0)) == 100
    # the first (hook installation) is not judged; the second is, and sets the spacing
    assert steps == [0, 5, 105, 205, 305]
    assert c.interval == 100 and c.extra_ms == pytest.approx(20.0)


def test_the_spacing_has_a_ceiling_and_comes_back_when_profiling_gets_cheap():
    c = ProfileCadence(2, first_step=0)
    drive(c, 200, plain_ms=10.0, profiled_ms=1000.0)
    assert c.interval == 2 * MAX_STRETCH
    for step in range(200, 2000):  # the estimate halves towards zero at each profiled step
        p = c.due(step)
        c.measured(step, 10.0, profiled=p)
    assert c.interval == 2


def test_steps_profiled_for_other_reasons_do_not_count():
    c = ProfileCadence(5, first_step=0)
    drive(c, 10, plain_ms=100.0, profiled_ms=100.0)
    c.measured(11, 500.0, profiled=True)  # an exploration step, say: not one the cadence chose
    assert c.interval == 5 and c.extra_ms == pytest.approx(0.0)


def test_no_step_is_profiled_while_the_last_one_waits_to_be_judged():
    c = ProfileCadence(5, first_step=0)
    lag_steps = 12  # step times arrive this many steps late (dated by an anchor seconds later)
    due, profiled = [], []
    for step in range(300):
        due.append(c.due(step))
        if due[-1]:
            profiled.append(step)
        if step >= lag_steps:
            late = step - lag_steps
            c.measured(late, 120.0 if due[late] else 100.0, profiled=due[late])
    # 0 is not judged (no wait); 5 is, and nothing is profiled until its time arrives at step 17,
    # which spaces the next 100 steps on: one step in 5 would have profiled 10 and 15 meanwhile
    assert profiled == [0, 5, 105, 205]
    assert c.interval == 100


def test_a_measurement_that_never_comes_stops_profiling_only_for_a_while():
    c = ProfileCadence(5, first_step=0, max_stretch=4)
    assert c.due(0)
    c.measured(0, 100.0, profiled=True)
    assert c.due(5)  # never measured
    waited = [s for s in range(6, 40) if c.due(s)]
    assert waited[0] == 5 + 5 * 4  # gives up after the longest spacing


class MarkerCostDevice(SimulatedDevice):
    """Every marker costs the GPU 1 ms (the host paces it); the test adds the step's own work."""

    def __init__(self):
        super().__init__(0, noise=False)
        self.t_s = 0.0

    def marker(self):
        m = VirtualMarker(self.t_s)
        self.t_s += 0.001
        return m


def test_the_engine_spaces_profiled_steps_by_what_their_markers_cost(tmp_path):
    dev = MarkerCostDevice()
    cfg = KdvfsConfig.from_dict({"mode": "observe", "run_dir": str(tmp_path), "warmup_steps": 0,
                                 "profile_every_n_steps": 5, "window_steps": 1000})
    eng = Engine(cfg, device=dev).start()
    profiled = []
    for step in range(120):
        eng.step_begin(step)
        eng.region_enter("forward")
        dev.t_s += 0.2  # 200 ms of work
        eng.region_exit("forward")
        for phase in ("backward", "optimizer"):
            eng.region_enter(phase)
            eng.region_exit(phase)
        if eng.profiling:
            profiled.append(step)
        eng.step_end()
    eng.close()
    # plain: 2 markers, 201 ms; profiled: 8 markers, 207 ms -> 6 ms a profiled step, so
    # 6 / (0.002 * 201) = 15 steps apart
    assert profiled[:3] == [0, 5, 20] and all(b - a == 15 for a, b in zip(profiled[1:], profiled[2:]))
    assert eng.summary()["profile_interval_steps"] == 15
