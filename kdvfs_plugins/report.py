"""Tables and plots. Plots use matplotlib's Agg backend (no display needed); every figure made
from the simulator is titled as a model prediction."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

GRANULARITY_ORDER = ("iteration", "pass", "kernel")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(data: Mapping) -> str:
    return "model prediction (simulated H100)" if data.get("model_prediction", True) else "measured"


def plot_sweep(data: Mapping, path) -> Path:
    """Energy saved against slowdown, one line per granularity (the paper's Fig. 6)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in GRANULARITY_ORDER:
        pts = sorted((p for p in data["points"] if p["granularity"] == g), key=lambda p: p["max_slowdown"])
        if pts:
            ax.plot([100 * p["executed_time_change"] for p in pts], [-100 * p["executed_energy_change"] for p in pts],
                    marker="o", label=g)
    ax.set_xlabel("slowdown (%)")
    ax.set_ylabel("energy saved (%)")
    ax.set_title(f"Energy saved vs slowdown - {_label(data)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_latency_sweep(data: Mapping, path) -> Path:
    """Kernel-level energy saved against switch latency, per actuation mode, with pass level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
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
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def format_compare(data: Mapping) -> str:
    """The compare table as text (fractions shown as %)."""
    lines = [f"{_label(data)}: planned vs executed, switch latency {data['switch_latency_ms']:g} ms"
             f" ({'issued ahead' if data.get('issue_ahead') else 'at the boundary'}),"
             f" {'noise seed ' + str(data.get('seed')) if data.get('noise') else 'no noise'}",
             f"  {'granularity':<10} {'objective':<8} {'plan time':>9} {'plan energy':>11} "
             f"{'exec time':>9} {'exec energy':>11} {'switches/step':>13}"]
    for r in data["rows"]:
        lines.append(f"  {r['granularity']:<10} {r['objective']:<8} {100 * r['planned_time_change']:+8.2f}% "
                     f"{100 * r['planned_energy_change']:+10.2f}% {100 * r['executed_time_change']:+8.2f}% "
                     f"{100 * r['executed_energy_change']:+10.2f}% {r['switches_per_step']:13.1f}")
    return "\n".join(lines)


def format_sweep(data: Mapping) -> str:
    lines = [f"{_label(data)}: energy saved vs slowdown budget (replayed noise-free)",
             f"  {'budget':>6} " + " ".join(f"{g + ' time/energy':>24}" for g in GRANULARITY_ORDER)]
    budgets = sorted({p["max_slowdown"] for p in data["points"]})
    for b in budgets:
        cells = []
        for g in GRANULARITY_ORDER:
            p = next((p for p in data["points"] if p["granularity"] == g and p["max_slowdown"] == b), None)
            cells.append(f"{100 * p['executed_time_change']:+10.2f}% {100 * p['executed_energy_change']:+10.2f}%"
                         if p else f"{'-':>24}")
        lines.append(f"  {100 * b:5.1f}% " + " ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def format_latency_sweep(data: Mapping) -> str:
    lines = [f"{_label(data)}: {data.get('objective', 'strict')} saving vs switch latency (replayed noise-free)",
             f"  {'latency':>8} {'actuation':<10} {'kernel time':>11} {'kernel energy':>13} {'pass energy':>11} {'switches':>8}"]
    for p in data["points"]:
        lines.append(f"  {p['switch_latency_ms']:6.1f}ms {p['actuation']:<10} {100 * p['kernel_time_change']:+10.2f}% "
                     f"{100 * p['kernel_energy_change']:+12.2f}% {100 * p['pass_energy_change']:+10.2f}% "
                     f"{p['kernel_switches_per_step']:8.0f}")
    return "\n".join(lines)
