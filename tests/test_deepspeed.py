"""kdvfs under real DeepSpeed on the CPU: gloo, the simulated device, 1 and 2 ranks, ZeRO 0 and 2.

Each run happens in a subprocess (DeepSpeed's process group is per process; two ranks need
torchrun), which writes what kdvfs saw to ``rank<N>.json``.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

deepspeed = pytest.importorskip("deepspeed")

try:
    import kdvfs_deepspeed
except ImportError:  # the package is new: an editable install made before it existed lacks it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    import kdvfs_deepspeed

from kdvfs_plugins import ConfigError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "deepspeed_scripts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_env(world_size: int) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "integrations"), env.get("PYTHONPATH")])))
    if world_size == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    else:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
    return env


def run(script: Path, args: list, world_size: int = 1, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    env = ds_env(world_size)
    if world_size == 1:
        cmd = [sys.executable, str(script), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
               f"--master_port={env['MASTER_PORT']}", str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def results(out: Path, world_size: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def phases(events, step=None):
    return [r for kind, r, s in events if kind == "enter" and "/" not in r and (step is None or s == step)]


def expected(gas: int, zero: int, steps: int) -> list[str]:
    """Per micro-step forward, backward (with the reduction inside it where DeepSpeed reduces),
    then the optimizer at the accumulation boundary."""
    out = []
    for _ in range(steps):
        for micro in range(gas):
            out += ["forward", "backward"]
            if zero >= 2 or micro == gas - 1:  # ZeRO 0/1 reduce at the boundary only
                out.append("communication")
        out.append("optimizer")
    return out


def check_nesting(events):
    """Phases open and close in order; kernel groups open inside their own phase."""
    open_phases = []
    for kind, region, _ in events:
        if "/" in region:
            if kind == "enter":
                assert open_phases and region.split("/")[0] == open_phases[-1], (region, open_phases)
        elif kind == "enter":
            open_phases.append(region)
        else:
            assert open_phases.pop() == region
    assert not open_phases


def check_rank(r: dict, gas: int, zero: int, steps: int) -> None:
    assert phases(r["events"]) == expected(gas, zero, steps)
    for step in range(steps):
        assert phases(r["events"], step) == expected(gas, zero, 1), f"rank {r['rank']} step {step}"
    check_nesting(r["events"])
    assert r["records"] == list(range(steps))
    # Clocks were changed, then reset to the driver's default at the end.
    assert r["requests"][0] == [1500, 2619] and r["requests"][-1] is None
    assert r["wrapped_left"] == []
    assert r["global_steps"] == steps


# ---------------------------------------------------------------------- configuration
def _no_engine(*args, **kwargs):
    raise AssertionError("deepspeed.initialize ran although the kernel_dvfs block is invalid")


def test_invalid_block_fails_before_deepspeed_builds_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(deepspeed, "initialize", functools.wraps(deepspeed.initialize)(_no_engine))
    bad = {"train_micro_batch_size_per_gpu": 1, "kernel_dvfs": {"device": "simulated", "granularity": "layer"}}
    with pytest.raises(ConfigError, match=r"DeepSpeed 'kernel_dvfs' block: granularity='layer'.*kernel \| pass"):
        kdvfs_deepspeed.initialize(model=object(), config=bad)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**bad, "kernel_dvfs": {"sm_mhz": 1500}}))
    with pytest.raises(ConfigError, match="mem_mhz"):
        kdvfs_deepspeed.initialize(model=object(), config=str(path))
    args = SimpleNamespace(deepspeed_config=str(path), local_rank=-1)
    with pytest.raises(ConfigError, match="mem_mhz"):
        kdvfs_deepspeed.initialize(args, object())
    with pytest.raises(ConfigError, match="unknown key; did you mean 'max_slowdown'"):
        kdvfs_deepspeed.initialize(model=object(), config_params={"kernel_dvfs": {"max_slowdwn": 0.1}})


# ---------------------------------------------------------------------- regions, 1 and 2 ranks
def test_one_rank_zero0_attach_with_monitor(tmp_path):
    out, mon = tmp_path / "out", tmp_path / "monitor"
    run(SCRIPTS / "record_regions.py", [out, "--zero", 0, "--gas", 2, "--steps", 3, "--attach", "--monitor", mon,
                                        "--block", '{"granularity": "pass"}'])
    (r,) = results(out, 1)
    check_rank(r, gas=2, zero=0, steps=3)
    rows = (mon / "job" / "kdvfs_gpu_time_ms.csv").read_text().splitlines()
    assert rows[0] == "step,gpu_time_ms" and len(rows) >= 2
    assert (out / "run" / "rank0" / "summary.json").exists()


def test_one_rank_zero2_kernel_groups(tmp_path):
    out = tmp_path / "out"
    run(SCRIPTS / "record_regions.py", [out, "--zero", 2, "--gas", 2, "--steps", 2])
    (r,) = results(out, 1)
    check_rank(r, gas=2, zero=2, steps=2)
    groups = {region for _, region, _ in r["events"] if "/" in region}
    assert {"forward/embed", "forward/head"} <= groups and any(g.startswith("backward/") for g in groups)


@pytest.mark.parametrize("zero", [0, 2])
def test_two_ranks(tmp_path, zero):
    out = tmp_path / "out"
    run(SCRIPTS / "record_regions.py", [out, "--zero", zero, "--gas", 2, "--steps", 2, "--block",
                                        '{"granularity": "pass"}'], world_size=2)
    ranks = results(out, 2)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    for r in ranks:
        check_rank(r, gas=2, zero=zero, steps=2)
    assert ranks[0]["weight_sum"] == pytest.approx(ranks[1]["weight_sum"])  # data parallel stayed in step


# ---------------------------------------------------------------------- pipeline
def pipe_expected(stages: int, stage: int, gas: int) -> list[str]:
    """The phase of each instruction in DeepSpeed's 1F1B train schedule, in order."""
    from deepspeed.runtime.pipe.schedule import TrainSchedule

    names = []
    for step_cmds in TrainSchedule(micro_batches=gas, stages=stages, stage_id=stage):
        for cmd in step_cmds:
            phase = kdvfs_deepspeed.PIPE_PHASES.get(type(cmd).__name__)
            if phase:
                names.append(phase)
    return names


@pytest.mark.parametrize("stages", [2])  # one stage runs the same instructions minus send/recv
def test_pipeline_instructions_map_to_regions(tmp_path, stages):
    out = tmp_path / "out"
    run(SCRIPTS / "record_pipeline.py", [out, "--stages", stages, "--gas", 2, "--steps", 2], world_size=stages)
    for r in results(out, stages):
        for step in range(2):
            # each instruction is a region of its own phase (names: test_pipeline_live_deepspeed.py)
            entered = [region.partition("/")[0] for kind, region, s in r["events"] if kind == "enter" and s == step]
            assert entered == pipe_expected(stages, r["rank"], 2)
        assert r["records"] == [0, 1]
        assert r["requests"][0] == [1500, 2619] and r["requests"][-1] is None
        assert r["instance_map_left"] is False


# ---------------------------------------------------------------------- example
def test_example_runs_on_cpu(tmp_path):
    proc = run(ROOT / "examples" / "deepspeed_train.py",
               ["--deepspeed_config", ROOT / "examples" / "deepspeed_config.json", "--steps", 2], cwd=tmp_path)
    assert "trained 2 steps" in proc.stdout
    summary = json.loads((tmp_path / "kdvfs_runs" / "deepspeed_example" / "rank0" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["clock_changes"] >= 1 and summary["model_prediction"] is True
