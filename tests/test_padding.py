"""bertkern.ops.unpad / pad / mask_to_indices, the Packing object and the mask helpers, against
the pure-PyTorch reference (CPU path, and CUDA when a GPU is present)."""
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
from bertkern.ops.padding import Packing
from tests.devices import devices
from tests.reference import pad_ref, unpad_ref


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
    # direct operator calls check too: a RuntimeError whose message names the Python type
    with pytest.raises(RuntimeError, match="^IndexError: .*out of range"):
        torch.ops.bertkern.gather_rows(torch.randn(3, 4), torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="^TypeError: .*bool"):
        torch.ops.bertkern.mask_to_indices(torch.zeros(2, 3))


# ---- Packing: the one packing object every caller uses -------------------------------------------

def _padded(x, batch_first):
    """(B, S, *F) in the given layout: seq-first is (S, B, *F), contiguous."""
    return x if batch_first else x.transpose(0, 1).contiguous()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("batch,seqlen", BS)
def test_packing_from_mask_matches_reference(batch_first, kind, batch, seqlen):
    mask = make_mask(kind, batch, seqlen)
    x = torch.randn(batch, seqlen, 3, 2)
    ref_packed, ref_indices, ref_cu, ref_max = unpad_ref(x, mask)
    packing = Packing.from_mask(mask, batch_first)
    assert (packing.batch, packing.seqlen, packing.batch_first) == (batch, seqlen, batch_first)
    assert packing.padded_shape == ((batch, seqlen) if batch_first else (seqlen, batch))
    assert torch.equal(packing.cu_seqlens, ref_cu) and packing.max_seqlen == ref_max
    packed = packing.pack(_padded(x, batch_first))
    torch.testing.assert_close(packed, ref_packed, atol=0, rtol=0)
    back = packing.unpack(packed)
    torch.testing.assert_close(back, _padded(pad_ref(ref_packed, ref_indices, batch, seqlen), batch_first),
                               atol=0, rtol=0)
    if batch_first:
        assert torch.equal(packing.indices, ref_indices)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batch,seqlen", BS)
def test_packing_full_is_the_no_padding_case(batch_first, batch, seqlen):
    x = torch.randn(batch, seqlen, 4)
    mask = torch.zeros(batch, seqlen, dtype=torch.bool)
    packing = Packing.full(batch, seqlen, x.device, batch_first)
    ref = Packing.from_mask(mask, batch_first)
    assert torch.equal(packing.cu_seqlens, ref.cu_seqlens) and packing.max_seqlen == seqlen
    xp = _padded(x, batch_first)
    packed = packing.pack(xp)
    torch.testing.assert_close(packed, unpad_ref(x, mask)[0], atol=0, rtol=0)
    torch.testing.assert_close(packing.unpack(packed), xp, atol=0, rtol=0)
    if batch_first:  # reshapes only: no gather, no scatter
        assert packing.indices is None
        if x.numel():
            assert packed.data_ptr() == x.data_ptr() and packing.unpack(packed).data_ptr() == x.data_ptr()
    else:
        assert torch.equal(packing.indices, ref.indices)


@pytest.mark.parametrize("batch_first", [True, False])
def test_packing_fully_padded_and_empty_batches(batch_first):
    for batch, seqlen in [(3, 4), (0, 4), (3, 0)]:
        mask = torch.ones(batch, seqlen, dtype=torch.bool)
        x = torch.randn(batch, seqlen, 2, requires_grad=True)
        packing = Packing.from_mask(mask, batch_first)
        packed = packing.pack(_padded(x, batch_first))
        assert packed.shape == (0, 2) and packing.max_seqlen == 0
        assert packing.cu_seqlens.tolist() == [0] * (batch + 1)
        out = packing.unpack(packed)
        assert torch.equal(out, torch.zeros(*packing.padded_shape, 2))
        out.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["scattered", "none", "one_empty"])
def test_packing_gradients(batch_first, kind):
    mask = make_mask(kind, 3, 5, seed=1)
    packing = Packing.from_mask(mask, batch_first)
    x = torch.randn(*packing.padded_shape, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(packing.pack, (x,))
    packed = packing.pack(x.detach()).requires_grad_(True)
    assert torch.autograd.gradcheck(packing.unpack, (packed,))
    full = Packing.full(3, 5, None, batch_first)
    assert torch.autograd.gradcheck(lambda t: full.unpack(full.pack(t) * 2), (x,))
    # pack's backward is unpack's forward (scatter into zeros) and the other way round
    g = torch.randn(packing.pack(x).shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(packing.pack(x), x, g)
    assert torch.equal(grad, packing.unpack(g))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["right", "none", "all", "one_empty"])
def test_packing_from_cu_seqlens_is_the_left_aligned_batch(batch_first, kind):
    mask = make_mask("right" if kind == "one_empty" else kind, 4, 6, seed=2)
    if kind == "one_empty":
        mask[1] = True
    by_mask = Packing.from_mask(mask, batch_first)
    x = torch.randn(by_mask.cu_seqlens[-1].item(), 5)
    packing = Packing.from_cu_seqlens(by_mask.cu_seqlens, by_mask.max_seqlen, x.shape[0], batch_first)
    assert packing.padded_shape == ((4, by_mask.max_seqlen) if batch_first else (by_mask.max_seqlen, 4))
    assert torch.equal(packing.key_padding_mask(), mask[:, :by_mask.max_seqlen])
    padded = packing.unpack(x)
    torch.testing.assert_close(packing.pack(padded), x, atol=0, rtol=0)
    trimmed = Packing.from_mask(mask[:, :by_mask.max_seqlen], batch_first)
    torch.testing.assert_close(padded, trimmed.unpack(x), atol=0, rtol=0)


def test_packing_compiles_fullgraph_and_runs_on_meta():
    def roundtrip(x, mask, batch_first):
        packing = Packing.from_mask(mask, batch_first)
        return packing.unpack(torch.tanh(packing.pack(x))), packing.cu_seqlens

    def full(x):
        packing = Packing.full(x.shape[1], x.shape[0], x.device, batch_first=False)
        return packing.unpack(packing.pack(x) * 2)

    compiled = torch.compile(roundtrip, fullgraph=True, dynamic=True)
    for batch_first in (True, False):
        for kind in ("scattered", "right", "all"):
            mask = make_mask(kind, 3, 10)
            x = torch.randn(3, 10, 4) if batch_first else torch.randn(10, 3, 4)
            for a, b in zip(compiled(x, mask, batch_first), roundtrip(x, mask, batch_first)):
                torch.testing.assert_close(a, b)
    x = torch.randn(7, 3, 4)
    torch.testing.assert_close(torch.compile(full, fullgraph=True, dynamic=True)(x), x * 2)
    # meta: no data, so the upper bound (every position real), as mask_to_indices' meta kernel
    packing = Packing.from_mask(torch.zeros(2, 5, dtype=torch.bool, device="meta"), batch_first=False)
    out = packing.unpack(packing.pack(torch.empty(5, 2, 8, device="meta")))
    assert out.shape == (5, 2, 8) and out.device.type == "meta"


def test_packing_to_and_bad_input():
    packing = Packing.from_mask(make_mask("scattered", 2, 3))
    moved = packing.to("meta")
    assert moved.indices.device.type == "meta" and moved.cu_seqlens.device.type == "meta"
    assert moved.max_seqlen == packing.max_seqlen and packing.indices.device.type == "cpu"
    with pytest.raises(ValueError, match=r"Packing.pack: x has shape \(3, 2, 4\), expected \(2, 3\)"):
        packing.pack(torch.randn(3, 2, 4))  # a seq-first tensor for a batch-first packing
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        Packing.from_mask(torch.zeros(2, 3))
