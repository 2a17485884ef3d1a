"""Progress on terminals only: drawn by tqdm on a terminal, nothing at all elsewhere."""
from __future__ import annotations

import io
import sys

import pytest

from kdvfs_plugins.progress import ProgressLine, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal():
    term = Terminal()
    with progress(3, "sweep", unit="budget", stream=term) as bar:
        assert bar.enabled
        for _ in range(3):
            bar.update(1)
        bar.set_status("slowdowns 0.3")
    text = term.getvalue()
    assert "sweep" in text and "3/3" in text and "slowdowns 0.3" in text


def test_nothing_is_written_off_a_terminal():
    pipe = io.StringIO()
    with progress(3, "sweep", stream=pipe) as bar:
        assert not bar.enabled
        bar.update(3)
        bar.set_status("anything")
    assert pipe.getvalue() == ""
    # forced either way, as the config's progress key does
    forced = io.StringIO()
    with progress(1, "forced", stream=forced, enabled=True) as bar:
        bar.update(1)
    assert "forced" in forced.getvalue()
    with progress(1, "off", stream=Terminal(), enabled=False) as bar:
        assert not bar.enabled


def test_the_bar_closes_on_an_exception():
    term = Terminal()
    try:
        with progress(2, "work", stream=term) as bar:
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert bar._bar is None


def test_status_line_of_the_engine_is_drawn_by_tqdm_not_by_hand():
    term = Terminal()
    line = ProgressLine(True, term)
    line.update("kdvfs explore: block 1")
    line.update("kdvfs explore: block 2")
    line.close()
    assert "block 2" in term.getvalue()
    quiet = io.StringIO()
    off = ProgressLine(False, quiet)
    off.update("x")
    off.close()
    assert quiet.getvalue() == ""


def _study(ctx, *, values, scale):
    return {"ctx": ctx, "points": [scale * v for v in values]}


def test_studies_in_parts_give_one_calls_result_and_show_progress(monkeypatch):
    from kdvfs_plugins.commands.simulate import in_parts

    whole = _study("c", values=[1, 2, 3], scale=2)
    monkeypatch.setattr(sys, "stderr", Terminal())
    parts = in_parts(_study, "c", key="values", values=[1, 2, 3], merge="points", desc="latency sweep",
                     unit="latency", scale=2)
    assert parts == whole
    assert "latency sweep" in sys.stderr.getvalue() and "/3 " in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert in_parts(_study, "c", key="values", values=[1, 2], merge="points", desc="d", unit="u", scale=1) == \
        _study("c", values=[1, 2], scale=1)
    assert sys.stderr.getvalue() == ""


@pytest.mark.slow
def test_the_demo_shows_one_bar_on_a_terminal_and_none_off_it(monkeypatch, tmp_path, capsys):
    from kdvfs_plugins.cli import main

    argv = ["demo", "--no-sweeps", "--no-explore", "--no-lightning", "--exec-steps", "1"]
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(argv + ["--run-dir", str(tmp_path / "a")]) == 0
    drawn = sys.stderr.getvalue()
    assert "kdvfs demo" in drawn and "/4" in drawn  # three objectives and the plan timeline
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(argv + ["--run-dir", str(tmp_path / "b")]) == 0
    assert sys.stderr.getvalue() == ""
    assert "planned vs executed" in capsys.readouterr().out  # the tables go to stdout either way


@pytest.mark.slow
def test_simulate_explore_shows_its_seeds_on_a_terminal(monkeypatch, capsys):
    from kdvfs_plugins.cli import main

    argv = ["simulate", "--explore", "--seeds", "2", "--explore-max-steps", "200", "--json"]
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(argv) == 0
    assert "exploring seeds" in sys.stderr.getvalue() and "/2" in sys.stderr.getvalue()
    assert '"seeds"' in capsys.readouterr().out  # the JSON alone on stdout
