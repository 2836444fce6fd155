"""The encoder's GEMMs: bertkern's oneDNN route (the operator bertkern::linear, what
bertkern.ops.linear runs on AMD CPUs) vs torch's F.linear (MKL sgemm, bertkern's route elsewhere).

BERT-base shapes on the packed tokens of a 32 x 128 batch with ~44% padding (T = 2304 real
tokens): QKV projection, attention output projection, FFN up and down. Forward and forward +
backward. Both routes are rows of each group; the two are timed in 9 interleaved rounds at the
group's first row. extra_info: tflops, every row's median_s, iqr_s, min_s, rounds,
round_seconds, interleaved_seconds (both medians), interleaved_tflops; in the onednn row
speedup_vs_f_linear (F.linear median / oneDNN median: > 1 means oneDNN is faster here) and
speedup_vs_f_linear_ci95 (paired bootstrap over the rounds); cpu_gemm, cpu_vendor (vendor_id
of /proc/cpuinfo: the README's per-vendor GEMM claims read it from here), cpu_model_name and
default_route (which of the two bertkern.ops.linear takes on this machine).
"""
import pytest
import torch
import torch.nn.functional as F

import bertkern
from bertkern.ops.linear import _linear_cpu, cpu_model_name, cpu_vendor, onednn_linear_enabled
from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py
from bertkern.bench.stats import median

TOKENS = 2304
IMPLS = ["onednn", "f_linear"]
ROUNDS = 9  # interleaved rounds per (mode, shape), both routes
_RESULTS = {}  # (mode, shape) -> {impl: [seconds per round]}
SHAPES = {"qkv": (768, 2304), "out_proj": (768, 768), "ffn_up": (768, 3072), "ffn_down": (3072, 768)}


def _fn(impl, mode, x, w, b, dy):
    f = _linear_cpu if impl == "onednn" else F.linear
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                f(x, w, b)
        return fwd
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]

    def fwd_bwd():
        torch.autograd.grad(f(*leaves), leaves, dy)
    return fwd_bwd


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_linear(benchmark, mode, shape, impl):
    k, n = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(TOKENS, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    dy = torch.randn(TOKENS, n, generator=g)
    benchmark.group = f"linear {mode} cpu {shape} {TOKENS}x{k}->{n} float32"
    fn = _fn(impl, mode, x, w, b, dy)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    flops = 2 * TOKENS * k * n * (3 if mode == "fwd_bwd" else 1)
    info = dict(impl=impl, mode=mode, device="cpu", flops=flops, cpu_threads=torch.get_num_threads(),
                cpu_gemm="onednn" if impl == "onednn" else "mkl", cpu_vendor=cpu_vendor(), cpu_model_name=cpu_model_name(),
                default_route="onednn" if onednn_linear_enabled() else "f_linear")
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        info["tflops"] = flops / stats.stats.min / 1e12
    key = (mode, shape)
    if key not in _RESULTS and not getattr(benchmark, "disabled", False):
        _RESULTS[key] = dict(zip(IMPLS, interleaved_rounds([_fn(name, mode, x, w, b, dy) for name in IMPLS],
                                                           rounds=ROUNDS)))
    if key in _RESULTS:
        rounds = _RESULTS[key]
        info.update(summary(rounds[impl]))
        info["interleaved_seconds"] = {name: median(xs) for name, xs in rounds.items()}
        info["interleaved_tflops"] = flops / median(rounds[impl]) / 1e12
        if impl == "onednn":
            info.update(ratio_info("f_linear", rounds["f_linear"], rounds["onednn"]))
    benchmark.extra_info.update(info)
