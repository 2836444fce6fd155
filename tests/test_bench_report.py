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
                           "--out", str(out), "--title", "CLI run"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# CLI run")
    assert "2.31x" in proc.stdout and "AMD EPYC 9B14" in proc.stdout
    assert str(out / "report.md") in proc.stderr
    assert (out / "report.md").read_text(encoding="utf-8").strip() == proc.stdout.strip()
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
