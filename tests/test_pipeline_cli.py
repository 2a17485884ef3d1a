"""``kdvfs simulate --pipeline``: the JSON contract, stragglers, user traces and bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from kdvfs_plugins.cli import main
from kdvfs_plugins.data import WORKLOAD_TRACES, path
from kdvfs_plugins.errors import ConfigError
from kdvfs_plugins.studies.pipeline import parse_straggler, pipeline_compare, stage_workloads

ROW_KEYS = {"planner", "objective", "planned_time_change", "executed_time_change", "executed_energy_change",
            "per_rank"}


def _run(capsys, *argv):
    rc = main(["simulate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_contract_and_plot(capsys, tmp_path):
    rc, out, _ = _run(capsys, "--pipeline", "2", "--microbatches", "4", "--schedule", "gpipe", "--compare",
                      "--json", "--out-dir", str(tmp_path))
    assert rc == 0
    data = json.loads(out)
    assert data["model_prediction"] is True and data["label"] == "model prediction (simulated H100 cluster)"
    assert [r["planner"] for r in data["rows"]] == ["default", "per_gpu", "envpipe", "critical_path", "critical_path"]
    assert [r["objective"] for r in data["rows"]][1:] == ["strict", "strict", "strict", "relaxed 5%"]
    relaxed = data["rows"][-1]
    assert relaxed["executed_energy_change"] <= data["rows"][3]["executed_energy_change"]
    assert relaxed["executed_time_change"] <= 0.05 + 0.005
    for r in data["rows"]:
        assert ROW_KEYS <= set(r)
        assert len(r["per_rank"]) == data["ranks"] == 2
        assert {"rank", "stage", "replica", "energy_j", "executed_energy_change", "clocks"} <= set(r["per_rank"][0])
    assert data["rows"][0]["executed_energy_change"] == 0.0
    assert data["schedule"] == "gpipe" and data["stage_traces"][0].startswith("gpt1b-stage0-of4+")
    assert (tmp_path / "pipeline_timeline.png").stat().st_size > 10_000
    assert data["plot"] == str(tmp_path / "pipeline_timeline.png")


def test_table_is_labelled_a_model_prediction(capsys, tmp_path):
    rc, out, _ = _run(capsys, "--pipeline", "2", "--microbatches", "3", "--no-noise",
                      "--plot", str(tmp_path / "t.png"))
    assert rc == 0
    assert out.startswith("model prediction (simulated H100 cluster)")
    assert "critical_path" in out and "envpipe" in out and (tmp_path / "t.png").exists()


def test_markdown_table_as_the_docs_show_it(capsys, tmp_path):
    rc, out, _ = _run(capsys, "--pipeline", "2", "--microbatches", "3", "--no-noise", "--markdown",
                      "--out-dir", str(tmp_path))
    assert rc == 0 and out.startswith("model prediction (simulated H100 cluster)")
    assert "| critical_path | strict |" in out and "plot:" not in out and "assumptions" not in out


def test_interleaved_on_the_shipped_traces(capsys, tmp_path):
    rc, out, _ = _run(capsys, "--pipeline", "2", "--microbatches", "4", "--schedule", "interleaved", "--json",
                      "--out-dir", str(tmp_path))
    assert rc == 0
    data = json.loads(out)
    assert data["chunks"] == 2 and data["stages"] == 2 and len(data["stage_traces"]) == 4
    cp = [r for r in data["rows"] if r["planner"] == "critical_path" and r["objective"] == "strict"][0]
    assert cp["executed_time_change"] <= 0.005 and cp["executed_energy_change"] < -0.05


def test_straggler_saving_with_and_without_replanning(capsys, tmp_path):
    rc, out, _ = _run(capsys, "--pipeline", "2", "--microbatches", "4", "--dp", "2", "--straggler", "3:1.1",
                      "--json", "--out-dir", str(tmp_path))
    assert rc == 0
    data = json.loads(out)
    assert data["straggler"]["rank"] == 3 and data["straggler"]["factor"] == 1.1
    assert data["straggler"]["default_time_change"] > 0  # the last stage of replica 1 sets the pace
    cp = {(r["planner"], r["objective"]): r for r in data["rows"]}["critical_path", "strict"]
    assert {"executed_time_change", "executed_energy_change"} <= set(cp["without_replanning"])
    assert cp["executed_time_change"] <= 0.005
    # Re-planned to the straggler's pace, the others slow down into the time it costs them.
    assert cp["executed_energy_change"] < cp["without_replanning"]["executed_energy_change"]


def test_user_stage_traces(capsys, tmp_path):
    files = []
    for i in (0, 3):
        dst = tmp_path / f"stage{i}.csv"
        shutil.copy(path(WORKLOAD_TRACES[f"gpt1b-stage{i}-of4"][0]), dst)
        files.append(str(dst))
    rc, out, _ = _run(capsys, "--pipeline", "2", "--microbatches", "4", "--stage-traces", ",".join(files),
                      "--json", "--out-dir", str(tmp_path))
    assert rc == 0
    assert json.loads(out)["stage_traces"] == ["stage0.csv", "stage3.csv"]


@pytest.mark.parametrize("argv,message", [
    (["--pipeline", "4", "--straggler", "9:1.1"], "--straggler='9:1.1' is not allowed; a rank from 0 to 3"),
    (["--pipeline", "0"], "--pipeline=0 is not allowed; a number of stages >= 1"),
    (["--pipeline", "3"], "give one trace per stage with --stage-traces"),
    (["--pipeline", "3", "--stage-traces", "a.csv,b.csv"], "one trace per stage: 3 files for --pipeline 3 (got 2)"),
    (["--pipeline", "2", "--stage-traces", "nope0.csv,nope1.csv"], "not found"),
    (["--pipeline", "2", "--straggler", "1"], "RANK:FACTOR, e.g. 1:1.1"),
    (["--pipeline", "2", "--schedule", "zigzag"], "one of 1f1b, gpipe"),
    (["--pipeline", "2", "--microbatches", "0"], "--microbatches=0 is not allowed"),
    (["--pipeline", "4", "--schedule", "interleaved"], "2 for the interleaved schedule on the shipped"),
    (["--pipeline", "2", "--schedule", "interleaved", "--stage-traces", "a.csv,b.csv,c.csv"],
     "a multiple of 2 and at least 4 files"),
])
def test_bad_input_exits_2_and_says_what_to_do(capsys, argv, message):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("kdvfs simulate: ") and err.count("kdvfs simulate") == 1
    assert message in err


def test_library_errors_are_config_errors():
    with pytest.raises(ConfigError, match="one trace per stage"):
        stage_workloads(4, ["a.csv"])
    with pytest.raises(ConfigError, match="RANK:FACTOR"):
        parse_straggler("x:y")
    with pytest.raises(ConfigError, match="a latency in ms"):
        pipeline_compare(2, 2, switch_latency_ms=-1)
