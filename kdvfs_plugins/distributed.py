"""Agreement across the ranks of a process group, for decisions that must be the same on each.

The ranks of one tensor-parallel group run in lockstep: one slow rank slows them all, so they
must use the same plan. The group's first rank decides (loads the plan, or fails to) and
broadcasts the result or the error; every rank then raises the same error or uses the same plan,
so no rank waits for another that gave up. ``torch.distributed`` is imported only when a group
is given, so the core stays free of training frameworks.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from .errors import KdvfsError

T = TypeVar("T")
#: ``group="world"`` means every rank of the default process group.
WORLD = "world"


@dataclass(frozen=True)
class Replicas:
    """Ranks that run identical work (data-parallel replicas) and so may share exploration.

    ``group``: a process group (or :data:`WORLD`) holding every rank that takes part, or an
    all-gather function for replicas in one process (:func:`all_gather`); ``lane``:
    this rank's replica index; ``lanes``: how many replicas there are. Under tensor parallelism
    the ranks of one tensor-parallel group are one replica: they share a lane (and so a design).
    """

    group: object
    lane: int
    lanes: int

    def __post_init__(self):
        if self.lanes < 1 or not 0 <= self.lane < self.lanes:
            raise ValueError(f"replica {self.lane} of {self.lanes}: need lanes >= 1 and 0 <= lane < lanes")


class AgreementError(KdvfsError):
    """The deciding rank failed; the same message reaches every rank of the group."""


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is present wherever a process group exists
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def agree(group, decide: Callable[[], T]) -> T:
    """Run ``decide`` on the group's first rank and give its result to every rank of the group.

    ``group`` is a ``torch.distributed`` process group, :data:`WORLD`, or None (no agreement:
    ``decide`` runs here). An exception on the deciding rank is raised on every rank, as
    :class:`AgreementError` on the others and as itself on the deciding rank.
    """
    dist = None if group is None else _dist()
    if dist is None:
        return decide()
    pg = None if group == WORLD else group
    src = dist.get_global_rank(pg, 0) if pg is not None else 0
    box: list = [None]
    if dist.get_rank() == src:
        try:
            box[0] = ("ok", decide())
        except Exception as exc:  # broadcast first, so the others do not wait forever
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(box, src=src, group=pg)
            raise
    dist.broadcast_object_list(box, src=src, group=pg)
    status, value = box[0]
    if status == "error":
        raise AgreementError(f"rank {src} of this group could not decide: {value}")
    return value


def all_gather(group, item) -> list:
    """Every rank's ``item``, in rank order, on every rank of the group (``[item]`` without one).

    ``group`` may also be an all-gather itself (a callable taking this rank's item): replicas in
    one process, as ``kdvfs simulate --explore --lanes`` runs them."""
    if callable(group):
        return list(group(item))
    dist = None if group is None else _dist()
    if dist is None:
        return [item]
    pg = None if group == WORLD else group
    out = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, item, group=pg)
    return out


#: How long a rank of a :class:`LocalAllGather` waits for the others before it gives up (seconds).
EXCHANGE_TIMEOUT_S = 120.0


class LocalAllGather:
    """An all-gather among threads of one process, one thread per rank (a collective's semantics:
    each rank gets every rank's items in rank order, once all have called). ``for_rank(r)`` is
    what rank ``r`` passes as its group (:func:`all_gather`): the studies run replicas and
    pipeline stages as threads this way."""

    def __init__(self, ranks: int, timeout_s: float = EXCHANGE_TIMEOUT_S):
        self._barrier = threading.Barrier(ranks, timeout=timeout_s)
        self._slots: list = [None] * ranks
        self.calls = 0

    def for_rank(self, rank: int) -> Callable[[object], list]:
        def exchange(items):
            self._slots[rank] = items
            self._barrier.wait()
            out = list(self._slots)
            self._barrier.wait()  # nobody writes the next round before everyone has read this one
            if rank == 0:
                self.calls += 1
            return out

        return exchange

    def abort(self) -> None:
        """Release every rank waiting in an exchange (one rank failed: the others must not hang)."""
        self._barrier.abort()


def run_ranks(pool, play: Callable[[int], T], ranks: int, gather: Optional[LocalAllGather] = None) -> list[T]:
    """``play(rank)`` for every rank on the threads of ``pool`` (a ``concurrent.futures``
    executor), the results in rank order. The first failure is raised, after releasing the ranks
    that wait for the failed one in an exchange of ``gather``."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    futures = [pool.submit(play, r) for r in range(ranks)]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    failed = next((f.exception() for f in done if f.exception() is not None), None)
    if failed is not None:
        if gather is not None:
            gather.abort()
        raise failed
    return [f.result() for f in futures]
