"""The pipeline study's table and timeline figure.

``format_pipeline(data) -> str``: the compare table of :func:`kdvfs_plugins.studies.pipeline.
pipeline_compare`'s data, titled as a model prediction of the simulated H100 cluster.
``pipeline_timeline_figure(runs, data, planners=("default", "critical_path"))``: one panel per
planner, ranks against time, each stretch coloured by the SM clock it ran at (waits hatched).
``plot_pipeline_timeline(runs, data, path)``: that figure as a PNG.

``runs`` maps planner names to executed runs with ``time_s`` and ``segments`` (per rank, stretches
with ``start_s``, ``end_s``, ``kind``, ``microbatch``, ``sm_mhz``): what the virtual cluster returns.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

LABEL = "model prediction (simulated H100 cluster)"
#: Clock colour scale (MHz): the H100's lowest and highest SM clocks.
SM_RANGE_MHZ = (345.0, 1980.0)


def _pc(x: float) -> str:
    return f"{100 * x:+.2f}%"


def format_pipeline(data: Mapping, fmt: str = "text") -> str:
    """The compare as a text table (``fmt="text"``) or as Markdown (``"markdown"``, as the docs
    show it: no plot path, which would be this machine's, and no assumptions, which the page lists)."""
    d = data["default"]
    chunks = f" x {data['chunks']} model chunks" if data.get("chunks", 1) > 1 else ""
    head = (f"{data.get('label', LABEL)}: {data['stages']} stages{chunks} x {data['replicas']} replicas, "
            f"{data['microbatches']} microbatches, {data['schedule']}, switch latency {data['switch_latency_ms']:g} ms "
            f"({'issued ahead' if data['issue_ahead'] else 'at the boundary'}), "
            f"{'noise seed ' + str(data['seed']) if data['noise'] else 'no noise'}")
    notes = [f"default: iteration {d['iteration_time_s'] * 1e3:.2f} ms, {d['energy_j']:.1f} J"]
    st = data.get("straggler")
    if st:
        notes.append(f"straggler: rank {st['rank']} x{st['factor']:g} (default iteration "
                     f"{_pc(st['default_time_change'])} against no straggler)")
    cols = ["planner", "objective", "planned time", "planned energy", "executed time", "executed energy", "changes"]
    rows = []
    for r in data["rows"]:
        row = [r["planner"], r["objective"], _pc(r["planned_time_change"]), _pc(r["planned_energy_change"]),
               _pc(r["executed_time_change"]), _pc(r["executed_energy_change"]), str(r["clock_changes"])]
        if st:
            w = r["without_replanning"]
            row.append(f"{_pc(w['executed_time_change'])} / {_pc(w['executed_energy_change'])}")
        row.append(" ".join(_pc(x["executed_energy_change"]) for x in r["per_rank"]))
        rows.append(row)
    if st:
        cols.append("without re-planning: time / energy")
    cols.append("energy per rank")
    if fmt == "markdown":
        lines = [head, "", *(f"{n}." for n in notes), "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * 2 + "---:|" * (len(cols) - 2)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt_row = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [head, *(f"  {n}" for n in notes)]
    lines += [fmt_row.format(*cols).rstrip()] + [fmt_row.format(*row).rstrip() for row in rows]
    lines.append("  assumptions: " + "; ".join(data.get("assumptions", ())))
    if data.get("plot"):
        lines.append(f"  plot: {data['plot']}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pipeline_timeline_figure(runs: Mapping, data: Mapping, planners: Sequence[str] = ("default", "critical_path")):
    """Ranks against time per planner; colour = the SM clock the stretch ran at."""
    plt = _pyplot()
    import matplotlib
    from matplotlib import cm, colors

    planners = [p for p in planners if p in runs]
    norm = colors.Normalize(*SM_RANGE_MHZ)
    cmap = matplotlib.colormaps["viridis"]
    n_ranks = max(len(runs[p].segments) for p in planners)
    fig, axes = plt.subplots(len(planners), 1, figsize=(11, 1.0 + len(planners) * (1.0 + 0.45 * n_ranks)),
                             squeeze=False, sharex=True, layout="constrained")
    rows = {r["planner"]: r for r in data.get("rows", ()) if r["objective"] in ("default", "strict")}
    chunked = data.get("chunks", 1) > 1  # interleaved: label instructions F<microbatch>.<chunk>
    for ax, name in zip(axes[:, 0], planners):
        run = runs[name]
        for rank, segs in enumerate(run.segments):
            for s in segs:
                wait = s.kind == "wait"
                ax.barh(rank, (s.end_s - s.start_s) * 1e3, left=s.start_s * 1e3, height=0.45 if wait else 0.8,
                        color=cmap(norm(s.sm_mhz)), edgecolor="none", hatch="//" if wait else None,
                        alpha=0.55 if wait else 1.0)
                if not wait and s.microbatch >= 0 and s.end_s - s.start_s > 0.004:
                    label = f"{s.kind[0].upper()}{s.microbatch}" + (f".{s.chunk}" if chunked else "")
                    ax.text((s.start_s + s.end_s) / 2 * 1e3, rank, label, ha="center", va="center", fontsize=6,
                            color="white")
        row = rows.get(name)
        extra = (f": executed time {_pc(row['executed_time_change'])}, energy {_pc(row['executed_energy_change'])}"
                 if row and name != "default" else "")
        ax.set_title(f"{name}{extra} (iteration {run.time_s * 1e3:.1f} ms)", fontsize=9)
        ax.set_yticks(range(len(run.segments)))
        ax.set_yticklabels([f"rank {r}" for r in range(len(run.segments))], fontsize=8)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("time in the iteration (ms)")
    fig.suptitle(f"{LABEL}: pipeline timeline, {data.get('stages')} stages, {data.get('microbatches')} "
                 f"microbatches, {data.get('schedule')} (waits hatched)", fontsize=10)
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes[:, 0].tolist(), label="SM clock (MHz)", fraction=0.03, pad=0.01, aspect=30)
    return fig


def plot_pipeline_timeline(runs: Mapping, data: Mapping, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = pipeline_timeline_figure(runs, data)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
