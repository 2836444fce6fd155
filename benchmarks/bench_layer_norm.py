"""LayerNorm benchmarks: bertkern.ops.layer_norm (residual add fused) against PyTorch.

Run with ``pytest benchmarks --benchmark-only``. Each configuration runs twice, as a ``torch``
case and a ``bertkern`` case in the same ``benchmark.group``:

  fwd_residual      y = LayerNorm(x + residual)   torch: F.layer_norm(x + r, ...)
  fwd               y = LayerNorm(x)              torch: F.layer_norm(x, ...)
  fwd_bwd_residual  forward + backward of the first, gradients for x, residual, weight, bias

``extra_info`` of every case holds:
  bytes             what the fused bertkern op reads and writes (the minimum traffic of the
                    computation), for both cases, so that gbps compares like with like
  gbps              bytes / median time (pytest-benchmark's median of this case)
  tokens_per_s      rows (tokens) / median time
  speedup_vs_torch  torch median / bertkern median over 9 interleaved rounds (both timed at the
                    configuration's first row, so that both see the same machine load), with
                    speedup_vs_torch_ci95 (paired bootstrap over the rounds); 1.0 for the
                    torch case
  median_s, iqr_s, min_s, rounds, round_seconds   this case's interleaved rounds
  torch_min_s, bertkern_min_s  the fastest round of each
  peak_memory_bytes (CUDA only) peak allocation of one call above what was allocated before

CPU cases always run (small but real shapes, a minute or two in all on 2 cores); CUDA cases run
BERT-base / BERT-large token counts and skip cleanly when there is no GPU. CUDA is queried only
when a CUDA case runs, never at import time.
"""
import pytest
import torch
import torch.nn.functional as F

import bertkern

from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py (on sys.path)
from bertkern.bench.stats import median

ROUNDS = 9  # interleaved rounds per configuration (both implementations)
_RESULTS = {}  # configuration -> ([torch seconds per round], [bertkern seconds per round])

EPS = 1e-5

# (rows = tokens, hidden size, dtype)
CPU_SHAPES = [
    (8192, 768, torch.float32),
    (4096, 1024, torch.float32),
    (8192, 768, torch.bfloat16),
]
CUDA_SHAPES = [
    (32 * 512, 768, torch.float16),  # BERT-base, 32 sequences of 512 tokens
    (32 * 512, 1024, torch.bfloat16),  # BERT-large
    (32 * 512, 768, torch.float32),
]

# A string condition is evaluated when the test is set up, not when this module is imported.
_needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


CASES = [
    pytest.param("cpu", m, n, dt, id=f"cpu-{m}x{n}-{_dtype_name(dt)}") for m, n, dt in CPU_SHAPES
] + [
    pytest.param("cuda", m, n, dt, id=f"cuda-{m}x{n}-{_dtype_name(dt)}", marks=_needs_cuda)
    for m, n, dt in CUDA_SHAPES
]
OPS = ["fwd_residual", "fwd", "fwd_bwd_residual"]
IMPLS = ["torch", "bertkern"]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _fused_bytes(op, m, n, dtype):
    """Bytes the fused bertkern op must read and write for one call."""
    elem = torch.empty((), dtype=dtype).element_size()
    act = m * n * elem  # one activation tensor
    params = 2 * n * elem  # weight + bias
    stats = 2 * m * 4  # mean + rstd, float32
    if op == "fwd":  # read x, write y
        return 2 * act + params + stats
    if op == "fwd_residual":  # read x, residual, write y
        return 3 * act + params + stats
    # forward: read x, residual, write y, z (kept for backward), stats;
    # backward: read dy, z, stats, weight, write dz (the gradient of x and of residual),
    # dweight, dbias.
    return 4 * act + params + stats + 3 * act + params + stats + params


def _make_fns(op, device, m, n, dtype):
    """(torch_fn, bertkern_fn): each runs one call and waits for the device."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        values = torch.randn(*shape, generator=gen, dtype=torch.float32)
        return values.to(device=device, dtype=dtype)

    x, residual = randn(m, n), randn(m, n)
    weight, bias = 1 + 0.1 * randn(n), 0.1 * randn(n)

    if op == "fwd":

        def torch_fn():
            F.layer_norm(x, (n,), weight, bias, EPS)
            _sync(device)

        def bertkern_fn():
            bertkern.ops.layer_norm(x, weight, bias, eps=EPS)
            _sync(device)

    elif op == "fwd_residual":

        def torch_fn():
            F.layer_norm(x + residual, (n,), weight, bias, EPS)
            _sync(device)

        def bertkern_fn():
            bertkern.ops.layer_norm(x, weight, bias, eps=EPS, residual=residual)
            _sync(device)

    else:
        leaves = [t.clone().requires_grad_(True) for t in (x, residual, weight, bias)]
        xg, rg, wg, bg = leaves
        dy = randn(m, n)

        # autograd.grad rather than backward(): no accumulation into .grad between calls.
        def torch_fn():
            y = F.layer_norm(xg + rg, (n,), wg, bg, EPS)
            torch.autograd.grad(y, leaves, dy)
            _sync(device)

        def bertkern_fn():
            y = bertkern.ops.layer_norm(xg, wg, bg, eps=EPS, residual=rg)
            torch.autograd.grad(y, leaves, dy)
            _sync(device)

    return torch_fn, bertkern_fn



def _peak_memory_bytes(fn):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,m,n,dtype", CASES)
@pytest.mark.parametrize("op", OPS)
def test_layer_norm(benchmark, op, device, m, n, dtype, impl):
    benchmark.group = f"layer_norm {op} {device} {m}x{n} {_dtype_name(dtype)}"
    torch_fn, bertkern_fn = _make_fns(op, device, m, n, dtype)
    fn = bertkern_fn if impl == "bertkern" else torch_fn

    benchmark(fn)

    key = (op, device, m, n, dtype)
    if key not in _RESULTS:
        _RESULTS[key] = interleaved_rounds([torch_fn, bertkern_fn], rounds=ROUNDS, target_s=0.02)
    torch_rounds, bertkern_rounds = _RESULTS[key]
    own = bertkern_rounds if impl == "bertkern" else torch_rounds
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    seconds = stats.stats.median if stats is not None else median(own)
    ratios = ratio_info("torch", torch_rounds, bertkern_rounds) if impl == "bertkern" else {"speedup_vs_torch": 1.0}
    nbytes = _fused_bytes(op, m, n, dtype)
    benchmark.extra_info.update(
        impl=impl,
        op=op,
        device=device,
        shape=[m, n],
        dtype=_dtype_name(dtype),
        bytes=nbytes,
        gbps=nbytes / seconds / 1e9,
        tokens_per_s=m / seconds,
        torch_min_s=min(torch_rounds),
        bertkern_min_s=min(bertkern_rounds),
        **ratios,
        **summary(own),
        threads=torch.get_num_threads() if device == "cpu" else None,
    )
    if device == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = _peak_memory_bytes(fn)
