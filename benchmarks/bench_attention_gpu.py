"""GPU attention benchmarks: bertkern's Triton kernels against torch SDPA's FlashAttention-2 and
memory-efficient backends, at BERT shapes. CUDA only: every case skips cleanly without a GPU.

Run with ``pytest benchmarks --benchmark-only`` (or ``python -m bertkern.bench gpu-check``, which
runs these and sets the results next to the static GPU model's prediction). Each configuration
runs once per implementation, in one ``benchmark.group``:

  bertkern        bertkern.ops.attention_varlen on packed (T, H, D) tokens, uniform lengths
                  (what the encoder calls after unpadding)
  sdpa_flash      F.scaled_dot_product_attention on (B, H, S, D), SDPBackend.FLASH_ATTENTION
  sdpa_efficient  the same, SDPBackend.EFFICIENT_ATTENTION

modes: ``fwd`` (forward only, under no_grad) and ``fwd_bwd`` (forward + backward for q, k, v).
One timed call runs REPS launches and synchronizes once, so launch and sync overhead do not
dominate kernels of ~100 us.

``extra_info`` of every case holds:
  flops            useful FLOPs of one call: 4 * B * H * S^2 * D forward, plus 2.5x that for the
                   backward (FlashAttention's convention; causal halves both)
  tflops           flops / median seconds per call / 1e12
  speedup_vs_flash sdpa_flash median / this case's median, both timed in this test in 9
                   interleaved rounds; 1.0 for the flash case; speedup_vs_flash_ci95 its paired
                   bootstrap interval; median_s, iqr_s, min_s, rounds, round_seconds: this
                   case's rounds
"""
import pytest
import torch
import torch.nn.functional as F

import bertkern

from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py (on sys.path)
from bertkern.bench.stats import median

REPS = 10
# (batch, heads, seqlen, head_dim): BERT-base attention, and the same width with head dim 128.
SHAPES = [(32, 12, 512, 64), (32, 6, 512, 128)]
DTYPES = [torch.bfloat16, torch.float16]
DROPOUTS = [0.0, 0.1]
MODES = ["fwd", "fwd_bwd"]
IMPLS = ["bertkern", "sdpa_flash", "sdpa_efficient"]

_needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")


def attention_flops(batch, heads, seqlen, head_dim, mode, causal=False):
    """Useful FLOPs of one attention call (two S x S x D matmuls forward; 2.5x that backward)."""
    fwd = 4 * batch * heads * seqlen * seqlen * head_dim
    total = fwd * (3.5 if mode == "fwd_bwd" else 1.0)
    return total / 2 if causal else total


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _make_fn(impl, mode, batch, heads, seqlen, head_dim, dtype, dropout_p):
    """One timed call: REPS launches of ``impl`` then a device synchronize."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, heads, seqlen, head_dim)
    q, k, v = (torch.randn(*shape, generator=gen).to("cuda", dtype) for _ in range(3))
    grad = mode == "fwd_bwd"
    if impl == "bertkern":
        packed = [t.transpose(1, 2).reshape(batch * seqlen, heads, head_dim).contiguous() for t in (q, k, v)]
        q, k, v = packed
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device="cuda")

        def call():
            return bertkern.ops.attention_varlen(q, k, v, cu, seqlen, dropout_p=dropout_p)
    else:
        backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.EFFICIENT_ATTENTION

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    for t in (q, k, v):
        t.requires_grad_(grad)
    dout = torch.randn_like(q)

    def fn():
        for _ in range(REPS):
            if grad:
                out = call()
                torch.autograd.grad(out, (q, k, v), dout)
            else:
                with torch.no_grad():
                    call()
        torch.cuda.synchronize()

    return fn


CASES = [
    pytest.param(impl, mode, shape, dt, p, marks=_needs_cuda,
                 id=f"cuda-{mode}-b{shape[0]}h{shape[1]}s{shape[2]}d{shape[3]}-{_dtype_name(dt)}-p{p}-{impl}")
    for shape in SHAPES for dt in DTYPES for p in DROPOUTS for mode in MODES for impl in IMPLS
]


@pytest.mark.parametrize("impl,mode,shape,dtype,dropout_p", CASES)
def test_attention_gpu(benchmark, impl, mode, shape, dtype, dropout_p):
    batch, heads, seqlen, head_dim = shape
    benchmark.group = f"attention-gpu {mode} b{batch} h{heads} s{seqlen} d{head_dim} {_dtype_name(dtype)} p{dropout_p}"
    fn = _make_fn(impl, mode, *shape, dtype, dropout_p)
    flash = fn if impl == "sdpa_flash" else _make_fn("sdpa_flash", mode, *shape, dtype, dropout_p)
    benchmark(fn)
    flash_rounds, self_rounds = interleaved_rounds([flash, fn], rounds=9, target_s=0.02)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    seconds = (stats.stats.median if stats is not None else median(self_rounds)) / REPS
    flops = attention_flops(batch, heads, seqlen, head_dim, mode)
    benchmark.extra_info.update(
        impl=impl, op=f"attention_{mode}", device="cuda", shape=list(shape), dtype=_dtype_name(dtype),
        dropout_p=dropout_p, flops=flops, tflops=flops / seconds / 1e12, seconds_per_call=seconds,
        **ratio_info("flash", flash_rounds, self_rounds), **summary(self_rounds), gpu=torch.cuda.get_device_name(), bertkern_version=bertkern.__version__,
    )
