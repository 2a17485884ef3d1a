"""The physical model behind the virtual H100: time and power of a kernel class at any clock pair.

Pure and noise-free; every function takes numpy arrays (or scalars) of clocks and broadcasts.
The stateful :class:`~kdvfs_plugins.sim.gpu.VirtualGPU` adds the windowed power controller,
switch latency, the energy counter and noise on top of it. Everything it returns is a model
prediction; ``docs/simulator.md`` lists each parameter, its value and where it comes from.

Time. A kernel class has an SM part ``a_sm``, a memory part ``a_mem`` and a fixed part ``a_fix``
(relative amounts at the top clocks 1980/2619 MHz). The SM part scales with 1/SM clock, the memory
part with 1/memory clock, and the two overlap as a soft roofline (a p-norm: the larger one
dominates, the smaller one hides behind it)::

    shape(f, m) = ((a_sm*1980/f)^p + (a_mem*2619/m)^p)^(1/p) + a_fix     (normalised to 1 at the top)

Power, in W::

    P = board + leak*V(f)^2 + clock_tree*(f/1980)*V(f)^2          static: drawn while clocked
      + mem_background*(m/2619) + mem_traffic*(a_mem/shape)      memory: interface + traffic
      + dyn_k*(f/1980)*V(f)^2 * u_sm                              SM work: activity x f x V^2

with ``u_sm`` the share of the kernel's time its SM part is busy and ``V`` a piecewise voltage
curve (flat ``v_min`` up to ``v_knee_mhz``, then rising to 1 at 1980 MHz). Power rises
monotonically with the SM clock, so "the highest clock under the cap" is well defined.

A :class:`Work` item's ``duration_s`` is its time in the default state of a training step, where
the measured card held one SM clock for the whole mix (``work_ref_sm_mhz``, the GPT step's median
1695 MHz) and the top memory clock; the model turns it into time at the top clocks and from there
into time at any clock pair.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError

PARAMS_FILE = Path(__file__).with_name("h100_params.json")

ArrayLike = Union[float, int, np.ndarray, Sequence[float]]


@dataclass(frozen=True)
class Work:
    """GPU work of one kernel class (or trace category).

    ``duration_s`` is the time at default clocks: the card's own throttled default state inside a
    training step (see the module docstring). ``flops`` and ``bytes`` are informative (the counts
    the duration was derived from, where known).
    """

    category: str
    duration_s: float
    flops: float = 0.0
    bytes: float = 0.0


@dataclass(frozen=True)
class KernelClass:
    """Time shape and power of one class of kernels."""

    name: str
    a_sm: float
    a_mem: float
    a_fix: float
    #: SM dynamic power at 1980 MHz, V=1 and the SM part busy all the time (fitted).
    dyn_w: float
    #: Achieved rates at the top clocks without the power cap (fitted), used to cost counted work.
    tflops_top: Optional[float] = None
    gbps_top: Optional[float] = None
    note: str = ""


@dataclass(frozen=True)
class ModelParams:
    """Every number of the model. Loaded from ``h100_params.json``; ``calibrate`` rewrites it."""

    sm_max_mhz: int
    sm_min_mhz: int
    sm_step_mhz: int
    mem_mhz: tuple[int, ...]
    idle_sm_mhz: int
    power_limit_w: float
    controller_target_w: float
    power_window_s: float
    board_w: float
    leak_w: float
    clock_tree_w: float
    mem_background_w: float
    mem_traffic_w: float
    v_min: float
    v_knee_mhz: float
    roofline_p: float
    work_ref_sm_mhz: float
    work_ref_mem_mhz: float
    idle_hold_s: float
    min_kernel_s: float
    noise: Mapping[str, float]
    classes: Mapping[str, KernelClass]
    category_to_class: Mapping[str, str]
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def mem_max_mhz(self) -> int:
        return max(self.mem_mhz)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelParams":
        classes = {name: KernelClass(name=name, **c) for name, c in d["classes"].items()}
        known = {f for f in cls.__dataclass_fields__} - {"classes", "mem_mhz", "extra", "noise", "category_to_class"}
        kw = {k: d[k] for k in known}
        extra = {k: v for k, v in d.items() if k not in cls.__dataclass_fields__}
        return cls(mem_mhz=tuple(d["mem_mhz"]), classes=classes, noise=dict(d["noise"]),
                   category_to_class=dict(d["category_to_class"]), extra=extra, **kw)

    def to_dict(self) -> dict:
        out: dict = {}
        for name in self.__dataclass_fields__:
            if name in ("classes", "extra"):
                continue
            v = getattr(self, name)
            out[name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
        out["classes"] = {
            n: {k: getattr(c, k) for k in KernelClass.__dataclass_fields__ if k != "name"}
            for n, c in self.classes.items()
        }
        out.update(self.extra)
        return out

    def with_(self, **changes) -> "ModelParams":
        return replace(self, **changes)


def load_params(source: Union[None, str, Path, Mapping, ModelParams] = None) -> ModelParams:
    """Parameters from a ModelParams, a dict, a JSON path, or (None) the shipped H100 fit."""
    if isinstance(source, ModelParams):
        return source
    if source is None:
        return _shipped_params()
    if isinstance(source, Mapping):
        return ModelParams.from_dict(source)
    return ModelParams.from_dict(json.loads(Path(source).read_text()))


@lru_cache(maxsize=1)
def _shipped_params() -> ModelParams:
    return ModelParams.from_dict(json.loads(PARAMS_FILE.read_text()))


def _arr(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=float)


class H100Model:
    """Noise-free, vectorised time and power of kernel classes at arbitrary clock pairs."""

    def __init__(self, params: Union[None, str, Path, Mapping, ModelParams] = None):
        self.params = p = load_params(params)
        self._p = float(p.roofline_p)
        # Normalise each class so that shape(top clocks) == 1.
        self._norm = {n: self._raw_shape(c, p.sm_max_mhz, p.mem_max_mhz) for n, c in p.classes.items()}
        # The controller works on the supported SM clocks, ascending (interpolating between them).
        self.grid_sm_mhz = np.arange(p.sm_min_mhz, p.sm_max_mhz + 1, p.sm_step_mhz, dtype=float)
        self._curve_cache: dict = {}
        self._mem_max_mhz = float(p.mem_max_mhz)  # a property that takes a max: read per kernel slice
        self._norm_f = {n: float(v) for n, v in self._norm.items()}

    # --- classes ---------------------------------------------------------------------------
    def class_of(self, category: Union[str, Work]) -> KernelClass:
        """The kernel class of a Work, a trace category, an op name or a class name."""
        name = category.category if isinstance(category, Work) else category
        p = self.params
        if name in p.classes:
            return p.classes[name]
        mapped = p.category_to_class.get(name)
        if mapped is None:
            mapped = p.category_to_class.get("*")
        if mapped is None or mapped not in p.classes:
            raise ConfigError("category", name, f"known categories: {', '.join(sorted(p.category_to_class))}",
                              source="virtual GPU")
        return p.classes[mapped]

    # --- time ------------------------------------------------------------------------------
    def _raw_shape(self, c: KernelClass, sm_mhz: ArrayLike, mem_mhz: ArrayLike):
        p = self.params
        x_sm = c.a_sm * p.sm_max_mhz / _arr(sm_mhz)
        x_mem = c.a_mem * p.mem_max_mhz / _arr(mem_mhz)
        return (x_sm ** self._p + x_mem ** self._p) ** (1.0 / self._p) + c.a_fix

    def shape(self, category, sm_mhz: ArrayLike, mem_mhz: ArrayLike) -> np.ndarray:
        """Time at (sm, mem) relative to time at the top clocks (>= 1)."""
        c = self.class_of(category)
        return self._raw_shape(c, sm_mhz, mem_mhz) / self._norm[c.name]

    def top_time_s(self, work: Work) -> float:
        """Time of ``work`` at the top clocks, without the power cap."""
        p = self.params
        return work.duration_s / self.shape_at(self.class_of(work).name, p.work_ref_sm_mhz, p.work_ref_mem_mhz)

    def time_s(self, work: Work, sm_mhz: ArrayLike, mem_mhz: ArrayLike) -> np.ndarray:
        """Time of ``work`` at exactly these clocks (no cap applied)."""
        return self.top_time_s(work) * self.shape(work, sm_mhz, mem_mhz)

    # --- power -----------------------------------------------------------------------------
    def voltage(self, sm_mhz: ArrayLike) -> np.ndarray:
        """Relative core voltage (1 at the top clock) along the voltage-frequency curve."""
        p = self.params
        x = np.clip((_arr(sm_mhz) - p.v_knee_mhz) / (p.sm_max_mhz - p.v_knee_mhz), 0.0, 1.0)
        return p.v_min + (1.0 - p.v_min) * x

    def static_power_w(self, sm_mhz: ArrayLike, mem_mhz: ArrayLike) -> np.ndarray:
        """Power while clocked but running no kernel (gaps inside a step; idle at the idle clock)."""
        p = self.params
        f = _arr(sm_mhz)
        v2 = self.voltage(f) ** 2
        return (p.board_w + p.leak_w * v2 + p.clock_tree_w * (f / p.sm_max_mhz) * v2
                + p.mem_background_w * (_arr(mem_mhz) / p.mem_max_mhz))

    def idle_power_w(self) -> float:
        """Long idle: the driver drops the SM clock to its idle clock."""
        p = self.params
        return float(self.static_power_w(p.idle_sm_mhz, p.mem_max_mhz))

    def power_w(self, category, sm_mhz: ArrayLike, mem_mhz: ArrayLike) -> np.ndarray:
        """Average power while a kernel of this class runs at exactly these clocks (no cap)."""
        c = self.class_of(category)
        p = self.params
        f, m = _arr(sm_mhz), _arr(mem_mhz)
        raw = self._raw_shape(c, f, m)
        u_sm = (c.a_sm * p.sm_max_mhz / f) / raw
        v2 = self.voltage(f) ** 2
        return (self.static_power_w(f, m) + p.mem_traffic_w * (c.a_mem / raw)
                + c.dyn_w * (f / p.sm_max_mhz) * v2 * u_sm)

    # --- one clock pair at a time ----------------------------------------------------------
    # The virtual GPU asks for one kernel slice at a time, hundreds of thousands of times a run,
    # where numpy's cost per call on 0-d arrays was most of the demo's time. The same formulas on
    # floats (the tests hold them to the vectorised ones above).
    def shape_at(self, class_name: str, sm_mhz: float, mem_mhz: float) -> float:
        """:meth:`shape` of one class at one clock pair, as a float."""
        c = self.params.classes[class_name]
        return self._raw_at(c, sm_mhz, mem_mhz) / self._norm_f[class_name]

    def _raw_at(self, c: KernelClass, sm_mhz: float, mem_mhz: float) -> float:
        p = self.params
        x_sm = c.a_sm * p.sm_max_mhz / sm_mhz
        x_mem = c.a_mem * self._mem_max_mhz / mem_mhz
        return (x_sm ** self._p + x_mem ** self._p) ** (1.0 / self._p) + c.a_fix

    def _v2_at(self, sm_mhz: float) -> float:
        p = self.params
        x = min(max((sm_mhz - p.v_knee_mhz) / (p.sm_max_mhz - p.v_knee_mhz), 0.0), 1.0)
        v = p.v_min + (1.0 - p.v_min) * x
        return v * v

    def static_power_at(self, sm_mhz: float, mem_mhz: float) -> float:
        """:meth:`static_power_w` at one clock pair, as a float."""
        return self._static_at(sm_mhz, mem_mhz, self._v2_at(sm_mhz))

    def _static_at(self, sm_mhz: float, mem_mhz: float, v2: float) -> float:
        p = self.params
        return (p.board_w + p.leak_w * v2 + p.clock_tree_w * (sm_mhz / p.sm_max_mhz) * v2
                + p.mem_background_w * (mem_mhz / self._mem_max_mhz))

    def power_at(self, class_name: str, sm_mhz: float, mem_mhz: float) -> float:
        """:meth:`power_w` of one class at one clock pair, as a float."""
        c = self.params.classes[class_name]
        p = self.params
        raw = self._raw_at(c, sm_mhz, mem_mhz)
        u_sm = (c.a_sm * p.sm_max_mhz / sm_mhz) / raw
        v2 = self._v2_at(sm_mhz)  # once for the static and the dynamic part
        return (self._static_at(sm_mhz, mem_mhz, v2) + p.mem_traffic_w * (c.a_mem / raw)
                + c.dyn_w * (sm_mhz / p.sm_max_mhz) * v2 * u_sm)

    # --- the power cap ---------------------------------------------------------------------
    def power_curve(self, category, mem_mhz: float, lock_sm_mhz: Optional[float] = None) -> np.ndarray:
        """Power on the controller's SM-clock grid, with an SM lock (the clock is min(grid, lock))."""
        c = self.class_of(category)
        key = (c.name, float(mem_mhz), None if lock_sm_mhz is None else float(lock_sm_mhz))
        curve = self._curve_cache.get(key)
        if curve is None:
            f = self.grid_sm_mhz if lock_sm_mhz is None else np.minimum(self.grid_sm_mhz, lock_sm_mhz)
            curve = self.power_w(c.name, f, mem_mhz)
            curve.setflags(write=False)
            self._curve_cache[key] = curve
        return curve

    def static_curve(self, mem_mhz: float, lock_sm_mhz: Optional[float] = None) -> np.ndarray:
        key = ("<static>", float(mem_mhz), None if lock_sm_mhz is None else float(lock_sm_mhz))
        curve = self._curve_cache.get(key)
        if curve is None:
            f = self.grid_sm_mhz if lock_sm_mhz is None else np.minimum(self.grid_sm_mhz, lock_sm_mhz)
            curve = self.static_power_w(f, mem_mhz)
            curve.setflags(write=False)
            self._curve_cache[key] = curve
        return curve

    def ceiling_from_curve(self, curve: np.ndarray, target_w: Optional[float] = None) -> float:
        """Highest SM clock (continuous, MHz) at which a power curve stays at or under the target."""
        target = self.params.controller_target_w if target_w is None else target_w
        g = self.grid_sm_mhz
        if curve[-1] <= target:
            return float(g[-1])
        if curve[0] >= target:
            return float(g[0])
        i = int(np.searchsorted(curve, target, side="right"))  # curve[i-1] <= target < curve[i]
        lo, hi = curve[i - 1], curve[i]
        return float(g[i - 1] + (g[i] - g[i - 1]) * (target - lo) / (hi - lo))

    def cap_sm_mhz(self, category, mem_mhz: ArrayLike) -> np.ndarray:
        """The SM clock the card sustains for this class alone under the power cap, per memory clock."""
        m = np.atleast_1d(_arr(mem_mhz))
        out = np.array([self.ceiling_from_curve(self.power_curve(category, float(mi))) for mi in m])
        return out if np.ndim(mem_mhz) else out[0]

    def effective_sm_mhz(self, category, sm_mhz: ArrayLike, mem_mhz: ArrayLike,
                         ceiling_sm_mhz: Optional[ArrayLike] = None) -> np.ndarray:
        """The SM clock a lock really gets: lowered to the power-cap clock where the cap binds.

        ``ceiling_sm_mhz`` is the controller's clock for the surrounding mix (see
        :meth:`mix_ceiling_sm_mhz`); by default the class's own steady-state cap clock.
        """
        f, m = np.broadcast_arrays(_arr(sm_mhz), _arr(mem_mhz))
        if ceiling_sm_mhz is None:
            ceiling = np.vectorize(lambda mm: float(self.cap_sm_mhz(category, mm)))(m) if m.ndim else \
                self.cap_sm_mhz(category, float(m))
        else:
            ceiling = _arr(ceiling_sm_mhz)
        return np.minimum(f, ceiling)

    # --- what the planner calls ------------------------------------------------------------
    def time_energy(self, work: Work, sm_mhz: ArrayLike, mem_mhz: ArrayLike, *,
                    power_cap: bool = True, ceiling_sm_mhz: Optional[ArrayLike] = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Time (s) and energy (J) of ``work`` with the clocks locked at every (sm, mem) pair.

        With ``power_cap`` (the default) a lock above the cap-sustainable clock is lowered to it,
        as the real card does: to the class's own steady-state cap clock, or to
        ``ceiling_sm_mhz`` when the caller knows the controller's clock for the surrounding mix.
        """
        f, m = np.broadcast_arrays(_arr(sm_mhz), _arr(mem_mhz))
        if power_cap:
            f = self.effective_sm_mhz(work, f, m, ceiling_sm_mhz)
        t = self.time_s(work, f, m)
        return t, t * self.power_w(work, f, m)

    def auto_time_energy(self, work: Work, mem_mhz: ArrayLike = None, ceiling_sm_mhz: Optional[float] = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Default (driver-chosen) behaviour: top SM clock lowered by the cap. Returns (time_s, energy_j, sm_mhz)."""
        p = self.params
        m = _arr(p.mem_max_mhz if mem_mhz is None else mem_mhz)
        f = self.effective_sm_mhz(work, np.full(m.shape, float(p.sm_max_mhz)), m, ceiling_sm_mhz)
        t = self.time_s(work, f, m)
        return t, t * self.power_w(work, f, m), f

    def mix_ceiling_sm_mhz(self, items: Sequence[tuple[Work, Optional[object]]], gap_s: float = 0.0,
                           gap_mem_mhz: Optional[float] = None) -> float:
        """The controller's steady-state SM clock for a mix repeated back to back.

        ``items`` are (work, lock) with lock a ClockPair or None (auto). The card holds the clock
        at which the time-weighted average power of the whole mix (gaps included) meets the
        controller's target: one clock for the mix, as measured inside the GPT step. Solved by
        fixed-point iteration over the time weights, which change with the clock.
        """
        p = self.params
        items = self._grouped(items)
        ceiling = float(p.sm_max_mhz)
        for _ in range(8):
            num = np.zeros_like(self.grid_sm_mhz)
            den = 0.0
            for work, lock in items:
                m = p.mem_max_mhz if lock is None else lock.mem_mhz
                lock_sm = None if lock is None else lock.sm_mhz
                f = ceiling if lock_sm is None else min(ceiling, lock_sm)
                d = float(self.time_s(work, f, m))
                num += d * self.power_curve(work, m, lock_sm)
                den += d
            if gap_s > 0:
                num += gap_s * self.static_curve(gap_mem_mhz or p.mem_max_mhz)
                den += gap_s
            if den <= 0:
                return float(p.sm_max_mhz)
            new = self.ceiling_from_curve(num / den)
            if abs(new - ceiling) < 0.05:
                return new
            ceiling = new
        return ceiling

    def _grouped(self, items) -> list[tuple[Work, Optional[object]]]:
        """Items merged per (class, lock): time is linear in a Work's duration, so this is exact."""
        acc: dict = {}
        for work, lock in items:
            key = (self.class_of(work).name, lock)
            acc[key] = acc.get(key, 0.0) + work.duration_s
        return [(Work(name, d), lock) for (name, lock), d in acc.items()]

    def mix_time_energy(self, items: Sequence[tuple[Work, Optional[object]]], gap_s: float = 0.0
                        ) -> tuple[float, float, float]:
        """Steady-state (time_s, energy_j, controller SM MHz) of a mix repeated back to back.

        A noise-free shortcut for the virtual GPU's long-window behaviour: every item runs at its
        lock lowered to the mix's controller clock (:meth:`mix_ceiling_sm_mhz`); gaps draw static
        power at that clock. Switch latency is not modelled here.
        """
        p = self.params
        items = self._grouped(items)
        ceiling = self.mix_ceiling_sm_mhz(items, gap_s)
        t = e = 0.0
        for work, lock in items:
            m = p.mem_max_mhz if lock is None else lock.mem_mhz
            f = ceiling if lock is None else min(ceiling, lock.sm_mhz)
            d = float(self.time_s(work, f, m))
            t += d
            e += d * float(self.power_w(work, f, m))
        if gap_s > 0:
            t += gap_s
            e += gap_s * float(self.static_power_w(ceiling, p.mem_max_mhz))
        return t, e, ceiling

    def work_from_counts(self, category: str, flops: float = 0.0, bytes: float = 0.0) -> Work:
        """A Work item with an H100-like duration for counted FLOPs and bytes.

        Time at the top clocks is the larger of flops / the class's achieved FLOP/s and bytes / its
        achieved bandwidth (both fitted to the measured ops), at least ``min_kernel_s``; the Work
        carries that time converted to the default state (``work_ref_sm_mhz``).
        """
        c = self.class_of(category)
        p = self.params
        t = 0.0
        if flops and c.tflops_top:
            t = max(t, flops / (c.tflops_top * 1e12))
        if bytes and c.gbps_top:
            t = max(t, bytes / (c.gbps_top * 1e9))
        t = max(t, p.min_kernel_s)
        ref = float(self.shape(c.name, p.work_ref_sm_mhz, p.work_ref_mem_mhz))
        return Work(category, t * ref, float(flops), float(bytes))


@lru_cache(maxsize=1)
def default_model() -> H100Model:
    """The shipped, calibrated H100 model (shared; it is immutable)."""
    return H100Model()
