"""``python -m bertkern.bench gpu-check`` without a GPU: the exit path and the table code.

gpu-check itself needs an NVIDIA GPU. Here: it exits 2 with a clear message when there is none,
the command line reaches gpu_check.main, and the rows / printing code works on a small
*synthetic* pytest-benchmark JSON and a *synthetic* model JSON. The numbers in those inputs are
made up to exercise the formatting; they are not measurements and not model output.
"""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from bertkern.bench import __main__ as cli
from bertkern.bench import gpu_check, gpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, gpu-check runs everything")
def test_cli_exits_2_without_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "bertkern.bench", "gpu-check", "--out", str(tmp_path / "x.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "gpu-check needs an NVIDIA GPU" in proc.stderr and "Nothing was run" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_main_returns_2_without_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(out=str(tmp_path / "x.json")) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_wiring(monkeypatch):
    seen = {}
    monkeypatch.setattr(gpu_check, "main", lambda **kw: seen.update(kw) or 0)
    assert cli.main(["gpu-check", "--out", "o.json", "--model", "m.json", "--skip-tests"]) == 0
    assert seen == dict(out="o.json", model_json="m.json", skip_tests=True)
    assert cli.main(["gpu-check"]) == 0
    assert seen == dict(out="gpu-check.json", model_json=None, skip_tests=False)


def test_default_model_json_is_what_gpu_model_writes():
    assert gpu_check.DEFAULT_MODEL_JSON == os.path.join(gpu_model.DEFAULT_OUT, "gpu_model.json")


def test_peaks_for_device_name():
    h100 = gpu_model.peaks_for_device_name("NVIDIA H100 80GB HBM3")
    assert h100["gpu"] == "H100" and h100["spec_part"]
    assert h100["tensor_flops"] == pytest.approx(989e12, rel=0.01)
    assert h100["hbm_bytes"] == pytest.approx(3.35e12)
    h200 = gpu_model.peaks_for_device_name("NVIDIA H200")
    assert h200["gpu"] == "H200" and h200["hbm_bytes"] == pytest.approx(4.8e12)
    assert h200["tensor_flops"] == h100["tensor_flops"]
    a100 = gpu_model.peaks_for_device_name("NVIDIA A100-SXM4-80GB")
    assert a100["gpu"] == "A100" and a100["tensor_flops"] == pytest.approx(312e12, rel=0.01)
    assert not gpu_model.peaks_for_device_name("NVIDIA A100-SXM4-40GB")["spec_part"]
    assert not gpu_model.peaks_for_device_name("NVIDIA H100 PCIe")["spec_part"]
    assert gpu_model.peaks_for_device_name("Tesla V100-SXM2-16GB") is None
    assert gpu_model.peaks_for_device_name("") is None


# Synthetic inputs (made-up numbers; formatting only).
_MODEL = {
    "attention_predictions": [
        {"gpu": "H100", "dtype": "bf16", "shape": [32, 12, 512, 64], "dropout": 0.0,
         "bertkern": {"fwd_tflops": 500.0, "fwdbwd_tflops": 400.0},
         "fa2": {"fwd_tflops": 450.0, "fwdbwd_tflops": 350.0},
         "hmma_full": {"bertkern": {"fwd_tflops": 500.0, "fwdbwd_tflops": 400.0},
                       "fa2": {"fwd_tflops": 600.0, "fwdbwd_tflops": 480.0}}},
    ],
    "memory_predictions": [
        {"gpu": "H100", "op": "fwd", "impl": "bertkern", "dtype": "fp16", "shape": [16384, 768],
         "hbm_fraction": 0.5, "time_s": 1e-5},
        {"gpu": "H100", "op": "unpad", "impl": "bertkern", "dtype": "fp16", "shape": [32, 512, 768],
         "hbm_fraction": 0.25, "time_s": 1e-5, "scope": "gather only"},
    ],
}


def _bench(name, median, **info):
    return {"name": name, "group": "g", "stats": {"median": median}, "extra_info": info}


_BENCH = {"benchmarks": [
    _bench("attn-bertkern", 1e-3, device="cuda", impl="bertkern", op="attention_fwd", shape=[32, 12, 512, 64],
           dtype="bfloat16", dropout_p=0.0, tflops=98.9),
    _bench("attn-flash", 1e-3, device="cuda", impl="sdpa_flash", op="attention_fwd_bwd", shape=[32, 12, 512, 64],
           dtype="bfloat16", dropout_p=0.0, tflops=200.0),
    _bench("attn-efficient", 1e-3, device="cuda", impl="sdpa_efficient", op="attention_fwd",
           shape=[32, 12, 512, 64], dtype="bfloat16", dropout_p=0.0, tflops=100.0),
    _bench("attn-other-shape", 1e-3, device="cuda", impl="bertkern", op="attention_fwd", shape=[1, 1, 128, 64],
           dtype="bfloat16", dropout_p=0.0, tflops=1.0),
    _bench("ln-bertkern", 1e-5, device="cuda", impl="bertkern", op="fwd", shape=[16384, 768], dtype="float16",
           gbps=335.0),
    _bench("ln-torch", 1e-5, device="cuda", impl="torch", op="fwd", shape=[16384, 768], dtype="float16", gbps=300.0),
    _bench("unpad-bertkern", 1e-5, device="cuda", impl="bertkern", op="unpad", shape=[32, 512, 768],
           dtype="float16", gbps=100.0, bytes=2e7),
    _bench("encoder", 2e-3, device="cuda", impl="bertkern", op="encoder"),
    _bench("ln-cpu", 1e-4, device="cpu", impl="bertkern", op="fwd", shape=[8192, 768], dtype="float32", gbps=10.0),
]}


def test_rows_from_benchmarks_synthetic():
    rows = gpu_check.rows_from_benchmarks(_BENCH, "NVIDIA H100 80GB HBM3", _MODEL)
    by = {r["name"]: r for r in rows}
    assert "ln-cpu" not in by and len(rows) == len(_BENCH["benchmarks"]) - 1
    assert by["attn-bertkern"]["pct_peak"] == pytest.approx(10.0, rel=0.01)
    assert by["attn-bertkern"]["model"]["label"] == "500 TFLOP/s (model)"
    assert by["attn-bertkern"]["model"]["value_hmma_full"] == 500.0
    assert by["attn-flash"]["model"]["value"] == 350.0 and by["attn-flash"]["model"]["value_hmma_full"] == 480.0
    assert "model" not in by["attn-efficient"] and "model" not in by["attn-other-shape"]
    assert by["ln-bertkern"]["pct_peak"] == pytest.approx(10.0)
    assert by["ln-bertkern"]["model"]["label"] == "1675 GB/s (model)"
    assert "model" not in by["ln-torch"]  # the model covers bertkern's kernels only
    # with the case's bytes: bytes / the model's time; without: the model's % of HBM x spec bandwidth
    assert by["unpad-bertkern"]["model"]["label"] == "2000 GB/s (model, gather only)"
    assert by["unpad-bertkern"]["model"]["hbm_pct"] == 25.0
    assert "model" not in by["encoder"] and "pct_peak" not in by["encoder"]
    # Another GPU: its own peaks, no model rows for it in the synthetic model.
    rows = gpu_check.rows_from_benchmarks(_BENCH, "NVIDIA A100-SXM4-80GB", _MODEL)
    assert all("model" not in r for r in rows)
    assert {r["name"]: r for r in rows}["ln-bertkern"]["pct_peak"] == pytest.approx(335 / 2039 * 100)
    # Unknown GPU, no model: measurements only.
    rows = gpu_check.rows_from_benchmarks(_BENCH, "Some GPU", None)
    assert all("pct_peak" not in r and "model" not in r for r in rows)


def test_print_rows_synthetic(capsys):
    rows = gpu_check.rows_from_benchmarks(_BENCH, "NVIDIA H100 80GB HBM3", _MODEL)
    rows.append({"name": None, "median_s": None})
    gpu_check.print_rows(rows)
    out = capsys.readouterr().out.splitlines()
    assert "model (not measured)" in out[0]
    line = next(ln for ln in out if ln.startswith("attn-bertkern"))
    assert "98.9 TFLOP/s" in line and "10%" in line and "500 TFLOP/s (model)" in line
    line = next(ln for ln in out if ln.startswith("ln-bertkern"))
    assert "335 GB/s" in line and "1675 GB/s (model)" in line
    line = next(ln for ln in out if ln.startswith("encoder"))
    assert "2.000 ms" in line and line.rstrip().endswith("-")
    assert len(out) == 1 + len(rows)


def _bench_shapes(path, name="SHAPES"):
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {path}")


def test_model_knows_the_attention_benchmark_shapes():
    assert tuple(map(tuple, _bench_shapes("benchmarks/bench_attention_gpu.py"))) == gpu_model.BENCH_ATTENTION_SHAPES


def test_committed_model_predicts_the_attention_benchmarks():
    """The committed gpu_model.json has a bertkern and an FA2 figure for every attention benchmark
    case on H100, H200 and A100."""
    path = os.path.join(ROOT, gpu_check.DEFAULT_MODEL_JSON)
    if not os.path.exists(path):
        pytest.skip("no committed gpu_model.json")
    with open(path) as f:
        model = json.load(f)
    if "attention_predictions" not in model:
        pytest.fail("gpu_model.json predates attention_predictions: rerun python -m bertkern.bench gpu-model")
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"):
        for shape in gpu_model.BENCH_ATTENTION_SHAPES:
            for dtype in ("bfloat16", "float16"):
                for p in (0.0, 0.1):
                    for op in ("attention_fwd", "attention_fwd_bwd"):
                        for impl in ("bertkern", "sdpa_flash"):
                            info = dict(impl=impl, op=op, shape=list(shape), dtype=dtype, dropout_p=p)
                            pred = gpu_model.prediction_for_benchmark(model, device, info)
                            assert pred is not None and pred["value"] > 0, (device, info)
                            assert pred["label"].endswith("TFLOP/s (model)")


def test_committed_model_predicts_the_layer_norm_and_padding_benchmarks():
    """When the committed model had the CUDA kernels' SASS, it has a figure for every bertkern
    LayerNorm / padding benchmark case on H100, H200 and A100."""
    path = os.path.join(ROOT, gpu_check.DEFAULT_MODEL_JSON)
    if not os.path.exists(path):
        pytest.skip("no committed gpu_model.json")
    with open(path) as f:
        model = json.load(f)
    if (model.get("cuda_source") or {}).get("status") != "ok":
        pytest.skip(f"the committed model has no CUDA kernel SASS: {model.get('cuda_source')}")
    names = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
    cases = [dict(op=op, shape=[m, n], dtype=names[dt]) for m, n, dt in gpu_model.BENCH_LAYER_NORM_SHAPES
             for op in ("fwd", "fwd_residual", "fwd_bwd_residual")]
    cases += [dict(op=op, shape=[b, s, e], dtype=names[dt]) for b, s, e, dt in gpu_model.BENCH_PADDING_SHAPES
              for op in ("unpad", "pad")]
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"):
        for case in cases:
            info = dict(case, impl="bertkern", gbps=1.0, bytes=1e8)
            pred = gpu_model.prediction_for_benchmark(model, device, info)
            assert pred is not None and pred["value"] > 0 and "GB/s (model" in pred["label"], (device, case)
            assert gpu_model.prediction_for_benchmark(model, device, dict(info, impl="torch")) is None


def test_model_knows_the_layer_norm_and_padding_benchmark_shapes():
    dt = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}

    def shapes(path):
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CUDA_SHAPES" for t in node.targets):
                return [tuple(dt.get(ast.unparse(e), ast.unparse(e)) if isinstance(e, ast.Attribute)
                              else eval(ast.unparse(e), {"__builtins__": {}})  # e.g. 32 * 512
                              for e in elt.elts) for elt in node.value.elts]
        raise AssertionError(path)

    assert tuple(shapes("benchmarks/bench_layer_norm.py")) == gpu_model.BENCH_LAYER_NORM_SHAPES
    assert tuple(shapes("benchmarks/bench_padding.py")) == gpu_model.BENCH_PADDING_SHAPES
