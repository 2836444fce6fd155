"""pytest-benchmark JSON records: load a file, read each benchmark defensively, group the rows.

The JSON is pytest-benchmark's: top-level ``machine_info``, ``commit_info`` and ``benchmarks``,
each benchmark with ``name``, ``fullname``, ``group``, ``params``, ``stats`` (``median``, ...)
and ``extra_info``. The suites in benchmarks/ record in ``extra_info`` (every key optional here):
``impl``, ``mode``, ``workload``, ``device``, ``seqlen``, ``padding_fraction``, ``real_tokens``,
``tokens_per_s``, ``tflops``, ``gbps``, ``peak_memory_bytes``, ``gpu``, ``torch_version``,
``dropout``; the timing of the suite's own interleaved rounds: ``median_s``, ``iqr_s``, ``min_s``,
``rounds`` and ``round_seconds`` (a list); in the bertkern rows, ``speedup_vs_<baseline>`` (ratio
of medians: baseline time over bertkern time) and ``speedup_vs_<baseline>_ci95`` ([lo, hi], a 95%
paired bootstrap interval over the rounds).

Older JSON without these keys still reads: a row's time is then pytest-benchmark's own median
(``stats``) and its speedups have no interval (``Row.median_source`` / ``Row.intervals`` say
which); the report says so.

Only the standard library is imported here.
"""
import json
import math
import os
from collections import OrderedDict

SPEEDUP_PREFIX = "speedup_vs_"
CI_SUFFIX = "_ci95"
NO_GROUP = "(no group)"


class ReportError(Exception):
    """The input cannot be turned into a report (missing file, invalid JSON, wrong format)."""


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


def number(value):
    """value as a finite float, or None (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def is_scalar(value):
    return value is None or isinstance(value, (str, int, float, bool))


def interval(value):
    """A [lo, hi] pair of finite numbers (lo <= hi) as a tuple, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    lo, hi = number(value[0]), number(value[1])
    if lo is None or hi is None or lo > hi:
        return None
    return lo, hi


def crosses_one(ci):
    """True when the interval (lo, hi) contains 1.0 (ends included)."""
    return ci[0] <= 1.0 <= ci[1]


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


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
        # time per call: the suite's median over its interleaved rounds (median_s), else
        # pytest-benchmark's own statistics of this row (older suites)
        self.median = number(self.extra.get("median_s"))
        if self.median is not None:
            self.median_source = "rounds"
            self.iqr = number(self.extra.get("iqr_s"))
            self.min = number(self.extra.get("min_s"))
            self.rounds = number(self.extra.get("rounds"))
        else:
            self.median_source = None
            for key in ("median", "mean", "min"):
                if number(stats.get(key)) is not None:
                    self.median, self.median_source = number(stats[key]), f"stats_{key}"
                    break
            self.iqr = number(stats.get("iqr")) if self.median_source == "stats_median" else None
            self.min = number(stats.get("min"))
            self.rounds = number(stats.get("rounds"))
        self.rounds = int(self.rounds) if self.rounds is not None and self.rounds >= 0 else None
        impl = self.extra.get("impl", self.params.get("impl"))
        self.impl = str(impl) if impl is not None else None
        self.speedups = OrderedDict()
        self.intervals = OrderedDict()  # baseline -> (lo, hi), where the row records one
        for key, value in self.extra.items():
            if not isinstance(key, str) or not key.startswith(SPEEDUP_PREFIX):
                continue
            if key.endswith(CI_SUFFIX):
                ci = interval(value)
                if ci is not None:
                    self.intervals[key[len(SPEEDUP_PREFIX):-len(CI_SUFFIX)]] = ci
            elif number(value) is not None:
                self.speedups[key[len(SPEEDUP_PREFIX):]] = number(value)
        self.intervals = OrderedDict((b, ci) for b, ci in self.intervals.items() if b in self.speedups)

    def get(self, key):
        """A numeric extra_info value (params as a fallback), or None."""
        value = number(self.extra.get(key))
        return value if value is not None else number(self.params.get(key))

    @property
    def median_from_rounds(self):
        """True when the time is the suite's own median over its rounds (extra_info median_s)."""
        return self.median_source == "rounds"

    def unresolved(self, baseline):
        """True when the ratio against baseline has an interval that contains 1.0: the two are
        not distinguishable from equal speed."""
        ci = self.intervals.get(baseline)
        return ci is not None and crosses_one(ci)

    @property
    def dropout(self):
        return self.get("dropout")

    @property
    def workload(self):
        value = self.extra.get("workload", self.params.get("workload"))
        return str(value) if value is not None else None

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


def rows_of(data):
    """A Row for each benchmark (a dict) of the loaded JSON, in file order."""
    return [Row(b, i) for i, b in enumerate(data["benchmarks"]) if isinstance(b, dict)]


def group_rows(rows):
    """OrderedDict group -> rows: groups by name (no group last), rows fastest first (stable)."""
    groups = OrderedDict()
    for name in sorted({r.group for r in rows}, key=lambda g: (g == NO_GROUP, g)):
        members = [r for r in rows if r.group == name]
        members.sort(key=lambda r: (r.median is None, r.median if r.median is not None else 0.0, r.index))
        groups[name] = members
    return groups


def headline_rows(rows):
    """The rows whose speedups the summary and the plot show: in each group, the bertkern rows
    (impl or name containing "bertkern") that record speedups, or, in a group without such a
    row, every row that records one."""
    out = []
    for members in group_rows(rows).values():
        fast = [r for r in members if r.headline_speedups]
        ours = [r for r in fast if "bertkern" in r.label.lower()]
        out += ours or fast
    return out


# --------------------------------------------------------------------------------------------
# machine: what the JSON says about where it ran


def distinct_values(rows, *keys):
    """Distinct non-empty string values of the first of `keys` present in each row's extra_info."""
    seen = []
    for r in rows:
        for key in keys:
            value = r.extra.get(key)
            if value not in (None, "") and is_scalar(value):
                if str(value) not in seen:
                    seen.append(str(value))
                break
    return seen


def first_value(mapping, *keys):
    """The first of `keys` with a non-empty scalar value in mapping, as a string, or None."""
    for key in keys:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if value not in (None, "") and is_scalar(value):
            return str(value)
    return None


def machine_info(data):
    """The JSON's machine_info dict ({} when missing)."""
    mi = data.get("machine_info")
    return mi if isinstance(mi, dict) else {}


def cpu_name(data):
    """CPU brand from machine_info, or None."""
    mi = machine_info(data)
    cpu = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
    return first_value(cpu, "brand_raw", "brand") or first_value(mi, "processor")


def cpu_count(data):
    """machine_info's CPU core count as an int, or None."""
    mi = machine_info(data)
    cpu = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
    return int(cpu["count"]) if number(cpu.get("count")) is not None else None


def gpus(data, rows):
    """GPU names: machine_info's, else the distinct ones the rows record."""
    gpu = first_value(machine_info(data), "gpu", "gpu_name", "cuda_device_name")
    return [gpu] if gpu else distinct_values(rows, "gpu", "gpu_name", "device_name", "cuda_device_name")


def machine_summary(data):
    """One short line for the plot title: CPU (cores), GPU when recorded."""
    text = cpu_name(data) or "unknown CPU"
    if cpu_count(data) is not None:
        text += f" ({cpu_count(data)} cores)"
    names = gpus(data, rows_of(data))
    if names:
        text += ", " + ", ".join(names)
    return text


# --------------------------------------------------------------------------------------------
# the run: commit, date and a short machine name (the results folder's name)


def commit_info(data):
    """(full commit id or None, dirty: bool) from pytest-benchmark's commit_info. pytest-benchmark
    sets dirty from ``git describe --dirty``: uncommitted changes to tracked files (untracked
    files do not count). A missing id, 'unversioned' or an 'error' entry give None."""
    ci = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    commit = first_value(ci, "id")
    if commit in (None, "unversioned") or ci.get("error"):
        commit = None
    return commit, bool(ci.get("dirty"))


def run_date(data):
    """The run's date (YYYY-MM-DD) from the JSON's ``datetime`` (pytest-benchmark writes it in
    UTC), else commit_info's ``time``; None when neither reads as an ISO date."""
    import re

    ci = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    for value in (data.get("datetime"), ci.get("time"), ci.get("author_time")):
        if isinstance(value, str):
            m = re.match(r"\s*(\d{4}-\d{2}-\d{2})", value)
            if m:
                return m.group(1)
    return None


_CPU_NOISE = r"\((?:r|tm|c)\)|\b(?:cpu|processor|with radeon graphics|\d+-core)\b|@.*$"


def short_name(text):
    """A lowercase file-name-safe short form of a CPU or GPU name:
    'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz' -> 'intel-xeon-platinum-8481c',
    'AMD EPYC 9B14 96-Core Processor' -> 'amd-epyc-9b14', 'NVIDIA H200' -> 'nvidia-h200'."""
    import re

    text = re.sub(_CPU_NOISE, " ", str(text), flags=re.IGNORECASE)
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text


def machine_slug(data):
    """The machine part of the default results folder name: the CPU's short name, then the GPU's
    when a row ran on CUDA ('amd-epyc-9b14', 'intel-xeon-platinum-8481c-nvidia-h100-80gb-hbm3');
    'unknown-machine' when the JSON names neither."""
    rows = rows_of(data)
    parts = [short_name(cpu_name(data) or "")]
    if any((r.device or "").startswith("cuda") for r in rows):
        parts += [short_name(g) for g in gpus(data, rows)[:1]]
    slug = "-".join(p for p in parts if p)
    return slug or "unknown-machine"
