"""Two gloo ranks: one plan for the group, and no stall when a rank cannot set clocks."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kdvfs_plugins import ClockPair
from kdvfs_plugins.clocks import ClockTable
from kdvfs_plugins.data import h100_clock_lists, h100_default_clocks
from kdvfs_plugins.plan import Plan

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(tmp_path, scenario):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), KDVFS_DISABLE_ENTRYPOINTS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "tests" / "distributed_scripts" / "two_ranks.py"),
           str(tmp_path), scenario]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def write_plan(path):
    mem, sm = h100_clock_lists()
    name = h100_default_clocks()["device"]["name"]
    Plan(name, ClockTable.from_lists(mem, sm), {"backward": ClockPair(1500, 2619)}).save(path)


@pytest.mark.slow
def test_the_group_uses_the_first_ranks_plan(tmp_path):
    write_plan(tmp_path / "plan.json")
    ranks = run_two(tmp_path, "plan")
    assert [r.get("error") for r in ranks] == [None, None]
    assert ranks[0]["plan"] == ranks[1]["plan"] == {"backward": {"sm_mhz": 1500, "mem_mhz": 2619}}


@pytest.mark.slow
def test_when_the_first_rank_cannot_load_the_plan_every_rank_says_so(tmp_path):
    ranks = run_two(tmp_path, "plan")  # no plan.json at all: rank 0 fails, rank 1 hears it
    assert "does not exist" in ranks[0]["error"]
    assert ranks[1]["error"].startswith("AgreementError: rank 0 of this group could not decide")


@pytest.mark.slow
def test_a_rank_whose_writes_are_refused_falls_back_and_does_not_stall_the_other(tmp_path):
    ranks = run_two(tmp_path, "refused")
    assert [r.get("error") for r in ranks] == [None, None]
    assert ranks[0]["device"] == "nvml" and ranks[0]["writes"] > 0 and ranks[0]["restored"]
    assert ranks[1]["device"] == "observe" and ranks[1]["writes"] == 0
