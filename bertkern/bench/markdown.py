"""The markdown of a benchmark report: machine lines, a summary of bertkern's speedups per group
and one table per group, from the rows of bertkern.bench.records.

Only the standard library is imported here.
"""
import math
from collections import OrderedDict

from bertkern.bench import records
from bertkern.bench.records import SPEEDUP_PREFIX

# extra_info keys shown in their own table columns (or not at all) rather than in a group's
# "common settings" line.
_METRIC_KEYS = {"impl", "seconds", "median_s", "iqr_s", "min_s", "rounds", "round_seconds", "tokens_per_s", "tflops", "gbps", "peak_memory_bytes",
                "interleaved_tokens_per_s", "gemm_only_seconds", "gemm_share", "speedup_bound_vs_torch_best",
                "alt_gemm_ratio"}


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


def _ratio_number(value):
    """Two decimals; two significant digits below 0.1 (0.0038, not 0.00)."""
    return _sig(value, 2) if 0 < abs(value) < 0.1 else f"{value:.2f}"


def fmt_speedup(value):
    return "" if value is None else f"{_ratio_number(value)}x"


UNRESOLVED = "(n.s.)"
UNRESOLVED_LEGEND = (f"`{UNRESOLVED}`: the ratio's 95% interval includes 1.00x, so the two are not "
                     "distinguishable from equal speed on this run.")


def fmt_ratio(value, ci=None):
    """'1.43x [1.31, 1.55]'; with the UNRESOLVED marker when the interval contains 1.0."""
    if value is None:
        return ""
    text = fmt_speedup(value)
    if ci is not None:
        text += f" [{_ratio_number(ci[0])}, {_ratio_number(ci[1])}]"
        if records.crosses_one(ci):
            text += " " + UNRESOLVED
    return text


def row_ratio(row, baseline):
    """A row's ratio against baseline, formatted with its interval (when recorded)."""
    return fmt_ratio(row.speedups.get(baseline), row.intervals.get(baseline))


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
# sections


def machine_lines(data, rows, allow_dirty=False):
    """Markdown lines describing the machine, software and commit of the run."""
    mi = records.machine_info(data)
    parts = [records.cpu_name(data) or "unknown CPU"]
    if records.cpu_count(data) is not None:
        parts.append(f"{records.cpu_count(data)} cores")
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
    torch_version = (records.first_value(mi, "torch_version", "torch")
                     or ", ".join(records.distinct_values(rows, "torch_version", "torch")))
    if torch_version:
        software.append(f"torch {torch_version}")
    threads = records.distinct_values(rows, "cpu_threads", "num_threads", "threads")
    if threads:
        software.append(f"CPU threads {', '.join(threads)}")
    gemm = records.distinct_values(rows, "cpu_gemm")
    if gemm:
        software.append(f"CPU GEMM {', '.join(gemm)}")
    if software:
        lines.append("- **Software:** " + ", ".join(software))
    gpus = records.gpus(data, rows)
    if gpus:
        lines.append("- **GPU:** " + ", ".join(gpus))
    devices = records.distinct_values(rows, "device")
    if devices:
        lines.append("- **Devices benchmarked:** " + ", ".join(devices))

    ci = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    commit = records.first_value(ci, "id")
    if commit:
        extra = [x for x in (records.first_value(ci, "branch"), "dirty" if ci.get("dirty") else None) if x]
        lines.append(f"- **Commit:** `{commit[:12]}`" + (f" ({', '.join(extra)})" if extra else ""))
    _, dirty = records.commit_info(data)
    if dirty:
        lines.append("- **Uncommitted changes:** pytest-benchmark recorded a dirty tree for this run "
                     "(`commit_info.dirty`), so the commit does not fully describe the code that ran"
                     + (" (rendered with `--allow-dirty`)" if allow_dirty else "") + ".")
    version = records.first_value(data, "version")
    run = [x for x in (records.first_value(data, "datetime"),
                       f"pytest-benchmark {data['version']}" if version else None) if x]
    if run:
        lines.append("- **Run:** " + ", ".join(run))
    return lines


def _common_settings(rows):
    """`key=value` for the scalar extra_info keys every row of a group shares with one value."""
    if not rows:
        return []
    out = []
    for key, value in rows[0].extra.items():
        if (not isinstance(key, str) or key in _METRIC_KEYS or key.startswith(SPEEDUP_PREFIX)
                or not records.is_scalar(value) or value is None):
            continue
        if all(key in r.extra and r.extra[key] == value for r in rows[1:]):
            out.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return out


STATS_MARK = "(pb)"


def group_table(rows):
    """Markdown lines of one group's table; a column only when some row of the group has it."""
    columns = [("benchmark", lambda r: f"`{r.name}`")]
    if any(r.impl is not None for r in rows):
        columns.append(("impl", lambda r: r.impl or ""))
    text_columns = len(columns)
    # mixed group (some rows with the suite's medians, some without): mark the fallback times
    mixed = any(r.median_from_rounds for r in rows)
    columns.append(("median", lambda r: fmt_time(r.median) + (" " + STATS_MARK if mixed and r.median is not None
                                                             and not r.median_from_rounds else "")))
    if any(r.iqr is not None for r in rows):
        columns.append(("IQR", lambda r: fmt_time(r.iqr) if r.iqr is not None else ""))
    if any(r.rounds is not None for r in rows):
        columns.append(("rounds", lambda r: str(r.rounds) if r.rounds is not None else ""))
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
        columns.append((f"speedup vs {b}", lambda r, b=b: row_ratio(r, b)))
    return _table([c[0] for c in columns], [[fn(r) for _, fn in columns] for r in rows],
                  [i >= text_columns for i in range(len(columns))])


def summary_lines(groups):
    """Per group, each speedup row's speedups; then the geometric mean per baseline."""
    lines = []
    per_baseline = OrderedDict()
    for name, rows in groups.items():
        fast = records.headline_rows(rows)
        for r in fast:
            who = f" ({r.label})" if len(fast) > 1 or (r.impl not in (None, "bertkern")) else ""
            text = ", ".join(f"{row_ratio(r, b)} vs {b}" for b in r.headline_speedups)
            lines.append(f"- `{name}`{who}: {text}")
            for b, v in r.headline_speedups.items():
                if v > 0:
                    per_baseline.setdefault(b, []).append(v)
    if not lines:
        return ["No row records a `speedup_vs_*` value."]
    fast = [r for rows in groups.values() for r in records.headline_rows(rows)]
    ratios = [(r, b) for r in fast for b in r.headline_speedups]
    with_ci = [(r, b) for r, b in ratios if b in r.intervals]
    head = ("bertkern's speedup per group (baseline time / bertkern time, ratio of medians; above 1.00x "
            "bertkern is faster)")
    if with_ci:
        head += ", with its 95% interval in brackets (paired bootstrap over the rounds)"
    out = [head + ":", ""] + lines
    unresolved = [(r, b) for r, b in with_ci if r.unresolved(b)]
    notes = []
    if unresolved:
        notes.append(f"{UNRESOLVED_LEGEND} {len(unresolved)} of {len(with_ci)} ratios with an interval.")
    if len(with_ci) < len(ratios):
        notes.append(f"{len(ratios) - len(with_ci)} of {len(ratios)} ratios carry no interval: the JSON "
                     "records no `speedup_vs_<impl>_ci95` for them (an older suite), so their spread "
                     "is unknown.")
    if notes:
        out += [""] + notes
    if per_baseline:
        out += ["", "Across groups (geometric mean of the ratios, min to max, number of groups):", ""]
        for b, values in per_baseline.items():
            out.append(f"- vs {b}: {fmt_speedup(records.geomean(values))} "
                       f"({fmt_speedup(min(values))} to {fmt_speedup(max(values))}, n={len(values)})")
    return out


def timing_note(rows):
    """The Results section's sentence on where the times and ratios come from."""
    ours = [r for r in rows if r.median_from_rounds]
    fallback = [r for r in rows if r.median is not None and not r.median_from_rounds]
    text = []
    if ours:
        text.append("Times are medians over the suite's interleaved rounds (extra_info `median_s`), IQR "
                    "the interquartile range of those rounds; ratios are ratios of medians.")
    if fallback:
        which = ("This JSON records no `median_s` (an older suite): the times" if not ours else
                 f"{len(fallback)} of {len(rows)} rows record no `median_s`: their times (marked `{STATS_MARK}` "
                 "in groups that mix both)")
        text.append(f"{which} are "
                    "pytest-benchmark's own median of its rounds of that row alone (not interleaved), "
                    "and their speedups are the values the suite recorded (older suites: ratios of "
                    "interleaved minimums).")
    if any(r.intervals for r in rows):
        text.append("Brackets: the ratio's 95% paired bootstrap interval over the rounds.")
    text.append("Rows fastest first.")
    return " ".join(text)


def document(data, source=None, title=None, plot_note=None, allow_dirty=False, extra_lines=()):
    """The whole report.md text (no trailing newline) for a loaded pytest-benchmark JSON.

    plot_note: markdown placed after the machine lines (the plots or why they were skipped);
    allow_dirty: the dirty-tree line says the report was rendered with --allow-dirty;
    extra_lines: more machine-section lines (the results folder's reproduction line)."""
    rows = records.rows_of(data)
    groups = records.group_rows(rows)
    out = [f"# {title or 'bertkern benchmark report'}", ""]
    if source:
        out += [f"Source: `{source}` ({len(rows)} benchmarks in {len(groups)} groups)", ""]
    out += machine_lines(data, rows, allow_dirty) + list(extra_lines) + [""]
    if plot_note:
        out += [plot_note, ""]
    if not rows:
        out += ["The JSON holds no benchmarks (were they all skipped, or run without "
                "`--benchmark-only`?).", ""]
        return "\n".join(out)
    out += ["## Summary", ""] + summary_lines(groups) + [""]
    out += ["## Results", "", timing_note(rows) + " Speedups: baseline time / bertkern time.", ""]
    if any(r.unresolved(b) for r in rows for b in r.intervals):
        out += [UNRESOLVED_LEGEND, ""]
    for name, members in groups.items():
        out += [f"### {name}", ""]
        common = _common_settings(members)
        if common and len(members) > 1:
            out += ["Common: " + ", ".join(f"`{c}`" for c in common), ""]
        out += group_table(members) + [""]
    return "\n".join(out)
