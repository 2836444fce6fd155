"""pytest-benchmark JSON records: load a file, read each benchmark defensively, group the rows.

The JSON is pytest-benchmark's: top-level ``machine_info``, ``commit_info`` and ``benchmarks``,
each benchmark with ``name``, ``fullname``, ``group``, ``params``, ``stats`` (``median``, ...)
and ``extra_info``. The suites in benchmarks/ record in ``extra_info`` (every key optional here):
``impl``, ``mode``, ``workload``, ``device``, ``seqlen``, ``padding_fraction``, ``real_tokens``,
``tokens_per_s``, ``tflops``, ``gbps``, ``peak_memory_bytes``, ``gpu``, ``torch_version`` and,
in the bertkern rows, ``speedup_vs_<baseline>`` (baseline time over bertkern time).

Only the standard library is imported here.
"""
import json
import math
import os
from collections import OrderedDict

SPEEDUP_PREFIX = "speedup_vs_"
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
        self.median = next((v for v in (number(stats.get(k)) for k in ("median", "mean", "min"))
                            if v is not None), None)
        impl = self.extra.get("impl", self.params.get("impl"))
        self.impl = str(impl) if impl is not None else None
        self.speedups = OrderedDict()
        for key, value in self.extra.items():
            if isinstance(key, str) and key.startswith(SPEEDUP_PREFIX) and number(value) is not None:
                self.speedups[key[len(SPEEDUP_PREFIX):]] = number(value)

    def get(self, key):
        """A numeric extra_info value (params as a fallback), or None."""
        value = number(self.extra.get(key))
        return value if value is not None else number(self.params.get(key))

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
