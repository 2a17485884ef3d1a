"""The shipped JSON Schema of the kernel_dvfs block is the one the config schema generates, and it
accepts and rejects what the config does."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

from kdvfs_plugins import ConfigError, KdvfsConfig
from kdvfs_plugins.schema import SCHEMA_FILE, kernel_dvfs_schema, schema_text

jsonschema = pytest.importorskip("jsonschema")


def test_shipped_file_is_what_the_config_generates():
    assert SCHEMA_FILE.read_text() == schema_text(), "run: python -m kdvfs_plugins.schema --write"


def test_every_key_with_its_default():
    props = kernel_dvfs_schema()["properties"]
    assert list(props) == [f.name for f in fields(KdvfsConfig)]
    defaults = KdvfsConfig()
    for name, prop in props.items():
        if "default" in prop:
            assert prop["default"] == getattr(defaults, name), name
    assert props["mode"]["enum"] == ["observe", "explore", "apply", "auto"]
    assert (props["max_slowdown"]["minimum"], props["max_slowdown"]["maximum"]) == (0.0, 1.0)


GOOD = [
    {},
    {"mode": "observe", "device": "simulated", "max_slowdown": 0.05, "objective": "relaxed"},
    {"sm_mhz": 1500, "mem_mhz": 2619, "region_clocks": {"optimizer": {"sm_mhz": 1200, "mem_mhz": 2619},
                                                         "forward/layers.*": [1400, 1593]}},
    {"module_depth": "auto", "progress": False, "switch_latency_ms": None, "plan_path": "plans/p.json"},
    {"module_depth": 3, "progress": "auto", "warmup_steps": 0, "power_readings": "step_end"},
]
BAD = [
    {"mdoe": "observe"},                      # unknown key
    {"mode": "fast"},
    {"max_slowdown": 2},
    {"warmup_steps": 1.5},
    {"granularity": "layer"},
    {"region_clocks": {"forward": {"sm_mhz": 1500}}},
    {"module_depth": 0},
    {"run_dir": ""},
]


@pytest.mark.parametrize("block", GOOD)
def test_what_the_config_accepts_the_schema_accepts(block):
    KdvfsConfig.from_dict(block)
    jsonschema.validate(block, kernel_dvfs_schema())


@pytest.mark.parametrize("block", BAD)
def test_what_the_config_rejects_the_schema_rejects(block):
    with pytest.raises(ConfigError):
        KdvfsConfig.from_dict(block)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(block, kernel_dvfs_schema())


def test_a_full_config_validates():
    block = json.loads(json.dumps(KdvfsConfig().to_dict()))
    jsonschema.validate(block, kernel_dvfs_schema())
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))
