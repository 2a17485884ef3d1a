"""The --kernel-dvfs flags: parsed through Megatron's parser with the provider, rejected without it."""
import argparse
import dataclasses
import json
import sys

import pytest

from kdvfs_megatron import add_kernel_dvfs_args, chain_providers, config_from_args, flag_name
from kdvfs_plugins import ClockPair, ConfigError, KdvfsConfig

FLAGS = ["--kernel-dvfs", "--kernel-dvfs-mode", "observe", "--kernel-dvfs-plan", "plan.json",
         "--kernel-dvfs-max-slowdown", "0.01"]


def megatron_parser(extra_args_provider=None):
    """A parser built the way Megatron builds it.

    megatron-core 0.16.1 ships no ``megatron/training`` (0.19 does), so where its ``parse_args``
    cannot be imported this mirrors it: ``ArgumentParser(allow_abbrev=False)``, Megatron's own
    arguments (a few stand-ins), then ``parser = extra_args_provider(parser)``.
    """
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser.add_argument("--num-layers", type=int)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def parse(argv, extra_args_provider=None, monkeypatch=None):
    try:
        from megatron.training.arguments import parse_args
    except ImportError:
        return megatron_parser(extra_args_provider).parse_args(argv)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    return parse_args(extra_args_provider)


def test_flags_parse_with_the_provider(monkeypatch):
    args = parse(FLAGS + ["--kernel-dvfs-sm-mhz", "1500", "--kernel-dvfs-mem-mhz", "2619"],
                 add_kernel_dvfs_args, monkeypatch)
    assert args.kernel_dvfs is True
    assert args.kernel_dvfs_mode == "observe"
    assert args.kernel_dvfs_plan_path == "plan.json"
    assert args.kernel_dvfs_max_slowdown == 0.01
    assert args.kernel_dvfs_sm_mhz == 1500 and isinstance(args.kernel_dvfs_sm_mhz, int)
    cfg = config_from_args(args)
    assert cfg == KdvfsConfig.from_dict(
        {"mode": "observe", "plan_path": "plan.json", "max_slowdown": 0.01, "sm_mhz": 1500, "mem_mhz": 2619}
    )


def test_megatron_rejects_the_flags_without_the_provider(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(FLAGS, None, monkeypatch)
    assert exc.value.code == 2
    assert "unrecognized arguments: --kernel-dvfs" in capsys.readouterr().err


def test_every_config_field_has_a_flag():
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    options = set(parser._option_string_actions)
    for f in dataclasses.fields(KdvfsConfig):
        if f.name == "enabled":
            assert "--kernel-dvfs" in options
        else:
            assert flag_name(f.name) in options, f"no flag for config field {f.name}"
    assert {"--kernel-dvfs-plan", "--kernel-dvfs-config"} <= options


def test_absent_switch_gives_none_and_warns_about_ignored_flags(kdvfs_log):
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    assert config_from_args(parser.parse_args([])) is None
    assert not kdvfs_log
    assert config_from_args(parser.parse_args(["--kernel-dvfs-mode", "apply"])) is None
    assert any("without --kernel-dvfs" in r.getMessage() for r in kdvfs_log)


def test_types_and_json_values():
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args([
        "--kernel-dvfs", "--kernel-dvfs-region-clocks", '{"optimizer": {"sm_mhz": 1200, "mem_mhz": 2619}}',
        "--kernel-dvfs-sim-noise", "false", "--kernel-dvfs-module-depth", "2", "--kernel-dvfs-progress", "true",
        "--kernel-dvfs-granularity", "pass",
    ])
    cfg = config_from_args(args)
    assert cfg.region_clocks == {"optimizer": ClockPair(1200, 2619)}
    assert cfg.sim_noise is False and cfg.module_depth == 2 and cfg.progress is True and cfg.granularity == "pass"
    assert parser.parse_args(["--kernel-dvfs-sim-noise"]).kernel_dvfs_sim_noise is True


@pytest.mark.parametrize("argv, fragment", [
    (["--kernel-dvfs-sm-mhz", "fast"], "invalid int value"),
    (["--kernel-dvfs-region-clocks", "{oops"], "invalid JSON object value"),
    (["--kernel-dvfs-sim-noise", "maybe"], "invalid bool"),
])
def test_unparsable_values_stop_at_parse_time(argv, fragment, capsys):
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--kernel-dvfs", *argv])
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, allowed", [
    (["--kernel-dvfs-mode", "fast"], "--kernel-dvfs-mode", "observe | explore | apply | auto"),
    (["--kernel-dvfs-max-slowdown", "2"], "--kernel-dvfs-max-slowdown", "[0.0, 1.0]"),
    (["--kernel-dvfs-sm-mhz", "1500"], "--kernel-dvfs-sm-mhz", "give both --kernel-dvfs-sm-mhz and --kernel-dvfs-mem-mhz"),
    (["--kernel-dvfs-region-clocks", '{"forward": {"sm_mhz": 1}}'], "--kernel-dvfs-region-clocks['forward']", ""),
])
def test_bad_values_raise_config_error_naming_the_flag(argv, flag, allowed):
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    with pytest.raises(ConfigError) as exc:
        config_from_args(parser.parse_args(["--kernel-dvfs", *argv]))
    assert exc.value.source == "--kernel-dvfs-* flags"
    assert exc.value.key == flag
    assert allowed in str(exc.value)


def test_config_file_is_read_and_flags_override_it(tmp_path):
    path = tmp_path / "kd.json"
    path.write_text(json.dumps({"mode": "apply", "max_slowdown": 0.02, "run_dir": "runs"}))
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    cfg = config_from_args(parser.parse_args(["--kernel-dvfs", "--kernel-dvfs-config", str(path),
                                              "--kernel-dvfs-max-slowdown", "0.05"]))
    assert (cfg.mode, cfg.max_slowdown, cfg.run_dir) == ("apply", 0.05, "runs")
    # A DeepSpeed JSON carries the same keys in its "kernel_dvfs" block.
    path.write_text(json.dumps({"train_batch_size": 8, "kernel_dvfs": {"mode": "observe"}}))
    assert config_from_args(parser.parse_args(["--kernel-dvfs", "--kernel-dvfs-config", str(path)])).mode == "observe"


def test_config_file_errors_name_the_file(tmp_path):
    parser = add_kernel_dvfs_args(argparse.ArgumentParser(allow_abbrev=False))
    path = tmp_path / "kd.json"
    path.write_text(json.dumps({"mdoe": "apply"}))
    with pytest.raises(ConfigError, match="did you mean 'mode'") as exc:
        config_from_args(parser.parse_args(["--kernel-dvfs", "--kernel-dvfs-config", str(path)]))
    assert exc.value.source == f"--kernel-dvfs-config {path}"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_from_args(parser.parse_args(["--kernel-dvfs", "--kernel-dvfs-config", str(path)]))
    with pytest.raises(ConfigError, match="cannot be read"):
        config_from_args(parser.parse_args(["--kernel-dvfs", "--kernel-dvfs-config", str(tmp_path / "missing.json")]))


def test_chain_providers_calls_each_in_order_and_skips_none():
    seen = []

    def add_other(parser):
        seen.append("other")
        parser.add_argument("--other-flag", action="store_true")
        return parser

    def returns_nothing(parser):
        seen.append("nothing")

    provider = chain_providers(add_other, None, returns_nothing, add_kernel_dvfs_args)
    args = megatron_parser(provider).parse_args(["--other-flag", "--kernel-dvfs"])
    assert seen == ["other", "nothing"]
    assert args.other_flag and args.kernel_dvfs


def test_overhead_benchmark_parses_the_kdvfs_flags():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_megatron_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_megatron_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args(["--tiny", "--kernel-dvfs", "--kernel-dvfs-mode", "observe",
                                            "--kernel-dvfs-device", "observe"])
    bench.apply_tiny_defaults(args)
    assert (args.steps, args.block_steps, args.num_layers) == (24, 4, 2)
    assert config_from_args(args).device == "observe"


def test_every_timer_of_the_installed_megatron_is_mapped():
    """Timer names are the adapter's contract with Megatron: a renamed timer must fail here."""
    import importlib
    import re
    from pathlib import Path

    pytest.importorskip("megatron.core")
    from kdvfs_megatron import GRADS_REGION, PIPELINE_REGION, REGION_OF_TIMER

    def timer_names(module):
        return set(re.findall(r"timers\('([a-z-]+)'", Path(importlib.import_module(module).__file__).read_text()))

    p2p = timer_names("megatron.core.pipeline_parallel.p2p_communication")
    assert p2p and all(REGION_OF_TIMER.get(n) == PIPELINE_REGION for n in p2p), p2p
    grads = timer_names("megatron.core.distributed.finalize_model_grads")
    assert grads and all(REGION_OF_TIMER.get(n) == GRADS_REGION for n in grads), grads
    assert timer_names("megatron.core.pipeline_parallel.schedules") == {"forward-compute", "backward-compute",
                                                                         "forward-backward"}
