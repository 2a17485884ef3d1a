"""``kdvfs report RUN_DIR``: one self-contained HTML page of what a run recorded.

Works on the demo's run directory (``kdvfs demo --run-dir DIR``), on the ``run_dir`` of a
Lightning, DeepSpeed or Megatron run (its ``rank<N>`` directories) and on one ``rank<N>``
directory. Anything else (a missing or empty directory, the parent ``kdvfs_runs`` of several
runs) exits with status 2 and says what was expected. Sections whose data the run did not record
are left out with a note.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory: the demo's, a training run's run_dir (rank<N>/ inside), "
                                   "or one rank<N> directory")
    p.add_argument("--out", default=None, help="the HTML file to write (default: RUN_DIR/report.html)")


def run(args) -> int:
    from ..report import write_report

    # write_report checks RUN_DIR first: a missing or empty directory, or a parent of run
    # directories, is an error (exit status 2) that says what was expected; no page is written.
    path = write_report(Path(args.run_dir), args.out)
    print(f"kdvfs report: wrote {path}")
    return 0
