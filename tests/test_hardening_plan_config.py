"""Issue 20, plans and config: malformed input is a PlanError or ConfigError naming the field,
never an AttributeError or OverflowError; clocks are whole MHz, never silently truncated; and
region_clocks keys that match no region are named once the regions are known."""
import json

import pytest

from kdvfs_plugins import ClockPair, ConfigError, KdvfsConfig, PlanError
from kdvfs_plugins.plan import Plan, UnmatchedRegionKeys

from test_engine import run_steps, sim_engine
from test_plan import H100, table


def valid_plan() -> dict:
    return Plan(H100, table(), {"step": None, "forward": ClockPair(1410, 2619)}).to_dict()


def load(tmp_path, text: str) -> Plan:
    (tmp_path / "p.json").write_text(text)
    return Plan.load(tmp_path / "p.json")


# ---------------------------------------------------------------------- plans
@pytest.mark.parametrize("top", ["[]", "null", "\"plan\"", "5", "[" * 5000 + "]" * 5000])
def test_a_plan_whose_top_level_is_not_an_object_is_a_plan_error(tmp_path, top):
    with pytest.raises(PlanError, match="top level|not valid JSON"):
        load(tmp_path, top)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(regions=[["forward", [1410, 2619]]]), "regions must be a JSON object"),
    (lambda d: d["device"]["clocks"].update(sm_mhz_by_mem=[[1410]]), "device.clocks.sm_mhz_by_mem must be a JSON object"),
    (lambda d: d.update(device=[]), "device must be a JSON object"),
    (lambda d: d["device"]["clocks"].update(mem_mhz=None), "device.clocks.mem_mhz must be a list"),
    (lambda d: d.update(key=[1, 2]), "key must be a JSON object"),
    (lambda d: d.update(max_slowdown="lots"), "max_slowdown must be a number"),
])
def test_a_field_of_the_wrong_type_is_a_plan_error_naming_it(tmp_path, mutate, field):
    d = valid_plan()
    mutate(d)
    with pytest.raises(PlanError, match=field.replace("[", r"\[").replace(".", r"\.")):
        load(tmp_path, json.dumps(d))


@pytest.mark.parametrize("text_clock, field", [
    ("1e400", r"regions\['forward'\]\.sm_mhz"),       # inf: OverflowError before
    ("1905.9", r"regions\['forward'\]\.sm_mhz"),      # truncated to 1905 before
    ("\"1905\"", r"regions\['forward'\]\.sm_mhz"),    # a string, accepted before
    ("true", r"regions\['forward'\]\.sm_mhz"),
    ("-1410", r"regions\['forward'\]\.sm_mhz"),
])
def test_a_plan_clock_that_is_not_a_whole_number_is_refused(tmp_path, text_clock, field):
    text = json.dumps(valid_plan()).replace('"forward": {"sm_mhz": 1410', f'"forward": {{"sm_mhz": {text_clock}')
    assert text_clock in text
    with pytest.raises(PlanError, match=field) as err:
        load(tmp_path, text)
    assert "whole number of MHz" in str(err.value) or "from 1 to 99999" in str(err.value)


def test_a_clock_table_entry_of_1e400_is_a_plan_error(tmp_path):
    text = json.dumps(valid_plan()).replace('"mem_mhz": [2619', '"mem_mhz": [1e400', 1)
    with pytest.raises(PlanError, match=r"device\.clocks\.mem_mhz\[0\]"):
        load(tmp_path, text)


def test_a_valid_plan_still_round_trips(tmp_path):
    plan = load(tmp_path, json.dumps(valid_plan()))
    assert plan.regions == {"step": None, "forward": ClockPair(1410, 2619)} and plan.clock_table == table()


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("raw, key", [
    ({"sm_mhz": float("inf"), "mem_mhz": 2619}, "sm_mhz"),
    ({"sm_mhz": "inf", "mem_mhz": 2619}, "sm_mhz"),
    ({"sm_mhz": 1e400, "mem_mhz": 2619}, "sm_mhz"),
    ({"sm_mhz": 1410, "mem_mhz": float("-inf")}, "mem_mhz"),
    ({"warmup_steps": float("inf")}, "warmup_steps"),
    ({"sm_mhz": 1905.9, "mem_mhz": 2619}, "sm_mhz"),
])
def test_infinite_or_fractional_config_clocks_are_config_errors(raw, key):
    with pytest.raises(ConfigError) as err:
        KdvfsConfig.from_dict(raw)
    assert err.value.key == key


@pytest.mark.parametrize("clocks", [[1500.9, 1593.7], {"sm_mhz": 1500, "mem_mhz": 1593.5}, [float("inf"), 1593],
                                    ["fast", 1593], [True, 1593]])
def test_region_clocks_must_be_whole_mhz(clocks):
    with pytest.raises(ConfigError, match="whole number of MHz") as err:
        KdvfsConfig.from_dict({"region_clocks": {"forward": clocks}})
    assert err.value.key == "region_clocks['forward']"


def test_region_clocks_in_whole_mhz_are_kept():
    cfg = KdvfsConfig.from_dict({"region_clocks": {"forward": [1500.0, "1593"], "backward": ClockPair(1410, 2619)}})
    assert cfg.region_clocks == {"forward": ClockPair(1500, 1593), "backward": ClockPair(1410, 2619)}


def test_region_clocks_keys_that_match_no_region_are_named_with_a_did_you_mean(tmp_path, kdvfs_log):
    eng, _ = sim_engine(tmp_path, warmup_steps=0, profile_every_n_steps=1,
                        region_clocks={"forwrd": [1500, 2619], "backward": [1410, 2619],
                                       "forward/layers.*.mlpp": [1200, 2619]})
    run_steps(eng, 5)
    eng.close()
    notes = [r.getMessage() for r in kdvfs_log if "region_clocks" in r.getMessage()]
    assert len(notes) == 1, notes
    assert "'forwrd' (did you mean 'forward'?)" in notes[0]
    assert "'forward/layers.*.mlpp' (did you mean 'forward/layers.*.mlp'?)" in notes[0]
    assert "'backward'" not in notes[0].split("regions seen")[0]


def test_region_keys_are_judged_over_several_profiled_steps():
    check = UnmatchedRegionKeys({"forward/layers.*.mlp", "optimizer"}, profiled_steps=3)
    assert check.seen({"step": 1, "forward": 1, "optimizer": 1}) is None  # hooks not in yet
    assert check.seen({"step": 1, "forward/layers.*.mlp": 1}) is None
    assert check.seen({"step": 1}) is None and check.done  # every key matched: nothing to say


def test_saving_a_plan_never_writes_through_a_planted_link(tmp_path):
    victims = []
    for name in ("plan.json.tmp", "plan.json"):  # the old fixed temporary name, and the plan itself
        victim = tmp_path / f"victim-of-{name}"
        victim.write_text("do not touch\n")
        (tmp_path / name).symlink_to(victim)
        victims.append(victim)
    plan = Plan(H100, table(), {"step": None, "forward": ClockPair(1410, 2619)})
    plan.save(tmp_path / "plan.json")
    assert [v.read_text() for v in victims] == ["do not touch\n"] * 2
    assert not (tmp_path / "plan.json").is_symlink() and Plan.load(tmp_path / "plan.json").regions == plan.regions
