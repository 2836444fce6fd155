"""The plots of a benchmark report.

- ``encoder_speedup.png`` (draw_encoder): the chart a user wants first, bertkern.Encoder's speedup
  against the batch's padding fraction, train and inference (one series per dropout where train
  rows record several), against the best torch path, with the 95% intervals as error bars.
- ``speedup.png`` (draw): the detailed plot, every suite's speedup against padding fraction and
  against sequence length, one series per suite, baseline, mode (and dropout), legend outside
  on the right.

matplotlib is optional and imported only when drawing: without it, or without rows that carry
the needed keys, the draw functions return no path and a note saying why.
"""
import os
from collections import OrderedDict

from bertkern.bench import records


def _series(rows, x_of):
    """{(suite, baseline, mode, device, dropout): [(x, speedup, ci or None), ...]} over rows with a
    speedup and an x (dropout only for suites whose rows record several values)."""
    dropouts = {}  # per suite, the dropout values of its train rows (inference runs without)
    for r in rows:
        if r.mode != "inference":
            dropouts.setdefault(r.suite, set()).add(r.dropout)
    series = OrderedDict()
    for r in rows:
        x = x_of(r)
        if x is None:
            continue
        dropout = r.dropout if r.mode != "inference" and len(dropouts.get(r.suite, ())) > 1 else None
        for b, v in r.headline_speedups.items():
            series.setdefault((r.suite, b, r.mode, r.device, dropout), []).append((x, v, r.intervals.get(b)))
    return series


def _import_mpl():
    """(FigureCanvasAgg, Figure, ticker module) or None without matplotlib."""
    try:
        from matplotlib import ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return FigureCanvasAgg, Figure, ticker


NO_MPL = "matplotlib is not installed (pip install matplotlib)."


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
    mpl = _import_mpl()
    if mpl is None:
        return None, "Plot skipped: " + NO_MPL
    FigureCanvasAgg, Figure, ticker = mpl
    FixedLocator, NullLocator, PercentFormatter = ticker.FixedLocator, ticker.NullLocator, ticker.PercentFormatter

    # colour: suite, baseline (and dropout); marker and line style: mode
    pairs, modes = [], []
    for _, series in panels:
        for suite, b, mode, _, dropout in series:
            if (suite, b, dropout) not in pairs:
                pairs.append((suite, b, dropout))
            if mode not in modes:
                modes.append(mode)
    suites = {pair[0] for pair in pairs}
    devices = {r.device for r in rows if r.device is not None}
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
              "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    linestyles = ["-", ":", "-.", (0, (5, 1, 1, 1))]

    def label(key):
        suite, b, mode, device, dropout = key
        text = (f"{suite}: " if len(suites) > 1 else "") + f"vs {b}"
        extra = [x for x in (mode, f"dropout {dropout:g}" if dropout is not None else None,
                             device if len(devices) > 1 else None) if x]
        return text + (f" ({', '.join(extra)})" if extra else "")

    fig = Figure(figsize=(15, 6), dpi=100, layout="constrained")
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
            suite, b, mode, _, dropout = key
            color = colors[pairs.index((suite, b, dropout)) % len(colors)]
            marker = markers[modes.index(mode) % len(markers)]
            style = linestyles[modes.index(mode) % len(linestyles)]
            # every benchmark as a marker; the line joins the geometric mean at each x (padding
            # fractions binned to 10%, so that cases of one workload at other lengths share a point)
            bins = OrderedDict()
            for x, v, _ in sorted(points, key=lambda p: p[:2]):
                bins.setdefault(round(x * 10) if binned else x, []).append((x, v))
            mean_x = [sum(p[0] for p in pts) / len(pts) for pts in bins.values()]
            mean_y = [records.geomean([p[1] for p in pts if p[1] > 0]) if any(p[1] > 0 for p in pts) else 0.0
                      for pts in bins.values()]
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, marker=marker,
                       s=28, alpha=0.55, zorder=3)
            with_ci = [p for p in points if p[2] is not None]
            if with_ci:  # the 95% intervals, thin, behind the markers
                ax.errorbar([p[0] for p in with_ci], [p[1] for p in with_ci],
                            yerr=[[p[1] - p[2][0] for p in with_ci], [p[2][1] - p[1] for p in with_ci]],
                            fmt="none", ecolor=color, alpha=0.6, elinewidth=1, capsize=2, zorder=2)
                ymax = max(ymax, max(p[2][1] for p in with_ci))
            (line,) = ax.plot(mean_x, mean_y, color=color, marker=marker, linestyle=style,
                              linewidth=1.8, markersize=6, zorder=4)
            handles.setdefault((pairs.index((suite, b, dropout)), modes.index(mode), label(key)), line)
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
        # one column outside on the right: as many series as there are, none cut off
        ncol = 1 if len(handles) <= 24 else 2
        note = "markers: single benchmarks (bars: 95% interval)\nlines: geometric mean at each x\ndashed: parity (1.00x)"
        try:
            fig.legend(list(handles.values()), list(handles.keys()), loc="outside right upper", ncol=ncol,
                       frameon=False, title=note, title_fontsize=8, fontsize="small", alignment="left")
        except (ValueError, TypeError):  # matplotlib < 3.7: no "outside" placement
            axes[1].legend(list(handles.values()), list(handles.keys()), fontsize="small", title=note,
                           title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.savefig(os.fspath(png_path), format="png")
    return os.fspath(png_path), None


# --------------------------------------------------------------------------------------------
# encoder_speedup.png: the chart a user wants first

_CONFIG_KEYS = ("d_model", "nhead", "dim_feedforward", "layers", "batch", "seqlen", "dtype")
_SERIES_COLORS = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
_SERIES_MARKERS = ["o", "s", "D", "^", "v", "P"]


def _config(r):
    return tuple(r.extra.get(k) if records.is_scalar(r.extra.get(k)) else str(r.extra.get(k))
                 for k in _CONFIG_KEYS)


def _config_text(r):
    e = r.extra
    parts = []
    if e.get("d_model") is not None:
        parts.append(f"d_model {e['d_model']}")
    if e.get("layers") is not None:
        parts.append(f"{e['layers']} layers")
    if e.get("batch") is not None and e.get("seqlen") is not None:
        parts.append(f"batch {e['batch']} x {e['seqlen']}")
    if e.get("dtype") is not None:
        parts.append(str(e["dtype"]))
    return ", ".join(parts)


def encoder_series(rows):
    """The encoder chart's data: [(device, config text, OrderedDict label -> [(x, y, ci, workload)])].

    Rows: the bertkern rows of test_encoder (suite "encoder", impl "bertkern") with a
    padding_fraction; per device the model config with the most workloads (the headline config;
    the sequence-length sweep and the small models are in the detailed plot). y: the speedup vs
    the best torch path (``speedup_vs_torch_best``; inference, torch's fast path included), else
    vs ``torch`` (train: the only torch baseline). One series per mode, and per dropout when the
    train rows record several."""
    enc = [r for r in rows if r.suite == "encoder" and r.impl == "bertkern"
           and r.get("padding_fraction") is not None
           and ("torch_best" in r.speedups or "torch" in r.speedups)]
    out = []
    for device in sorted({r.device or "" for r in enc}, key=lambda d: (d != "cpu", d)):
        mine = [r for r in enc if (r.device or "") == device]
        by_config = OrderedDict()
        for r in mine:
            by_config.setdefault(_config(r), []).append(r)
        best = max(by_config.values(), key=lambda rs: len({(r.workload, r.get("padding_fraction")) for r in rs}))
        dropouts = {r.dropout for r in best if r.mode == "train"}
        series = OrderedDict()
        for r in sorted(best, key=lambda r: ((r.mode or "") != "train", r.dropout or 0.0, r.get("padding_fraction"))):
            b = "torch_best" if "torch_best" in r.speedups else "torch"
            against = "best torch path" if b == "torch_best" else "torch"
            label = r.mode or "encoder"
            if r.mode == "train" and r.dropout is not None and (len(dropouts) > 1 or r.dropout):
                label += f", dropout {r.dropout:g}"
            label += f" (vs {against})"
            series.setdefault(label, []).append((r.get("padding_fraction"), r.speedups[b], r.intervals.get(b),
                                                 r.workload))
        out.append((device, _config_text(best[0]), series))
    return out


def draw_encoder(data, png_path, title=None):
    """Draw encoder_speedup.png; returns (path or None, note): note says why it was skipped."""
    panels = encoder_series(records.rows_of(data))
    if not panels:
        return None, ("Encoder chart skipped: no bertkern row of test_encoder records `padding_fraction` "
                      "and `speedup_vs_torch_best` / `speedup_vs_torch`.")
    mpl = _import_mpl()
    if mpl is None:
        return None, "Encoder chart skipped: " + NO_MPL
    FigureCanvasAgg, Figure, ticker = mpl

    # 8 in wide: 800 px at README width (saved at 150 dpi for sharpness when scaled)
    fig = Figure(figsize=(8, 4.2 * len(panels) + 0.6), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    any_ci = False
    for ax, (device, config, series) in zip(axes, panels):
        n = len(series)
        xs = sorted({p[0] for pts in series.values() for p in pts})
        span = max(0.3, (xs[-1] - xs[0]) if xs else 0.3)
        dodge = 0.015 * span  # series side by side at one workload, so the bars do not overlap
        ymax = 1.0
        for i, (label, pts) in enumerate(series.items()):
            color, marker = _SERIES_COLORS[i % len(_SERIES_COLORS)], _SERIES_MARKERS[i % len(_SERIES_MARKERS)]
            off = (i - (n - 1) / 2) * dodge
            px = [p[0] + off for p in pts]
            py = [p[1] for p in pts]
            lo = [p[1] - p[2][0] if p[2] else 0.0 for p in pts]
            hi = [p[2][1] - p[1] if p[2] else 0.0 for p in pts]
            any_ci = any_ci or any(p[2] for p in pts)
            ax.errorbar(px, py, yerr=[lo, hi] if any(p[2] for p in pts) else None, color=color, marker=marker,
                        markersize=7, linewidth=2, capsize=4, elinewidth=1.5, label=label, zorder=3)
            for x, y, p in zip(px, py, pts):
                top = p[2][1] if p[2] else y
                ax.annotate(f"{y:.2g}x" if 0 < abs(y) < 0.1 else f"{y:.2f}x", (x, y), xytext=(8, 0), textcoords="offset points",
                            fontsize=9, color=color, va="center", ha="left", zorder=5,
                            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85))
                ymax = max(ymax, top)
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1.2, zorder=1, label="equal speed (1.0x)")
        ax.set_ylim(0, ymax * 1.18)
        ax.set_xlim(min(0.0, xs[0]) - 0.05 * span, xs[-1] + 0.16 * span)
        # x ticks at the workloads' padding fractions, named
        names = OrderedDict()
        for pts in series.values():
            for x, _, _, workload in pts:
                key = next((k for k in names if abs(k - x) < 0.02 * span), x)
                names.setdefault(key, [])
                if workload and workload not in names[key]:
                    names[key].append(workload)
        ax.set_xticks(list(names))
        ax.set_xticklabels([f"{100 * x:.0f}%" + ("\n" + " / ".join(w.replace("_", " ") for w in ws) if ws else "")
                            for x, ws in names.items()])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("padding fraction of the batch (workload)")
        ax.set_ylabel("bertkern speedup (x faster)")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
        ax.grid(True, axis="y", alpha=0.3)
        what = f"{device.upper() if device else 'encoder'}: {config}" if config else (device.upper() or "encoder")
        ax.set_title(what, fontsize=10, color="0.25")
        panel_ci = any(p[2] for pts in series.values() for p in pts)
        ax.legend(loc="upper left", fontsize=9, framealpha=0.92,
                  title="error bars: 95% interval" if panel_ci else None, title_fontsize=8)
    cpu = records.machine_summary(data)
    sub = cpu + ("" if any_ci else " (no intervals recorded in this JSON)")
    fig.suptitle(f"{title or 'bertkern.Encoder speedup vs padding'}\n{sub}", fontsize=11)
    fig.savefig(os.fspath(png_path), format="png")
    return os.fspath(png_path), None
