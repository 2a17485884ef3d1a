"""Error messages that stop a mistake early and say what to do, printed with the program named once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))

from kdvfs_plugins import ConfigError  # noqa: E402
from kdvfs_plugins.cli import error_line, main  # noqa: E402


def test_the_program_is_named_once(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdvfs report: RUN_DIR=") and err.count("kdvfs report") == 1
    # an error raised by a part the command borrows (the trace reader) is shown under the command
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["simulate", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdvfs simulate: trace='bad.csv'") and "kdvfs trace" not in err
    assert error_line("info", ConfigError("k", 1, "allowed: 2", "plan file p.json")) == \
        "kdvfs info: plan file p.json: k=1 is not allowed; allowed: 2"


def test_a_missing_trace_says_not_found(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--trace", "nonexistent.csv"]) == 2
    err = capsys.readouterr().err
    assert "kdvfs simulate: --trace='nonexistent.csv'" in err and "not found" in err and "gpt1b" in err


def test_megatron_fixed_clocks_need_both_flags():
    from kdvfs_megatron.args import add_kernel_dvfs_args, config_from_args

    parser = add_kernel_dvfs_args(argparse.ArgumentParser())
    for flag, value in (("--kernel-dvfs-sm-mhz", "1500"), ("--kernel-dvfs-mem-mhz", "2619")):
        with pytest.raises(ConfigError) as err:
            config_from_args(parser.parse_args(["--kernel-dvfs", flag, value]))
        assert str(err.value) == (f"--kernel-dvfs-* flags: {flag}={int(value)} is not allowed; give both "
                                  "--kernel-dvfs-sm-mhz and --kernel-dvfs-mem-mhz (fixed clocks for the whole step), "
                                  "or neither")
    both = parser.parse_args(["--kernel-dvfs", "--kernel-dvfs-sm-mhz", "1500", "--kernel-dvfs-mem-mhz", "2619"])
    assert (config_from_args(both).sm_mhz, config_from_args(both).mem_mhz) == (1500, 2619)


def test_lightning_apply_with_a_missing_plan_fails_at_construction(tmp_path):
    from kdvfs_lightning import KernelDVFS

    with pytest.raises(ConfigError, match=r"KernelDVFS\(\.\.\.\): plan_path='.*missing.json' is not allowed; "
                                          r"no plan file at .*missing.json; mode 'apply' reads a stored plan"):
        KernelDVFS(mode="apply", plan_path=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"the default: <run_dir>/plan.json"):
        KernelDVFS(mode="apply", run_dir=str(tmp_path))
    # fixed clocks need no plan file; an existing file is accepted
    KernelDVFS(mode="apply", sm_mhz=1500, mem_mhz=2619, run_dir=str(tmp_path))
    (tmp_path / "plan.json").write_text("{}")
    KernelDVFS(mode="apply", plan_path=str(tmp_path / "plan.json"))


def test_deepspeed_apply_with_a_missing_plan_fails_before_deepspeed(tmp_path):
    import kdvfs_deepspeed

    with pytest.raises(ConfigError, match="DeepSpeed 'kernel_dvfs' block: plan_path=.*no plan file"):
        kdvfs_deepspeed.config_from_deepspeed({"kernel_dvfs": {"mode": "apply", "plan_path": str(tmp_path / "p.json")}})


def test_info_without_a_driver_does_not_say_writes_are_permitted(monkeypatch, capsys):
    from fakes.fake_nvml import FakeNvml
    from kdvfs_plugins.commands import info as info_cmd
    from kdvfs_plugins.devices import nvml as nvml_backend

    monkeypatch.setattr(nvml_backend, "writes_permitted", lambda: True)  # root with SYS_ADMIN, but no driver
    assert info_cmd.run(argparse.Namespace(json=False), nvml=FakeNvml(driver=False)) == 0
    text = capsys.readouterr().out
    assert "clock writes: permitted" not in text
    assert "clock writes: none possible (no NVIDIA driver, so no GPU clocks to set)" in text
    assert info_cmd.collect(FakeNvml(driver=False))["clock_writes"]["permitted"] is False
