"""The one-command GPU check: ``python -m bertkern.bench gpu-check`` on a machine with one NVIDIA GPU.

From an installed source checkout (``pip install -e .``) it runs, in this order and within about
8 minutes on an H100/H200/A100:
  1. the CUDA cases of the test suite (every test id containing "cuda", the model-parallel CUDA
     split and the torch suite's CUDA cases), stopping at the first failure;
  2. the CUDA benchmarks: attention (benchmarks/bench_attention_gpu.py: bertkern vs torch SDPA's
     FlashAttention-2 and memory-efficient backends), LayerNorm and pad/unpad (vs F.layer_norm and
     torch indexing) and the BERT-base / -large encoders (vs nn.TransformerEncoder);
  3. a table of measured TFLOP/s (attention) and GB/s (LayerNorm, padding) with the % of the
     GPU's peak, next to what the static GPU model (python -m bertkern.bench gpu-model, committed
     under benchmarks/results/gpu-model/) predicts for the same kernel; the model's figures are
     labelled "model", the measured ones are measurements of this GPU;
  4. one JSON (``--out``, default gpu-check.json) with the GPU, software versions, git commit,
     test outcome, every benchmark row and the model figures next to them.

Without a GPU it exits with status 2 and says so, running nothing.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

# (test file, -k expression): the CUDA cases of the suite.
CUDA_TESTS = [
    ("tests/test_attention.py", "cuda"),
    ("tests/test_layer_norm.py", "cuda"),
    ("tests/test_padding.py", "cuda"),
    ("tests/test_model_parallel.py", "cuda"),
    ("tests/test_torch_suite.py", "cuda"),
]
# Benchmark files and the -k expression selecting their CUDA cases.
CUDA_BENCHMARKS = [
    "benchmarks/bench_attention_gpu.py",
    "benchmarks/bench_layer_norm.py",
    "benchmarks/bench_padding.py",
    "benchmarks/bench_encoder.py",
]
# What `python -m bertkern.bench gpu-model` writes (committed).
DEFAULT_MODEL_JSON = os.path.join("benchmarks", "results", "gpu-model", "gpu_model.json")


def checkout_root():
    """The source checkout bertkern is installed from (editable install), or None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(root, "tests")) and os.path.isdir(os.path.join(root, "benchmarks")):
        return root
    return None


def _git_commit(root):
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _pytest(root, args, timeout_s):
    """Runs pytest in a child process; (returncode, last summary line, seconds)."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=root, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return 124, f"timed out after {timeout_s} s\n{tail}", time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-500:]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        summary = "\n".join(lines[-40:])
    return proc.returncode, summary, time.monotonic() - t0


def run_tests(root, timeout_s):
    rc_all, parts, seconds = 0, [], 0.0
    for path, expr in CUDA_TESTS:
        rc, summary, s = _pytest(root, [path, "-k", expr, "-q", "-x", "-p", "no:cacheprovider"], timeout_s)
        seconds += s
        parts.append({"file": path, "k": expr, "returncode": rc, "summary": summary, "seconds": round(s, 1)})
        print(f"  {path} -k {expr}: {summary.splitlines()[-1] if summary else rc} ({s:.0f} s)", flush=True)
        if rc not in (0, 5):
            rc_all = rc
            break
    return rc_all, parts


def run_benchmarks(root, timeout_s):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        rc, summary, seconds = _pytest(root, [*CUDA_BENCHMARKS, "-k", "cuda", "--benchmark-only", "-q",
                                              "--benchmark-max-time=0.5", "--benchmark-min-rounds=5",
                                              f"--benchmark-json={out}", "-p", "no:cacheprovider"], timeout_s)
        data = _load_json(out) or {"benchmarks": []}
    print(f"  benchmarks: {summary.splitlines()[-1] if summary else rc} ({seconds:.0f} s)", flush=True)
    return rc, summary, data


def _load_json(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def load_model(path):
    """The gpu_model.json at path (a dict), or None when there is none."""
    return _load_json(path)


def gpu_peaks(name):
    """Tensor FLOP/s and HBM bytes/s of the GPU named ``name``, from the static model's spec table;
    None for a GPU the table does not know."""
    from bertkern.bench import gpu_model

    return gpu_model.peaks_for_device_name(name)


def rows_from_benchmarks(data, name, model):
    """One row per CUDA benchmark case of a pytest-benchmark JSON (``data``) run on the GPU called
    ``name``: the measurement, the % of that GPU's spec peak, and the model's figure (``model``:
    a gpu_model.json dict, or None)."""
    from bertkern.bench import gpu_model

    peaks = gpu_peaks(name)
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("device") != "cuda":
            continue
        row = {"name": bench.get("name"), "group": bench.get("group"), "impl": info.get("impl"),
               "op": info.get("op"), "median_s": (bench.get("stats") or {}).get("median")}
        if "tflops" in info:
            row["tflops"] = info["tflops"]
            if peaks:
                row["pct_peak"] = 100.0 * info["tflops"] * 1e12 / peaks["tensor_flops"]
        if "gbps" in info:
            row["gbps"] = info["gbps"]
            if peaks:
                row["pct_peak"] = 100.0 * info["gbps"] * 1e9 / peaks["hbm_bytes"]
        if model is not None:
            predicted = gpu_model.prediction_for_benchmark(model, name, info)
            if predicted is not None:
                row["model"] = predicted
        rows.append(row)
    return rows


def print_rows(rows):
    print(f"{'case':<78} {'measured':>16} {'% peak':>7} {'model (not measured)':>30}")
    for r in rows:
        if "tflops" in r:
            measured = f"{r['tflops']:.1f} TFLOP/s"
        elif "gbps" in r:
            measured = f"{r['gbps']:.0f} GB/s"
        elif r.get("median_s") is not None:
            measured = f"{r['median_s'] * 1e3:.3f} ms"
        else:
            measured = "-"
        pct = f"{r['pct_peak']:.0f}%" if "pct_peak" in r else "-"
        model = r.get("model")
        model_s = "-" if model is None else model.get("label", "")
        print(f"{str(r.get('name') or '')[:78]:<78} {measured:>16} {pct:>7} {model_s:>30}")


def main(out="gpu-check.json", model_json=None, skip_tests=False, tests_timeout_s=240, bench_timeout_s=300):
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs an NVIDIA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Nothing was run. "
              "Without a GPU, `python -m bertkern.bench gpu-model` gives the static model instead.",
              file=sys.stderr)
        return 2
    import bertkern

    if not bertkern.cuda_kernels_built():
        print("gpu-check: bertkern was built without its CUDA kernels (no CUDA toolkit at build time); "
              "reinstall with a toolkit (CUDA_HOME) to check them.", file=sys.stderr)
        return 2
    root = checkout_root()
    if root is None:
        print("gpu-check runs from a source checkout installed with `pip install -e .` "
              "(it needs the tests/ and benchmarks/ folders).", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    t0 = time.monotonic()
    print(f"gpu-check on {name}, torch {torch.__version__}, bertkern {bertkern.__version__}", flush=True)
    report = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "bertkern": bertkern.__version__, "commit": _git_commit(root), "peaks": gpu_peaks(name)}
    if skip_tests:
        tests_rc, report["tests"] = 0, "skipped"
    else:
        print("1/2 CUDA tests", flush=True)
        tests_rc, report["tests"] = run_tests(root, tests_timeout_s)
    print("2/2 CUDA benchmarks", flush=True)
    bench_rc, bench_summary, data = run_benchmarks(root, bench_timeout_s)
    model_path = model_json or os.path.join(root, DEFAULT_MODEL_JSON)
    model = load_model(model_path)
    if model is None:
        print(f"  no model figures: {model_path} not found (python -m bertkern.bench gpu-model writes it)",
              flush=True)
    peaks = report["peaks"]
    if peaks and not peaks.get("spec_part", True):
        print(f"  note: % of peak uses the {peaks['gpu']} SXM spec figures; this part ({name}) has lower peaks",
              flush=True)
    rows = rows_from_benchmarks(data, name, model)
    report.update(benchmarks_returncode=bench_rc, benchmarks_summary=bench_summary, rows=rows,
                  model_file=model_path if model is not None else None,
                  seconds=round(time.monotonic() - t0, 1))
    print_rows(rows)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    ok = tests_rc == 0 and bench_rc == 0 and bool(rows)
    print(f"gpu-check: {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; wrote {out}")
    return 0 if ok else 1
