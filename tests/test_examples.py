"""The examples run as users would run them."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lightning_quickstart_runs_on_the_simulated_gpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lightning_quickstart.py"), "--steps", "6", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "rank0" / "summary.json").exists()
    assert "model prediction" in out.stderr
