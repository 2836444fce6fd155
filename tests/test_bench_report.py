"""bertkern.bench.report: markdown + speedup plot from pytest-benchmark's JSON (python -m bertkern.bench)."""
import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import pytest

from bertkern.bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    env["MPLBACKEND"] = "Agg"
    return env


def _bench(name, group, median, **extra):
    return {"group": group, "name": name, "fullname": f"benchmarks/bench_x.py::{name}",
            "params": None, "param": None, "extra_info": extra,
            "stats": {"min": median * 0.9, "max": median * 1.2, "mean": median * 1.05,
                      "stddev": median * 0.01, "rounds": 5, "median": median, "iqr": 0.0,
                      "q1": median, "q3": median, "iterations": 1, "ops": 1.0 / median}}


def _synthetic():
    benchmarks = []
    for mode in ("train", "inference"):
        for workload, pad, seqlen in (("no_padding", 0.0, 128), ("uniform", 0.4, 128), ("long_tail", 0.7, 512)):
            group = f"encoder-{mode}-cpu-{workload}-s{seqlen}"
            common = dict(mode=mode, workload=workload, batch=8, seqlen=seqlen, d_model=768, layers=2,
                          padding_fraction=pad, real_tokens=1000, device="cpu")
            torch_s = 0.040 if mode == "train" else 0.012
            speed = {"no_padding": 1.1, "uniform": 2.31, "long_tail": 3.5}[workload]
            benchmarks.append(_bench(f"test_encoder[{mode}-{workload}-torch]", group, torch_s, impl="torch",
                                     tokens_per_s=1000 / torch_s, **common))
            benchmarks.append(_bench(f"test_encoder[{mode}-{workload}-hf_bert]", group, torch_s * 1.2,
                                     impl="hf_bert", tokens_per_s=1000 / (torch_s * 1.2), **common))
            benchmarks.append(_bench(f"test_encoder[{mode}-{workload}-bertkern]", group, torch_s / speed,
                                     impl="bertkern", tokens_per_s=1000 * speed / torch_s,
                                     speedup_vs_torch=speed, speedup_vs_hf_bert=speed * 1.2,
                                     peak_memory_bytes=3 * 2 ** 20, torch_version="2.14.1", **common))
    # rows missing most keys: no impl, no extra_info at all, no group, odd values
    benchmarks.append(_bench("test_layer_norm[fwd-torch]", "layer_norm fwd cpu 4096x768", 2.5e-4, gbps=12.5))
    benchmarks.append(_bench("test_layer_norm[fwd-bertkern]", "layer_norm fwd cpu 4096x768", 1.25e-4,
                             gbps=25.0, speedup_vs_torch=2.0, padding_fraction=None, note="x"))
    benchmarks.append(_bench("test_pipe[a|b]", "layer_norm fwd cpu 4096x768", 5e-4))
    # the padding suite records speedup_vs_torch = 1.0 in its baseline rows too
    for impl, t, speedup in (("bertkern", 1e-4, 2.61), ("torch", 2.61e-4, 1.0), ("torch_bool", 3e-4, 1.0)):
        benchmarks.append(_bench(f"test_padding[pad-{impl}]", "pad cpu 32x128x768", t, impl=impl,
                                 padding_fraction=0.44, speedup_vs_torch=speedup))
        benchmarks[-1]["params"] = {"op": "pad", "seqlen": 128, "impl": impl}
    bare = _bench("test_bare", None, 3e-6)
    del bare["extra_info"]
    benchmarks.append(bare)
    benchmarks.append({"name": "test_no_stats", "group": "odd", "extra_info": {"speedup_vs_torch": "fast"}})
    return {
        "machine_info": {"node": "vm", "machine": "x86_64", "system": "Linux", "release": "6.1",
                         "python_implementation": "CPython", "python_version": "3.11.7",
                         "cpu": {"brand_raw": "AMD EPYC 9B14", "count": 2, "arch": "X86_64"}},
        "commit_info": {"id": "0123456789abcdef0123", "branch": "main", "dirty": True},
        "benchmarks": benchmarks,
        "datetime": "2026-01-01T00:00:00+00:00",
        "version": "5.3.1",
    }


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, "not a PNG file"
    return struct.unpack(">II", head[16:24])  # IHDR width, height


def _check_png(path):
    assert os.path.getsize(path) > 5000
    width, height = _png_size(path)
    assert width >= 600 and height >= 300
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # not a blank canvas


@pytest.fixture
def synthetic_json(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_synthetic()))
    return path


def test_render_markdown_and_plot(synthetic_json, tmp_path):
    out = tmp_path / "report"
    text, png = report.render(synthetic_json, out, title="Synthetic run")
    assert (out / "report.md").read_text(encoding="utf-8").strip() == text.strip()
    assert text.startswith("# Synthetic run")
    assert "AMD EPYC 9B14, 2 cores" in text
    assert "torch 2.14.1" in text
    assert "`0123456789ab` (main, dirty)" in text
    # one table per group, with the speedup columns of that group, formatted
    for mode in ("train", "inference"):
        assert f"### encoder-{mode}-cpu-uniform-s128" in text
    assert "| speedup vs torch | speedup vs hf_bert |" in text
    assert "2.31x" in text and "2.77x" in text and "3.50x" in text and "1.10x" in text
    assert "### layer_norm fwd cpu 4096x768" in text and "2.00x" in text
    assert "GB/s" in text and "peak memory" in text and "3.00 MiB" in text
    assert "40.0%" in text and "70.0%" in text
    assert "125 us" in text and "250 us" in text and "3.00 us" in text
    assert "### (no group)" in text and "`test_bare`" in text and "n/a" in text
    assert "`test_pipe[a\\|b]`" in text  # a pipe in a name cannot break the table
    # summary: per group bertkern's speedup against each baseline, then the geometric means
    summary = text.split("## Summary", 1)[1].split("## Results", 1)[0]
    assert "- `encoder-train-cpu-uniform-s128`: 2.31x vs torch, 2.77x vs hf_bert" in summary
    assert "- `layer_norm fwd cpu 4096x768`: 2.00x vs torch" in summary
    assert "- `pad cpu 32x128x768`: 2.61x vs torch\n" in summary and "torch_bool" not in summary
    assert "vs torch:" in summary and "n=8" in summary
    # groups sorted by name, rows fastest first within a group
    groups = [line[4:] for line in text.splitlines() if line.startswith("### ")]
    assert groups == sorted(groups[:-1]) + ["(no group)"]
    table = text.split("### encoder-train-cpu-long_tail-s512", 1)[1].split("###", 1)[0]
    assert table.index("bertkern]") < table.index("torch]") < table.index("hf_bert]")
    if HAVE_MPL:
        assert png == str(out / "speedup.png")
        assert "![bertkern speedup](speedup.png)" in text
        _check_png(png)
    else:
        assert png is None and "matplotlib is not installed" in text


def test_gemm_floor_columns(tmp_path):
    data = _synthetic()
    data["benchmarks"] = [
        _bench("test_e[bertkern]", "enc", 0.4, impl="bertkern", speedup_vs_torch=1.3, gemm_only_seconds=0.36,
               speedup_bound_vs_torch_best=1.46, gemm_share=0.9, alt_gemm_ratio=1.1, mode="inference"),
        _bench("test_e[torch]", "enc", 0.52, impl="torch", mode="inference")]
    path = tmp_path / "floor.json"
    path.write_text(json.dumps(data))
    text, _ = report.render(path, tmp_path)
    table = text.split("### enc", 1)[1]
    assert "| GEMMs alone | bound vs torch_best |" in table
    assert "360 ms" in table and "1.46x" in table
    assert "gemm_share" not in table and "alt_gemm_ratio" not in table  # not in the common line
    summary = text.split("## Summary", 1)[1].split("## Results", 1)[0]
    assert "bound" not in summary  # a bound is not a baseline


def test_render_defaults_next_to_json(synthetic_json):
    text, png = report.render(str(synthetic_json))
    assert (synthetic_json.parent / "report.md").exists()
    if HAVE_MPL:
        assert os.path.dirname(png) == str(synthetic_json.parent)


def test_plot_skipped_without_needed_keys(tmp_path):
    data = _synthetic()
    data["benchmarks"] = [_bench("test_a", "g", 1e-3, impl="bertkern", speedup_vs_torch=1.5),
                          _bench("test_b", "g", 2e-3, impl="torch")]
    path = tmp_path / "nokeys.json"
    path.write_text(json.dumps(data))
    text, png = report.render(path, tmp_path)
    assert png is None and not (tmp_path / "speedup.png").exists()
    assert "Plot skipped" in text and "1.50x vs torch" in text

    data["benchmarks"] = [_bench("test_b", "g", 2e-3, impl="torch", padding_fraction=0.2)]
    path.write_text(json.dumps(data))
    text, png = report.render(path, tmp_path)
    assert png is None and "no benchmark records a `speedup_vs_*`" in text
    assert "No row records a `speedup_vs_*` value." in text

    data["benchmarks"] = []
    path.write_text(json.dumps(data))
    text, png = report.render(path, tmp_path)
    assert png is None and "holds no benchmarks" in text


def test_plot_skipped_without_matplotlib(synthetic_json, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    text, png = report.render(synthetic_json, tmp_path / "nompl")
    assert png is None and not (tmp_path / "nompl" / "speedup.png").exists()
    assert "Plot skipped: matplotlib is not installed" in text and "2.31x vs torch" in text


def test_cli(synthetic_json, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "bertkern.bench", "report", str(synthetic_json),
                           "--out", str(out), "--title", "CLI run", "--allow-dirty"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# CLI run")
    assert "2.31x" in proc.stdout and "AMD EPYC 9B14" in proc.stdout
    assert str(out / "report.md") in proc.stderr
    assert (out / "report.md").read_text(encoding="utf-8").strip() == proc.stdout.strip()
    assert "rendered with `--allow-dirty`" in proc.stdout and "--allow-dirty" in proc.stderr
    if HAVE_MPL:
        _check_png(out / "speedup.png")


BAD_INPUTS = [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('{"machine_info": {}}', "not a pytest-benchmark JSON"),
    ("[1, 2]", "not a pytest-benchmark JSON"),
    (b"\xff\xfe\x00garbage", "not a text (JSON) file"),
]


@pytest.mark.parametrize("content,message", BAD_INPUTS)
def test_render_bad_input(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(report.ReportError, match=re.escape(message)) as err:
        report.render(path, tmp_path)
    assert "bad.json" in str(err.value)
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("content,message", [BAD_INPUTS[0], BAD_INPUTS[1]])
def test_cli_bad_input(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "bertkern.bench", "report", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr and "bad.json" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "report.md").exists()


def test_cli_usage_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bertkern.bench"], capture_output=True, text=True,
                          cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 2 and "report" in proc.stderr


TINY_BENCH = '''
import time

import pytest


@pytest.mark.parametrize("seqlen,pad", [(64, 0.0), (128, 0.4), (256, 0.7)])
@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("impl", ["bertkern", "torch"])
def test_tiny(benchmark, impl, mode, seqlen, pad):
    benchmark.group = f"tiny-{mode}-s{seqlen}"
    benchmark(time.sleep, 0)
    info = dict(impl=impl, mode=mode, seqlen=seqlen, padding_fraction=pad, real_tokens=8 * seqlen,
                tokens_per_s=8 * seqlen / benchmark.stats.stats.median, interleaved_seconds={"x": 1.0})
    if impl == "bertkern":
        info["speedup_vs_torch"] = 1.0 + pad * 2 + (0.25 if mode == "train" else 0.0)
    benchmark.extra_info.update(info)
'''


def test_real_pytest_benchmark_json(tmp_path):
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_tiny_bench.py").write_text(textwrap.dedent(TINY_BENCH))
    out_json = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test_tiny_bench.py", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "--benchmark-only", f"--benchmark-json={out_json}",
         "--benchmark-min-rounds=3", "--benchmark-max-time=0.01", "--benchmark-warmup=off"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert len(data["benchmarks"]) == 12 and "machine_info" in data

    text, png = report.render(out_json, tmp_path / "report")
    brand = data["machine_info"]["cpu"].get("brand_raw")
    if brand:
        assert brand in text
    for mode in ("train", "inference"):
        for seqlen in (64, 128, 256):
            assert f"### tiny-{mode}-s{seqlen}" in text
    for speedup in ("1.25x", "2.05x", "2.65x", "1.00x", "1.80x", "2.40x"):
        assert f"{speedup} vs torch" in text
    assert "speedup vs torch" in text and "tokens/s" in text and "70.0%" in text
    if HAVE_MPL:
        _check_png(png)



# --------------------------------------------------------------------------------------------
# suites that record medians over interleaved rounds and bootstrap intervals (issue 16)

FULL_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _timed(name, group, median, rounds=15, spread=0.02, **extra):
    """A row as the suites write it now: extra_info median_s / iqr_s / min_s / rounds / round_seconds."""
    row = _bench(name, group, median * 1.3, **extra)  # pytest-benchmark's own stats: other numbers
    row["extra_info"].update(median_s=median, iqr_s=median * spread, min_s=median * (1 - spread), rounds=rounds,
                             round_seconds=[median * (1 + spread * ((i % 3) - 1)) for i in range(rounds)])
    return row


# (mode, dropout) -> workload -> (ratio vs torch, ci, ratio vs torch_best, ci)
ENCODER_RATIOS = {
    ("train", 0.0): {"no_padding": (1.21, [1.12, 1.30]), "uniform": (1.43, [1.31, 1.55]),
                     "long_tail": (2.95, [2.70, 3.20])},
    ("train", 0.1): {"no_padding": (1.48, [1.40, 1.57]), "uniform": (2.27, [2.10, 2.41]),
                     "long_tail": (4.10, [3.80, 4.44])},
    ("inference", 0.0): {"no_padding": (0.99, [0.95, 1.04]), "uniform": (1.11, [1.04, 1.19]),
                         "long_tail": (1.66, [1.52, 1.80])},
}
PADDING = {"no_padding": 0.0, "uniform": 0.434, "long_tail": 0.655}


def _synthetic_timed():
    benchmarks = []
    config = dict(device="cpu", batch=32, seqlen=128, dtype="float32", d_model=768, nhead=12,
                  dim_feedforward=3072, layers=2)
    for (mode, dropout), workloads in ENCODER_RATIOS.items():
        for workload, (ratio, ci) in workloads.items():
            group = f"encoder {mode} cpu-d768h12f3072L2-32x128-float32 {workload}" + (
                f" dropout{dropout:g}" if mode == "train" else "")
            common = dict(mode=mode, workload=workload, padding_fraction=PADDING[workload], real_tokens=2000,
                          dropout=dropout, **config)
            torch_s = 0.120 if mode == "train" else 0.040
            benchmarks.append(_timed(f"test_encoder[{group}-torch]", group, torch_s, impl="torch", **common))
            extra = dict(speedup_vs_torch=ratio, speedup_vs_torch_ci95=ci)
            if mode == "inference":
                benchmarks.append(_timed(f"test_encoder[{group}-torch_nested]", group, torch_s * 0.9,
                                         impl="torch_nested", **common))
                extra.update(speedup_vs_torch_nested=ratio * 1.1, speedup_vs_torch_nested_ci95=[ci[0] * 1.1, ci[1] * 1.1],
                             speedup_vs_torch_best=ratio, speedup_vs_torch_best_ci95=ci)
            benchmarks.append(_timed(f"test_encoder[{group}-bertkern]", group, torch_s / ratio, impl="bertkern",
                                     **extra, **common))
    # the sequence-length sweep: another config, uniform only; not in the encoder chart
    sweep = dict(config, batch=8, seqlen=512)
    group = "encoder inference cpu-d768h12f3072L2-8x512-float32 uniform"
    benchmarks.append(_timed(f"test_encoder[{group}-bertkern]", group, 0.05, impl="bertkern", mode="inference",
                             workload="uniform", padding_fraction=0.41, speedup_vs_torch=9.99,
                             speedup_vs_torch_ci95=[9.5, 10.5], speedup_vs_torch_best=8.88,
                             speedup_vs_torch_best_ci95=[8.5, 9.2], **sweep))
    benchmarks.append(_timed(f"test_encoder[{group}-torch]", group, 0.5, impl="torch", mode="inference",
                             workload="uniform", padding_fraction=0.41, **sweep))
    return {
        "machine_info": {"node": "vm", "machine": "x86_64", "system": "Linux", "release": "6.1",
                         "python_implementation": "CPython", "python_version": "3.11.7",
                         "cpu": {"brand_raw": "AMD EPYC 9B14 96-Core Processor", "count": 2, "arch": "X86_64"}},
        "commit_info": {"id": FULL_COMMIT, "time": "2026-12-02T10:00:00+00:00", "branch": "main", "dirty": False},
        "benchmarks": benchmarks,
        "datetime": "2026-12-03T16:00:00.123456+00:00",
        "version": "5.3.1",
    }


def _write(tmp_path, data, name="out.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "bertkern.bench", "report", *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)


def test_medians_intervals_and_flag(tmp_path):
    text, _ = report.render(_write(tmp_path, _synthetic_timed()), tmp_path / "r")
    table = text.split("### encoder train cpu-d768h12f3072L2-32x128-float32 uniform dropout0\n", 1)[1]
    table = table.split("###", 1)[0]
    header = next(line for line in table.splitlines() if line.startswith("| benchmark"))
    assert "| median | IQR | rounds |" in header
    # the suite's median (120 ms / 1.43), not pytest-benchmark's stats (1.3x that), its IQR, rounds
    assert "| 83.9 ms | 1.68 ms | 15 |" in table and "109 ms" not in table
    assert "| 120 ms | 2.40 ms | 15 |" in table
    assert "1.43x [1.31, 1.55]" in table and "(n.s.)" not in table
    assert "(pb)" not in text and "no `median_s`" not in text
    assert "ratios of medians" in text and "95% paired bootstrap interval" in text
    # a ratio whose interval contains 1.0 is flagged, in its table and in the summary, with a legend
    flagged = text.split("### encoder inference cpu-d768h12f3072L2-32x128-float32 no_padding\n", 1)[1]
    flagged = flagged.split("###", 1)[0]
    assert "0.99x [0.95, 1.04] (n.s.)" in flagged
    assert "1.09x [1.04, 1.14] (n.s.)" not in flagged  # vs torch_nested: interval above 1.0
    summary = text.split("## Summary", 1)[1].split("## Results", 1)[0]
    assert ("- `encoder inference cpu-d768h12f3072L2-32x128-float32 no_padding`: 0.99x [0.95, 1.04] (n.s.) "
            "vs torch") in summary
    assert "- `encoder train cpu-d768h12f3072L2-32x128-float32 long_tail dropout0.1`: 4.10x [3.80, 4.44] vs torch" \
        in summary
    assert "`(n.s.)`: the ratio's 95% interval includes 1.00x" in summary
    assert "2 of 17 ratios with an interval" in summary  # torch and torch_best of that group
    assert "carry no interval" not in summary
    assert text.count("includes 1.00x") == 2  # the summary's note and the Results legend
    # the common line does not repeat the timing keys
    assert "rounds=" not in text and "median_s" not in text.split("## Results", 1)[1].split("###", 1)[1]


def test_old_json_says_what_it_falls_back_to(synthetic_json, tmp_path):
    text, _ = report.render(synthetic_json, tmp_path / "old")
    results = text.split("## Results", 1)[1]
    assert "This JSON records no `median_s`" in results and "pytest-benchmark's own median" in results
    summary = text.split("## Summary", 1)[1].split("## Results", 1)[0]
    assert "carry no interval" in summary and "(n.s.)" not in text and "[" not in summary.split(":", 1)[1]
    # pytest-benchmark's median and IQR of that row
    assert "| median | IQR | rounds |" in text and "| 125 us | 0 ns | 5 |" in text


def test_mixed_json_marks_the_fallback_rows(tmp_path):
    data = _synthetic_timed()
    data["benchmarks"].append(_bench("test_encoder[old-torch]", data["benchmarks"][0]["group"], 0.2, impl="torch"))
    text, _ = report.render(_write(tmp_path, data), tmp_path / "mixed")
    assert "1 of 24 rows record no `median_s`" in text
    assert "| 200 ms (pb) |" in text and text.count("(pb)") == 2  # the row, and the note


def test_row_reads_intervals_defensively():
    from bertkern.bench import records

    row = records.Row({"name": "x", "extra_info": {
        "impl": "bertkern", "speedup_vs_torch": 1.5, "speedup_vs_torch_ci95": [1.4, 1.6],
        "speedup_vs_a": 1.2, "speedup_vs_a_ci95": [1.3, 1.1],  # lo > hi: ignored
        "speedup_vs_b": 1.0, "speedup_vs_b_ci95": "wide",
        "speedup_vs_c_ci95": [0.9, 1.1],  # an interval without its ratio: ignored
        "median_s": 0.5, "rounds": 7.0}}, 0)
    assert list(row.speedups) == ["torch", "a", "b"]
    assert row.intervals == {"torch": (1.4, 1.6)}
    assert row.median == 0.5 and row.median_from_rounds and row.rounds == 7 and row.iqr is None
    assert records.crosses_one((0.9, 1.0)) and records.crosses_one((1.0, 1.2)) and not records.crosses_one((1.01, 2))


def test_folder_name_from_json():
    from bertkern.bench import records

    assert records.short_name("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz") == "intel-xeon-platinum-8481c"
    assert records.short_name("AMD EPYC 9B14 96-Core Processor") == "amd-epyc-9b14"
    data = _synthetic_timed()
    assert records.machine_slug(data) == "amd-epyc-9b14" and records.run_date(data) == "2026-12-03"
    assert report.default_folder(data) == os.path.join("benchmarks", "results", "amd-epyc-9b14-2026-12-03")
    assert report.default_folder(data, machine="My Box #2").endswith("my-box-2-2026-12-03")
    data["benchmarks"][0]["extra_info"].update(device="cuda", gpu="NVIDIA H100 80GB HBM3")
    assert records.machine_slug(data) == "amd-epyc-9b14-nvidia-h100-80gb-hbm3"
    del data["datetime"]
    assert records.run_date(data) == "2026-12-02"  # commit_info's time
    assert records.machine_slug({"benchmarks": []}) == "unknown-machine"


EXPECTED_FILES = {"results.json", "COMMIT", "report.md", "encoder_speedup.png", "speedup.png"}


def test_cli_results_folder(tmp_path):
    src = _write(tmp_path, _synthetic_timed())
    proc = _cli(tmp_path, src)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "benchmarks" / "results" / "amd-epyc-9b14-2026-12-03"
    names = {p.name for p in folder.iterdir()}
    assert names == (EXPECTED_FILES if HAVE_MPL else {"results.json", "COMMIT", "report.md"})
    assert (folder / "results.json").read_bytes() == src.read_bytes()
    assert (folder / "COMMIT").read_text() == FULL_COMMIT + "\n"
    text = (folder / "report.md").read_text(encoding="utf-8")
    assert text.strip() == proc.stdout.strip()
    assert f"git checkout {FULL_COMMIT}" in text and "Source: `results.json`" in text
    assert "Uncommitted changes" not in text and "--allow-dirty" not in text
    for name in names:  # the default folder is relative to the current directory
        assert os.path.join("benchmarks", "results", "amd-epyc-9b14-2026-12-03", name) in proc.stderr
    if HAVE_MPL:
        assert "![bertkern.Encoder speedup vs padding fraction](encoder_speedup.png)" in text
        assert "![bertkern speedup](speedup.png)" in text
        _check_png(folder / "encoder_speedup.png")

    # regenerate in place from the committed copy: not copied onto itself, same report
    proc = _cli(tmp_path, folder / "results.json", "--out", folder)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "results.json").read_bytes() == src.read_bytes()
    assert (folder / "report.md").read_text(encoding="utf-8") == text

    # --machine names the folder
    proc = _cli(tmp_path, src, "--machine", "Xeon 8481C")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "benchmarks" / "results" / "xeon-8481c-2026-12-03" / "COMMIT").exists()


@pytest.mark.parametrize("commit_info,message", [
    ({"id": FULL_COMMIT, "dirty": True}, "dirty tree"),
    ({"id": "unversioned", "dirty": False, "error": "CalledProcessError(128, 'not a git repository')"},
     "records no commit"),
    (None, "records no commit"),
])
def test_cli_refuses_dirty_or_unknown_commit(tmp_path, commit_info, message):
    data = _synthetic_timed()
    if commit_info is None:
        del data["commit_info"]
    else:
        data["commit_info"] = commit_info
    src = _write(tmp_path, data)
    out = tmp_path / "res"
    proc = _cli(tmp_path, src, "--out", out)
    assert proc.returncode == 1 and proc.stdout == ""
    assert message in proc.stderr and "--allow-dirty" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "benchmarks").exists()  # nothing written
    with pytest.raises(report.PublishError, match=message):
        report.publish(src, out)

    proc = _cli(tmp_path, src, "--out", out, "--allow-dirty")
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "rendered with `--allow-dirty`" in text and "warning" in proc.stderr
    assert (out / "COMMIT").read_text() == (FULL_COMMIT if commit_info and commit_info.get("dirty") else "unknown") + "\n"
    assert (out / "results.json").read_bytes() == src.read_bytes()


def test_encoder_chart_series_and_file(tmp_path):
    from bertkern.bench import plot, records

    data = _synthetic_timed()
    (device, config, series), = plot.encoder_series(records.rows_of(data))
    assert device == "cpu" and config == "d_model 768, 2 layers, batch 32 x 128, float32"
    assert list(series) == ["train, dropout 0 (vs torch)", "train, dropout 0.1 (vs torch)",
                            "inference (vs best torch path)"]
    inference = series["inference (vs best torch path)"]
    assert [(x, y, ci, w) for x, y, ci, w in inference] == [
        (0.0, 0.99, (0.95, 1.04), "no_padding"), (0.434, 1.11, (1.04, 1.19), "uniform"),
        (0.655, 1.66, (1.52, 1.80), "long_tail")]  # the 8x512 sweep row (8.88x) is not in it
    # one dropout only: the train series says which
    one = [b for b in data["benchmarks"] if b["extra_info"].get("dropout") != 0.0 or b["extra_info"]["mode"] != "train"]
    (_, _, series), = plot.encoder_series(records.rows_of(dict(data, benchmarks=one)))
    assert list(series) == ["train, dropout 0.1 (vs torch)", "inference (vs best torch path)"]
    if not HAVE_MPL:
        pytest.skip("matplotlib is not installed")
    import matplotlib

    matplotlib.use("Agg")
    png, note = plot.draw_encoder(data, tmp_path / "encoder_speedup.png")
    assert note is None and png == str(tmp_path / "encoder_speedup.png")
    _check_png(png)
    width, _ = _png_size(png)
    assert 800 <= width <= 1600  # 8 in wide: README width
    # without encoder rows: skipped, with a reason; the report does not mention the chart
    data["benchmarks"] = [b for b in data["benchmarks"] if "encoder" not in b["name"]] + [
        _timed("test_layer_norm[bertkern]", "ln", 1e-4, impl="bertkern", speedup_vs_torch=1.5, seqlen=128)]
    png, note = plot.draw_encoder(data, tmp_path / "none.png")
    assert png is None and "no bertkern row of test_encoder" in note and not (tmp_path / "none.png").exists()
    text, _ = report.render(_write(tmp_path, data), tmp_path / "ln")
    assert "encoder_speedup" not in text and "Encoder chart" not in text


def test_old_json_encoder_chart_without_intervals(synthetic_json, tmp_path):
    from bertkern.bench import plot, records

    data = json.loads(synthetic_json.read_text())
    (_, _, series), = plot.encoder_series(records.rows_of(data))
    assert list(series) == ["train (vs torch)", "inference (vs torch)"]
    assert all(ci is None for pts in series.values() for _, _, ci, _ in pts)
    if HAVE_MPL:
        png, _ = plot.draw_encoder(data, tmp_path / "e.png")
        _check_png(png)
