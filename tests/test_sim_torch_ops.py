"""Counting the ops of a CPU torch run as H100 work."""
import pytest

torch = pytest.importorskip("torch")

from kdvfs_plugins.sim.gpu import VirtualGPU  # noqa: E402
from kdvfs_plugins.sim.model import Work  # noqa: E402
from kdvfs_plugins.sim.torch_ops import OpCounter, category_of_op  # noqa: E402


def _step(width, counter):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.LayerNorm(width),
                                torch.nn.Linear(width, 10))
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    with counter:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with counter.as_category("optimizer"):
            opt.step()
        opt.zero_grad()
    return counter.drain()


def test_mm_flops_are_2mnk_and_categorised():
    c = OpCounter()
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with c:
        torch.mm(a, b)
        torch.nn.functional.gelu(a)
    works = c.drain()
    assert [w.category for w in works] == ["gemm", "gelu"]
    assert works[0].flops == 2 * 8 * 4 * 16
    assert works[0].bytes == (8 * 16 + 16 * 4 + 8 * 4) * 4
    assert c.drain() == []  # drained
    assert all(isinstance(w, Work) and w.duration_s > 0 for w in works)


def test_training_step_counts_grow_with_size_and_cover_all_phases():
    small = OpCounter()
    big = OpCounter()
    ws, wb = _step(64, small), _step(65536, big)
    cats = {w.category for w in ws}
    assert {"gemm", "gelu", "layernorm", "softmax_loss", "optimizer"} <= cats
    fs, fb = small.totals["gemm"][1], big.totals["gemm"][1]
    assert fb > 10 * fs
    assert sum(w.bytes for w in wb) > sum(w.bytes for w in ws)
    assert sum(w.duration_s for w in wb) > sum(w.duration_s for w in ws)
    # Layer 1: forward + weight gradient (the input needs no gradient); layer 2: forward + both.
    assert fs == 2 * (2 * 16 * 64 * 32) + 3 * (2 * 16 * 10 * 64)


def test_attention_flops_counted_on_cpu():
    c = OpCounter()
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with c:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    att = c.totals["attention"]
    assert att[0] == 2 and att[1] > 4 * 2 * 8 * 8 * 4


def test_counter_feeds_the_virtual_gpu():
    c = OpCounter(coalesce=True)
    works = _step(256, c)
    gpu = VirtualGPU(noise=False)
    for w in works:
        gpu.run(w)
    assert gpu.now_s == pytest.approx(sum(w.duration_s for w in works), rel=0.2)


def test_category_names():
    assert category_of_op("aten.addmm.default") == "gemm"
    assert category_of_op("aten.view.default") is None
    assert category_of_op("aten._fused_adamw_.default") == "optimizer"
    assert category_of_op("aten._foreach_norm.Scalar") == "reduce"
    assert category_of_op("aten.add.Tensor") == "elementwise"
