"""Markdown report and speedup plot from a pytest-benchmark JSON file.

    pytest benchmarks --benchmark-only --benchmark-json=out.json
    python -m bertkern.bench report out.json [--out DIR] [--title TITLE]

or from Python::

    from bertkern.bench.report import render
    markdown, png = render("out.json", "reports/")   # png is None when the plot was skipped

The JSON is pytest-benchmark's: top-level ``machine_info``, ``commit_info`` and ``benchmarks``,
each benchmark with ``name``, ``fullname``, ``group``, ``params``, ``stats`` (``median``, ...)
and ``extra_info``. The suites in benchmarks/ record in ``extra_info`` (every key optional here):
``impl``, ``mode``, ``workload``, ``device``, ``seqlen``, ``padding_fraction``, ``real_tokens``,
``tokens_per_s``, ``tflops``, ``gbps``, ``peak_memory_bytes``, ``gpu``, ``torch_version`` and,
in the bertkern rows, ``speedup_vs_<baseline>`` (baseline time over bertkern time).

Writes ``report.md`` (machine, a summary of bertkern's speedups per group, one table per group)
and ``speedup.png`` (speedup against padding fraction and against sequence length, one series per
baseline and mode). matplotlib is optional: without it, or without rows that carry the needed
keys, the plot is skipped with a note and the markdown is still written.

Only the standard library is imported here (matplotlib lazily, when plotting).
"""
import json
import math
import os
import sys
from collections import OrderedDict

SPEEDUP_PREFIX = "speedup_vs_"
REPORT_NAME = "report.md"
PLOT_NAME = "speedup.png"
NO_GROUP = "(no group)"

# extra_info keys shown in their own table columns (or not at all) rather than in a group's
# "common settings" line.
_METRIC_KEYS = {"impl", "seconds", "tokens_per_s", "tflops", "gbps", "peak_memory_bytes",
                "interleaved_tokens_per_s", "gemm_only_seconds", "gemm_share", "speedup_bound_vs_torch_best",
                "alt_gemm_ratio"}


class ReportError(Exception):
    """The input cannot be turned into a report (missing file, invalid JSON, wrong format)."""


# --------------------------------------------------------------------------------------------
# loading


def load(json_path):
    """The parsed pytest-benchmark JSON; ReportError with a readable message when it is not."""
    path = os.fspath(json_path)
    if not os.path.exists(path):
        raise ReportError(f"no such file: {path}")
    if os.path.isdir(path):
        raise ReportError(f"{path} is a directory, not a pytest-benchmark JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise ReportError(f"{path} is not a text (JSON) file: {e}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path} is not a pytest-benchmark JSON file (no top-level \"benchmarks\" "
                          "list); write one with pytest --benchmark-only --benchmark-json=FILE")
    return data


def _num(value):
    """value as a finite float, or None (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _scalar(value):
    return value is None or isinstance(value, (str, int, float, bool))


class Row:
    """One benchmark of the JSON, with the fields the report uses pulled out defensively."""

    def __init__(self, bench, index):
        self.index = index
        self.name = str(bench.get("name") or bench.get("fullname") or f"benchmark {index}")
        group = bench.get("group")
        self.group = str(group) if group not in (None, "") else NO_GROUP
        extra = bench.get("extra_info")
        self.extra = extra if isinstance(extra, dict) else {}
        params = bench.get("params")
        self.params = params if isinstance(params, dict) else {}
        stats = bench.get("stats")
        stats = stats if isinstance(stats, dict) else {}
        self.median = next((v for v in (_num(stats.get(k)) for k in ("median", "mean", "min"))
                            if v is not None), None)
        impl = self.extra.get("impl", self.params.get("impl"))
        self.impl = str(impl) if impl is not None else None
        self.speedups = OrderedDict()
        for key, value in self.extra.items():
            if isinstance(key, str) and key.startswith(SPEEDUP_PREFIX) and _num(value) is not None:
                self.speedups[key[len(SPEEDUP_PREFIX):]] = _num(value)

    def get(self, key):
        """A numeric extra_info value (params as a fallback), or None."""
        value = _num(self.extra.get(key))
        return value if value is not None else _num(self.params.get(key))

    @property
    def suite(self):
        """The test function without ``test_`` (``test_encoder[...]`` -> ``encoder``)."""
        base = self.name.split("[", 1)[0]
        return base[5:] if base.startswith("test_") else base

    @property
    def headline_speedups(self):
        """speedups without a row's comparison with itself (speedup_vs_torch = 1.0 in torch rows)."""
        return OrderedDict((b, v) for b, v in self.speedups.items() if b != self.impl)

    @property
    def label(self):
        return self.impl if self.impl is not None else self.name

    @property
    def seqlen(self):
        """extra_info's seqlen, else the test's parametrized seqlen (pytest-benchmark's params)."""
        return self.get("seqlen")

    @property
    def mode(self):
        mode = self.extra.get("mode", self.params.get("mode"))
        return str(mode) if mode is not None else None

    @property
    def device(self):
        device = self.extra.get("device", self.params.get("device"))
        return str(device) if device is not None else None


def _rows(data):
    return [Row(b, i) for i, b in enumerate(data["benchmarks"]) if isinstance(b, dict)]


def headline_rows(rows):
    """The rows whose speedups the summary and the plot show: in each group, the bertkern rows
    (impl or name containing "bertkern") that record speedups, or, in a group without such a
    row, every row that records one."""
    out = []
    for members in _groups(rows).values():
        fast = [r for r in members if r.headline_speedups]
        ours = [r for r in fast if "bertkern" in r.label.lower()]
        out += ours or fast
    return out


def _groups(rows):
    """OrderedDict group -> rows: groups by name (no group last), rows fastest first (stable)."""
    groups = OrderedDict()
    for name in sorted({r.group for r in rows}, key=lambda g: (g == NO_GROUP, g)):
        members = [r for r in rows if r.group == name]
        members.sort(key=lambda r: (r.median is None, r.median if r.median is not None else 0.0, r.index))
        groups[name] = members
    return groups


# --------------------------------------------------------------------------------------------
# formatting


def _sig(x, digits=3):
    """x with `digits` significant digits, no exponent for everyday magnitudes."""
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


def fmt_time(seconds):
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            return f"{_sig(seconds / scale)} {unit}"
    return f"{_sig(seconds / 1e-9)} ns"


def fmt_si(value):
    if value is None:
        return ""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{_sig(value / scale)}{suffix}"
    return _sig(value)


def fmt_bytes(value):
    if value is None:
        return ""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(value) >= scale:
            return f"{_sig(value / scale)} {unit}"
    return f"{value:.0f} B"


def fmt_speedup(value):
    return "" if value is None else f"{value:.2f}x"


def fmt_fraction(value):
    return "" if value is None else f"{100.0 * value:.1f}%"


def fmt_plain(value):
    return "" if value is None else _sig(value)


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header, lines, right):
    """Markdown table lines; right[i]: right-align column i (numbers)."""
    out = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in line) + " |" for line in lines]
    return out


# --------------------------------------------------------------------------------------------
# machine


def _distinct(rows, *keys):
    """Distinct non-empty string values of the first of `keys` present in each row's extra_info."""
    seen = []
    for r in rows:
        for key in keys:
            value = r.extra.get(key)
            if value not in (None, "") and _scalar(value):
                if str(value) not in seen:
                    seen.append(str(value))
                break
    return seen


def _first(mapping, *keys):
    for key in keys:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if value not in (None, "") and _scalar(value):
            return str(value)
    return None


def machine_lines(data, rows):
    """Markdown lines describing the machine, software and commit of the run."""
    mi = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
    cpu = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
    parts = []
    brand = _first(cpu, "brand_raw", "brand") or _first(mi, "processor")
    parts.append(brand or "unknown CPU")
    cores = cpu.get("count")
    if _num(cores) is not None:
        parts.append(f"{int(cores)} cores")
    if mi.get("machine"):
        parts.append(str(mi["machine"]))
    system = " ".join(str(mi[k]) for k in ("system", "release") if mi.get(k))
    if system:
        parts.append(system)
    python = " ".join(str(mi[k]) for k in ("python_implementation", "python_version") if mi.get(k))
    if python:
        parts.append(python)
    lines = ["- **Machine:** " + ", ".join(parts)]

    software = []
    torch_version = _first(mi, "torch_version", "torch") or ", ".join(_distinct(rows, "torch_version", "torch"))
    if torch_version:
        software.append(f"torch {torch_version}")
    threads = _distinct(rows, "cpu_threads", "num_threads", "threads")
    if threads:
        software.append(f"CPU threads {', '.join(threads)}")
    gemm = _distinct(rows, "cpu_gemm")
    if gemm:
        software.append(f"CPU GEMM {', '.join(gemm)}")
    if software:
        lines.append("- **Software:** " + ", ".join(software))
    gpus = ([g] if (g := _first(mi, "gpu", "gpu_name", "cuda_device_name")) else []) or \
        _distinct(rows, "gpu", "gpu_name", "device_name", "cuda_device_name")
    if gpus:
        lines.append("- **GPU:** " + ", ".join(gpus))
    devices = _distinct(rows, "device")
    if devices:
        lines.append("- **Devices benchmarked:** " + ", ".join(devices))

    ci = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    commit = _first(ci, "id")
    if commit:
        extra = [x for x in (_first(ci, "branch"), "dirty" if ci.get("dirty") else None) if x]
        lines.append(f"- **Commit:** `{commit[:12]}`" + (f" ({', '.join(extra)})" if extra else ""))
    run = [x for x in (_first(data, "datetime"),
                       f"pytest-benchmark {data['version']}" if _first(data, "version") else None) if x]
    if run:
        lines.append("- **Run:** " + ", ".join(run))
    return lines


def machine_summary(data):
    """One short line for the plot title: CPU (cores), GPU when recorded."""
    mi = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
    cpu = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
    text = _first(cpu, "brand_raw", "brand") or _first(mi, "processor") or "unknown CPU"
    if _num(cpu.get("count")) is not None:
        text += f" ({int(cpu['count'])} cores)"
    gpus = ([g] if (g := _first(mi, "gpu", "gpu_name", "cuda_device_name")) else []) or \
        _distinct(_rows(data), "gpu", "gpu_name", "device_name", "cuda_device_name")
    if gpus:
        text += ", " + ", ".join(gpus)
    return text


# --------------------------------------------------------------------------------------------
# markdown


def _common_settings(rows):
    """`key=value` for the scalar extra_info keys every row of a group shares with one value."""
    if not rows:
        return []
    out = []
    for key, value in rows[0].extra.items():
        if (not isinstance(key, str) or key in _METRIC_KEYS or key.startswith(SPEEDUP_PREFIX)
                or not _scalar(value) or value is None):
            continue
        if all(key in r.extra and r.extra[key] == value for r in rows[1:]):
            out.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return out


def group_table(rows):
    """Markdown lines of one group's table; a column only when some row of the group has it."""
    columns = [("benchmark", lambda r: f"`{r.name}`")]
    if any(r.impl is not None for r in rows):
        columns.append(("impl", lambda r: r.impl or ""))
    text_columns = len(columns)
    columns.append(("median", lambda r: fmt_time(r.median)))
    optional = [("tokens/s", "tokens_per_s", fmt_si), ("padding", "padding_fraction", fmt_fraction),
                ("TFLOP/s", "tflops", fmt_plain), ("GB/s", "gbps", fmt_plain),
                ("peak memory", "peak_memory_bytes", fmt_bytes),
                # encoder rows: the layers' GEMMs alone on the real tokens, and what that floor
                # allows against the faster torch path (benchmarks/bench_encoder.py)
                ("GEMMs alone", "gemm_only_seconds", fmt_time),
                ("bound vs torch_best", "speedup_bound_vs_torch_best", fmt_speedup)]
    for header, key, fmt in optional:
        if any(r.get(key) is not None for r in rows):
            columns.append((header, lambda r, key=key, fmt=fmt: fmt(r.get(key))))
    baselines = []
    for r in rows:
        baselines += [b for b in r.speedups if b not in baselines]
    for b in baselines:
        columns.append((f"speedup vs {b}", lambda r, b=b: fmt_speedup(r.speedups.get(b))))
    return _table([c[0] for c in columns], [[fn(r) for _, fn in columns] for r in rows],
                  [i >= text_columns for i in range(len(columns))])


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary_lines(groups):
    """Per group, each speedup row's speedups; then the geometric mean per baseline."""
    lines = []
    per_baseline = OrderedDict()
    for name, rows in groups.items():
        fast = headline_rows(rows)
        for r in fast:
            who = f" ({r.label})" if len(fast) > 1 or (r.impl not in (None, "bertkern")) else ""
            text = ", ".join(f"{fmt_speedup(v)} vs {b}" for b, v in r.headline_speedups.items())
            lines.append(f"- `{name}`{who}: {text}")
            for b, v in r.headline_speedups.items():
                if v > 0:
                    per_baseline.setdefault(b, []).append(v)
    if not lines:
        return ["No row records a `speedup_vs_*` value."]
    out = ["bertkern's speedup per group (baseline time / bertkern time; above 1.00x bertkern is faster):",
           ""] + lines
    if per_baseline:
        out += ["", "Across groups (geometric mean, min to max, number of groups):", ""]
        for b, values in per_baseline.items():
            out.append(f"- vs {b}: {fmt_speedup(_geomean(values))} "
                       f"({fmt_speedup(min(values))} to {fmt_speedup(max(values))}, n={len(values)})")
    return out


def markdown(data, source=None, title=None, plot_note=None):
    rows = _rows(data)
    groups = _groups(rows)
    out = [f"# {title or 'bertkern benchmark report'}", ""]
    if source:
        out += [f"Source: `{source}` ({len(rows)} benchmarks in {len(groups)} groups)", ""]
    out += machine_lines(data, rows) + [""]
    if plot_note:
        out += [plot_note, ""]
    if not rows:
        out += ["The JSON holds no benchmarks (were they all skipped, or run without "
                "`--benchmark-only`?).", ""]
        return "\n".join(out)
    out += ["## Summary", ""] + summary_lines(groups) + [""]
    out += ["## Results", "", "Median time per call of pytest-benchmark's rounds; rows fastest first. "
            "Speedups are the benchmark's own interleaved measurement (baseline / bertkern).", ""]
    for name, members in groups.items():
        out += [f"### {name}", ""]
        common = _common_settings(members)
        if common and len(members) > 1:
            out += ["Common: " + ", ".join(f"`{c}`" for c in common), ""]
        out += group_table(members) + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# plot


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


def plot(data, png_path, title=None):
    """Draw speedup.png; returns (path or None, note): note says why the plot was skipped."""
    rows = headline_rows(_rows(data))
    if not rows:
        return None, "Plot skipped: no benchmark records a `speedup_vs_*` value."
    panels = [("padding fraction", _series(rows, lambda r: r.get("padding_fraction"))),
              ("sequence length", _series(rows, lambda r: r.seqlen))]
    if not any(s for _, s in panels):
        return None, ("Plot skipped: no row with a `speedup_vs_*` value also records "
                      "`padding_fraction` or `seqlen`.")
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
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
            mean_y = [_geomean([p[1] for p in pts if p[1] > 0]) if any(p[1] > 0 for p in pts) else 0.0
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
    fig.suptitle(f"{title or 'bertkern speedup'}\n{machine_summary(data)}", fontsize=12)
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


# --------------------------------------------------------------------------------------------
# entry points


def render(json_path, out_dir=None, title=None):
    """Write report.md and speedup.png for a pytest-benchmark JSON file.

    out_dir defaults to the JSON file's folder and is created if needed. Returns
    (markdown text, path of the PNG or None when the plot was skipped: the markdown says why).
    Raises ReportError for a missing, unreadable or non-pytest-benchmark file.
    """
    data = load(json_path)
    json_path = os.fspath(json_path)
    out_dir = os.fspath(out_dir) if out_dir is not None else (os.path.dirname(os.path.abspath(json_path)))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create output folder {out_dir}: {e}") from None
    png, note = plot(data, os.path.join(out_dir, PLOT_NAME), title=title)
    plot_line = f"![bertkern speedup]({PLOT_NAME})" if png else f"_{note}_"
    text = markdown(data, source=os.path.basename(json_path), title=title, plot_note=plot_line)
    with open(os.path.join(out_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text, png


def run_cli(json_path, out_dir=None, title=None):
    """The `report` command: render, print the markdown, say where the files went; exit status."""
    try:
        text, png = render(json_path, out_dir, title)
    except ReportError as e:
        print(f"bertkern.bench report: error: {e}", file=sys.stderr)
        return 1
    try:
        try:
            print(text)
        except UnicodeEncodeError:  # a console that cannot print a benchmark name: keep the files
            print(text.encode("ascii", "replace").decode("ascii"))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the files are written; stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.dirname(os.path.abspath(os.fspath(json_path)))
    print(f"\nwrote {os.path.join(out_dir, REPORT_NAME)}", file=sys.stderr)
    if png:
        print(f"wrote {png}", file=sys.stderr)
    else:
        note = next((line.strip("_") for line in text.splitlines() if line.startswith("_Plot skipped")), "")
        print(note or "plot skipped", file=sys.stderr)
    return 0


def main(argv=None):
    """`python -m bertkern.bench.report <json> ...` (same as `python -m bertkern.bench report`)."""
    from bertkern.bench.__main__ import main as bench_main

    return bench_main(["report"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
