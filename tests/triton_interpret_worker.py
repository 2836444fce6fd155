"""Checks of the Triton kernels of the attention operator run by the Triton interpreter on the CPU.

TRITON_INTERPRET=1 only takes effect if it is set before triton is imported, and the main
pytest process may have imported triton already (torch does), so tests/test_attention_triton.py
runs these cases in fresh subprocesses:

    TRITON_INTERPRET=1 python -m tests.triton_interpret_worker --out results.json CASE [CASE ...]

Each case raises on failure; the results file maps case name -> null (passed) or the traceback.
Importing this module only defines the cases (it imports neither triton nor bertkern).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import torch

CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


# Packed batch with an empty sequence, a length-1 sequence and lengths that are not multiples
# of any block size (the interpreter's tiles are 16 and 32).
LENGTHS = [1, 7, 0, 70]
HEADS = 2
# FlashAttention's bound: |bertkern - fp64 ref| <= 2 |torch in the same dtype - fp64 ref| + ATOL.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4}


def _cu_seqlens(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def _inputs(lengths, head_dim, dtype, seed=0, heads=HEADS):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(dtype) for _ in range(3))
    dout = torch.randn(total, heads, head_dim, generator=g).to(dtype)
    return q, k, v, dout


def _triton_ops():
    """torch.ops.bertkern.attention_fwd / attention_bwd with the Triton launchers as their CPU
    kernel (run by the interpreter): the operator's own autograd, fake and checks, on Triton."""
    from bertkern.ops import attention_triton

    attention_triton.use_on_cpu(True)
    return torch.ops.bertkern.attention_fwd, torch.ops.bertkern.attention_bwd


def _check_bound(name, got, ref64, ref_low, dtype):
    got, ref64, ref_low = got.double(), ref64.double(), ref_low.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs().max().item() if got.numel() else 0.0
    err_low = (ref_low - ref64).abs().max().item() if got.numel() else 0.0
    bound = 2 * err_low + ATOL[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 * {err_low:.3g} + {ATOL[dtype]:g} (torch {dtype})"


def _run_and_compare(lengths, head_dim, dtype, causal, dropout_p=0.0, seed=1234, max_seqlen=None):
    """Forward + backward of the operator against attention_varlen_ref in fp64 and in dtype."""
    from tests.reference import attention_dropout_keep_ref, attention_varlen_ref

    cu = _cu_seqlens(lengths)
    max_seqlen = max(lengths) if max_seqlen is None else max_seqlen
    scale = 1.0 / math.sqrt(head_dim)
    q, k, v, dout = _inputs(lengths, head_dim, dtype)
    seed_t = torch.tensor([seed], dtype=torch.int64) if dropout_p > 0 else None
    masks = (attention_dropout_keep_ref(seed, cu, HEADS, max_seqlen, dropout_p)
             if dropout_p > 0 else None)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    fwd, _ = _triton_ops()
    out, lse = fwd(*leaves, cu, max_seqlen, scale, causal, dropout_p, seed_t)
    assert out.dtype == dtype and out.shape == q.shape, (out.dtype, out.shape)
    assert lse.dtype == torch.float32 and lse.shape == (HEADS, q.shape[0]), (lse.dtype, lse.shape)
    grads = torch.autograd.grad(out, leaves, dout)

    results = {}
    for upcast in (True, False):
        ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref_out, ref_lse = attention_varlen_ref(*ref_leaves, cu, scale, causal, masks, dropout_p,
                                                upcast=upcast)
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.to(ref_out.dtype))
        results[upcast] = (ref_out, ref_lse, ref_grads)
    (out64, lse64, grads64), (out_low, _, grads_low) = results[True], results[False]
    _check_bound("out", out, out64, out_low, dtype)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-5)
    for name, g, g64, g_low in zip(("dq", "dk", "dv"), grads, grads64, grads_low):
        _check_bound(name, g, g64, g_low, dtype)


# ---------------------------------------------------------------------------------------------
# Forward + backward against the reference
# ---------------------------------------------------------------------------------------------
for _dtype in (torch.float32, torch.float16):
    for _head_dim in (32, 64, 80):
        for _causal in (False, True):
            _name = f"fwd_bwd-{str(_dtype)[6:]}-d{_head_dim}-{'causal' if _causal else 'full'}"
            case(_name)(lambda d=_dtype, h=_head_dim, c=_causal: _run_and_compare(LENGTHS, h, d, c))
    for _causal in (False, True):
        _name = f"dropout_fwd_bwd-{str(_dtype)[6:]}-{'causal' if _causal else 'full'}"
        case(_name)(lambda d=_dtype, c=_causal: _run_and_compare(LENGTHS, 32, d, c, dropout_p=0.25))


@case("long_single_sequence-fp16-d64-causal")
def _():
    # One sequence spanning many blocks in both directions: the causal diagonal crosses
    # unmasked, diagonal and tail runs of every kernel.
    _run_and_compare([150], 64, torch.float16, True)


@case("max_seqlen_above_longest-dropout")
def _():
    # max_seqlen larger than every sequence: extra programs exit, and the dropout counters use
    # the max_seqlen argument (W = 4 * ceil(max_seqlen / 32) calls per row), as the reference does.
    _run_and_compare([5, 33], 32, torch.float32, False, dropout_p=0.5, max_seqlen=40)


for _dtype, _causal in ((torch.float16, False), (torch.float16, True), (torch.float32, True)):
    # BLOCK_D = 128 tiles; lengths that are not multiples of 8 or 32 and a max_seqlen above the
    # longest (W = 12 calls per row, not 8).
    case(f"dropout_fwd_bwd-{str(_dtype)[6:]}-d80-{'causal' if _causal else 'full'}")(
        lambda d=_dtype, c=_causal: _run_and_compare([5, 37, 70], 80, d, c, dropout_p=0.3,
                                                     max_seqlen=75))


@case("head_dims_8_16_24_40")
def _():
    for head_dim in (8, 16, 24, 40):
        _run_and_compare([3, 19], head_dim, torch.float32, True)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------
@case("dropout_mask_is_the_philox_convention")
def _():
    """Read the kernel's keep mask back exactly: with q = 0 every query attends uniformly
    (P = 1 / L), and with v[j] = e_j (one-hot) out[i, h, j] = keep[i, j] / ((1 - p) L)."""
    from tests.reference import attention_dropout_keep_ref

    lengths, head_dim, p, seed = [64, 50, 0, 33, 1], 64, 0.3, 2**40 + 123
    cu = _cu_seqlens(lengths)
    total = cu[-1].item()
    q = torch.zeros(total, HEADS, head_dim)
    v = torch.zeros(total, HEADS, head_dim)
    for b, n in enumerate(lengths):
        s = cu[b].item()
        v[s:s + n, :, :n] = torch.eye(n)[:, None, :]
    k = torch.randn(total, HEADS, head_dim)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    out, _ = _triton_ops()[0](q, k, v, cu, max(lengths), 0.125, False, p, seed_t)
    masks = attention_dropout_keep_ref(seed, cu, HEADS, max(lengths), p)
    kept = total_entries = 0
    for b, n in enumerate(lengths):
        s = cu[b].item()
        got = out[s:s + n, :, :n].permute(1, 0, 2) * (1 - p) * n  # (H, L, L), ~0 or ~1
        got_keep = got > 0.5
        assert torch.all((got - got_keep.float()).abs() < 1e-4), f"sequence {b}: not a 0/1 pattern"
        assert torch.equal(got_keep, masks[b]), (
            f"sequence {b}: keep mask differs from the Philox convention in "
            f"{(got_keep != masks[b]).sum().item()} of {got_keep.numel()} entries")
        kept += got_keep.sum().item()
        total_entries += got_keep.numel()
    rate = kept / total_entries  # ~15k Bernoulli(0.7) draws: std ~0.004
    assert abs(rate - (1 - p)) < 0.02, f"keep rate {rate:.4f}, expected ~{1 - p}"


@case("dropout_seed_determines_output")
def _():
    lengths = [7, 70]
    cu = _cu_seqlens(lengths)
    q, k, v, dout = _inputs(lengths, 32, torch.float32)

    def run(seed, p=0.2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = _triton_ops()[0](*leaves, cu, 70, 0.2, False, p, torch.tensor([seed], dtype=torch.int64))
        return (out, lse, *torch.autograd.grad(out, leaves, dout))

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b):
        assert torch.equal(x, y), "same seed, different result"
    assert not torch.equal(a[0], c[0]), "different seeds, same output"
    assert torch.equal(a[1], c[1]), "lse must not depend on dropout"
    # dropout_p = 1 drops everything: zeros, and zero gradients, not NaN.
    out, _, dq, dk, dv = run(7, p=1.0)
    for t in (out, dq, dk, dv):
        assert torch.equal(t, torch.zeros_like(t))


@case("dropout_matches_the_cpu_operator")
def _():
    """The C++ CPU kernel of torch.ops.bertkern.attention_fwd/bwd implements the same Philox
    convention: with the same seed both drop the same entries, so outputs and gradients agree to
    rounding (a single differing mask entry would show as an O(1) error)."""
    from bertkern.ops import attention_triton

    attention_triton.use_on_cpu(False)  # the operator's CPU kernel is the C++ one again
    lengths = [1, 7, 0, 70]
    cu = _cu_seqlens(lengths)
    q, k, v, dout = _inputs(lengths, 32, torch.float32)
    seed = torch.tensor([2**40 + 5], dtype=torch.int64)
    for causal in (False, True):
        args = (cu, 70, 0.2, causal, 0.3, seed)
        out, lse = attention_triton.attention_fwd(q, k, v, *args)
        out_cpu, lse_cpu = torch.ops.bertkern.attention_fwd(q, k, v, *args)
        torch.testing.assert_close(out, out_cpu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, lse_cpu, atol=1e-5, rtol=1e-5)
        grads = attention_triton.attention_bwd(dout, q, k, v, out, lse, *args)
        grads_cpu = torch.ops.bertkern.attention_bwd(dout, q, k, v, out_cpu, lse_cpu, *args)
        for g, g_cpu in zip(grads, grads_cpu):
            torch.testing.assert_close(g, g_cpu, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shapes, layouts, arguments
# ---------------------------------------------------------------------------------------------
@case("empty_batches")
def _():
    fwd, _ = _triton_ops()
    for lengths in ([], [0], [0, 0, 0]):
        cu = _cu_seqlens(lengths)
        q, k, v = (torch.randn(0, HEADS, 32, requires_grad=True) for _ in range(3))
        out, lse = fwd(q, k, v, cu, 0, 1.0, True, 0.0, None)
        assert out.shape == (0, HEADS, 32) and lse.shape == (HEADS, 0)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert all(g.shape == (0, HEADS, 32) for g in grads)


@case("empty_sequences_between_real_ones")
def _():
    # Sequences of length 0 own no rows; neighbours must come out exact and finite.
    _run_and_compare([0, 3, 0, 0, 17, 0], 32, torch.float32, True)


@case("strided_inputs")
def _():
    """q, k, v as views of a packed (T, 3, H, D) projection, and a transposed (non unit-stride
    along D) dout: the results match contiguous inputs exactly."""
    fwd, _ = _triton_ops()
    lengths = [7, 70]
    cu = _cu_seqlens(lengths)
    total = sum(lengths)
    qkv = torch.randn(total, 3, HEADS, 32)
    dout = torch.randn(total, HEADS, 32)
    dout_strided = dout.transpose(0, 2).contiguous().transpose(0, 2)
    assert dout_strided.stride(-1) != 1

    def run(q, k, v, do):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out, lse = fwd(*leaves, cu, 70, 0.3, True, 0.0, None)
        return (out, lse, *torch.autograd.grad(out, leaves, do))

    got = run(qkv[:, 0], qkv[:, 1], qkv[:, 2], dout_strided)
    want = run(*(qkv[:, i].contiguous() for i in range(3)), dout)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@case("public_api_backend_triton_matches_cpu")
def _():
    # bertkern.ops.attention(backend="triton") on CPU tensors (allowed under the interpreter),
    # padded layout with padding anywhere, forward and backward, against the C++ backend.
    from bertkern.ops import attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 9, 2, 16, generator=g) for _ in range(3))
    mask = torch.rand(3, 9, generator=g) < 0.3
    mask[2] = True  # one sequence all padding
    grads = {}
    for backend in ("triton", "cpu"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, key_padding_mask=mask, causal=True, backend=backend)
        out.square().sum().backward()
        grads[backend] = (out, *(t.grad for t in leaves))
    assert torch.equal(grads["triton"][0][mask], torch.zeros_like(grads["triton"][0][mask]))
    for a, b in zip(grads["triton"], grads["cpu"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@case("opcheck")
def _():
    fwd, bwd = _triton_ops()
    lengths = [3, 0, 20]
    cu = _cu_seqlens(lengths)
    q, k, v, dout = _inputs(lengths, 32, torch.float32)
    seed = torch.tensor([5], dtype=torch.int64)
    for causal, p, s in ((False, 0.0, None), (True, 0.1, seed)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        torch.library.opcheck(fwd.default, (*leaves, cu, 20, 0.2, causal, p, s))
        out, lse = fwd(q, k, v, cu, 20, 0.2, causal, p, s)
        torch.library.opcheck(bwd.default,
                              (dout, q, k, v, out, lse, cu, 20, 0.2, causal, p, s))


@case("bad_arguments_raise_before_launch")
def _():
    from bertkern.ops.attention_triton import attention_fwd as fwd  # the launcher itself
    cu = _cu_seqlens([3, 5])
    q = torch.randn(8, 2, 32)
    seed = torch.tensor([1], dtype=torch.int64)

    def expect(exc, words, *args):
        try:
            fwd(*args)
        except exc as e:
            assert all(w in str(e) for w in words), f"message {str(e)!r} lacks {words}"
        else:
            raise AssertionError(f"no {exc.__name__} for {words}")

    expect(ValueError, ["k", "shape"], q, q[:7], q, cu, 5, 1.0, False, 0.0, None)
    expect(TypeError, ["v", "dtype"], q, q, q.half(), cu, 5, 1.0, False, 0.0, None)
    expect(TypeError, ["q", "float32"], q.double(), q.double(), q.double(), cu, 5, 1.0, False, 0.0, None)
    expect(TypeError, ["cu_seqlens", "int32"], q, q, q, cu.long(), 5, 1.0, False, 0.0, None)
    expect(ValueError, ["cu_seqlens", "(B + 1,)"], q, q, q, cu[None], 5, 1.0, False, 0.0, None)
    expect(ValueError, ["cu_seqlens", "T"], q, q, q, _cu_seqlens([3, 4]), 5, 1.0, False, 0.0, None)
    expect(ValueError, ["max_seqlen"], q, q, q, cu, 4, 1.0, False, 0.0, None)
    expect(ValueError, ["head dim", "36"], *(torch.randn(8, 2, 36),) * 3, cu, 5, 1.0, False, 0.0, None)
    expect(ValueError, ["head dim", "256"], *(torch.randn(8, 2, 256),) * 3, cu, 5, 1.0, False, 0.0, None)
    expect(ValueError, ["dropout_p"], q, q, q, cu, 5, 1.0, False, 1.5, seed)
    expect(ValueError, ["dropout_seed"], q, q, q, cu, 5, 1.0, False, 0.1, None)
    expect(TypeError, ["dropout_seed", "int64"], q, q, q, cu, 5, 1.0, False, 0.1, seed.int())
    expect(ValueError, ["max_seqlen^2"], q, q, q, cu, 50000, 1.0, False, 0.1, seed)


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON file: case -> null | traceback")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # It must be in the environment from the start: triton reads it when it is imported.
        sys.exit("run with TRITON_INTERPRET=1 in the environment")
    torch.set_num_threads(1)
    results = {}
    for name in args.cases or list(CASES):
        try:
            CASES[name]()
            results[name] = None
        except BaseException:  # noqa: BLE001  (report everything, including asserts)
            results[name] = traceback.format_exc()
        with open(args.out, "w") as f:  # rewritten after every case: a crash keeps the rest
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
