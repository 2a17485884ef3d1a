"""Simulated pipeline ranks: one device per rank of a :class:`~kdvfs_plugins.sim.cluster.VirtualCluster`.

Everything these devices report is a model prediction of the simulated H100 cluster.

A pipeline's ranks depend on each other, so no rank can run an iteration alone. Each
:class:`ClusterRankDevice` therefore collects its engine's markers and clock requests while its
driver reports the rank's program order (:meth:`ClusterRankDevice.at`: the driver says where in
the iteration the program is, as :class:`~kdvfs_plugins.devices.simulated.TraceDevice`'s driver
does); once every rank has gone through the iteration, :meth:`ClusterPipeline.run` turns all
ranks' requests into one :class:`~kdvfs_plugins.sim.cluster.ClusterPlan`, executes it on the
cluster (so the dependences between stages are honoured) and each device dates its markers and
advances its energy readings from its rank's segments.

Positions in one rank's iteration (``n`` instructions in program order):

- ``2k``: the wait before instruction ``k`` (a receive, a bubble); dated at the previous
  instruction's end (the iteration's start for ``k = 0``);
- ``2k + 1``: instruction ``k`` runs; dated at its start;
- ``2n``: the tail wait after the last instruction; dated at its end;
- ``2n + 1``: the iteration's end (every rank's tail wait lasts until the slowest rank is done);
  the step's end marker, and a request made there holds from the next iteration's start.

The clocks a rank asked for are read as the cluster's plan: an instruction runs at the clocks in
force at its position, and the rank's waits at the clocks in force at its start, its tail and
its receives (see :meth:`ClusterRankDevice._plan`). The
cluster runs all waits of a rank at one clock (or at the clock in force); a rank whose waits ask
for different clocks is refused with :class:`~kdvfs_plugins.errors.ConfigError`.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

from ..clocks import ClockPair, ClockTable
from ..data import h100_clock_lists
from ..errors import ConfigError
from ..sim.cluster import ClusterPlan, ClusterRun, VirtualCluster
from ..sim.readings import Readings
from .base import Device, DeviceInfo, Marker
from .simulated import StretchMarker, VirtualMarker, _VirtualReadings

__all__ = ["ClusterPipeline", "ClusterRankDevice"]

SOURCE = "kdvfs simulate --pipeline"
#: The virtual cluster's cards (the cluster's states are the H100's clock table).
DEVICE_NAME = "Simulated NVIDIA H100 80GB HBM3"


class ClusterPipeline:
    """The ranks' devices of one virtual cluster, run together one iteration at a time.

    ``seed``, ``noise``, ``switch_latency_s``, ``issue_ahead``: as
    :meth:`VirtualCluster.execute`; ``min_wait_s``: waits shorter than this keep the clock in
    force (the actuator's floor between changes); ``cannot_write``: ranks whose cards refuse clock
    writes. Iteration ``i`` draws the jitter of ``first_iteration + i``."""

    def __init__(self, cluster: VirtualCluster, *, seed: int = 0, noise: bool = True, switch_latency_s: float = 0.0,
                 issue_ahead: bool = True, min_wait_s: float = 0.0, cannot_write=(), first_iteration: int = 0):
        self.cluster = cluster
        self.seed, self.noise = seed, noise
        self.switch_latency_s, self.issue_ahead, self.min_wait_s = switch_latency_s, issue_ahead, min_wait_s
        self.iteration = first_iteration
        self._state = {c: k for k, c in enumerate(cluster.states)}
        table = ClockTable.from_lists(*h100_clock_lists())
        idle_w = cluster.model.idle_power_w()
        self.devices = tuple(ClusterRankDevice(self, r, table, idle_w, can_write_clocks=r not in set(cannot_write))
                             for r in range(cluster.ranks))
        #: the last iteration run (:class:`~kdvfs_plugins.sim.cluster.ClusterRun`)
        self.last_run: Optional[ClusterRun] = None

    def state_of(self, clocks: Optional[ClockPair]) -> int:
        try:
            return self._state[clocks]
        except KeyError:
            raise ConfigError("clocks", str(clocks), "clocks from the H100's table (the virtual cluster's states); "
                              "kdvfs info lists them", source=SOURCE) from None

    def run(self) -> ClusterRun:
        """Execute the iteration every rank has gone through, with every rank's requests."""
        order = self.cluster.schedule.order
        node_state = [0] * len(self.cluster.schedule.nodes)
        wait_state: list[Optional[int]] = []
        try:
            for r, dev in enumerate(self.devices):
                nodes, wait = dev._plan(len(order[r]))
                for i, st in zip(order[r], nodes):
                    node_state[i] = st
                wait_state.append(wait)
            plan = ClusterPlan(tuple(node_state), tuple(wait_state), self.min_wait_s)
            run = self.cluster.execute(plan, noise=self.noise, seed=self.seed,
                                       switch_latency_s=self.switch_latency_s, issue_ahead=self.issue_ahead,
                                       iteration=self.iteration)
        except BaseException:
            for dev in self.devices:  # the iteration never ran: it took no time (the engines can close)
                dev._abandon()
            raise
        self.iteration += 1
        self.last_run = run
        for dev in self.devices:
            dev._ran(run)
        return run


class ClusterRankDevice(_VirtualReadings, Device):
    """One rank's card of a :class:`ClusterPipeline` (see the module docstring)."""

    kind = "simulated"

    def __init__(self, pipeline: ClusterPipeline, rank: int, table: ClockTable, idle_power_w: float, *,
                 can_write_clocks: bool = True):
        self.pipeline = pipeline
        self.rank = rank
        self._table = table
        self._can_write = can_write_clocks
        self.readings = Readings(idle_power_w)
        self.now_s = 0.0
        self.energy_j = 0.0
        self._cursor = 0
        self._markers: list[StretchMarker] = []
        self._requests: dict[int, Optional[ClockPair]] = {}
        self._in_force: Optional[ClockPair] = None  # carried from one iteration to the next
        sch = pipeline.cluster.schedule
        order = sch.order[rank]
        #: wait positions the rank always waits at: start, tail, and before each receive
        self._receives = {0, 2 * len(order)} | {2 * k for k, i in enumerate(order)
                                                if any(kind == "p2p" for _, kind in sch.deps[i])}
        #: True between the cluster's run and the next iteration's first marker: markers are dated at once
        self._ran_last = False

    @property
    def switch_latency_ms(self) -> float:
        return self.pipeline.switch_latency_s * 1e3

    def info(self) -> DeviceInfo:
        return DeviceInfo(kind=self.kind, index=self.rank, name=DEVICE_NAME, uuid=f"SIM-CLUSTER-{self.rank}",
                          driver="simulated", clocks=self._table, power_limit_w=700.0,
                          can_write_clocks=self._can_write)

    def _readings(self):
        return self.readings

    def timeline_s(self) -> float:
        return self.now_s

    # ------------------------------------------------------------------ the driver
    def at(self, position: int) -> None:
        """The program has reached ``position`` of this rank's iteration (see the module docstring)."""
        if self._ran_last:
            self._ran_last = False  # a new iteration starts
        self._cursor = position

    def marker(self) -> Marker:
        if self._ran_last:  # after the run, before the next iteration (closing): now
            return VirtualMarker(self.now_s)
        m = StretchMarker(self._cursor)
        self._markers.append(m)
        return m

    # ------------------------------------------------------------------ clocks
    def _request(self, clocks: Optional[ClockPair], marker: Optional[Marker]) -> None:
        if not self._can_write:
            return  # refused: the driver's clocks stay
        if isinstance(marker, StretchMarker) and marker.t_s is None:
            self._requests[marker.stretch] = clocks
        elif self._ran_last:
            self._in_force = clocks  # after the run: from the next iteration's start
        else:
            self._requests[self._cursor] = clocks

    def current_clocks(self) -> ClockPair:
        c = self._in_force
        return c if c is not None else ClockPair(max(self._table.sm_mhz), max(self._table.mem_mhz))

    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        self._table.check(clocks)
        self._request(clocks, marker)

    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        self._request(None, marker)

    def _plan(self, n: int) -> tuple[list[int], Optional[int]]:
        """(state of each instruction in program order, the rank's wait state) from the requests.

        The rank's waits are the iteration's start and tail and each receive (an instruction that
        needs another stage's output); the cluster runs them at the clocks in force there, and
        any other wait position a request was made at. Other wait positions last no time in the
        schedules modelled (a stage-0 forward after a backward, the optimizer after the last
        backward) or are the all-reduce's (the cluster runs its wait at the rank's wait clock)."""
        state = self.pipeline.state_of
        in_force = self._in_force
        nodes: list[int] = []
        waits: dict[int, int] = {}
        for p in range(2 * n + 2):
            asked = p in self._requests
            if asked:
                in_force = self._requests[p]
            if p % 2:
                nodes.append(state(in_force))
            elif asked or p in self._receives:
                waits[p] = state(in_force)
        self._in_force = in_force
        self._requests = {}
        nodes = nodes[:n]
        distinct = set(waits.values())
        if len(distinct) <= 1:
            return nodes, next(iter(distinct), None)
        common = Counter(waits.values()).most_common(2)
        raise ConfigError("clocks", f"rank {self.rank} waits at {len(distinct)} clocks",
                          "one clock for all of a rank's waits (the virtual cluster runs them at one clock): "
                          f"give the step and its communication/recv_* regions the same clocks (states "
                          f"{common[0][0]} and {common[1][0]} were asked for)", source=SOURCE)

    # ------------------------------------------------------------------ after the run
    def _abandon(self) -> None:
        markers, self._markers = self._markers, []
        for m in markers:
            m.date(self.now_s)
        self._requests = {}
        self._ran_last = True

    def _ran(self, run: ClusterRun) -> None:
        sch = self.pipeline.cluster.schedule
        order = sch.order[self.rank]
        n = len(order)
        off = self.now_s

        def date(p: int) -> float:
            if p >= 2 * n + 1:
                return run.time_s
            if p % 2:
                return run.node_start_s[order[p // 2]]
            return run.node_end_s[order[p // 2 - 1]] if p > 0 else 0.0

        e = self.energy_j
        for seg in run.segments[self.rank]:
            self.readings.advance(off + seg.start_s, e, off + seg.end_s, e + seg.energy_j)
            e += seg.energy_j
        self.energy_j = e
        self.now_s = off + run.time_s
        markers, self._markers = self._markers, []
        for m in markers:
            m.date(off + date(m.stretch))
        self._ran_last = True
        self._cursor = 0
