"""Recording traces: profiler events -> CSV rows with region tags (no GPU needed)."""
import pytest

from kdvfs_plugins.cli import main
from kdvfs_plugins.errors import DeviceUnavailableError
from kdvfs_plugins.sim.capture import Span, categorize_kernel, events_to_rows, write_csv
from kdvfs_plugins.sim.trace import Trace


def test_events_to_rows_tags_innermost_region_and_step():
    ranges = [Span("kdvfs_step:0", 100, 1000), Span("kdvfs:forward", 100, 400),
              Span("kdvfs:forward/layers.*.mlp", 250, 100), Span("kdvfs:backward", 500, 500),
              Span("kdvfs_step:1", 1200, 300), Span("kdvfs:optimizer", 1200, 300)]
    kernels = [Span("nvjet_sm90_tst_192x192", 120, 50), Span("void at::native::GeluCUDAKernelImpl", 260, 20),
               Span("Memset (Device)", 600, 1), Span("void at::native::reduce_kernel<128, 4>", 700, 30),
               Span("multi_tensor_apply_kernel", 1250, 100), Span("outside every step", 2000, 5)]
    rows = events_to_rows(kernels, ranges)
    assert [r["region"] for r in rows] == ["forward", "forward/layers.*.mlp", "backward", "backward", "optimizer"]
    assert [r["phase"] for r in rows] == ["forward", "forward", "backward", "backward", "optimizer"]
    assert [r["category"] for r in rows] == ["gemm", "gelu", "memset", "reduce", "optimizer"]
    assert [r["step"] for r in rows] == [0, 0, 0, 0, 1]
    assert rows[0]["start_us"] == 0 and rows[1]["start_us"] == 140 and rows[4]["start_us"] == 0
    assert "," not in rows[3]["kernel"]


def test_rows_round_trip_through_the_trace_loader(tmp_path):
    ranges = [Span("kdvfs_step:0", 0, 100), Span("kdvfs:forward/attn", 0, 100)]
    rows = events_to_rows([Span("flash_fwd_kernel", 10, 20), Span("cutlass_gemm", 40, 30)], ranges)
    tr = Trace.from_csv(write_csv(rows, tmp_path / "t.csv"))
    assert [k.region for k in tr.steps[0].kernels] == ["forward/attn", "forward/attn"]
    assert [k.category for k in tr.steps[0].kernels] == ["attention", "gemm"]
    assert tr.steps[0].kernels[1].gap_before_s == pytest.approx(10e-6)


def test_categories_of_shipped_trace_kernel_names():
    tr = Trace.gpt1b()
    agree = [categorize_kernel(k.kernel) == k.category for k in tr.steps[0].kernels]
    assert sum(agree) / len(agree) > 0.8


def test_record_on_cpu_profiler(tmp_path):
    torch = pytest.importorskip("torch")
    from kdvfs_plugins.sim.capture import record, region

    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)

    def step(i):
        with region("forward"):
            y = lin(x).relu().sum()
        with region("backward"):
            y.backward()

    rows = record(step, steps=2, warmup_steps=0, device="cpu", out=tmp_path / "cpu.csv")
    assert {r["step"] for r in rows} == {0, 1}
    assert {r["region"] for r in rows} >= {"forward", "backward"}
    assert any(r["category"] == "gemm" for r in rows if r["region"] == "forward")
    assert Trace.from_csv(tmp_path / "cpu.csv").regions
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError):
            record(step, steps=1, device="cuda")


def test_trace_cli_cpu(tmp_path, capsys):
    pytest.importorskip("torch")
    script = tmp_path / "s.py"
    script.write_text(
        "import torch\nfrom kdvfs_plugins.sim.capture import region\n"
        "lin = torch.nn.Linear(8, 8)\n"
        "def kdvfs_trace_step(i):\n"
        "    with region('forward'):\n        y = lin(torch.randn(2, 8)).sum()\n"
        "    with region('backward'):\n        y.backward()\n")
    out = tmp_path / "t.csv"
    assert main(["trace", "--script", str(script), "--out", str(out), "--cpu", "--steps", "1"]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["trace", "--script", str(tmp_path / "nope.py"), "--out", str(out)]) == 2


def test_correct_rows_gives_untagged_kernels_the_next_phase_and_cuts_profiler_gaps():
    from kdvfs_plugins.sim.capture import correct_rows

    def row(start, dur, region, category="gemm"):
        return {"step": 0, "phase": region.split("/")[0], "category": category, "kernel": "k",
                "start_us": start, "dur_us": dur, "region": region}

    rows = [row(0, 10, "forward/layers.*.mlp"), row(10, 5, "step", "softmax_loss"),
            row(500, 10, "backward/head"), row(510, 5, "step", "attention"), row(515, 10, "backward/layers.*.qkv"),
            row(530, 20, "step", "optimizer"), row(560, 3, "step", "copy_cast")]
    out = correct_rows(rows, max_gap_us=20)
    assert [r["region"] for r in out] == ["forward/layers.*.mlp", "backward", "backward/head", "backward",
                                          "backward/layers.*.qkv", "optimizer", "optimizer"]
    assert [r["phase"] for r in out][-2:] == ["optimizer", "optimizer"]
    # the 485 µs gap after the loss is cut to 20 µs and everything after it moves up by 465 µs
    assert out[2]["start_us"] == 35 and out[-1]["start_us"] == 560 - 465
    assert correct_rows(rows, max_gap_us=None)[2]["start_us"] == 500
