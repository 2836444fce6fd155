"""CPU dropout: bertkern.ops.dropout (csrc/cpu/dropout.cpp, Philox mask in one pass) against
torch.nn.functional.dropout, at the encoder's activation sizes.

Run with ``pytest benchmarks --benchmark-only``. Shapes (fp32, p = 0.1, BERT's training
setting): 32 x 128 x 768 (the attention output / residual stream of the main CPU encoder
config) and 32 x 128 x 3072 (the FFN's hidden activation). Modes: ``fwd`` (training=True, no
graph) and ``fwd_bwd`` (forward + backward into the input, torch.autograd.grad).

Both implementations of a group are timed in 9 interleaved rounds at the group's first row
(benchmarks/_timing.py: interleaved_rounds), so load on the machine hits them alike.
extra_info: impl, mode, device, shape, dtype, p, bytes (input read + output written in the
forward, + gradient read + written in the backward), gbps and tokens_per_s (from the row's
median over the rounds), median_s, iqr_s, min_s, rounds, round_seconds, interleaved_seconds
(both medians), cpu_threads; the bertkern row adds speedup_vs_f_dropout (F.dropout median /
bertkern median) and speedup_vs_f_dropout_ci95 (paired bootstrap over the rounds).
"""
import pytest
import torch
import torch.nn.functional as F

import bertkern
from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py (on sys.path)
from bertkern.bench.stats import median

P = 0.1
SHAPES = [(32, 128, 768), (32, 128, 3072)]
IMPLS = ["bertkern", "f_dropout"]
MODES = ["fwd", "fwd_bwd"]
ROUNDS = 9
_RESULTS = {}  # (mode, shape) -> {impl: [seconds per round]}


def _fn(impl, mode, x, dy):
    f = (lambda t: bertkern.ops.dropout(t, P, training=True)) if impl == "bertkern" else (
        lambda t: F.dropout(t, P, training=True))
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                f(x)
        return fwd
    leaf = x.detach().requires_grad_()

    def fwd_bwd():
        torch.autograd.grad(f(leaf), [leaf], dy)
    return fwd_bwd


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_dropout(benchmark, mode, shape, impl):
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    shape_id = "x".join(map(str, shape))
    benchmark.group = f"dropout {mode} cpu-{shape_id}-float32-p{P:g}"
    fn = _fn(impl, mode, x, dy)
    benchmark(fn)
    key = (mode, shape)
    if key not in _RESULTS and not getattr(benchmark, "disabled", False):
        _RESULTS[key] = dict(zip(IMPLS, interleaved_rounds([_fn(n, mode, x, dy) for n in IMPLS], rounds=ROUNDS,
                                                           target_s=0.05)))
    nbytes = x.numel() * x.element_size() * (2 if mode == "fwd" else 4)
    info = dict(impl=impl, mode=mode, device="cpu", shape=list(shape), dtype="float32", p=P, bytes=nbytes,
                cpu_threads=torch.get_num_threads())
    if key in _RESULTS:
        rounds = _RESULTS[key]
        seconds = median(rounds[impl])
        info.update(summary(rounds[impl]), gbps=nbytes / seconds / 1e9,
                    tokens_per_s=shape[0] * shape[1] / seconds,
                    interleaved_seconds={n: median(xs) for n, xs in rounds.items()})
        if impl == "bertkern":
            info.update(ratio_info("f_dropout", rounds["f_dropout"], rounds["bertkern"]))
    benchmark.extra_info.update(info)
