"""Pipeline instruction regions in the core: their names, and how a plan names them (fast tests)."""
from __future__ import annotations

import pytest

from kdvfs_plugins import ClockPair
from kdvfs_plugins.plan import UnmatchedRegionKeys
from kdvfs_plugins.regions import Region, fold_microbatch, instruction_region, lookup

WAIT, FWD, FWD0, COMM = ClockPair(345, 1593), ClockPair(1500, 2619), ClockPair(1200, 2619), ClockPair(1005, 2619)


def test_instruction_names_parse_as_phase_and_group():
    assert instruction_region("communication", "recv_activation", 3) == "communication/recv_activation.mb3"
    assert instruction_region("communication", "reduce_grads") == "communication/reduce_grads"
    r = Region.parse(instruction_region("forward", "pipe", 12))
    assert (r.phase, r.group) == ("forward", "pipe.mb12")


def test_fold_microbatch_touches_only_a_trailing_microbatch_of_a_group():
    assert fold_microbatch("communication/recv_grad.mb10") == "communication/recv_grad.*"
    assert fold_microbatch("forward/pipe.mb0") == "forward/pipe.*"
    for unchanged in ("forward", "forward/layers.*.mlp", "forward/mb3", "backward/pipe.mb3x", "step"):
        assert fold_microbatch(unchanged) == unchanged


def test_plan_lookup_name_then_all_microbatches_then_phase():
    plan = {"communication/recv_activation.*": WAIT, "forward/pipe.mb0": FWD0, "forward/pipe.*": FWD,
            "communication": COMM}
    assert lookup(plan, "communication/recv_activation.mb7") == (True, WAIT)
    assert lookup(plan, "forward/pipe.mb0") == (True, FWD0)  # the exact name wins over the fold
    assert lookup(plan, "forward/pipe.mb1") == (True, FWD)
    assert lookup(plan, "communication/send_grad.mb1") == (True, COMM)  # no instruction key: the phase
    assert lookup(plan, "backward/pipe.mb1") == (False, None)


def test_region_clocks_key_for_all_microbatches_is_not_reported_unmatched():
    keys = UnmatchedRegionKeys(["communication/recv_activation.*", "communication/recv_grad.*"], profiled_steps=1)
    note = keys.seen({"communication/recv_activation.mb0": 1.0, "forward/pipe.mb0": 2.0})
    assert note is not None and "'communication/recv_grad.*'" in note
    assert "recv_activation.*'" not in note.split("match")[0]


def test_megatron_pipeline_timers_are_watched_and_named_after_p2p_methods():
    pytest.importorskip("megatron.core")
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from kdvfs_megatron import PIPE_INSTRUCTION_OF_TIMER, REGION_OF_TIMER

    for timer, (phase, group, count, _) in PIPE_INSTRUCTION_OF_TIMER.items():
        assert timer in REGION_OF_TIMER and REGION_OF_TIMER[timer].partition("/")[0] == phase
        assert group == "pipe" or callable(getattr(P2PCommunicator, group, None)), group
        assert count in ("f", "b")
