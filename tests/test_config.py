import pytest

from kdvfs_plugins import ClockPair, ConfigError, KdvfsConfig


def test_defaults_are_strict_kernel_level_auto():
    cfg = KdvfsConfig.from_dict({})
    assert (cfg.mode, cfg.device, cfg.granularity, cfg.max_slowdown) == ("auto", "auto", "kernel", 0.0)
    assert cfg.effective_objective == "strict"


def test_slowdown_budget_makes_the_objective_relaxed():
    assert KdvfsConfig.from_dict({"max_slowdown": 0.05}).effective_objective == "relaxed"


@pytest.mark.parametrize(
    "raw, key, fragment",
    [
        ({"mode": "fast"}, "mode", "observe | explore | apply | auto"),
        ({"device": "cuda"}, "device", "auto | nvml | observe | simulated"),
        ({"granularity": "layer"}, "granularity", "kernel | pass | iteration"),
        ({"max_slowdown": 2}, "max_slowdown", "[0.0, 1.0]"),
        ({"max_slowdown": "a lot"}, "max_slowdown", "a number"),
        ({"warmup_steps": 1.5}, "warmup_steps", "an integer"),
        ({"enabled": "maybe"}, "enabled", "true | false"),
        ({"region_clocks": {"forward": [1500]}}, "region_clocks['forward']", "clock pair"),
        ({"sm_mhz": 1500}, "mem_mhz", "together"),
        ({"objective": "strict", "max_slowdown": 0.1}, "objective", "relaxed"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(raw, key, fragment):
    with pytest.raises(ConfigError) as err:
        KdvfsConfig.from_dict(raw, source="KernelDVFS(...)")
    msg = str(err.value)
    assert err.value.key == key
    assert msg.startswith("KernelDVFS(...):") and key in msg and fragment in msg


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'max_slowdown'"):
        KdvfsConfig.from_dict({"max_slowdwn": 0.1})


def test_strings_from_flags_and_json_are_coerced():
    cfg = KdvfsConfig.from_dict({"enabled": "false", "sm_mhz": "1500", "mem_mhz": 2619, "region_clocks": {"forward": {"sm_mhz": 1200, "mem_mhz": 1593}}})
    assert cfg.enabled is False
    assert cfg.fixed_clocks == ClockPair(1500, 2619)
    assert cfg.region_clocks["forward"] == ClockPair(1200, 1593)
    assert KdvfsConfig.from_dict(cfg.to_dict()) == cfg
