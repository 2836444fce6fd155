"""unpad / pad benchmarks: bertkern.ops against torch boolean indexing and index_put.

Run with ``pytest benchmarks --benchmark-only``. Groups:

  unpad  bertkern.ops.unpad(x, mask) (packed tokens, indices, cu_seqlens, max_seqlen)
         vs  torch ``x[~mask]`` (boolean indexing: packed tokens only)
         and torch_full: what unpad returns, built from nonzero / cumsum / index_select
  pad    bertkern.ops.pad(x_packed, indices, B, S)
         vs  torch ``out = zeros(B*S, E); out[indices] = x_packed`` (index_put)
         and torch_bool: ``out = zeros(B, S, E); out[~mask] = x_packed``

extra_info: bytes moved (packed tokens read + written), gbps, tokens_per_s (real tokens),
speedup_vs_torch (torch ``x[~mask]`` / index_put median over bertkern's, the three timed in 9
interleaved rounds at the case's first row; 1.0 for the baselines) with speedup_vs_torch_ci95
(paired bootstrap over the rounds), each row's own median_s, iqr_s, min_s, rounds,
round_seconds, interleaved_seconds (every implementation's median), padding fraction. CPU always; CUDA when a GPU is present.
"""
import pytest
import torch
import torch.nn.functional as F

from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py (on sys.path)
from bertkern.bench.stats import median

ROUNDS = 9  # interleaved rounds per case (the three implementations)
_RESULTS = {}  # case -> {impl: [seconds per round]}

# (batch, seqlen, hidden, dtype); lengths uniform in [seqlen/8, seqlen]: ~44% padding
CPU_SHAPES = [(32, 128, 768, torch.float32), (64, 256, 768, torch.bfloat16)]
CUDA_SHAPES = [(32, 512, 768, torch.float16), (32, 512, 1024, torch.bfloat16)]
_needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")


def _name(dtype):
    return str(dtype).replace("torch.", "")


CASES = [pytest.param("cpu", *s, id=f"cpu-{s[0]}x{s[1]}x{s[2]}-{_name(s[3])}") for s in CPU_SHAPES] + [
    pytest.param("cuda", *s, id=f"cuda-{s[0]}x{s[1]}x{s[2]}-{_name(s[3])}", marks=_needs_cuda)
    for s in CUDA_SHAPES
]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _inputs(device, batch, seqlen, hidden, dtype):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, seqlen // 8), seqlen + 1, (batch,), generator=g)
    mask = (torch.arange(seqlen)[None, :] >= lengths[:, None]).to(device)
    x = torch.randn(batch, seqlen, hidden, generator=g).to(device=device, dtype=dtype)
    return x, mask


def _torch_full_unpad(x, mask):
    keep = ~mask
    seqlens = keep.sum(1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten()).flatten()
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    return x.reshape(-1, *x.shape[2:]).index_select(0, indices), indices, cu_seqlens, int(seqlens.max())


def _fns(op, device, batch, seqlen, hidden, dtype):
    import bertkern

    x, mask = _inputs(device, batch, seqlen, hidden, dtype)
    x_packed, indices, _, _ = bertkern.ops.unpad(x, mask)

    def wrap(f):
        def run():
            f()
            _sync(device)
        return run

    if op == "unpad":
        impls = {
            "torch": wrap(lambda: x[~mask]),
            "torch_full": wrap(lambda: _torch_full_unpad(x, mask)),
            "bertkern": wrap(lambda: bertkern.ops.unpad(x, mask)),
        }
    else:
        def index_put():
            out = x_packed.new_zeros(batch * seqlen, hidden)
            out[indices] = x_packed
            return out.view(batch, seqlen, hidden)

        def bool_put():
            out = x_packed.new_zeros(batch, seqlen, hidden)
            out[~mask] = x_packed
            return out

        impls = {
            "torch": wrap(index_put),
            "torch_bool": wrap(bool_put),
            "bertkern": wrap(lambda: bertkern.ops.pad(x_packed, indices, batch, seqlen)),
        }
    return impls, x_packed.shape[0], float(mask.float().mean())



@pytest.mark.parametrize("impl", ["torch", "torch_alt", "bertkern"])
@pytest.mark.parametrize("device,batch,seqlen,hidden,dtype", CASES)
@pytest.mark.parametrize("op", ["unpad", "pad"])
def test_padding(benchmark, op, device, batch, seqlen, hidden, dtype, impl):
    impls, tokens, padding_fraction = _fns(op, device, batch, seqlen, hidden, dtype)
    alt = "torch_full" if op == "unpad" else "torch_bool"
    name = alt if impl == "torch_alt" else impl
    benchmark.group = f"{op} {device} {batch}x{seqlen}x{hidden} {_name(dtype)}"
    fn = impls[name]
    benchmark(fn)
    key = (op, device, batch, seqlen, hidden, dtype)
    if key not in _RESULTS:
        names = ["torch", alt, "bertkern"]
        _RESULTS[key] = dict(zip(names, interleaved_rounds([impls[n] for n in names], rounds=ROUNDS,
                                                           target_s=0.02)))
    rounds = _RESULTS[key]
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else median(rounds[name])
    ratios = (ratio_info("torch", rounds["torch"], rounds["bertkern"]) if impl == "bertkern"
              else {"speedup_vs_torch": 1.0})
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = 2 * tokens * hidden * elem + (batch * seqlen * hidden * elem if op == "pad" else 0)
    benchmark.extra_info.update(
        impl=name, op=op, device=device, shape=[batch, seqlen, hidden], dtype=_name(dtype),
        real_tokens=tokens, padding_fraction=padding_fraction, bytes=nbytes,
        gbps=nbytes / seconds / 1e9, tokens_per_s=tokens / seconds,
        interleaved_seconds={n: median(xs) for n, xs in rounds.items()}, **ratios, **summary(rounds[name]),
    )
