"""bertkern.ops.attention on the C++ CPU backend (and CUDA/Triton when a GPU is present),
against the fp64 pure-PyTorch reference, with FlashAttention's error bound for low dtypes."""
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bertkern  # noqa: F401
from bertkern.ops import attention, unpad
from tests.devices import devices
from tests.reference import attention_dropout_keep_ref, attention_varlen_ref, philox4x32_ref
from tests.test_dropout import assert_drops_binomial

LENGTHS = [1, 7, 70, 0, 33]


def packed_inputs(lengths, heads, head_dim, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths, default=0)


def assert_within_flash_bound(out, ref64, low_ref, atol):
    """|bertkern - fp64| <= 2 |torch in the low dtype - fp64| + atol, elementwise-max sense."""
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (low_ref.double() - ref64).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + atol, f"error {err:.3g} > 2 * {base:.3g} + {atol}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_against_reference(device, dtype, head_dim, causal):
    q, k, v, cu, max_len = packed_inputs(LENGTHS, 2, head_dim, dtype, device)
    scale = 1 / math.sqrt(head_dim)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, cu_seqlens=cu, max_seqlen=max_len, causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = attention_varlen_ref(*ref_leaves, cu, scale, causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    low, _ = attention_varlen_ref(*low_leaves, cu, scale, causal, upcast=False)
    low_grads = torch.autograd.grad(low, low_leaves, dout)

    atol = 1e-6 if dtype == torch.float32 else 1e-4
    assert_within_flash_bound(out, ref, low, atol)
    for g, r, lg in zip(grads, ref_grads, low_grads):
        assert_within_flash_bound(g, r, lg, atol)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def assert_matches_ref_fp64(got, ref, what):
    torch.testing.assert_close(got, ref.to(got.dtype), atol=2e-5, rtol=2e-5, msg=lambda m: f"{what}: {m}")


def test_empty_sequence_gives_zeros_and_zero_grads():
    """Empty sequences (packed) and fully padded ones (padded layout) next to real ones: the
    output rows of an empty / padded sequence are exact zeros, the gradients reaching q, k, v at
    those positions are exact zeros, everything is finite, and the real sequences' output and
    gradients equal the fp64 reference's (the empty ones change nothing)."""
    scale = 1 / math.sqrt(16)
    # packed: [0, 3, 0]: the empty sequences own no rows; the real one is the reference's
    q, k, v, cu, max_len = packed_inputs([0, 3, 0], 2, 16, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, cu_seqlens=cu, max_seqlen=max_len)
    assert out.shape == (3, 2, 16) and torch.isfinite(out).all()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = attention_varlen_ref(*ref_leaves, cu, scale)
    assert_matches_ref_fp64(out, ref, "out")
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, ref_leaves, dout.double())):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert_matches_ref_fp64(g, r, f"d{name}")

    # padded layout: sequences 0 and 2 all padding, sequence 1 three real tokens then one pad
    batch, seqlen = 3, 4
    g = torch.Generator().manual_seed(6)
    qp, kp, vp = (torch.randn(batch, seqlen, 2, 16, generator=g) for _ in range(3))
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    mask[1, :3] = False
    leaves = [t.clone().requires_grad_(True) for t in (qp, kp, vp)]
    out = attention(*leaves, key_padding_mask=mask)
    assert out.shape == qp.shape and torch.isfinite(out).all()
    assert torch.equal(out[mask], torch.zeros_like(out[mask])), "padded / empty rows not exactly 0"
    dout = torch.randn(out.shape, generator=g)  # nonzero at padded positions too
    grads = torch.autograd.grad(out, leaves, dout)
    real = ~mask[1]
    ref_leaves = [t[1][real].double().requires_grad_(True) for t in (qp, kp, vp)]
    ref_cu = torch.tensor([0, int(real.sum())], dtype=torch.int32)
    ref, _ = attention_varlen_ref(*ref_leaves, ref_cu, scale)
    assert_matches_ref_fp64(out[1][real], ref, "out (real tokens)")
    for name, gr, r in zip("qkv", grads, torch.autograd.grad(ref, ref_leaves, dout[1][real].double())):
        assert torch.isfinite(gr).all(), f"d{name} not finite"
        assert torch.equal(gr[mask], torch.zeros_like(gr[mask])), f"d{name} nonzero at padded positions"
        assert_matches_ref_fp64(gr[1][real], r, f"d{name} (real tokens)")

    # an all-empty batch: T = 0 (packed), and every sequence padding (padded layout)
    q0, k0, v0, cu0, _ = packed_inputs([0, 0], 2, 16, torch.float32)
    q0.requires_grad_(True)
    out0 = attention(q0, k0, v0, cu_seqlens=cu0, max_seqlen=0)
    assert out0.shape == (0, 2, 16)
    out0.sum().backward()
    assert q0.grad.shape == q0.shape
    leaves = [t.clone().requires_grad_(True) for t in (qp, kp, vp)]
    out = attention(*leaves, key_padding_mask=torch.ones(batch, seqlen, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    for name, gr in zip("qkv", torch.autograd.grad(out, leaves, torch.ones_like(out))):
        assert torch.equal(gr, torch.zeros_like(gr)), f"d{name} nonzero for an all-padding batch"


@pytest.mark.parametrize("causal", [False, True])
def test_padded_layout_matches_sdpa_and_zeroes_padding(causal):
    g = torch.Generator().manual_seed(1)
    batch, seqlen, heads, head_dim = 3, 11, 2, 16
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(batch, seqlen, generator=g) < 0.3  # padding anywhere
    mask[1] = True  # a sequence that is all padding
    out = attention(q, k, v, key_padding_mask=mask, causal=causal)
    assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    # reference: SDPA on the packed real tokens of each sequence
    for b in range(batch):
        real = ~mask[b]
        if real.sum() == 0:
            continue
        qb, kb, vb = (t[b][real].transpose(0, 1) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal).transpose(0, 1)
        torch.testing.assert_close(out[b][real], ref)
    # no mask: plain SDPA
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal)
    torch.testing.assert_close(attention(q, k, v, causal=causal), ref.transpose(1, 2))


def test_dropout_reproducible_rate_and_backward_consistent():
    q, k, v, cu, max_len = packed_inputs([40, 25], 2, 32, torch.float64)
    p = 0.3
    torch.manual_seed(7)
    a = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, dropout_p=p)
    torch.manual_seed(7)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)  # the draw attention() makes
    torch.manual_seed(7)
    b = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, dropout_p=p)
    c = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, dropout_p=p)
    assert torch.equal(a, b) and not torch.equal(a, c)
    masks = attention_dropout_keep_ref(int(seed), cu, 2, max_len, p)
    keep = torch.cat([m.flatten() for m in masks])  # the kernel's masks: out == ref below
    assert_drops_binomial(int((~keep).sum()), keep.numel(), p, "attention dropout")
    # forward and backward both equal the reference with the regenerated mask
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(7)
    out = attention(*leaves, cu_seqlens=cu, max_seqlen=max_len, dropout_p=p)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref, _ = attention_varlen_ref(*ref_leaves, cu, 1 / math.sqrt(32), dropout_masks=masks, dropout_p=p)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, ref_leaves, dout)):
        torch.testing.assert_close(x, y)


def test_philox_matches_reference_bits():
    offsets = torch.tensor([0, 1, 2, 12345, -5, 2**31 - 1, -(2**31)], dtype=torch.int32)
    for seed in (0, 1, 2**62 - 41, 123456789012345):
        got = torch.ops.bertkern._philox_words(seed, offsets)
        counters = offsets.numpy().astype(np.uint32).astype(np.uint64)  # int32 bits
        want = torch.from_numpy(philox4x32_ref(seed, counters).view(np.int32))
        assert got.shape == (7, 4) and torch.equal(got, want)  # the 4 words of each counter
    two_d = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    assert torch.equal(torch.ops.bertkern._philox_words(9, two_d),
                       torch.ops.bertkern._philox_words(9, two_d.flatten()).reshape(3, 4, 4))


@pytest.mark.parametrize("dropout_p", [0.0, 1e-9, 2.0**-17, 0.1, 1 / 3, 0.5, 0.999, 1.0])
def test_dropout_threshold_is_p_in_16_bits(dropout_p):
    """keep iff a uniform 16-bit half u >= T: the drop probability T / 2^16 is within 2^-17 of
    p, p = 0 keeps every u and p = 1 none."""
    pytest.importorskip("triton", reason="the Triton kernels' module needs triton (not in CPU torch builds)")
    from bertkern.kernels.attention import dropout_threshold

    t = dropout_threshold(dropout_p)
    assert 0 <= t <= 65536 and abs(t / 65536 - dropout_p) <= 2.0**-17
    assert (t == 0) == (dropout_p <= 2.0**-17) and (t == 65536) == (dropout_p >= 1 - 2.0**-17)
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_threshold(1.5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("extra", [0, 5])  # max_seqlen beyond the longest sequence changes W
def test_dropout_mask_is_the_reference_for_odd_lengths(causal, extra):
    """Read the CPU op's keep mask back exactly: with q = 0 query i attends uniformly to its
    visible keys (P = 1 / n_i), and with v[j] = e_j out[i, h, j] = keep[i, j] / ((1 - p) n_i).
    Lengths are not multiples of 8 or 32 (a Philox call's 8 keys straddle the row end), and the
    backward with the same mask equals the reference's."""
    lengths, heads, p, seed = [37, 1, 0, 66, 13, 6], 3, 0.3, 2**41 + 77
    total, dim = sum(lengths), max(lengths)
    max_seqlen = max(lengths) + extra
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.zeros(total, heads, dim, dtype=torch.float64)
    k = torch.randn(total, heads, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v = torch.zeros(total, heads, dim, dtype=torch.float64)
    for b, n in enumerate(lengths):
        v[cu[b]:cu[b] + n, :, :n] = torch.eye(n, dtype=torch.float64)[:, None, :]
    seed_t = torch.tensor([seed], dtype=torch.int64)
    out, _ = torch.ops.bertkern.attention_fwd(q, k, v, cu, max_seqlen, 0.125, causal, p, seed_t)
    masks = attention_dropout_keep_ref(seed, cu, heads, max_seqlen, p)
    drops = entries = 0
    for b, n in enumerate(lengths):
        s = int(cu[b])
        visible = torch.ones(n, n, dtype=torch.bool)
        if causal:
            visible = visible.tril()
        counts = visible.sum(1, keepdim=True).double()
        got = out[s:s + n, :, :n].permute(1, 0, 2) * (1 - p) * counts  # (H, L, L), 0 or 1
        got_keep = got > 0.5
        # kept: P / (1 - p) (got = 1 up to fp64 rounding); dropped: exactly 0
        assert torch.allclose(got[got_keep], torch.ones_like(got[got_keep]), atol=1e-9, rtol=0), f"sequence {b}"
        assert torch.equal(got[~got_keep], torch.zeros_like(got[~got_keep])), f"sequence {b}: a drop is not 0"
        assert torch.equal(got_keep, masks[b] & visible), (
            f"sequence {b}: keep mask differs from attention_dropout_keep_ref in "
            f"{(got_keep != (masks[b] & visible)).sum().item()} of {got_keep.numel()} entries")
        drops += (~got_keep & visible).sum().item()  # the kernel's own drops, visible entries only
        entries += heads * visible.sum().item()
    assert_drops_binomial(drops, entries, p, f"attention dropout, causal={causal}")
    # The backward regenerates the same mask.
    x = [t.clone().requires_grad_(True) for t in (torch.randn_like(q), k, v)]
    out = torch.ops.bertkern.attention_fwd(*x, cu, max_seqlen, 0.125, causal, p, seed_t)[0]
    y = [t.clone().requires_grad_(True) for t in (x[0].detach(), k, v)]
    ref, _ = attention_varlen_ref(*y, cu, 0.125, causal, dropout_masks=masks, dropout_p=p)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, x, dout), torch.autograd.grad(ref, y, dout)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_gradcheck_fp64(causal, dropout_p):
    q, k, v, cu, max_len = packed_inputs([3, 0, 5], 2, 4, torch.float64, seed=2)
    seed = torch.tensor([99], dtype=torch.int64) if dropout_p else None

    def fn(q_, k_, v_):
        return torch.ops.bertkern.attention_fwd(q_, k_, v_, cu, max_len, 0.5, causal, dropout_p, seed)[0]

    assert torch.autograd.gradcheck(fn, [t.requires_grad_(True) for t in (q, k, v)])


def test_backward_is_deterministic():
    q, k, v, cu, max_len = packed_inputs([70, 33, 1], 3, 32, torch.float32)
    grads = []
    for threads in (1, 2, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            out = attention(*leaves, cu_seqlens=cu, max_seqlen=max_len, causal=True)
            grads.append(torch.autograd.grad(out.square().sum(), leaves))
        finally:
            torch.set_num_threads(prev)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck(dtype, dropout_p):
    q, k, v, cu, max_len = packed_inputs([5, 0, 3], 2, 8, dtype)
    seed = torch.tensor([5], dtype=torch.int64) if dropout_p else None
    args = (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), cu, max_len, 0.3, True, dropout_p, seed)
    torch.library.opcheck(torch.ops.bertkern.attention_fwd.default, args)
    out, lse = torch.ops.bertkern.attention_fwd(*args)
    torch.library.opcheck(torch.ops.bertkern.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                           cu, max_len, 0.3, True, dropout_p, seed))
    torch.library.opcheck(torch.ops.bertkern._philox_words.default, (3, torch.arange(10, dtype=torch.int32)))


def test_torch_compile_fullgraph_matches_eager():
    def block(x, mask):
        packed, indices, cu, max_len = unpad(x, mask)
        heads = packed.reshape(-1, 2, 8)
        return attention(heads, heads * 0.5, heads, cu_seqlens=cu, max_seqlen=max_len, causal=True)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 16, generator=g)
    mask = torch.rand(3, 9, generator=g) < 0.3
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), block(x, mask))


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4), heads=st.integers(1, 3),
       head_dim=st.sampled_from([8, 24, 64]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(lengths, heads, head_dim, causal, seed):
    q, k, v, cu, max_len = packed_inputs(lengths, heads, head_dim, torch.float32, seed=seed)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, causal=causal)
    ref, _ = attention_varlen_ref(q, k, v, cu, 1 / math.sqrt(head_dim), causal)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=2e-5)


def test_bad_input():
    q, k, v, cu, max_len = packed_inputs([3, 4], 2, 16, torch.float32)
    with pytest.raises(TypeError, match="k must be a Tensor"):
        attention(q, "k", v, cu_seqlens=cu, max_seqlen=max_len)
    with pytest.raises(TypeError, match="cu_seqlens must be a Tensor"):
        attention(q, k, v, cu_seqlens=[0, 3, 7], max_seqlen=max_len)
    with pytest.raises(TypeError, match="v must be a Tensor"):
        attention(q.reshape(1, 7, 2, 16), k.reshape(1, 7, 2, 16), None)
    with pytest.raises(ValueError, match="k must have q's shape"):
        attention(q, k[:5], v, cu_seqlens=cu, max_seqlen=max_len)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        attention(q, k, v.double(), cu_seqlens=cu, max_seqlen=max_len)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        attention(q, k, v, cu_seqlens=cu.long(), max_seqlen=max_len)
    with pytest.raises(ValueError, match="cu_seqlens"):  # inconsistent with T (checked on CPU)
        attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32), max_seqlen=6)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        attention(q[None], k[None], v[None], key_padding_mask=torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, dropout_p=1.5)
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError:  # torch's CPU builds ship without Triton: asking for it says so
        with pytest.raises(ImportError, match="need the triton package"):
            attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, backend="triton")
    else:
        with pytest.raises(ValueError, match="head dim"):
            attention(q[..., :12], k[..., :12], v[..., :12], cu_seqlens=cu, max_seqlen=max_len, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=max_len, backend="flash")


def test_dropout_one_gives_zeros_with_zero_grads():
    """dropout_p = 1 drops every probability: zeros, still connected to the graph (zero
    gradients), as F.dropout(p=1) multiplies by zero."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(7, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=4, dropout_p=1.0)
    assert out.shape == q.shape and out.abs().max().item() == 0.0
    out.sum().backward()
    assert v.grad is not None and v.grad.abs().max().item() == 0.0
