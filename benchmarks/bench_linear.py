"""The encoder's GEMMs: bertkern's oneDNN route (the operator bertkern::linear, what
bertkern.ops.linear runs on AMD CPUs) vs torch's F.linear (MKL sgemm, bertkern's route elsewhere).

BERT-base shapes on the packed tokens of a 32 x 128 batch with ~44% padding (T = 2304 real
tokens): QKV projection, attention output projection, FFN up and down. Forward and forward +
backward. extra_info: tflops, speedup_vs_f_linear (interleaved in the same test), cpu_gemm, cpu_vendor and
default_route (which of the two bertkern.ops.linear takes on this machine).
"""
import pytest
import torch
import torch.nn.functional as F

import bertkern
from bertkern.ops.linear import _linear_cpu, cpu_vendor, onednn_linear_enabled
from _timing import interleaved_min  # benchmarks/_timing.py

TOKENS = 2304
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


@pytest.mark.parametrize("impl", ["onednn", "f_linear"])
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
                cpu_gemm="onednn" if impl == "onednn" else "mkl", cpu_vendor=cpu_vendor(),
                default_route="onednn" if onednn_linear_enabled() else "f_linear")
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        info["tflops"] = flops / stats.stats.min / 1e12
    if impl == "onednn" and not getattr(benchmark, "disabled", False):
        t_bk, t_torch = interleaved_min([fn, _fn("f_linear", mode, x, w, b, dy)], rounds=3)
        info["speedup_vs_f_linear"] = t_torch / t_bk
    benchmark.extra_info.update(info)
