"""Each ``examples/trace_*.py`` script records a trace through ``kdvfs trace`` (tiny, on the CPU)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("trace_*.py"))
ENVS = {"trace_llama.py": [{}, {"KDVFS_LLAMA": "gqa2b"}], "trace_gpt_stage.py": [{"KDVFS_STAGE": "3"}]}


@pytest.mark.parametrize("script,extra", [(s, e) for s in SCRIPTS for e in ENVS.get(s.name, [{}])],
                         ids=lambda v: v.name if isinstance(v, Path) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_trace_script_records_phases_and_regions(tmp_path, script, extra):
    out = tmp_path / "trace.csv"
    env = {**os.environ, "KDVFS_TRACE_TINY": "1", **extra}
    subprocess.run([sys.executable, "-m", "kdvfs_plugins.cli", "trace", "--script", str(script), "--cpu",
                    "--out", str(out)], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    rows = list(csv.DictReader(out.open()))
    assert {r["step"] for r in rows} == {"0", "1"}
    assert {"forward", "backward", "optimizer"} <= {r["phase"] for r in rows}
    assert "gemm" in {r["category"] for r in rows}
    # the module tagger named regions below the phases, as KernelDVFS reports them
    assert any(r["region"].count("/") >= 1 for r in rows)
