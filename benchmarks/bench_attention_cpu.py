"""Varlen attention benchmarks: bertkern.ops.attention on packed tokens vs torch SDPA.

Run with ``pytest benchmarks --benchmark-only``. Each case is timed forward-only (no_grad) and
forward+backward, for three implementations:

  bertkern   bertkern.ops.attention(q, k, v, cu_seqlens=..., max_seqlen=..., dropout_p=...,
             causal=...) on the packed real tokens (T, H, D): the C++ kernel
             csrc/cpu/attention.cpp on CPU, the Triton kernel on CUDA
  sdpa_mask  F.scaled_dot_product_attention on the padded batch (B, H, S, D) with a boolean
             attn_mask (key padding, and the causal triangle when causal): what a padded
             encoder does
  sdpa_loop  one SDPA call per sequence on its real tokens only (B calls, no padding work)

extra_info: real_tokens, padding_fraction, flops of the real tokens only (4 H D per query-key
pair in the forward, 3.5x that for forward+backward; pairs j <= i only when causal), tflops,
tokens_per_s, every row's own interleaved rounds (median_s, iqr_s, min_s, rounds,
round_seconds; all implementations of a case timed in 9 interleaved rounds at its first row, so
machine noise hits them alike), and in the bertkern rows speedup_vs_sdpa_mask /
speedup_vs_sdpa_loop (baseline median over bertkern median) with their _ci95 intervals (paired
bootstrap over the rounds). Cases: with and without dropout (p = 0.1, BERT's training setting),
each forward-only and forward+backward. CUDA cases also record peak_memory_bytes; they skip cleanly without a GPU, and
no device is queried at import time.
"""
import timeit

import pytest
import torch
import torch.nn.functional as F

from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py (on sys.path)
from bertkern.bench.stats import median

ROUNDS = 9  # interleaved rounds per case (all implementations)
_RESULTS = {}  # case key -> {impl: [seconds per round]}, timed at the case's first row

# (batch, seqlen, heads, head_dim, dtype, dropout_p, causal); lengths uniform in [S/5, S] with
# one full-length sequence: ~40% padding. The dropout case is BERT's training configuration.
CPU_CASES = [
    (16, 128, 12, 64, torch.float32, 0.0, False),
    (16, 128, 12, 64, torch.float32, 0.1, False),
    (8, 512, 12, 64, torch.float32, 0.0, False),
]
CUDA_CASES = [
    (32, 512, 12, 64, torch.float16, 0.0, False),
    (32, 512, 16, 64, torch.bfloat16, 0.1, False),
]
IMPLS = ["bertkern", "sdpa_mask", "sdpa_loop"]
# GPU only: SDPA pinned to its fused backends. Flash takes no mask, so it runs the padded batch
# unmasked (computing every padded token, as a model without unpadding would); the
# memory-efficient backend takes the padding mask.
CUDA_IMPLS = ["sdpa_flash", "sdpa_efficient"]
_needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")


def _case_id(device, batch, seqlen, heads, head_dim, dtype, dropout_p, causal):
    name = f"{device}-{batch}x{seqlen}-h{heads}d{head_dim}-{str(dtype).replace('torch.', '')}"
    return name + (f"-drop{dropout_p:g}" if dropout_p else "") + ("-causal" if causal else "")


CASES = [pytest.param("cpu", *c, id=_case_id("cpu", *c)) for c in CPU_CASES] + [
    pytest.param("cuda", *c, id=_case_id("cuda", *c), marks=_needs_cuda) for c in CUDA_CASES
]


def _public_attention():
    """bertkern.ops.attention, or None while the public API is absent."""
    try:
        import bertkern.ops
    except ImportError:
        return None
    return getattr(bertkern.ops, "attention", None)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class _Problem:
    """One padded batch and its packed real tokens, with the three implementations."""

    def __init__(self, device, batch, seqlen, heads, head_dim, dtype, dropout_p, causal):
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(max(1, seqlen // 5), seqlen + 1, (batch,), generator=g)
        lengths[0] = seqlen
        keep = torch.arange(seqlen)[None, :] < lengths[:, None]  # True = real token
        x = [torch.randn(batch, seqlen, heads, head_dim, generator=g) for _ in range(3)]
        self.device, self.dropout_p, self.causal = device, dropout_p, causal
        self.lengths = [int(n) for n in lengths]
        self.tokens = sum(self.lengths)
        self.padding_fraction = 1.0 - self.tokens / (batch * seqlen)
        # packed (T, H, D) for bertkern; contiguous padded (B, H, S, D), SDPA's layout, for torch
        self.packed = [t[keep].to(device=device, dtype=dtype) for t in x]
        self.padded = [t.transpose(1, 2).contiguous().to(device=device, dtype=dtype) for t in x]
        self.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
        self.max_seqlen = max(self.lengths)
        mask = keep[:, None, None, :]
        if causal:
            mask = mask & torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
        self.attn_mask = mask.to(device)
        pairs = sum(n * (n + 1) // 2 if causal else n * n for n in self.lengths)
        self.fwd_flops = 4 * heads * head_dim * pairs

    def forward_fn(self, impl):
        """A callable computing impl's forward on fresh graph-free inputs; returns output tensors."""
        p, causal = self.dropout_p, self.causal
        if impl == "bertkern":
            attention = _public_attention()

            def run(q, k, v):
                out = attention(q, k, v, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen,
                                dropout_p=p, causal=causal)
                return [out]
            return run, self.packed
        if impl == "sdpa_mask":
            return (lambda q, k, v: [F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.attn_mask, dropout_p=p)]), self.padded
        if impl in CUDA_IMPLS:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.EFFICIENT_ATTENTION
            mask = None if impl == "sdpa_flash" else self.attn_mask

            def fused(q, k, v):
                with sdpa_kernel(backend):
                    return [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                           is_causal=causal and mask is None)]
            return fused, self.padded

        def loop(q, k, v):
            return [F.scaled_dot_product_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                   dropout_p=p, is_causal=causal)
                    for b, n in enumerate(self.lengths)]
        return loop, self.padded

    def timed_fn(self, impl, mode):
        run, inputs = self.forward_fn(impl)
        device = self.device
        if mode == "fwd":
            def fwd():
                with torch.no_grad():
                    run(*inputs)
                _sync(device)
            return fwd
        leaves = [t.detach().requires_grad_() for t in inputs]
        grads = [torch.randn_like(o) for o in run(*leaves)]

        def fwd_bwd():
            torch.autograd.grad(run(*leaves), leaves, grads)
            _sync(device)
        return fwd_bwd



@pytest.mark.parametrize("impl", IMPLS + CUDA_IMPLS)
@pytest.mark.parametrize("device,batch,seqlen,heads,head_dim,dtype,dropout_p,causal", CASES)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_attention(benchmark, mode, device, batch, seqlen, heads, head_dim, dtype, dropout_p,
                   causal, impl):
    if impl in CUDA_IMPLS and device != "cuda":
        pytest.skip("SDPA flash / memory-efficient backends are GPU baselines")
    if impl == "bertkern" and _public_attention() is None:
        pytest.skip("bertkern.ops.attention is not available (bertkern/ops/attention.py)")
    problem = _Problem(device, batch, seqlen, heads, head_dim, dtype, dropout_p, causal)
    benchmark.group = f"attention {mode} " + _case_id(device, batch, seqlen, heads, head_dim, dtype,
                                                      dropout_p, causal)
    fn = problem.timed_fn(impl, mode)
    benchmark(fn)

    flops = problem.fwd_flops * (3.5 if mode == "fwd_bwd" else 1.0)
    stats = getattr(benchmark, "stats", None)
    info = dict(impl=impl, mode=mode, device=device, shape=[batch, seqlen, heads, head_dim],
                dtype=str(dtype).replace("torch.", ""), dropout_p=dropout_p, causal=causal,
                real_tokens=problem.tokens, padding_fraction=round(problem.padding_fraction, 3),
                flops=flops)
    disabled = getattr(benchmark, "disabled", False)  # --benchmark-disable: a quick smoke run
    names = [n for n in IMPLS + (CUDA_IMPLS if device == "cuda" else [])
             if n != "bertkern" or _public_attention() is not None]
    key = (mode, device, batch, seqlen, heads, head_dim, dtype, dropout_p, causal)
    if not disabled and key not in _RESULTS:
        samples = interleaved_rounds([problem.timed_fn(name, mode) for name in names], rounds=ROUNDS)
        _RESULTS[key] = dict(zip(names, samples))
    if key in _RESULTS:
        rounds = _RESULTS[key]
        info.update(summary(rounds[impl]))
        info["interleaved_seconds"] = {name: median(xs) for name, xs in rounds.items()}
        if impl == "bertkern":
            for name in names[1:]:
                info.update(ratio_info(name, rounds[name], rounds["bertkern"]))
    seconds = stats.stats.median if stats is not None else timeit.timeit(fn, number=1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    info.update(seconds=seconds, tflops=flops / seconds / 1e12, tokens_per_s=problem.tokens / seconds)
    benchmark.extra_info.update(info)
