"""Tables, plots and the HTML report of a run directory.

Plots use matplotlib's Agg backend (no display needed), imported only when a figure is drawn, so
that importing this module costs nothing. Every figure made from the simulator is titled as a model
prediction. One function per figure: ``*_figure(data)`` returns a matplotlib figure; the
``plot_*`` helpers save one to a PNG file.

The report (:func:`write_report`) reads what a run recorded and writes one self-contained HTML page:
every figure is embedded as a base64 PNG, so the page can be mailed or archived on its own. The
section functions return data (blocks); the page's markup and style are in one Jinja2 template,
``templates/report.html.j2``.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from .tables import Table

GRANULARITY_ORDER = ("iteration", "pass", "kernel")
MODEL_PREDICTION = "model prediction (simulated H100)"
#: Region band colours of the step timeline, by phase (the first part of a region name).
PHASE_COLOURS = {"forward": "#9ecae1", "backward": "#fdae6b", "optimizer": "#a1d99b",
                 "communication": "#bcbddc", "step": "#d9d9d9"}
#: Explorer block kinds (phases) in the exploration plot, in the order a run goes through them.
BLOCK_COLOURS = {"baseline": "#7f7f7f", "explore": "#1f77b4", "default": "#2ca02c",
                 "validate-plan": "#d62728", "validate-default": "#ff7f0e"}
#: Files a run directory may hold (the demo's and the engine's); the report reads what is there.
DEMO_FILES = ("compare.json", "sweep.json", "latency_sweep.json", "plan_timeline.json", "exploration.json", "demo.json")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(data: Mapping) -> str:
    return MODEL_PREDICTION if data.get("model_prediction", True) else "measured"


def _laid_out(fig, rect=(0, 0, 1, 1)):
    """Lay a figure out once, where it is made (``rect`` leaves room for a figure legend)."""
    fig.tight_layout(rect=rect)
    return fig


def _phase(region: str) -> str:
    return region.split("/", 1)[0]


# --------------------------------------------------------------------------------------------
# Figures (one function each; each returns a matplotlib figure)
# --------------------------------------------------------------------------------------------


def sweep_figure(data: Mapping):
    """Energy saved against slowdown, one line per granularity (the paper's Fig. 6)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for g in GRANULARITY_ORDER:
        pts = sorted((p for p in data["points"] if p["granularity"] == g), key=lambda p: p["max_slowdown"])
        if pts:
            ax.plot([100 * p["executed_time_change"] for p in pts], [-100 * p["executed_energy_change"] for p in pts],
                    marker="o", label=g)
    ax.set_xlabel("slowdown (%)")
    ax.set_ylabel("energy saved (%)")
    ax.set_title(f"Energy saved vs slowdown - {_label(data)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="granularity")
    return _laid_out(fig)


def latency_sweep_figure(data: Mapping):
    """Kernel-level energy saved against switch latency, per actuation mode, with pass level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for actuation, style in (("ahead", "-"), ("late", "--")):
        pts = sorted((p for p in data["points"] if p["actuation"] == actuation), key=lambda p: p["switch_latency_ms"])
        if not pts:
            continue
        x = [max(p["switch_latency_ms"], 0.03) for p in pts]  # 0 ms drawn at the axis' left edge
        name = "issued ahead" if actuation == "ahead" else "at the boundary (lands late)"
        ax.plot(x, [-100 * p["kernel_energy_change"] for p in pts], style, marker="o", label=f"kernel, {name}")
        ax.plot(x, [-100 * p["pass_energy_change"] for p in pts], style, marker="x", alpha=0.6, label=f"pass, {name}")
    ax.set_xscale("log")
    ax.set_xlabel("switch latency (ms; 0 drawn at 0.03)")
    ax.set_ylabel(f"energy saved (%), {data.get('objective', 'strict')}")
    ax.set_title(f"Saving vs clock switch latency - {_label(data)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _laid_out(fig)


def region_bars_figure(data: Mapping):
    """Time and energy per region of one step, at the default clocks and at the plan's clocks."""
    plt = _pyplot()
    import numpy as np

    rows = sorted(data["regions"], key=lambda r: r["default_energy_j"])
    y = np.arange(len(rows))
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 0.32 * len(rows) + 1.6), sharey=True)
    for ax, key, unit in ((ax_t, "time_ms", "GPU time per step (ms)"), (ax_e, "energy_j", "energy per step (J)")):
        ax.barh(y + 0.2, [r[f"default_{key}"] for r in rows], height=0.4, label="default clocks", color="#9e9e9e")
        ax.barh(y - 0.2, [r[f"planned_{key}"] for r in rows], height=0.4, label="planned clocks", color="#1f77b4")
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3)
    ax_t.set_yticks(y, [r["region"] for r in rows], fontsize=8)
    ax_e.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Per region, {_plan_name(data)} - {_label(data)}", fontsize=10)
    return _laid_out(fig)


def _plan_name(data: Mapping) -> str:
    slow = f" {100 * data['max_slowdown']:g}%" if data.get("objective") == "relaxed" else ""
    return f"{data.get('granularity', '?')}-level {data.get('objective', '?')}{slow} plan"


def _phase_bands(ax, stretches: Sequence[Mapping]) -> None:
    """Shade runs of consecutive stretches of one phase (hundreds of stretches: per-stretch bands
    would be unreadable, per-phase runs show the step's structure)."""
    start = None
    for i, s in enumerate(stretches):
        phase = _phase(s["region"])
        nxt = _phase(stretches[i + 1]["region"]) if i + 1 < len(stretches) else None
        if start is None:
            start = s["start_ms"]
        if nxt != phase:
            ax.axvspan(start, s["start_ms"] + s["time_ms"], color=PHASE_COLOURS.get(phase, "#eeeeee"), alpha=0.45, lw=0)
            start = None


def _step_line(ax, stretches: Sequence[Mapping], key: str, **style) -> None:
    xs, ys = [], []
    for s in stretches:
        xs += [s["start_ms"], s["start_ms"] + s["time_ms"]]
        ys += [s[key], s[key]]
    ax.plot(xs, ys, **style)


def timeline_figure(data: Mapping):
    """SM and memory clock over one step, default and planned, over the step's phase bands."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    tl = data["timeline"]
    fig, (ax_sm, ax_mem) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for ax, key in ((ax_sm, "sm_mhz"), (ax_mem, "mem_mhz")):
        _phase_bands(ax, tl["planned"])
        # default wide and pale underneath: where both coincide (often the memory clock) both still show
        _step_line(ax, tl["default"], key, color="#555555", lw=2.6, alpha=0.45, label="default clocks")
        _step_line(ax, tl["planned"], key, color="#d62728", lw=1.2, label="planned clocks")
        ax.grid(alpha=0.3)
    ax_sm.set_ylabel("SM clock (MHz)")
    ax_mem.set_ylabel("memory clock (MHz)")
    ax_mem.set_xlabel("time in the step (ms)")
    mems = [s["mem_mhz"] for s in tl["default"] + tl["planned"]]
    ax_mem.set_ylim(min(mems) - 300, max(mems) + 300)
    phases = list(dict.fromkeys(_phase(s["region"]) for s in tl["planned"]))
    lines, _ = ax_sm.get_legend_handles_labels()
    bands = [Patch(color=PHASE_COLOURS.get(p, "#eeeeee"), alpha=0.45, label=p) for p in phases]
    ax_sm.legend(handles=lines + bands, fontsize=8, ncol=len(lines) + len(bands), loc="lower center",
                 bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(f"Clocks over one step, {_plan_name(data)} - {_label(data)}", fontsize=10)
    return _laid_out(fig)


def exploration_figure(data: Mapping):
    """Exploration progress: each step's GPU time and each block's energy per step, by phase."""
    plt = _pyplot()

    blocks = data["blocks"]
    fig, (ax_t, ax_e) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    seen: set = set()
    for b in blocks:
        colour = BLOCK_COLOURS.get(b["kind"], "#8c564b")
        label = b["kind"] if b["kind"] not in seen else None
        seen.add(b["kind"])
        steps = range(b["first_step"], b["first_step"] + len(b["time_ms"]))
        ax_t.plot(list(steps), b["time_ms"], ".", ms=2, color=colour, label=label)
        if b.get("energy_j_per_step") is not None:
            ax_e.hlines(b["energy_j_per_step"], b["first_step"], b["first_step"] + b["steps"], color=colour, lw=3)
    ax_t.set_ylabel("GPU time per step (ms)")
    ax_e.set_ylabel("energy per step (J)\n(per block)")
    ax_e.set_xlabel("training step")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8, ncol=len(seen), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                markerscale=5, title=None)
    res = data.get("result") or {}
    fig.suptitle(f"Exploration progress ({res.get('status', '?')} after {res.get('steps', '?')} steps)"
                 f" - {_label(data)}", fontsize=10)
    return _laid_out(fig)


def windows_figure(windows: Sequence[Mapping], summary: Mapping):
    """A rank's measurement windows: energy per step and GPU time per step, window by window."""
    plt = _pyplot()

    x = [0.5 * (w["first_step"] + w["last_step"]) for w in windows]
    fig, (ax_t, ax_e) = plt.subplots(2, 1, figsize=(10, 4), sharex=True)
    ax_t.plot(x, [w["gpu_time_ms_per_step"] for w in windows], "o-", ms=3)
    ax_e.plot(x, [w["energy_j"] / (w["last_step"] - w["first_step"] + 1) for w in windows], "o-", ms=3, color="#d62728")
    ax_t.set_ylabel("GPU ms / step")
    ax_e.set_ylabel("energy J / step")
    ax_e.set_xlabel("training step (window middle)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Rank {summary.get('rank', '?')}: measurement windows - {_label(summary)}", fontsize=10)
    return _laid_out(fig)


def savings_figure(rows: Sequence[Mapping], label: str):
    """Energy and time change of each estimate, with its spread where it has one.

    ``rows``: ``{"name", "energy_change", "time_change"}`` fractions, optional ``*_min``/``*_max``
    (the spread over validation pairs), ``*_se`` (standard error; drawn as +-2 se) and
    ``planned_*`` (the plan's own prediction, drawn hollow beside the executed figure).
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.42 * len(rows) + 2.0), sharey=True)
    y = list(range(len(rows)))[::-1]
    for ax, key, title in ((axes[0], "energy_change", "energy change (%)"), (axes[1], "time_change", "time change (%)")):
        for yi, r in zip(y, rows):
            v = 100 * r[key]
            # min-max above the point and +-2 se below it: of similar width, they would hide each other
            if f"{key}_min" in r:
                ax.errorbar([v], [yi + 0.18], xerr=[[v - 100 * r[f"{key}_min"]], [100 * r[f"{key}_max"] - v]],
                            fmt="none", ecolor="#888888", capsize=4, lw=1.2)
            if f"{key}_se" in r:
                ax.hlines(yi - 0.18, v - 200 * r[f"{key}_se"], v + 200 * r[f"{key}_se"], color="#1f77b4", lw=4, alpha=0.7)
            if f"planned_{key}" in r:
                ax.plot([100 * r[f"planned_{key}"]], [yi], "o", mfc="none", mec="#333333")
            ax.plot([v], [yi], "o", color="#d62728" if r.get("validated") else "#333333")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [r["name"] for r in rows], fontsize=8)
    legend = [Line2D([], [], marker="o", ls="none", color="#333333", label="executed / predicted"),
              Line2D([], [], marker="o", ls="none", mfc="none", mec="#333333", label="planned"),
              Line2D([], [], marker="o", ls="none", color="#d62728", label="validated mean"),
              Line2D([], [], color="#888888", label="min-max over validation pairs"),
              Line2D([], [], color="#1f77b4", lw=4, alpha=0.7, label="+-2 standard errors")]
    fig.legend(handles=legend, loc="lower center", ncol=5, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"Savings and their spread - {label}", fontsize=10)
    return _laid_out(fig, rect=(0, 0.06, 1, 1))


# --------------------------------------------------------------------------------------------
# Saving figures to files (used by the demo)
# --------------------------------------------------------------------------------------------


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_sweep(data: Mapping, path) -> Path:
    """:func:`sweep_figure` saved as a PNG."""
    return _save(sweep_figure(data), path)


def plot_latency_sweep(data: Mapping, path) -> Path:
    """:func:`latency_sweep_figure` saved as a PNG."""
    return _save(latency_sweep_figure(data), path)


# --------------------------------------------------------------------------------------------
# Text tables
# --------------------------------------------------------------------------------------------


def _pc(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _objective(row: Mapping, data: Mapping) -> str:
    if row["objective"] != "relaxed":
        return row["objective"]
    slowdown = row.get("max_slowdown", data.get("max_slowdown"))
    return "relaxed" if slowdown is None else f"relaxed {100 * slowdown:g}%"


def compare_table(data: Mapping) -> Table:
    """The compare (planned vs executed, per granularity and objective) as a :class:`Table`."""
    title = (f"{_label(data)}: planned vs executed, switch latency {data['switch_latency_ms']:g} ms"
             f" ({'issued ahead' if data.get('issue_ahead') else 'at the boundary'}),"
             f" {'noise seed ' + str(data.get('seed')) if data.get('noise') else 'no noise'}")
    rows = [[r["granularity"], _objective(r, data), _pc(r["planned_time_change"]), _pc(r["planned_energy_change"]),
             _pc(r["executed_time_change"]), _pc(r["executed_energy_change"]), f"{r['switches_per_step']:.1f}"]
            for r in data["rows"]]
    return Table(["granularity", "objective", "planned time", "planned energy", "executed time", "executed energy",
                  "switches/step"], rows, title=title, align="llrrrrr")


def format_compare(data: Mapping, fmt: str = "text") -> str:
    """The compare table as text or Markdown (fractions shown as %)."""
    return compare_table(data).render(fmt)


def sweep_table(data: Mapping) -> Table:
    """Energy saved against the slowdown budget, per granularity, as a :class:`Table`."""
    budgets = sorted({p["max_slowdown"] for p in data["points"]})
    rows = []
    for b in budgets:
        cells = [f"{100 * b:g}%"]
        for g in GRANULARITY_ORDER:
            p = next((p for p in data["points"] if p["granularity"] == g and p["max_slowdown"] == b), None)
            cells.append(f"{_pc(p['executed_time_change'])} / {_pc(p['executed_energy_change'])}" if p else "-")
        rows.append(cells)
    return Table(["budget"] + [f"{g} time / energy" for g in GRANULARITY_ORDER], rows, align="rrrr",
                 title=f"{_label(data)}: energy saved vs slowdown budget (replayed noise-free)")


def format_sweep(data: Mapping, fmt: str = "text") -> str:
    return sweep_table(data).render(fmt)


def latency_sweep_table(data: Mapping) -> Table:
    """The saving at each switch latency, per actuation, as a :class:`Table`."""
    rows = [[f"{p['switch_latency_ms']:g} ms", p["actuation"], _pc(p["kernel_time_change"]),
             _pc(p["kernel_energy_change"]), _pc(p["pass_energy_change"]), f"{p['kernel_switches_per_step']:.0f}"]
            for p in data["points"]]
    return Table(["latency", "actuation", "kernel time", "kernel energy", "pass energy", "switches"], rows,
                 align="rlrrrr",
                 title=f"{_label(data)}: {data.get('objective', 'strict')} saving vs switch latency (replayed noise-free)")


def format_latency_sweep(data: Mapping, fmt: str = "text") -> str:
    return latency_sweep_table(data).render(fmt)


# --------------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def rank_dirs(run_dir) -> list[Path]:
    """``rank<N>`` directories with a summary.json: ``run_dir`` itself when it is one (a rank
    directory given on its own), those directly under it (a training run's ``run_dir``), and, in
    the demo's run directory, those one level down (its ``lightning/rank0``)."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        return [run_dir]
    found = list(run_dir.glob("rank*/summary.json"))
    if _is_demo_dir(run_dir):
        found += run_dir.glob("*/rank*/summary.json")
    return sorted({p.parent for p in found}, key=lambda p: (str(p.parent), _rank_number(p)))


def _is_demo_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in DEMO_FILES)


def _is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or _is_demo_dir(path) or any(path.glob("rank*/summary.json"))


#: What ``kdvfs report`` accepts, said in every error about RUN_DIR.
RUN_DIR_EXPECTED = ("give a run directory: a training run's run_dir (it holds rank<N>/summary.json), one "
                    "rank<N> directory, or the demo's (kdvfs demo --run-dir DIR)")


def check_run_dir(run_dir, source: str = "kdvfs report") -> Path:
    """``run_dir`` if it holds something to report; otherwise a ConfigError that says what it
    holds and what was expected (a parent of run directories names them)."""
    from .errors import ConfigError

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError("RUN_DIR", str(run_dir), f"no such directory; {RUN_DIR_EXPECTED}", source)
    if _is_run_dir(path):
        return path
    runs = sorted({p for p in path.iterdir() if p.is_dir() and _is_run_dir(p)}
                  | {p.parent for p in path.glob("*/*/rank*/summary.json")})
    if runs:
        names = ", ".join(p.as_posix() for p in runs[:6]) + (", ..." if len(runs) > 6 else "")
        raise ConfigError("RUN_DIR", str(run_dir), f"it holds run directories, not a run; report one of them: "
                          f"kdvfs report {runs[0].as_posix()} (run directories here: {names})", source)
    raise ConfigError("RUN_DIR", str(run_dir), f"nothing to report in it (no rank<N>/summary.json, no "
                      f"{', '.join(DEMO_FILES)}); {RUN_DIR_EXPECTED}", source)


def _rank_number(path: Path) -> int:
    digits = path.name[len("rank"):]
    return int(digits) if digits.isdigit() else -1


def load_run(run_dir) -> dict:
    """Everything the report shows, from what is in ``run_dir`` (missing files are left out)."""
    run_dir = Path(run_dir)
    data: dict = {"run_dir": run_dir}
    for name in DEMO_FILES:
        content = _read_json(run_dir / name)
        if content is not None:
            data[name.removesuffix(".json")] = content
    data["ranks"] = [{"path": d, "summary": _read_json(d / "summary.json") or {},
                      "windows": _read_jsonl(d / "windows.jsonl")} for d in rank_dirs(run_dir)]
    return data


# --------------------------------------------------------------------------------------------
# The HTML page: sections are lists of blocks (data); templates/report.html.j2 holds the markup
# --------------------------------------------------------------------------------------------

TEMPLATE = "report.html.j2"


def figure_block(fig, caption: str = "") -> dict:
    """A figure as a block of the page: the PNG embedded as base64 (a data URI: no external file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return {"kind": "figure", "png_b64": base64.b64encode(buf.getvalue()).decode("ascii"), "caption": caption}


def _note(text: str) -> dict:
    return {"kind": "note", "text": text}


def _badge(data: Mapping) -> dict:
    return {"kind": "badge", "label": _label(data)}


def _heading(text: str) -> dict:
    return {"kind": "heading", "text": text}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence], text_columns: Sequence[int] = ()) -> dict:
    """Numbers right-aligned; the first column and ``text_columns`` left-aligned."""
    return {"kind": "table", "header": [str(h) for h in header], "rows": [[str(c) for c in r] for r in rows],
            "text_columns": list(text_columns)}


class Omitted(str):
    """What a section function returns when the run did not record its data: the reason, which the
    page lists in one short note instead of drawing an empty section."""


def section_regions(run: Mapping):
    plan = run.get("plan_timeline")
    if not plan or not plan.get("regions"):
        return Omitted("no plan_timeline.json; kdvfs demo writes one")
    totals = ""
    if plan.get("default_step_ms"):
        dt = plan["planned_step_ms"] / plan["default_step_ms"] - 1
        de = plan["planned_step_energy_j"] / plan["default_step_energy_j"] - 1
        totals = (f" Step: {plan['default_step_ms']:.1f} ms and {plan['default_step_energy_j']:.1f} J at default clocks,"
                  f" {plan['planned_step_ms']:.1f} ms and {plan['planned_step_energy_j']:.1f} J planned"
                  f" (time {_pct(dt)}, energy {_pct(de)}).")
    blocks = [_badge(plan), figure_block(region_bars_figure(plan),
                                         f"One step of {plan.get('trace', 'the trace')}, replayed noise-free; "
                                         f"plan at {plan.get('switch_latency_ms', 0):g} ms switch latency.{totals}")]
    by_clock: dict = {}
    for region, clocks in sorted(plan.get("clocks", {}).items()):
        by_clock.setdefault(clocks, []).append(region)
    if by_clock:
        # Grouped by clock pair: plans give most regions of a pass the same clocks.
        blocks += [_heading("Planned clocks"),
                   _table(["SM/memory MHz", "regions"], [[c, ", ".join(rs)] for c, rs in by_clock.items()],
                          text_columns=(1,))]
    return blocks


def section_timeline(run: Mapping):
    plan = run.get("plan_timeline")
    if not plan or not plan.get("timeline"):
        return Omitted("no plan_timeline.json; kdvfs demo writes one")
    return [_badge(plan), figure_block(timeline_figure(plan), "Each region stretch at the clock the GPU ran it at: "
                                       "the lock, or the power controller's clock where that is lower. Bands: the "
                                       "phases of the planned step.")]


def section_sweep(run: Mapping):
    data = run.get("sweep")
    if not data or not data.get("points"):
        return Omitted("no sweep.json; kdvfs demo writes one unless --no-sweeps")
    return [_badge(data), figure_block(sweep_figure(data), "Each point: the plan for one slowdown budget, "
                                       "replayed noise-free on the virtual GPU.")]


def section_latency(run: Mapping):
    data = run.get("latency_sweep")
    if not data or not data.get("points"):
        return Omitted("no latency_sweep.json; kdvfs demo writes one unless --no-sweeps")
    return [_badge(data), figure_block(latency_sweep_figure(data), "What the clock switch latency leaves reachable.")]


def section_exploration(run: Mapping):
    blocks = []
    data = run.get("exploration")
    if data and data.get("blocks"):
        res = data.get("result") or {}
        blocks += [_badge(data), figure_block(exploration_figure(data), "Top: every step's GPU time, coloured by the "
                                              "explorer's phase. Bottom: energy per step of each block, from the "
                                              "windowed energy counter."),
                   {"kind": "outcome", "status": str(res.get("status", "?")), "message": str(res.get("message", ""))}]
    for rank in run.get("ranks", []):
        s, wins = rank["summary"], rank["windows"]
        if not wins:
            continue
        ex = s.get("exploration")
        what = f"explored: {ex.get('status')}" if ex else "did not explore"
        blocks += [_heading(f"{_rank_title(run, rank)} ({what})"), _badge(s),
                   figure_block(windows_figure(wins, s), "Per measurement window; the run directory does not "
                                "record the explorer's phase of each window.")]
    return blocks or Omitted("the run did not explore and recorded no measurement windows")


def savings_rows(run: Mapping) -> list[dict]:
    """Estimates of the saving, each with the spread it has (validation pairs, standard error)."""
    rows = []
    ex = run.get("exploration")
    results = [("demo exploration", (ex or {}).get("result"))]
    results += [(_rank_title(run, r), r["summary"].get("exploration")) for r in run.get("ranks", [])]
    for name, res in results:
        if not res:
            continue
        p, v = res.get("predicted") or {}, res.get("validated") or {}
        if "energy_change" in p:
            rows.append({"name": f"{name}: predicted", "energy_change": p["energy_change"],
                         "time_change": p.get("time_change", 0.0)})
        if "energy_change" in v:
            rows.append({"name": f"{name}: validated ({int(v.get('pairs', 0))} pairs)", "validated": True,
                         **{k: v[k] for k in v if k.startswith(("energy_change", "time_change"))}})
    for r in (run.get("compare") or {}).get("rows", []):
        rows.append({"name": f"compare {r['granularity']} {r['objective']}", "energy_change": r["executed_energy_change"],
                     "time_change": r["executed_time_change"], "planned_energy_change": r.get("planned_energy_change", 0.0),
                     "planned_time_change": r.get("planned_time_change", 0.0)})
    return rows


def section_savings(run: Mapping):
    rows = savings_rows(run)
    if not rows:
        return Omitted("no compare.json and no exploration result")
    simulated = any(r["summary"].get("model_prediction") for r in run.get("ranks", [])) or \
        any(k in run for k in ("compare", "exploration"))
    label = MODEL_PREDICTION if simulated else "measured"
    table = _table(["estimate", "energy", "min", "max", "2 se", "time", "min", "max", "2 se"],
                   [[r["name"], _pct(r["energy_change"]), _pct(r.get("energy_change_min")),
                     _pct(r.get("energy_change_max")),
                     "-" if "energy_change_se" not in r else f"{200 * r['energy_change_se']:.2f}%",
                     _pct(r["time_change"]), _pct(r.get("time_change_min")), _pct(r.get("time_change_max")),
                     "-" if "time_change_se" not in r else f"{200 * r['time_change_se']:.2f}%"] for r in rows])
    blocks = [{"kind": "badge", "label": label}, figure_block(savings_figure(rows, label)), table]
    cmp = run.get("compare")
    if cmp:
        blocks.append(_note(f"Executed rows: one run of {cmp.get('steps', '?')} steps on the virtual GPU with noise "
                            f"seed {cmp.get('seed', '?')} at {cmp.get('switch_latency_ms', 0):g} ms switch latency; "
                            "no spread."))
    return blocks


def _rank_title(run: Mapping, rank: Mapping) -> str:
    rel = rank["path"].relative_to(run["run_dir"]) if rank["path"].is_relative_to(run["run_dir"]) else rank["path"]
    shown = rank["path"].name if rel == Path(".") else rel.as_posix()  # a rank directory given on its own
    return f"rank {rank['summary'].get('rank', '?')} ({shown})"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def section_ranks(run: Mapping):
    blocks = []
    for rank in run.get("ranks", []):
        s = rank["summary"]
        facts = _table(["device", "steps", "GPU ms/step", "energy J/step", "power W", "clock changes"],
                       [[s.get("device", "?"), s.get("steps", "?"), _fmt(s.get("gpu_time_ms_per_step"), ".2f"),
                         _fmt(s.get("energy_j_per_step"), ".2f"), _fmt(s.get("avg_power_w"), ".0f"),
                         s.get("clock_changes", 0)]])
        regions = s.get("regions") or []
        table = _table(["region", "GPU ms/step", "share"],
                       [[r["region"], f"{r['gpu_ms_per_step']:.3f}", f"{100 * r['share']:.1f}%"] for r in regions]) \
            if regions else _note("No profiled steps: no region table.")
        blocks += [_heading(_rank_title(run, rank)), _badge(s), facts, table]
    return blocks or Omitted("no rank<N>/summary.json in this run directory")


#: (anchor, title, section function), in page order. A section function returns its blocks
#: (dicts whose "kind" the template renders) or an :class:`Omitted` reason.
SECTIONS: tuple[tuple[str, str, Callable[[Mapping], object]], ...] = (
    ("regions", "Energy and time per region: default vs planned clocks", section_regions),
    ("timeline", "Clock timeline of one step", section_timeline),
    ("sweep", "Energy saved vs slowdown, per granularity", section_sweep),
    ("latency", "Saving vs clock switch latency", section_latency),
    ("exploration", "Exploration progress and measurement windows", section_exploration),
    ("savings", "Savings and their validation spread", section_savings),
    ("ranks", "Region table of each rank", section_ranks),
)


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(TEMPLATE)


def build_report(run_dir) -> str:
    """The HTML page for ``run_dir`` (one string, no external assets)."""
    run = load_run(run_dir)
    shown, omitted = [], []
    for anchor, title, fn in SECTIONS:
        body = fn(run)
        entry = {"anchor": anchor, "title": title, "short": title.split(":")[0]}
        if isinstance(body, Omitted):
            omitted.append({**entry, "reason": str(body)})
        else:
            shown.append({**entry, "blocks": body})
    return _template().render(title=f"kdvfs report: {Path(run_dir).resolve().name}", run_dir=str(run_dir),
                              model_prediction=MODEL_PREDICTION, shown=shown, omitted=omitted)


def write_report(run_dir, out=None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``); returns the path.

    Raises ConfigError (:func:`check_run_dir`) when ``run_dir`` holds nothing to report."""
    check_run_dir(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    page = build_report(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
