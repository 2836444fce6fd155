"""The speedup plot of a benchmark report (speedup.png): bertkern's speedup against padding
fraction and against sequence length, one series per suite, baseline and mode.

matplotlib is optional and imported only when drawing: without it, or without rows that carry
the needed keys, draw() returns no path and a note saying why.
"""
import os
from collections import OrderedDict

from bertkern.bench import records


def _series(rows, x_of):
    """{(suite, baseline, mode, device): [(x, speedup), ...]} over rows with a speedup and an x."""
    series = OrderedDict()
    for r in rows:
        x = x_of(r)
        if x is None:
            continue
        for b, v in r.headline_speedups.items():
            series.setdefault((r.suite, b, r.mode, r.device), []).append((x, v))
    return series


def draw(data, png_path, title=None):
    """Draw speedup.png; returns (path or None, note): note says why the plot was skipped."""
    rows = records.headline_rows(records.rows_of(data))
    if not rows:
        return None, "Plot skipped: no benchmark records a `speedup_vs_*` value."
    panels = [("padding fraction", _series(rows, lambda r: r.get("padding_fraction"))),
              ("sequence length", _series(rows, lambda r: r.seqlen))]
    if not any(s for _, s in panels):
        return None, ("Plot skipped: no row with a `speedup_vs_*` value also records "
                      "`padding_fraction` or `seqlen`.")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter
    except ImportError:
        return None, "Plot skipped: matplotlib is not installed (pip install matplotlib)."

    # colour: suite and baseline; marker and line style: mode
    pairs, modes = [], []
    for _, series in panels:
        for suite, b, mode, _ in series:
            if (suite, b) not in pairs:
                pairs.append((suite, b))
            if mode not in modes:
                modes.append(mode)
    suites = {suite for suite, _ in pairs}
    devices = {r.device for r in rows if r.device is not None}
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
              "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    linestyles = ["-", ":", "-.", (0, (5, 1, 1, 1))]

    def label(key):
        suite, b, mode, device = key
        text = (f"{suite}: " if len(suites) > 1 else "") + f"vs {b}"
        extra = [x for x in (mode, device if len(devices) > 1 else None) if x]
        return text + (f" ({', '.join(extra)})" if extra else "")

    fig = Figure(figsize=(13, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    handles = OrderedDict()
    ymax = 1.0
    for ax, (xlabel, series) in zip(axes, panels):
        ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.2, zorder=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bertkern speedup (baseline time / bertkern time)")
        ax.grid(True, alpha=0.3)
        if not series:
            ax.text(0.5, 0.5, f"no rows record {xlabel}", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
            continue
        xs_all = []
        binned = xlabel == "padding fraction"
        for key, points in series.items():
            suite, b, mode, _ = key
            color = colors[pairs.index((suite, b)) % len(colors)]
            marker = markers[modes.index(mode) % len(markers)]
            style = linestyles[modes.index(mode) % len(linestyles)]
            # every benchmark as a marker; the line joins the geometric mean at each x (padding
            # fractions binned to 10%, so that cases of one workload at other lengths share a point)
            bins = OrderedDict()
            for x, v in sorted(points):
                bins.setdefault(round(x * 10) if binned else x, []).append((x, v))
            mean_x = [sum(p[0] for p in pts) / len(pts) for pts in bins.values()]
            mean_y = [records.geomean([p[1] for p in pts if p[1] > 0]) if any(p[1] > 0 for p in pts) else 0.0
                      for pts in bins.values()]
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, marker=marker,
                       s=28, alpha=0.55, zorder=3)
            (line,) = ax.plot(mean_x, mean_y, color=color, marker=marker, linestyle=style,
                              linewidth=1.8, markersize=6, zorder=4)
            handles.setdefault((pairs.index((suite, b)), modes.index(mode), label(key)), line)
            xs_all += [p[0] for p in points]
            ymax = max(ymax, max(p[1] for p in points))
        if xlabel == "padding fraction":
            ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
            # from 0: padding fractions read against "no padding"
            ax.set_xlim(min(0.0, min(xs_all)) - 0.03, min(1.02, max(max(xs_all) + 0.05, 0.3)))
        else:
            values = sorted(set(xs_all))
            if values[0] > 0 and values[-1] / values[0] >= 4:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_minor_locator(NullLocator())
            if len(values) <= 12:
                ax.xaxis.set_major_locator(FixedLocator(values))
                ax.set_xticklabels([f"{v:g}" for v in values])
    for ax in axes:
        ax.set_ylim(0, ymax * 1.12)
    axes[0].set_title("speedup vs padding fraction")
    axes[1].set_title("speedup vs sequence length")
    fig.suptitle(f"{title or 'bertkern speedup'}\n{records.machine_summary(data)}", fontsize=12)
    if handles:
        handles = OrderedDict((k[2], handles[k]) for k in sorted(handles))
        ncol = min(len(handles), 4)
        note = "markers: single benchmarks, lines: geometric mean at each x, dashed: parity (1.00x)"
        try:
            fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=ncol,
                       frameon=False, title=note, title_fontsize=9)
        except (ValueError, TypeError):  # matplotlib < 3.7: no "outside" placement
            axes[0].legend(list(handles.values()), list(handles.keys()), fontsize="small", title=note,
                           title_fontsize=7)
    fig.savefig(os.fspath(png_path), format="png")
    return os.fspath(png_path), None
