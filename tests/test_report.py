"""``kdvfs report``: one self-contained page with every figure the run's data allows."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdvfs_plugins.cli import main
from kdvfs_plugins.report import MODEL_PREDICTION, build_report, rank_dirs, write_report

ROOT = Path(__file__).resolve().parents[1]
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"')
EXTERNAL = re.compile(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', re.I)
#: figures of a demo run directory: regions, timeline, sweep, latency sweep, exploration, savings
DEMO_FIGURES = 6


def _stretch(region, start_ms, time_ms, sm, mem=2619, energy=1.0):
    return {"region": region, "start_ms": start_ms, "time_ms": time_ms, "energy_j": energy, "sm_mhz": sm,
            "mem_mhz": mem, "locked": sm != 1700}


def _plan_timeline():
    default = [_stretch("forward/matmul", 0, 10, 1700), _stretch("backward/matmul", 10, 20, 1700),
               _stretch("optimizer", 30, 5, 1700)]
    planned = [_stretch("forward/matmul", 0, 10, 1700), _stretch("backward/matmul", 10, 20, 1600),
               _stretch("optimizer", 30, 6, 900, mem=1593, energy=0.5)]
    regions = [{"region": d["region"], "default_time_ms": d["time_ms"], "default_energy_j": d["energy_j"],
                "planned_time_ms": p["time_ms"], "planned_energy_j": p["energy_j"]} for d, p in zip(default, planned)]
    return {"model_prediction": True, "trace": "test", "granularity": "kernel", "objective": "relaxed",
            "max_slowdown": 0.05, "switch_latency_ms": 6.0, "clocks": {"optimizer": "900/1593"},
            "regions": regions, "timeline": {"default": default, "planned": planned}}


def _exploration():
    blocks = [{"index": i, "kind": k, "first_step": 10 * i, "steps": 10, "time_ms": [230.0 + i] * 10,
               "energy_j_per_step": 150.0 - i} for i, k in enumerate(["baseline", "explore", "default", "validate-plan"])]
    return {"model_prediction": True, "blocks": blocks,
            "result": {"status": "rejected", "steps": 40, "message": "not significant",
                       "predicted": {"energy_change": -0.01, "time_change": 0.0},
                       "validated": {"energy_change": -0.005, "energy_change_min": -0.02, "energy_change_max": 0.01,
                                     "energy_change_se": 0.004, "time_change": 0.0, "time_change_min": -0.001,
                                     "time_change_max": 0.001, "time_change_se": 0.0005, "pairs": 4.0}}}


def _compare():
    rows = [{"granularity": g, "objective": "strict", "planned_time_change": 0.0, "planned_energy_change": -0.01,
             "executed_time_change": 0.001, "executed_energy_change": -0.009, "switches_per_step": 3.0}
            for g in ("iteration", "pass", "kernel")]
    return {"model_prediction": True, "switch_latency_ms": 6.0, "seed": 0, "steps": 4, "noise": True, "rows": rows}


def _sweep():
    pts = [{"granularity": g, "max_slowdown": b, "executed_time_change": b, "executed_energy_change": -b}
           for g in ("iteration", "pass", "kernel") for b in (0.0, 0.1)]
    return {"model_prediction": True, "points": pts}


def _latency_sweep():
    pts = [{"switch_latency_ms": lat, "actuation": a, "kernel_energy_change": -0.01, "pass_energy_change": -0.009,
            "kernel_time_change": 0.0, "kernel_switches_per_step": 5} for lat in (0.0, 6.0) for a in ("ahead", "late")]
    return {"model_prediction": True, "objective": "strict", "points": pts}


def _rank(d: Path, rank=0, explored=False):
    d.mkdir(parents=True)
    summary = {"rank": rank, "device": "simulated", "steps": 20, "gpu_time_ms_per_step": 25.0, "energy_j_per_step": 15.0,
               "avg_power_w": 500.0, "clock_changes": 0, "model_prediction": True,
               "regions": [{"region": "forward", "gpu_ms_per_step": 5.0, "share": 0.2},
                           {"region": "backward", "gpu_ms_per_step": 20.0, "share": 0.8}],
               "exploration": _exploration()["result"] if explored else None}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "windows.jsonl").write_text("".join(json.dumps({"first_step": i * 5, "last_step": i * 5 + 4, "energy_j": 75.0,
                                                         "duration_s": 0.2, "gpu_time_ms_per_step": 25.0}) + "\n"
                                             for i in range(4)))
    (d / "steps.jsonl").write_text("")


@pytest.fixture
def demo_dir(tmp_path):
    """A run directory shaped like the demo's (small synthetic data: the report is under test)."""
    d = tmp_path / "demo"
    d.mkdir()
    for name, data in (("plan_timeline", _plan_timeline()), ("exploration", _exploration()), ("compare", _compare()),
                       ("sweep", _sweep()), ("latency_sweep", _latency_sweep())):
        (d / f"{name}.json").write_text(json.dumps(data))
    _rank(d / "lightning" / "rank0")
    return d


def figures(page: str) -> int:
    return len(IMG.findall(page))


def assert_self_contained(page: str) -> None:
    assert not EXTERNAL.search(page), EXTERNAL.search(page).group(0)
    assert "<link" not in page and "@import" not in page
    # every image is embedded
    assert page.count("<img") == figures(page)


def test_demo_run_dir_gives_every_figure(demo_dir, capsys):
    assert main(["report", str(demo_dir)]) == 0
    page = (demo_dir / "report.html").read_text()
    assert str(demo_dir / "report.html") in capsys.readouterr().out
    assert_self_contained(page)
    # the demo's six plus the Lightning rank's measurement windows
    assert figures(page) == DEMO_FIGURES + 1
    for anchor in ("regions", "timeline", "sweep", "latency", "exploration", "savings", "ranks"):
        assert f'id="{anchor}"' in page
    assert "Not in this run" not in page
    assert page.count(MODEL_PREDICTION) >= DEMO_FIGURES
    assert "<td>900/1593</td><td class=\"text\">optimizer</td>" in page  # the planned clocks table


def test_out_option_and_missing_sections_are_noted_not_drawn(demo_dir, tmp_path):
    for name in ("sweep.json", "latency_sweep.json", "plan_timeline.json"):
        (demo_dir / name).unlink()
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(demo_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert not (demo_dir / "report.html").exists()
    assert figures(page) == DEMO_FIGURES + 1 - 4
    assert "Not in this run" in page and "no sweep.json" in page and "no plan_timeline.json" in page
    assert 'id="timeline"' not in page and 'id="sweep"' not in page


def test_training_run_dir_with_ranks(tmp_path):
    """A Lightning/DeepSpeed/Megatron run_dir: only rank<N> directories."""
    _rank(tmp_path / "run" / "rank0", 0, explored=True)
    _rank(tmp_path / "run" / "rank1", 1)
    assert [p.name for p in rank_dirs(tmp_path / "run")] == ["rank0", "rank1"]
    path = write_report(tmp_path / "run")
    page = path.read_text()
    assert_self_contained(page)
    # windows of both ranks, and the savings of rank 0's exploration with its validation spread
    assert figures(page) == 3
    assert "rank 0 (rank0)" in page and "rank 1 (rank1)" in page and "validated (4 pairs)" in page
    assert "-2.00%" in page  # the validation minimum of the energy change


def test_empty_dir_writes_a_page_of_notes(tmp_path):
    page = build_report(tmp_path)
    assert figures(page) == 0 and "Not in this run" in page


def test_missing_run_dir_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"kdvfs report: RUN_DIR='{tmp_path / 'nope'}' is not allowed; no such directory; give a run directory" in err


def test_empty_dir_is_an_error_and_no_page_is_written(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "nothing to report in it (no rank<N>/summary.json" in err and "kdvfs demo --run-dir DIR" in err
    assert "wrote" not in out and not (tmp_path / "report.html").exists()


def test_parent_of_run_dirs_is_an_error_naming_them(tmp_path, capsys):
    runs = tmp_path / "kdvfs_runs"
    _rank(runs / "quickstart" / "rank0")
    _rank(runs / "demo" / "lightning" / "rank0")
    (runs / "demo" / "compare.json").write_text(json.dumps(_compare()))
    assert main(["report", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "it holds run directories, not a run; report one of them: kdvfs report" in err
    assert (runs / "demo").as_posix() in err and (runs / "quickstart").as_posix() in err
    assert not (runs / "report.html").exists()


def test_a_rank_directory_is_a_run_of_one_rank(tmp_path, capsys):
    _rank(tmp_path / "quickstart" / "rank0", explored=True)
    rank_dir = tmp_path / "quickstart" / "rank0"
    assert rank_dirs(rank_dir) == [rank_dir]
    assert main(["report", str(rank_dir)]) == 0
    assert f"kdvfs report: wrote {rank_dir / 'report.html'}" in capsys.readouterr().out
    page = (rank_dir / "report.html").read_text()
    assert "no rank&lt;N&gt;/summary.json" not in page and "rank 0" in page
    assert figures(page) == 2  # its measurement windows and its exploration's savings


@pytest.mark.slow
def test_demo_then_report_then_screenshot(tmp_path):
    """The issue's done-when: the real demo's run directory, reported and rendered in headless Chromium."""
    run_dir = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(run_dir), "--no-lightning", "--exec-steps", "1"]) == 0
    for name in ("compare.json", "sweep.json", "latency_sweep.json", "plan_timeline.json", "exploration.json"):
        assert (run_dir / name).exists(), name
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert_self_contained(page)
    assert figures(page) == DEMO_FIGURES
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium): the screenshot part is not run")
    png = tmp_path / "report.png"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(run_dir / "report.html"),
                          "--out", str(png)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000


def test_the_page_template_ships_as_package_data():
    import fnmatch
    import tomllib

    from kdvfs_plugins import report

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kdvfs_plugins"]
    template = Path(report.__file__).parent / "templates" / report.TEMPLATE
    assert template.is_file()
    assert any(fnmatch.fnmatch(f"templates/{template.name}", p) for p in patterns)
