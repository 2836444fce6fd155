"""bertkern.ops.unpad / pad / mask_to_indices and the mask helpers, against the pure-PyTorch
reference (CPU path, and CUDA when a GPU is present)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bertkern  # noqa: F401
from bertkern.ops import (
    key_padding_mask_from_attention_mask,
    key_padding_mask_from_lengths,
    mask_to_indices,
    pad,
    unpad,
)
from tests.reference import pad_ref, unpad_ref


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_mask(kind, batch, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "right":  # lengths from 0..S, padding at the end
        lengths = torch.randint(0, seqlen + 1, (batch,), generator=g)
        return torch.arange(seqlen)[None, :] >= lengths[:, None]
    if kind == "scattered":  # padding anywhere, not only at the end
        return torch.rand(batch, seqlen, generator=g) < 0.4
    if kind == "none":
        return torch.zeros(batch, seqlen, dtype=torch.bool)
    if kind == "all":
        return torch.ones(batch, seqlen, dtype=torch.bool)
    if kind == "one_empty":  # one sequence all padding among real ones
        mask = torch.rand(batch, seqlen, generator=g) < 0.3
        if batch:
            mask[batch // 2] = True
        return mask
    raise ValueError(kind)


MASKS = ["right", "scattered", "none", "all", "one_empty"]
BS = [(1, 1), (3, 7), (4, 64), (2, 1000), (0, 5), (5, 0)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("batch,seqlen", BS)
@pytest.mark.parametrize("features", [(8,), (3, 4)])
def test_unpad_pad_match_reference(device, kind, batch, seqlen, features):
    mask = make_mask(kind, batch, seqlen).to(device)
    x = torch.randn(batch, seqlen, *features, device=device)
    x_packed, indices, cu_seqlens, max_seqlen = unpad(x, mask)
    ref_packed, ref_indices, ref_cu, ref_max = unpad_ref(x, mask)
    assert indices.dtype == torch.int64 and cu_seqlens.dtype == torch.int32
    assert isinstance(max_seqlen, int)
    torch.testing.assert_close(x_packed, ref_packed, atol=0, rtol=0)
    torch.testing.assert_close(indices, ref_indices, atol=0, rtol=0)
    torch.testing.assert_close(cu_seqlens, ref_cu, atol=0, rtol=0)
    assert max_seqlen == ref_max
    back = pad(x_packed, indices, batch, seqlen)
    torch.testing.assert_close(back, pad_ref(ref_packed, ref_indices, batch, seqlen), atol=0, rtol=0)
    # Round trip: real tokens come back, padded positions are exactly zero.
    expected = x.masked_fill(mask.reshape(batch, seqlen, *([1] * len(features))), 0)
    torch.testing.assert_close(back, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.int8])
def test_any_dtype_and_odd_row_sizes(dtype):
    mask = make_mask("scattered", 3, 11)
    x = (torch.randn(3, 11, 3) * 10).to(dtype)  # 3 x int8 = 3-byte rows: the narrowest copy path
    x_packed, indices, _, _ = unpad(x, mask)
    torch.testing.assert_close(x_packed, unpad_ref(x, mask)[0], atol=0, rtol=0)
    torch.testing.assert_close(pad(x_packed, indices, 3, 11), pad_ref(x_packed, indices, 3, 11), atol=0, rtol=0)


def test_gradients_are_gather_and_scatter():
    mask = make_mask("scattered", 4, 9)
    x = torch.randn(4, 9, 5, dtype=torch.float64, requires_grad=True)
    x_packed, indices, _, _ = unpad(x, mask)
    g = torch.randn_like(x_packed)
    (x_packed * g).sum().backward()
    torch.testing.assert_close(x.grad, pad_ref(g, indices, 4, 9), atol=0, rtol=0)

    packed = x_packed.detach().requires_grad_(True)
    out = pad(packed, indices, 4, 9)
    g2 = torch.randn_like(out)
    (out * g2).sum().backward()
    torch.testing.assert_close(packed.grad, g2.reshape(36, 5)[indices], atol=0, rtol=0)


def test_gradcheck_fp64():
    mask = make_mask("scattered", 2, 5, seed=3)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unpad(t, mask)[0], (x,))
    _, indices, _, _ = unpad(x.detach(), mask)
    packed = torch.randn(indices.numel(), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pad(t, indices, 2, 5), (packed,))


def test_fully_padded_batch_has_zero_tokens_and_zero_grads():
    mask = torch.ones(3, 4, dtype=torch.bool)
    x = torch.randn(3, 4, 2, requires_grad=True)
    x_packed, indices, cu_seqlens, max_seqlen = unpad(x, mask)
    assert x_packed.shape == (0, 2) and indices.numel() == 0 and max_seqlen == 0
    assert cu_seqlens.tolist() == [0, 0, 0, 0]
    out = pad(x_packed, indices, 3, 4)
    assert torch.equal(out, torch.zeros(3, 4, 2))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_torch_compile_fullgraph_matches_eager():
    def roundtrip(x, mask):
        x_packed, indices, cu_seqlens, max_seqlen = unpad(x, mask)
        return pad(torch.tanh(x_packed), indices, x.shape[0], x.shape[1]), cu_seqlens

    compiled = torch.compile(roundtrip, fullgraph=True, dynamic=True)
    for kind in ("scattered", "right", "all"):
        mask = make_mask(kind, 3, 10)
        x = torch.randn(3, 10, 4)
        for a, b in zip(compiled(x, mask), roundtrip(x, mask)):
            torch.testing.assert_close(a, b)


def test_opcheck():
    mask = make_mask("scattered", 3, 7)
    x = torch.randn(21, 4, requires_grad=True)
    indices = torch.ops.bertkern.mask_to_indices(mask)[0]
    torch.library.opcheck(torch.ops.bertkern.mask_to_indices.default, (mask,))
    torch.library.opcheck(torch.ops.bertkern.mask_to_indices.default, (torch.ones(2, 3, dtype=torch.bool),))
    torch.library.opcheck(torch.ops.bertkern.gather_rows.default, (x, indices))
    packed = torch.randn(indices.numel(), 2, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.bertkern.scatter_rows.default, (packed, indices, 21))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 6),
    seqlen=st.integers(0, 70),
    features=st.sampled_from([(1,), (5,), (2, 3)]),
    p=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_masks(batch, seqlen, features, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, seqlen, generator=g) < p
    x = torch.randn(batch, seqlen, *features, generator=g)
    x_packed, indices, cu_seqlens, max_seqlen = unpad(x, mask)
    ref = unpad_ref(x, mask)
    torch.testing.assert_close(x_packed, ref[0], atol=0, rtol=0)
    assert torch.equal(indices, ref[1]) and torch.equal(cu_seqlens, ref[2]) and max_seqlen == ref[3]
    torch.testing.assert_close(pad(x_packed, indices, batch, seqlen), pad_ref(*ref[:2], batch, seqlen))


# ---- mask conventions --------------------------------------------------------------------------

def test_lengths_to_mask():
    mask = key_padding_mask_from_lengths(torch.tensor([2, 0, 3]))
    assert mask.tolist() == [[False, False, True], [True, True, True], [False, False, False]]
    assert key_padding_mask_from_lengths(torch.tensor([1]), max_len=3).tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="max_len"):
        key_padding_mask_from_lengths(torch.tensor([4]), max_len=3)
    with pytest.raises(TypeError):
        key_padding_mask_from_lengths(torch.tensor([1.0]))


def test_hf_attention_mask_polarity():
    attention_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # HF: 1 = keep
    assert key_padding_mask_from_attention_mask(attention_mask).tolist() == [
        [False, False, True], [False, True, True]]


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input():
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        unpad(x, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, S\)"):
        unpad(x, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="x has shape"):
        unpad(x, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="is on meta"):
        unpad(x, torch.zeros(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="int64"):
        pad(torch.randn(2, 4), torch.tensor([0, 1], dtype=torch.int32), 1, 2)
    with pytest.raises(ValueError, match="rows but indices"):
        pad(torch.randn(2, 4), torch.tensor([0, 1, 2]), 1, 3)
    # Out-of-range indices: checked on the CPU path (a device-side check on CUDA).
    with pytest.raises(IndexError, match="out of range"):
        pad(torch.randn(2, 4), torch.tensor([0, 5]), 1, 3)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.bertkern.gather_rows(torch.randn(3, 4), torch.tensor([-1]))
    # direct operator calls check too
    with pytest.raises(TypeError, match="bool"):
        torch.ops.bertkern.mask_to_indices(torch.zeros(2, 3))
