"""megatron-core's 1F1B pipeline schedule under kdvfs on the CPU: 4 gloo ranks, pp = 4.

Every forward/backward computation and every P2P transfer is a region with its microbatch; a plan
by instruction reaches every stage and changes clocks per instruction; a stage whose clock writes
are refused falls back to observe while the others go on. The CPU shims live in
tests/megatron_fixtures/. The expected regions follow the 1F1B loop of megatron-core 0.16.1
(``forward_backward_pipelining_without_interleaving``: warm-up forwards, steady 1F1B, cool-down
backwards), written out here independently of the adapter.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "megatron_fixtures" / "pipe_live.py"
STAGES, MICROBATCHES, STEPS = 4, 4, 2

WAIT, FWD0, FWD, BWD, COMM, OPT = [345, 1593], [1200, 2619], [1500, 2619], [1800, 2619], [1005, 2619], [1605, 2619]
#: Every receive is a wait, also the combined send-and-receive calls of the steady state.
WAITS = ("recv_forward", "recv_backward", "send_forward_recv_backward", "send_backward_recv_forward",
         # the interleaved schedule's
         "send_forward_recv_forward", "send_backward_recv_backward", "send_forward_backward_recv_forward_backward")
PLAN = {**{f"communication/{w}.*": WAIT for w in WAITS},
        "forward/pipe.mb0": FWD0, "forward/pipe.*": FWD, "backward": BWD, "communication": COMM, "optimizer": OPT}


def run_ranks(out: Path, block: dict, *extra, ranks: int = STAGES) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", KDVFS_DISABLE_ENTRYPOINTS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}",
           str(SCRIPT), str(out), "--microbatches", str(MICROBATCHES), "--steps", str(STEPS),
           "--block", json.dumps(block), *map(str, extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def one_f_one_b(stage: int) -> list[str]:
    """The regions of one schedule call plus the optimizer on ``stage``."""
    first, last = stage == 0, stage == STAGES - 1
    warmup = min(STAGES - stage - 1, MICROBATCHES)
    steady = MICROBATCHES - warmup
    out, f, b = [], 0, 0
    for _ in range(warmup):
        out += [] if first else [f"communication/recv_forward.mb{f}"]
        out += [f"forward/pipe.mb{f}"] + ([] if last else [f"communication/send_forward.mb{f}"])
        f += 1
    if steady and not first:
        out.append(f"communication/recv_forward.mb{f}")
    for i in range(steady):
        out.append(f"forward/pipe.mb{f}")
        f += 1
        out += [] if last else [f"communication/send_forward_recv_backward.mb{b}"]
        out.append(f"backward/pipe.mb{b}")
        b += 1
        if not first:
            out.append(f"communication/send_backward.mb{b - 1}" if i == steady - 1
                       else f"communication/send_backward_recv_forward.mb{f}")
    for _ in range(warmup):
        out += [] if last else [f"communication/recv_backward.mb{b}"]
        out.append(f"backward/pipe.mb{b}")
        b += 1
        out += [] if first else [f"communication/send_backward.mb{b - 1}"]
    # finalize_model_grads times four reductions in 0.16.1; then train_step's optimizer
    return out + ["communication/grads"] * 4 + ["optimizer"]


def clocks_of(region: str):
    phase, _, group = region.partition("/")
    if group.rsplit(".mb", 1)[0] in WAITS:
        return WAIT
    if region == "forward/pipe.mb0":
        return FWD0
    return {"forward": FWD, "backward": BWD, "communication": COMM, "optimizer": OPT}[phase]


def entered(events, step):
    return [r for kind, r, s in events if kind == "enter" and s == step]


def test_four_stages_plan_by_instruction(tmp_path):
    out = tmp_path / "out"
    ranks = run_ranks(out, {"region_clocks": PLAN, "warmup_steps": 0})
    assert sorted(r["stage"] for r in ranks) == list(range(STAGES))
    for r in ranks:
        stage, want = r["stage"], one_f_one_b(r["stage"])
        for step in range(STEPS):
            assert entered(r["events"], step) == want, f"stage {stage} step {step}"
        assert r["records"] == list(range(STEPS)) and r["proxy_left"] is False
        # every stage waits somewhere, and the plan gave each instruction its clocks, waits lowest
        assert any(clocks_of(n) == WAIT for n in want)
        # each instruction's clocks, then the step's (default) between instructions, every step
        assert r["requests"] == [c for region in want * STEPS for c in (clocks_of(region), None)], f"stage {stage}"
        assert r["requests"][-1] is None  # default clocks back at the end
        rank_dir = out / "run" / f"rank{r['rank']}"
        steps = [json.loads(line) for line in (rank_dir / "steps.jsonl").read_text().splitlines()]
        assert set(steps[0]["region_time_ms"]) == set(want) | {"step"}


def test_refused_stage_falls_back_and_the_others_go_on(tmp_path):
    refused = 1
    block = {"device": "nvml", "region_clocks": {**{f"communication/{w}.*": WAIT for w in WAITS}, "backward": BWD}}
    ranks = {r["rank"]: r for r in run_ranks(tmp_path / "out", block, "--refuse", refused)}
    for rank, r in ranks.items():
        assert r["records"] == list(range(STEPS)), f"rank {rank} did not finish its steps"
        for step in range(STEPS):
            assert entered(r["events"], step) == one_f_one_b(r["stage"])
        if rank == refused:
            assert r["device"] == "observe" and r["writes"] == 0
        else:
            assert r["device"] == "nvml" and r["writes"] > 0 and r["restored"] is True
            assert BWD in [c for _, c in r["changes"]]


def test_interleaved_two_stages_two_chunks(tmp_path):
    """pp = 2 with 2 model chunks per stage: the index counts each stage's forwards (backwards)
    over its chunks, Megatron's virtual microbatch id, so it runs 0 .. 2 * microbatches - 1 in order."""
    ranks = run_ranks(tmp_path / "out", {"region_clocks": PLAN}, "--chunks", 2, ranks=2)
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    virtual = list(range(2 * MICROBATCHES))
    for r in ranks:
        assert r["records"] == list(range(STEPS))
        for step in range(STEPS):
            names = entered(r["events"], step)
            assert [n for n in names if n.startswith("forward/")] == [f"forward/pipe.mb{i}" for i in virtual]
            assert [n for n in names if n.startswith("backward/")] == [f"backward/pipe.mb{i}" for i in virtual]
            transfers = {n.partition("/")[2].rsplit(".mb", 1)[0] for n in names if ".mb" in n and n.startswith("comm")}
            assert transfers and all(callable(getattr(P2PCommunicator, t, None)) for t in transfers)
            assert names[-1] == "optimizer"
        want = entered(r["events"], 0)
        assert r["requests"] == [c for region in want * STEPS for c in (clocks_of(region), None)]
