import json

import pytest

from kdvfs_plugins import ClockPair, PlanError
from kdvfs_plugins.clocks import ClockTable
from kdvfs_plugins.data import h100_clock_lists
from kdvfs_plugins.plan import Plan

H100 = "NVIDIA H100 80GB HBM3"


def table():
    mem, sm = h100_clock_lists()
    return ClockTable.from_lists(mem, sm)


def test_round_trip_and_fallback_to_phase_then_step(tmp_path):
    plan = Plan(H100, table(), {"step": ClockPair(1980, 2619), "backward": ClockPair(1500, 2619),
                                "forward/layers.*.mlp": ClockPair(1200, 1593)})
    path = plan.save(tmp_path / "plan.json")
    back = Plan.load(path)
    assert back.regions == plan.regions and back.clock_table == plan.clock_table
    assert back.clocks_for("forward/layers.*.mlp") == (True, ClockPair(1200, 1593))
    assert back.clocks_for("backward/layers.*.attn") == (True, ClockPair(1500, 2619))
    assert back.clocks_for("optimizer") == (True, ClockPair(1980, 2619))


def test_plan_for_another_gpu_is_rejected():
    plan = Plan("NVIDIA A100-SXM4-80GB", table(), {"step": None})
    with pytest.raises(PlanError, match="made for 'NVIDIA A100-SXM4-80GB' but this GPU is"):
        plan.check_device(H100, table())


def test_unsupported_clock_in_a_plan_file_is_named(tmp_path):
    d = Plan(H100, table(), {"forward": ClockPair(1234, 2619)}).to_dict()
    (tmp_path / "p.json").write_text(json.dumps(d))
    plan = Plan.load(tmp_path / "p.json")
    with pytest.raises(PlanError, match=r"region 'forward'.*SM clock 1234 MHz.*nearest 1230 MHz"):
        plan.check_device(H100, table())


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.pop("regions"), "malformed"),
    (lambda d: d.update(granularity="layer"), "granularity 'layer'"),
])
def test_malformed_plans_say_what_is_wrong(tmp_path, mutate, fragment):
    d = Plan(H100, table(), {"step": None}).to_dict()
    mutate(d)
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match=fragment):
        Plan.load(tmp_path / "p.json")


def test_missing_plan_file_says_how_to_make_one(tmp_path):
    with pytest.raises(PlanError, match="mode='auto'"):
        Plan.load(tmp_path / "nope.json")
