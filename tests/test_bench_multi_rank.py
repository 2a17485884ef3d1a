"""The overhead benchmarks on two data-parallel ranks: gloo on the CPU, the simulated device.

Each runs under torchrun as the GPU runs do; rank 0 must report every rank's own region table
and energy. Blocks are longer than the benchmarks' --tiny defaults: the simulated GPU's energy
counter refreshes every 100 ms (host time on the CPU), and a few short steps may end before
any refresh follows them, which leaves a rank without an energy figure.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, args: list, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # A launcher's variables from outside would make the ranks join some other group.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", **(extra_env or {}),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "integrations"), env.get("PYTHONPATH")])))
    # --standalone picks a free port for the rendezvous: parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "benchmarks" / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def region_rows(stdout: str, rank: int) -> list[str]:
    """The region rows of ``rank``'s table in rank 0's output (between the header and 'total')."""
    section = re.search(rf"^=== rank {rank} \(.*?(?=^=== rank |\Z)", stdout, re.M | re.S)
    assert section, f"no section for rank {rank} in:\n{stdout}"
    lines = section.group(0).splitlines()
    assert any(line.startswith(f"kdvfs region table (rank {rank},") for line in lines), section.group(0)
    start = next(i for i, line in enumerate(lines) if line.startswith("region ") and "GPU ms/step" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("total "))
    return [line for line in lines[start + 1:end] if re.match(r"^\S+\s+\d+\.\d{3}\s+\d+\.\d%$", line)]


def check_ranks(proc: subprocess.CompletedProcess, out: dict) -> None:
    for rank in (0, 1):
        rows = region_rows(proc.stdout, rank)
        assert rows and any(r.split()[0] == "forward" for r in rows), proc.stdout
    assert proc.stdout.count("=== rank ") == 2  # printed once, by rank 0
    assert out["world_size"] == 2 and [r["rank"] for r in out["ranks"]] == [0, 1]
    for r in out["ranks"]:
        assert r["energy_j_per_step"] > 0 and r["avg_power_w"] > 0, r
        assert r["regions"] and all(ms >= 0 for _, ms, _ in r["regions"])
        assert r["gpu"]["kind"] == "simulated"
    # each rank drove its own GPU
    assert [r["gpu"]["uuid"] for r in out["ranks"]] == ["SIM-0", "SIM-1"]


def test_lightning_two_ranks(tmp_path):
    pytest.importorskip("lightning.pytorch")
    out = tmp_path / "bench.json"
    proc = torchrun("bench_lightning_overhead.py", ["--tiny", "--device", "simulated", "--devices", 2, "--rounds", 1,
                                                    "--steps", 12, "--continuous-steps", 30,
                                                    "--run-dir", tmp_path / "run", "--json", out])
    result = json.loads(out.read_text())
    check_ranks(proc, result)
    assert "batch 4 per GPU x 2 GPUs (DDP)" in proc.stdout
    assert len(result["with_ms"]) == len(result["without_ms"]) == 1 and result["step_times_from"] == "rank 0"
    assert all(0 < r["host_ms_per_step"] < 1e3 for r in result["ranks"])
    # the timed steps but the last (11) split by profiled or not; the warm-up's installation left out
    for r in result["ranks"]:
        assert len(r["host_ms_profiled_steps"]) < 11 and 0 < r["host_ms_plain_step_median"] < r["host_ms_per_step"]
    assert proc.stdout.count("host time in kdvfs's hooks (last block):") == 2
    assert proc.stdout.count("on a plain timed step") == 2
    assert proc.stdout.count("; CPU time of kdvfs's threads ") == 2
    # the step markers' times of the last block's timed steps, and which of them were profiled
    for r in result["ranks"]:
        said = "none of them profiled" if not r["profiled_step_ms"] else "profiled ones: "
        assert f"(timed steps of the last block): {r['median_gpu_step_ms']:.2f} ms; {said}" in proc.stdout
    # one long session after the blocks: its first step installs the hooks, the cadence goes on
    for r in result["ranks"]:
        c = r["continuous"]
        assert c["steps"] == 30 and c["profiled_steps"][:2] == [0, 25] and c["interval_steps"] >= 25
    assert proc.stdout.count("one kdvfs session over 30 steps") == 2
    assert [r["continuous"]["thread_cpu_ms_per_step"] for r in result["ranks"]] == [0.0, 0.0]  # simulated
    # the second profiled step (25) was judged: the estimate is the rounds plus rank 0's share
    share = result["ranks"][0]["continuous"]["profiling_share"]
    assert share is not None and share > 0
    e = result["long_run_estimate"]
    assert e["overhead_pct"] == pytest.approx(result["overhead_pct_median_of_rounds"] + 100 * share)
    assert "long-run estimate: median of rounds + profiled share" in proc.stdout
    for rank in (0, 1):
        assert (tmp_path / "run" / f"rank{rank}" / "summary.json").exists()


def test_deepspeed_two_ranks_zero2(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "bench.json"
    # mode observe: what the GPU run's observe device amounts to, and no exploration in between
    proc = torchrun("bench_deepspeed_overhead.py", ["--tiny", "--mode", "observe", "--steps-per-block", 12,
                                                    "--blocks", 2, "--warmup-steps", 4, "--continuous-steps", 12,
                                                    "--run-dir", tmp_path / "run", "--json", out],
                    {"DS_ACCELERATOR": "cpu"})
    result = json.loads(out.read_text())
    check_ranks(proc, result)
    assert "ZeRO-2" in proc.stdout and "per GPU x 2 GPUs" in proc.stdout
    assert result["zero"] == 2 and result["steps_per_arm"] == 2 * (12 - 2)
    # each rank's host time in kdvfs's hooks, per step of the blocks with kdvfs
    assert all(0 < r["host_ms_per_step"] < 1e3 for r in result["ranks"])
    assert proc.stdout.count("host time in kdvfs's hooks:") == 2
    # and what kdvfs's own threads used beside it: none here, as the simulated GPU needs no power
    # sampler and its markers are reached when recorded, with no worker to wait on them
    assert [r["thread_cpu_ms_per_step"] for r in result["ranks"]] == [0.0, 0.0]
    assert proc.stdout.count("CPU time of kdvfs's threads: ") == 2
    assert "95% bootstrap interval" in proc.stdout and len(result["overhead_pct_per_round"]) == 2
    assert [len(b) for b in result["block_steps_ms"]] == [12 - 2] * 4
    # every step timed: the arms' step-time quantiles, from the same steps as the medians
    q = {r["q"]: r for r in result["step_quantiles"]}
    assert q[0.5]["with_ms"] == pytest.approx(result["median_step_ms_with_kdvfs"])
    assert q[0.1]["without_ms"] <= q[0.5]["without_ms"] <= q[0.9]["without_ms"]
    assert "step-time quantiles, with / without kdvfs: p10 " in proc.stdout
    # one session over the last 12 steps: its first step is profiled, the cadence reports its spacing
    for r in result["ranks"]:
        c = r["continuous"]
        assert c["steps"] == 12 and c["profiled_steps"] and c["interval_steps"] >= 25
    assert proc.stdout.count("one kdvfs session over 12 steps") == 2


def test_deepspeed_two_ranks_synchronised_per_block(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "bench.json"
    proc = torchrun("bench_deepspeed_overhead.py", ["--tiny", "--mode", "observe", "--steps-per-block", 8,
                                                    "--blocks", 2, "--warmup-steps", 2, "--sync", "block",
                                                    "--kdvfs", '{"power_readings": "step_end"}',
                                                    "--run-dir", tmp_path / "run", "--json", out],
                    {"DS_ACCELERATOR": "cpu"})
    result = json.loads(out.read_text())
    assert result["sync"] == "block" and "synchronised per block" in proc.stdout
    # keys given with --kdvfs reach the kernel_dvfs block and the header says so
    assert 'synchronised per block, kernel_dvfs also {"power_readings": "step_end"}' in proc.stdout
    assert result["kdvfs_extra"] == {"power_readings": "step_end"}
    # one time per block, the mean of its steps after the settle steps; host time still per step
    assert result["steps_per_arm"] == 2 * (8 - 2)
    assert [len(b) for b in result["block_steps_ms"]] == [1] * 4 and all(b[0] > 0 for b in result["block_steps_ms"])
    assert all(len(p) == 8 - 2 for p in result["block_steps_profiled"])
    assert all(0 < r["host_ms_per_step"] < 1e3 for r in result["ranks"])
    assert "(median of the blocks' means)" in proc.stdout and len(result["overhead_pct_per_round"]) == 2
    assert result["step_quantiles"] is None and "step-time quantiles" not in proc.stdout


def test_deepspeed_third_arm_compares_two_settings_within_the_same_rounds(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "bench.json"
    proc = torchrun("bench_deepspeed_overhead.py", ["--tiny", "--mode", "observe", "--steps-per-block", 4,
                                                    "--blocks", 2, "--warmup-steps", 2, "--settle-steps", 1,
                                                    "--alt-kdvfs", '{"granularity": "iteration"}',
                                                    "--run-dir", tmp_path / "run", "--json", out],
                    {"DS_ACCELERATOR": "cpu"})
    result = json.loads(out.read_text())
    # two rounds of three blocks, the second turned by one: it starts with the arm the first ended with
    assert result["block_arms"] == ["on", "off", "alt", "alt", "on", "off"]
    alt = result["alt"]
    assert alt["kdvfs_extra"] == {"granularity": "iteration"}
    for versus in ("against_without", "against_with"):
        assert len(alt[versus]["overhead_pct_per_round"]) == 2
    # each round's figure is its third-arm block over its block of the other arm
    first_round = {arm: statistics.median(ms) for arm, ms in zip(result["block_arms"][:3], result["block_steps_ms"][:3])}
    assert alt["against_with"]["overhead_pct_per_round"][0] == pytest.approx(
        (first_round["alt"] / first_round["on"] - 1) * 100)
    # every rank ran the third arm with its keys; without module hooks it profiled no step, where
    # the kernel-granularity arm's first step installs and profiles them. (Host time in the hooks
    # is no measure of kdvfs here: on the simulated GPU it includes costing the counted ops.)
    for r in result["ranks"]:
        assert r["alt"]["config"] == {"granularity": "iteration"}
        assert r["alt"]["host_ms_per_step"] > 0 and r["host_ms_per_step"] > 0
        assert r["alt"]["profiled_steps"] == 0 < r["profiled_steps"]
    assert "third arm, kdvfs with {\"granularity\": \"iteration\"} too" in proc.stdout
    assert "overhead against kdvfs without those keys per round" in proc.stdout
    assert proc.stdout.count("third arm: median step time") == 2
