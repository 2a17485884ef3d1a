"""DeepSpeed's PipelineEngine under kdvfs on the CPU: 4 gloo ranks, one stage each (1F1B).

Every executed instruction is a region with its microbatch; a plan by instruction reaches every
stage and changes clocks per instruction; a stage whose clock writes are refused falls back to
observe while the others go on. The expected regions come from DeepSpeed's own TrainSchedule
(its micro-batch ids, not the adapter's counting).
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("deepspeed")

from test_deepspeed import SCRIPTS, results, run  # noqa: E402

pytestmark = pytest.mark.slow

STAGES, GAS, STEPS = 4, 4, 2

WAIT, FWD0, FWD, BWD, COMM, OPT = [345, 1593], [1200, 2619], [1500, 2619], [1800, 2619], [1005, 2619], [1605, 2619]
PLAN = {
    "communication/recv_activation.*": WAIT,  # every microbatch's receive: the waits
    "communication/recv_grad.*": WAIT,
    "forward/pipe.mb0": FWD0,  # one microbatch alone
    "forward/pipe.*": FWD,
    "backward": BWD,  # a phase: every backward instruction
    "communication": COMM,  # sends and gradient reductions
    "optimizer": OPT,
}

#: Instruction class -> region prefix, and whether the region carries the micro-batch (as documented).
NAMES = {
    "ForwardPass": ("forward/pipe", True), "BackwardPass": ("backward/pipe", True),
    "SendActivation": ("communication/send_activation", True),
    "RecvActivation": ("communication/recv_activation", True),
    "SendGrad": ("communication/send_grad", True), "RecvGrad": ("communication/recv_grad", True),
    "ReduceGrads": ("communication/reduce_grads", False),
    "ReduceTiedGrads": ("communication/reduce_tied_grads", False),
    "OptimizerStep": ("optimizer", False),
}


def schedule_regions(stage: int) -> list[str]:
    """The regions of one train_batch() on ``stage``, from DeepSpeed's TrainSchedule."""
    from deepspeed.runtime.pipe.schedule import TrainSchedule

    sched = TrainSchedule(micro_batches=GAS, stages=STAGES, stage_id=stage)
    names, prev = [], -1
    for step_id, cmds in enumerate(sched.steps()):
        mb, _ = sched._step_to_micro_batch(step_id)
        for cmd in cmds:
            kind = type(cmd).__name__
            if kind == "LoadMicroBatch":
                continue
            prefix, per_mb = NAMES[kind]
            # Sends of a step belong to the previous step's micro-batch (see TrainSchedule.steps).
            owner = prev if kind in ("SendActivation", "SendGrad") else mb
            names.append(f"{prefix}.mb{owner}" if per_mb else prefix)
        prev = mb
    return names


def clocks_of(region: str):
    if region.startswith(("communication/recv_activation.", "communication/recv_grad.")):
        return WAIT
    if region == "forward/pipe.mb0":
        return FWD0
    return {"forward": FWD, "backward": BWD, "communication": COMM, "optimizer": OPT}[region.partition("/")[0]]


def expected_requests(stage: int) -> list:
    """Each instruction's clocks, then the step's (default) between instructions, every step."""
    out = []
    for _ in range(STEPS):
        for region in schedule_regions(stage):
            out += [clocks_of(region), None]
    return out


def entered(events, step):
    return [r for kind, r, s in events if kind == "enter" and s == step]


def check_nesting(events):
    depth = 0
    for kind, _, _ in events:
        depth += 1 if kind == "enter" else -1
        assert depth in (0, 1), "instruction regions must not nest"
    assert depth == 0


def test_four_stages_plan_by_instruction(tmp_path):
    out = tmp_path / "out"
    block = {"region_clocks": PLAN, "warmup_steps": 0}
    run(SCRIPTS / "pipe_live.py", [out, "--gas", GAS, "--steps", STEPS, "--block", json.dumps(block)],
        world_size=STAGES, timeout=240)
    ranks = results(out, STAGES)
    assert sorted(r["stage"] for r in ranks) == list(range(STAGES))
    for r in ranks:
        stage = r["stage"]
        want = schedule_regions(stage)
        # every stage: per-instruction regions with the micro-batch, in schedule order, every step
        for step in range(STEPS):
            assert entered(r["events"], step) == want, f"stage {stage} step {step}"
        check_nesting(r["events"])
        assert r["records"] == list(range(STEPS)) and r["instance_map_left"] is False
        assert any(n.startswith("communication/recv_") for n in want)  # every stage waits somewhere
        # the plan reached this stage: clocks change per instruction, waits at the lowest clock,
        # and the last request puts the driver's default clocks back
        assert r["requests"] == expected_requests(stage), f"stage {stage}"
        assert WAIT in r["requests"] and r["requests"][-1] is None
        # the run directory names the same regions
        rank_dir = out / "run" / f"rank{r['rank']}"
        steps = [json.loads(line) for line in (rank_dir / "steps.jsonl").read_text().splitlines()]
        assert set(steps[0]["region_time_ms"]) == set(want) | {"step"}
        summary = json.loads((rank_dir / "summary.json").read_text())
        table = {row["region"] for row in summary["regions"]}
        assert set(want) <= table <= set(want) | {"step"}
        assert summary["clock_changes"] == len(r["requests"])


def test_refused_stage_falls_back_and_the_others_go_on(tmp_path):
    out = tmp_path / "out"
    refused = 2
    block = {"device": "nvml", "region_clocks": {"communication/recv_activation.*": WAIT,
                                                 "communication/recv_grad.*": WAIT, "backward": BWD}}
    run(SCRIPTS / "pipe_live.py", [out, "--gas", GAS, "--steps", STEPS, "--block", json.dumps(block),
                                   "--refuse", refused], world_size=STAGES, timeout=240)
    ranks = {r["rank"]: r for r in results(out, STAGES)}
    for rank, r in ranks.items():
        assert r["records"] == list(range(STEPS)), f"rank {rank} did not finish its steps"
        for step in range(STEPS):
            assert entered(r["events"], step) == schedule_regions(r["stage"])
        if rank == refused:
            assert r["device"] == "observe" and r["writes"] == 0
        else:
            assert r["device"] == "nvml" and r["writes"] > 0 and r["restored"] is True
            assert [c for _, c in r["changes"] if c is not None] and BWD in [c for _, c in r["changes"]]
