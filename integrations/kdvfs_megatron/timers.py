"""A proxy for Megatron's ``Timers`` that turns its named timers into kdvfs region boundaries.

Megatron already brackets every part of a step that kdvfs cares about with
``timers(name, log_level).start()/.stop()``: the schedules (``forward-compute``,
``backward-compute``, ``forward-backward``), the pipeline P2P calls (``forward-recv`` ...),
``finalize_model_grads`` (``all-grads-sync`` ...), the distributed optimizer
(``params-all-gather``) and ``train_step`` (``optimizer``). The call sites and names are the same
in megatron-core 0.16 to 0.20, whereas the functions around them changed signatures
(``backward_step`` lost ``model_type``) and ``finalize_model_grads_func`` is overwritten by
``train()`` up to 0.18. So the proxy is the one hook that works across versions without patching
Megatron's functions.

Why no synchronisation is added: the proxy reports the boundary to the engine (which records a
marker and returns) and then calls the real timer with the same arguments. Megatron's real
``Timer.start/stop`` synchronises the device, but only for timers whose ``log_level`` is within
``--timing-log-level``; for the others ``Timers`` hands back a ``DummyTimer``. The proxy sees
every call whatever the level, and never turns a ``DummyTimer`` into a real one.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

from kdvfs_plugins.regions import BACKWARD, COMMUNICATION, FORWARD, OPTIMIZER, PIPE

#: Pipeline-parallel point-to-point transfers (``p2p_communication.py``) where kdvfs cannot tell
#: that the run is a pipeline (no Megatron process groups, no args); otherwise each transfer is a
#: region of its own (PIPE_INSTRUCTION_OF_TIMER).
PIPELINE_REGION = f"{COMMUNICATION}/pipeline"
#: Data-parallel gradient reduction and the small all-reduces of ``finalize_model_grads``.
GRADS_REGION = f"{COMMUNICATION}/grads"
#: Distributed-optimizer parameter all-gather (inside the optimizer step).
PARAMS_REGION = f"{COMMUNICATION}/params"

#: Megatron timer name -> kdvfs region. Timers not listed pass straight through.
REGION_OF_TIMER: dict[str, str] = {
    "forward-compute": FORWARD,
    "backward-compute": BACKWARD,
    "forward-recv": PIPELINE_REGION,
    "forward-send": PIPELINE_REGION,
    "backward-recv": PIPELINE_REGION,
    "backward-send": PIPELINE_REGION,
    "forward-send-backward-recv": PIPELINE_REGION,
    "backward-send-forward-recv": PIPELINE_REGION,
    "forward-send-forward-recv": PIPELINE_REGION,
    "backward-send-backward-recv": PIPELINE_REGION,
    "forward-backward-send-forward-backward-recv": PIPELINE_REGION,
    "all-grads-sync": GRADS_REGION,
    "conditional-embedder-grads-all-reduce": GRADS_REGION,
    "non-tensor-parallel-grads-all-reduce": GRADS_REGION,
    "embedding-grads-all-reduce": GRADS_REGION,
    "params-all-gather": PARAMS_REGION,
    "optimizer": OPTIMIZER,
}
#: With pipeline parallelism, the timers that bracket one instruction of the schedule -> (phase,
#: region group, the count it takes its microbatch from, offset). ``"f"``/``"b"``: forward/backward
#: computations started so far in this ``forward_backward_func`` call; the 1F1B schedule runs both
#: in microbatch order, so the count is the microbatch of the next one. A receive is named after
#: the microbatch it waits for (``recv_forward.mb3`` brings the input of forward 3; a combined
#: ``send_forward_recv_backward`` the gradient of backward ``b``); a send after the one it sends.
#: Group names are P2PCommunicator's method names.
PIPE_INSTRUCTION_OF_TIMER: dict[str, tuple[str, str, str, int]] = {
    "forward-compute": (FORWARD, PIPE, "f", 0),
    "backward-compute": (BACKWARD, PIPE, "b", 0),
    "forward-recv": (COMMUNICATION, "recv_forward", "f", 0),
    "forward-send": (COMMUNICATION, "send_forward", "f", -1),
    "backward-recv": (COMMUNICATION, "recv_backward", "b", 0),
    "backward-send": (COMMUNICATION, "send_backward", "b", -1),
    "forward-send-backward-recv": (COMMUNICATION, "send_forward_recv_backward", "b", 0),
    "backward-send-forward-recv": (COMMUNICATION, "send_backward_recv_forward", "f", 0),
    "forward-send-forward-recv": (COMMUNICATION, "send_forward_recv_forward", "f", 0),
    "backward-send-backward-recv": (COMMUNICATION, "send_backward_recv_backward", "b", 0),
    "forward-backward-send-forward-backward-recv": (COMMUNICATION, "send_forward_backward_recv_forward_backward",
                                                    "f", 0),
}
#: Started once per ``forward_backward_func`` call, by every schedule: a kdvfs step begins.
STEP_BEGIN_TIMER = "forward-backward"
#: Stopped by ``train_step`` after ``optimizer.step()``: the kdvfs step ends.
STEP_END_TIMER = "optimizer"
WATCHED_TIMERS = frozenset(REGION_OF_TIMER) | {STEP_BEGIN_TIMER, STEP_END_TIMER}


class TimerSink(Protocol):
    def timer_started(self, name: str) -> None: ...

    def timer_stopped(self, name: str) -> None: ...


class _NullTimer:
    """Stands in for Megatron's DummyTimer where no ``Timers`` object existed (``config.timers`` None)."""

    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self, barrier: bool = False) -> None:
        pass

    def reset(self) -> None:
        pass

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        return 0.0

    def active_time(self) -> float:
        return 0.0


_NULL_TIMER = _NullTimer()


class RegionTimer:
    """Wraps one timer returned by ``Timers``: report the boundary, then delegate unchanged."""

    __slots__ = ("name", "inner", "_sink")

    def __init__(self, name: str, inner: Any, sink: TimerSink):
        self.name = name
        self.inner = inner
        self._sink = sink

    def start(self, *args: Any, **kwargs: Any) -> Any:
        self._sink.timer_started(self.name)
        return self.inner.start(*args, **kwargs)

    def stop(self, *args: Any, **kwargs: Any) -> Any:
        self._sink.timer_stopped(self.name)
        return self.inner.stop(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:  # elapsed, reset, active_time, set_barrier_group ...
        return getattr(self.inner, attr)


class KdvfsTimers:
    """Callable like Megatron's ``Timers``; everything but ``__call__`` goes to the wrapped object.

    ``inner`` may be None (a megatron-core loop that never set ``config.timers``): then the
    watched timers still report boundaries, and every timer is a no-op.
    """

    def __init__(self, inner: Optional[Any], sink: TimerSink):
        self._kdvfs_inner = inner
        self._kdvfs_sink = sink
        self._kdvfs_wrappers: dict[str, RegionTimer] = {}

    @property
    def inner(self) -> Optional[Any]:
        return self._kdvfs_inner

    def __call__(self, name: str, log_level: Optional[int] = None) -> Any:
        inner = self._kdvfs_inner
        timer = _NULL_TIMER if inner is None else inner(name, log_level)
        if name not in WATCHED_TIMERS:
            return timer
        wrapper = self._kdvfs_wrappers.get(name)
        # Timers hands back the same object per name (or its shared DummyTimer): reuse the wrapper.
        if wrapper is None or wrapper.inner is not timer:
            wrapper = self._kdvfs_wrappers[name] = RegionTimer(name, timer, self._kdvfs_sink)
        return wrapper

    def __getattr__(self, attr: str) -> Any:  # log, write, get_all_timers_string, _timers ...
        if attr.startswith("_kdvfs_"):
            raise AttributeError(attr)
        inner = self._kdvfs_inner
        if inner is None:
            raise AttributeError(
                f"Timers.{attr}: kdvfs installed its timer proxy where Megatron had no Timers object "
                "(config.timers was None); give Megatron a Timers object before kdvfs_megatron.install()"
            )
        return getattr(inner, attr)

    def __repr__(self) -> str:
        return f"KdvfsTimers({self._kdvfs_inner!r})"


def unwrap_timers(timers: Any) -> Any:
    """The Megatron object behind any number of kdvfs proxies (None stays None)."""
    while isinstance(timers, KdvfsTimers):
        timers = timers.inner
    return timers
