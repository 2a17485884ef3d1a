"""``kdvfs report RUN_DIR``: one self-contained HTML page of what a run recorded.

Works on the demo's run directory (``kdvfs demo --run-dir DIR``) and on the ``run_dir`` of a
Lightning, DeepSpeed or Megatron run (its ``rank<N>`` directories). Sections whose data the run
did not record are left out with a note.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory: the demo's, or a training run's run_dir (rank<N>/ inside)")
    p.add_argument("--out", default=None, help="the HTML file to write (default: RUN_DIR/report.html)")


def run(args) -> int:
    from ..errors import ConfigError
    from ..report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError("RUN_DIR", str(run_dir), "an existing run directory (kdvfs demo --run-dir DIR writes one)",
                          source="kdvfs report")
    path = write_report(run_dir, args.out)
    print(f"kdvfs report: wrote {path}")
    return 0
