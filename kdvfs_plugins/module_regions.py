"""Kernel-group regions from module hooks: forward pre/post hooks, and in backward a gradient
hook on each module's output.

Region names are module paths with layer indices folded (``layers.*.mlp``), inside the phase
that is open when the module runs, so every layer shares one region and one set of clocks.
The model is used through ``nn.Module``'s public methods only; no framework is imported.
"""
from __future__ import annotations

import time
from typing import Iterable

from .regions import BACKWARD, FORWARD, fold_module_path


def _is_block_list(module) -> bool:
    children = list(module.children())
    kinds = {type(c) for c in children}
    return len(children) >= 2 and len(kinds) == 1 and type(module).__name__ in ("ModuleList", "Sequential")


def select_modules(model, depth="auto") -> list[tuple[str, object]]:
    """The (path, module) pairs that become kernel-group regions."""
    named = list(model.named_modules())
    if depth != "auto":
        return [(p, m) for p, m in named if p and p.count(".") + 1 == depth]
    block_lists = [p for p, m in named if _is_block_list(m)]
    if not block_lists:
        return [(p, m) for p, m in model.named_children()]
    chosen = []
    blocks = {f"{bl}.{name}" if bl else name for bl in block_lists for name, _ in dict(named)[bl].named_children()}
    ancestors = set()
    for bl in block_lists:
        parts = bl.split(".") if bl else []
        ancestors.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    for path, m in named:
        if not path:
            continue
        parent = path.rpartition(".")[0]
        if parent in blocks:
            chosen.append((path, m))  # a block's direct child: attention, MLP, norms
        elif parent in ancestors and path not in ancestors and path not in blocks:
            chosen.append((path, m))  # a sibling of the layer stack: embeddings, final norm, head
    return chosen


class ModuleRegions:
    """Installs and removes the hooks that report kernel-group regions to an engine."""

    def __init__(self, engine, model, depth="auto", backward: bool = True):
        self.engine = engine
        self.model = model
        self.depth = depth
        self.backward = backward
        self._handles: list = []
        self._root_handle = None
        self._selected = None  # (group, module) pairs, chosen once: the model's structure is fixed
        #: Host seconds spent in these hooks (adapters add it to their own host time).
        self.host_time_s = 0.0

    def install(self) -> "ModuleRegions":
        """Watch the model: the per-module hooks are put on only for steps that use them.

        A step that is neither profiled nor switching clocks by region pays for one hook call
        (on the model's own forward), not for two per module.
        """
        self._root_handle = self.model.register_forward_pre_hook(self._on_model_forward)
        return self

    def _on_model_forward(self, model, args) -> None:
        t0 = time.perf_counter()
        wanted = self.engine.active and self.engine.profiling_or_switching
        if wanted and not self._handles:
            if self._selected is None:
                self._selected = [(fold_module_path(p), m) for p, m in select_modules(self.model, self.depth)]
            for group, module in self._selected:
                self._hook(group, module)
        elif not wanted and self._handles:
            self._remove_module_hooks()
        self.host_time_s += time.perf_counter() - t0

    def _hook(self, group: str, module) -> None:
        eng = self.engine

        def name(default_phase: str) -> str:
            return f"{eng.current_phase or default_phase}/{group}"

        def fwd_pre(mod, args):
            if eng.profiling_or_switching:
                t0 = time.perf_counter()
                eng.region_enter(name(FORWARD))
                self.host_time_s += time.perf_counter() - t0

        def bwd_start(grad):
            t0 = time.perf_counter()
            eng.region_switch(name(BACKWARD))
            self.host_time_s += time.perf_counter() - t0

        def fwd_post(mod, args, out):
            if not eng.profiling_or_switching:
                return
            t0 = time.perf_counter()
            eng.region_exit(name(FORWARD))
            # The module's backward starts when the gradient of its output arrives. A tensor hook
            # marks that point at a fraction of the CPU cost of a full backward hook, which wraps
            # every input and output in an extra autograd node; the group then lasts until the
            # next group's gradient arrives.
            if self.backward and eng.active:
                t = out[0] if isinstance(out, (tuple, list)) and out else out
                if getattr(t, "requires_grad", False):
                    t.register_hook(bwd_start)
            self.host_time_s += time.perf_counter() - t0

        self._handles.append(module.register_forward_pre_hook(fwd_pre))
        self._handles.append(module.register_forward_hook(fwd_post))

    def _remove_module_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def remove(self) -> None:
        self._remove_module_hooks()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None

    @property
    def groups(self) -> Iterable[str]:
        return sorted({fold_module_path(p) for p, _ in select_modules(self.model, self.depth)})
