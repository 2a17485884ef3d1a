"""Cost the ops a (CPU) torch run really executes as H100 work.

An :class:`OpCounter` watches every aten op through a ``TorchDispatchMode`` (forward, backward and
optimizer alike), counts its FLOPs (PyTorch's own formulas from ``torch.utils.flop_counter`` for
matrix products, convolutions and attention) and the bytes it reads and writes (the sizes of its
tensor inputs and outputs), maps it to a trace category, and turns it into a :class:`Work` item
with an H100-like duration: the larger of FLOPs / the class's achieved FLOP/s and bytes / its
achieved bandwidth, both fitted to the measured H100 ops (``h100_params.json``). Matrix products
are costed as bf16 tensor-core work whatever the CPU dtype; bytes are counted at the tensors' real
sizes. These are model predictions of what the op would cost on the GPU, not measurements.

torch is imported only when a counter is created.

    counter = OpCounter()
    with counter:
        loss = model(x).sum(); loss.backward(); opt.step()
    works = counter.drain()          # work since the previous drain
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

from .model import H100Model, Work, default_model

# aten op name (without overload) -> trace category. Anything else is "elementwise".
_CATEGORY_BY_NAME = {
    **dict.fromkeys(("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution", "_convolution",
                     "convolution_backward", "_slow_conv2d_forward", "mkldnn_convolution", "addmv", "mv",
                     "dot", "linear", "matmul", "_int_mm"), "gemm"),
    **dict.fromkeys(("native_layer_norm", "native_layer_norm_backward", "native_group_norm",
                     "native_group_norm_backward", "native_batch_norm", "native_batch_norm_backward",
                     "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "_fused_rms_norm",
                     "_fused_rms_norm_backward", "rms_norm"), "layernorm"),
    **dict.fromkeys(("_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data",
                     "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward",
                     "cross_entropy_loss"), "softmax_loss"),
    **dict.fromkeys(("gelu", "gelu_backward", "silu", "silu_backward", "tanh", "tanh_backward", "erf",
                     "exp", "sigmoid", "sigmoid_backward"), "gelu"),
    **dict.fromkeys(("_to_copy", "copy_", "clone", "cat", "stack", "contiguous", "_unsafe_view",
                     "index_select", "gather", "scatter", "scatter_add", "index_put_", "index_add_",
                     "slice_backward", "select_backward", "new_empty_strided"), "copy_cast"),
    **dict.fromkeys(("embedding", "embedding_dense_backward", "_embedding_bag",
                     "_embedding_bag_backward"), "embedding"),
    **dict.fromkeys(("sum", "mean", "amax", "amin", "max", "min", "norm", "linalg_vector_norm", "var",
                     "var_mean", "std", "prod", "argmax", "argmin", "_foreach_norm"), "reduce"),
    **dict.fromkeys(("fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
                     "new_zeros", "new_ones", "new_full", "fill"), "memset"),
}
_ATTENTION_PREFIXES = ("_scaled_dot_product", "scaled_dot_product", "_flash_attention", "_efficient_attention")
_OPTIMIZER_PREFIXES = ("_fused_adam", "_fused_sgd", "_foreach_")
# Metadata and allocation: no GPU work.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "lift_fresh", "alias", "set_",
         "_local_scalar_dense", "resize_", "as_strided", "view", "t", "expand", "permute", "transpose",
         "unsqueeze", "squeeze", "split", "split_with_sizes", "slice", "select", "unbind", "reshape",
         "_reshape_alias", "is_same_size", "size", "stride", "numel", "dim"}


def category_of_op(name: str) -> Optional[str]:
    """Trace category of an aten op name (``aten.mm`` or ``mm``); None for ops that do no GPU work."""
    base = name.split(".")[1] if name.startswith("aten.") else name.split(".")[0]
    if base in _FREE:
        return None
    if base.startswith(_ATTENTION_PREFIXES):
        return "attention"
    if base.startswith(_OPTIMIZER_PREFIXES) and base != "_foreach_norm":
        return "optimizer"
    return _CATEGORY_BY_NAME.get(base, "elementwise")


def _attention_flops(name: str, args, out) -> float:
    """FLOPs of the CPU attention kernels, which torch's flop registry does not list."""
    from torch.utils import flop_counter as fc

    if "backward" in name:
        grad_out, q, k, v = args[0], args[1], args[2], args[3]
        return float(fc.sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape))
    q, k, v = args[0], args[1], args[2]
    return float(fc.sdpa_flop_count(q.shape, k.shape, v.shape))


class OpCounter:
    """Counts FLOPs and bytes of executed torch ops and hands them out as H100 :class:`Work`.

    ``coalesce`` merges consecutive ops of one category into one Work item (fewer, longer items;
    the virtual GPU's results are the same up to how often its power controller re-decides).
    """

    def __init__(self, model: Optional[H100Model] = None, coalesce: bool = False):
        import torch  # noqa: F401  (fail early, with torch's own message, where torch is missing)

        self.model = model or default_model()
        self.coalesce = coalesce
        self._lock = threading.Lock()
        self._pending: list[Work] = []
        #: Totals since creation: category -> [ops, flops, bytes, duration_s].
        self.totals: dict[str, list[float]] = {}
        self._mode = None
        self._forced: Optional[str] = None

    @contextlib.contextmanager
    def as_category(self, category: str):
        """Count every op inside as ``category`` (e.g. "optimizer" around an unfused optimizer step)."""
        previous, self._forced = self._forced, category
        try:
            yield self
        finally:
            self._forced = previous

    # --- counting ----------------------------------------------------------------------------
    def _record(self, func, args, kwargs, out) -> None:
        import torch
        from torch.utils import flop_counter as fc
        from torch.utils._pytree import tree_flatten

        name = str(func)  # "aten.mm.default"
        category = category_of_op(name)
        if category is None or getattr(func, "is_view", False):
            return
        if self._forced is not None:
            category = self._forced
        flops = 0.0
        packet = getattr(func, "overloadpacket", None)
        if packet in fc.flop_registry:
            flops = float(fc.flop_registry[packet](*args, **kwargs, out_val=out))
        elif category_of_op(name) == "attention":
            flops = _attention_flops(name, args, out)
        seen: set[int] = set()
        nbytes = 0
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor):
                key = id(t)
                if key not in seen:
                    seen.add(key)
                    nbytes += t.numel() * t.element_size()
        work = self.model.work_from_counts(category, flops=flops, bytes=nbytes)
        with self._lock:
            tot = self.totals.setdefault(category, [0, 0.0, 0.0, 0.0])
            tot[0] += 1
            tot[1] += flops
            tot[2] += nbytes
            tot[3] += work.duration_s
            if self.coalesce and self._pending and self._pending[-1].category == category:
                last = self._pending[-1]
                self._pending[-1] = Work(category, last.duration_s + work.duration_s,
                                         last.flops + flops, last.bytes + nbytes)
            else:
                self._pending.append(work)

    def _make_mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _CountingMode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                counter._record(func, args, kwargs, out)
                return out

        return _CountingMode()

    # --- control -----------------------------------------------------------------------------
    def start(self) -> "OpCounter":
        """Start counting on this thread (and the autograd work it runs)."""
        if self._mode is None:
            self._mode = self._make_mode()
            self._mode.__enter__()
        return self

    def stop(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def __enter__(self) -> "OpCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def drain(self) -> list[Work]:
        """Work counted since the previous drain (the simulated device calls this at region boundaries)."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def __call__(self) -> list[Work]:
        """A counter is a work source: calling it drains it."""
        return self.drain()
