"""The CUDA key-padding kernels (csrc/cuda/padding.cuh, launched as csrc/cuda/padding.cu does)
run on the CPU through the host emulation of the CUDA execution model (tests/emulation/), against
the pure-torch references of tests/reference.py (boolean indexing, cumsum, index_put), and under
ThreadSanitizer. No GPU and no bertkern import needed.
"""
import os

import pytest
import torch

from bertkern.errors import kernel_call  # the C++ checks' Python types, as bertkern's API raises them
from tests.emulation.loader import BUILD_ROOT, HERE as EMU_DIR
from tests.emulation.loader import load_emulated_ops
from tests.emulation.tsan import Tsan, assert_instrumented, tsan_probe
from tests.reference import pad_ref, unpad_ref

pytestmark = pytest.mark.emulated


@pytest.fixture(scope="module")
def ops():
    return load_emulated_ops()


def _random_mask(batch, seqlen, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, seqlen, generator=g) < p


def _right_padded(lengths, seqlen):
    return torch.arange(seqlen).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)


def _one_all_padded():
    mask = _random_mask(4, 33, 0.3, seed=2)
    mask[2] = True
    return mask


def _long_mixed():
    mask = _random_mask(3, 1000, 0.4, seed=3)  # S > 512: the scans loop over chunks
    mask[1] = _right_padded([700], 1000)[0]
    return mask


# key_padding_mask (True = padding) builders
MASKS = {
    "right_padded": lambda: _right_padded([16, 9, 1, 12], 16),
    "scattered": lambda: _random_mask(3, 37, 0.4, seed=1),  # padding inside sequences, S % 32 != 0
    "none_padded": lambda: torch.zeros(3, 40, dtype=torch.bool),
    "all_padded": lambda: torch.ones(2, 24, dtype=torch.bool),
    "one_all_padded": _one_all_padded,
    "B=0": lambda: torch.zeros(0, 16, dtype=torch.bool),
    "S=0": lambda: torch.zeros(3, 0, dtype=torch.bool),
    "S=1": lambda: torch.tensor([[True], [False], [False], [True], [False], [True]]),
    "S=1000": _long_mixed,
}


def _random_rows(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


def check_unpad_pad(ops, x, mask):
    """mask_to_indices + gather_rows + scatter_rows against unpad_ref / pad_ref, bit for bit."""
    batch, seqlen = mask.shape
    features = x.shape[2:]
    packed_ref, indices_ref, cu_ref, max_ref = unpad_ref(x, mask)
    indices, cu_seqlens, max_seqlen = ops.mask_to_indices(mask)
    assert indices.dtype == torch.int64 and indices.shape == indices_ref.shape
    assert torch.equal(indices, indices_ref)
    assert cu_seqlens.dtype == torch.int32 and torch.equal(cu_seqlens, cu_ref)
    assert isinstance(max_seqlen, int) and max_seqlen == max_ref

    packed = ops.gather_rows(x.reshape(batch * seqlen, *features), indices)
    assert packed.dtype == x.dtype and packed.shape == packed_ref.shape
    assert torch.equal(packed, packed_ref)
    gather_copy = ops._padding_last_row_copy()

    padded = ops.scatter_rows(packed, indices, batch * seqlen)
    assert padded.dtype == x.dtype and padded.shape == (batch * seqlen, *features)
    assert torch.equal(padded.reshape(x.shape), pad_ref(packed_ref, indices_ref, batch, seqlen))
    # round trip: the real tokens back in place, zeros at the padding
    keep = (~mask).reshape(batch, seqlen, *([1] * len(features)))
    assert torch.equal(padded.reshape(x.shape), torch.where(keep, x, torch.zeros((), dtype=x.dtype)))
    return gather_copy, ops._padding_last_row_copy()


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_to_indices_and_round_trip(ops, name):
    mask = MASKS[name]()
    batch, seqlen = mask.shape
    x = _random_rows((batch, seqlen, 8), torch.float32, seed=len(name))
    gather_copy, scatter_copy = check_unpad_pad(ops, x, mask)
    launched = int((~mask).sum()) > 0
    # 32-byte rows from fresh (aligned) allocations: 16-byte packs; no gather when T == 0, while
    # scatter writes every output row (the zeros too: there is no zero-fill pass)
    assert gather_copy[:2] == ([4, 4] if launched else [0, 0])
    assert scatter_copy[:2] == ([4, 4] if mask.numel() > 0 else [0, 0])
    if mask.numel() > 0:
        assert scatter_copy[4] == -(-mask.numel() // scatter_copy[3])  # a block per rows_y output rows


# (dtype, features, (unit bytes, VEC) padding.cu picks for the row)
ROW_LAYOUTS = [
    (torch.float32, (64,), (4, 4)),      # 256 B: 16-byte packs
    (torch.float32, (5,), (4, 1)),       # 20 B
    (torch.float32, (4, 8), (4, 4)),     # (H, D)
    (torch.float16, (3, 5), (2, 1)),     # 30 B
    (torch.float16, (2, 8), (4, 4)),     # 32 B
    (torch.bfloat16, (7,), (2, 1)),      # 14 B
    (torch.bool, (3,), (1, 1)),          # 3 B
    (torch.int8, (3,), (1, 1)),
    (torch.int8, (3, 5), (1, 1)),        # 15 B
    (torch.uint8, (1031,), (1, 1)),      # 1031 packs: 256 threads loop over the row
    (torch.int64, (2, 3), (4, 4)),       # 48 B
    (torch.int64, (1,), (4, 1)),         # 8 B
]


@pytest.mark.parametrize("dtype, features, unit_vec", ROW_LAYOUTS,
                         ids=[f"{str(d).split('.')[-1]}-{'x'.join(map(str, f))}" for d, f, _ in ROW_LAYOUTS])
def test_any_dtype_raw_row_copies(ops, dtype, features, unit_vec):
    mask = MASKS["scattered"]()
    x = _random_rows((*mask.shape, *features), dtype, seed=7)
    gather_copy, scatter_copy = check_unpad_pad(ops, x, mask)
    assert tuple(gather_copy[:2]) == unit_vec and tuple(scatter_copy[:2]) == unit_vec


def test_noncontiguous_inputs(ops):
    # the launcher makes every input contiguous first
    mask = MASKS["scattered"]().t().contiguous().t()  # a transposed view of a (S, B) tensor
    assert not mask.is_contiguous()
    indices, cu_seqlens, max_seqlen = ops.mask_to_indices(mask)
    _, indices_ref, cu_ref, max_ref = unpad_ref(torch.empty(*mask.shape, 1), mask)
    assert torch.equal(indices, indices_ref) and torch.equal(cu_seqlens, cu_ref) and max_seqlen == max_ref

    n_rows = mask.numel()
    x = _random_rows((6, n_rows), torch.float16, seed=4).t()  # (R, 6), column-major
    strided = torch.empty(2 * indices.numel(), dtype=torch.int64)[::2]
    strided.copy_(indices)
    assert not x.is_contiguous() and not strided.is_contiguous()
    packed = ops.gather_rows(x, strided)
    assert torch.equal(packed, x[indices])
    packed_t = packed.t().contiguous().t()
    assert not packed_t.is_contiguous()
    padded = ops.scatter_rows(packed_t, strided, n_rows)
    assert torch.equal(padded, pad_ref(packed, indices, n_rows, 1).reshape(n_rows, 6))


def test_not_16_byte_aligned_takes_the_word_path(ops):
    # 16-byte rows, but the tensors start one float past a 16-byte boundary: uint32, VEC = 1.
    mask = MASKS["right_padded"]()
    n_rows = mask.numel()
    buf = torch.empty(n_rows * 4 + 1)
    x = buf[1:].view(n_rows, 4)
    x.copy_(_random_rows((n_rows, 4), torch.float32, seed=5))
    assert x.data_ptr() % 16 != 0
    indices = unpad_ref(x.view(*mask.shape, 4), mask)[1]
    packed = ops.gather_rows(x, indices)
    assert ops._padding_last_row_copy()[:2] == [4, 1]
    assert torch.equal(packed, x[indices])
    packed_buf = torch.empty(packed.numel() + 1)
    packed_view = packed_buf[1:].view_as(packed)
    packed_view.copy_(packed)
    padded = ops.scatter_rows(packed_view, indices, n_rows)
    assert torch.equal(padded, pad_ref(packed, indices, n_rows, 1).reshape(n_rows, 4))


def test_narrow_path_needs_pointer_alignment(ops):
    buf = torch.arange(2 * 6 + 1, dtype=torch.float16)
    x = buf[1:].view(6, 2)  # 4-byte rows; data 2 bytes past a 4-byte boundary
    assert x.data_ptr() % 4 == 2
    indices = torch.tensor([5, 0, 3])
    assert torch.equal(ops.gather_rows(x, indices), x[indices])


def test_gather_from_zero_rows_checks_indices(ops):
    with pytest.raises(IndexError):
        kernel_call(ops.gather_rows, torch.empty(0, 4), torch.tensor([0, 0]))


def test_zero_width_rows(ops):
    mask = MASKS["scattered"]()
    indices, _, _ = ops.mask_to_indices(mask)
    for features in [(0,), (3, 0)]:
        x = torch.empty(mask.numel(), *features)
        packed = ops.gather_rows(x, indices)
        assert packed.shape == (indices.numel(), *features)
        assert ops.scatter_rows(packed, indices, mask.numel()).shape == (mask.numel(), *features)
        assert ops._padding_last_row_copy() == [0] * 5  # nothing to copy, no launch


def test_grid_stride_over_sequences_and_rows(ops):
    # With every grid capped at 2 blocks, each block scans several sequences (reusing its shared
    # scan scratch) and copies several row groups, as B > 65536 does on the GPU.
    mask = _random_mask(7, 70, 0.4, seed=6)
    mask[3] = True
    x = _random_rows((7, 70, 5), torch.int8, seed=6)
    previous = ops._set_padding_block_cap(2)
    try:
        check_unpad_pad(ops, x, mask)
        long_mask = MASKS["S=1000"]()
        check_unpad_pad(ops, _random_rows((*long_mask.shape, 3), torch.int8, seed=9), long_mask)
    finally:
        ops._set_padding_block_cap(previous)


def test_out_of_range_index_fails_the_device_side_check(ops):
    # padding.cu does not range-check indices on the host: the kernels' BERTKERN_DEVICE_CHECK
    # does (a trap on the GPU; the emulation's check raises after the launch).
    x = _random_rows((10, 6), torch.float32, seed=8)
    message = "device-side check failed: gather_rows: index out of range"
    with pytest.raises(IndexError, match=message) as failure:
        kernel_call(ops.gather_rows, x, torch.tensor([0, 10, 2]))
    assert "(i >= 0 && i < n_src) at " in str(failure.value)  # the kernel's own check
    assert "padding.cuh:" in str(failure.value)
    with pytest.raises(IndexError, match=message):
        kernel_call(ops.gather_rows, x, torch.tensor([-1]))
    message = "device-side check failed: scatter_rows: index out of range"
    with pytest.raises(IndexError, match=message):
        kernel_call(ops.scatter_rows, x[:3], torch.tensor([1, 10, 4]), 10)
    with pytest.raises(IndexError, match=message):
        kernel_call(ops.scatter_rows, x[:3, :3], torch.tensor([2, -5, 0]), 10)  # 12-byte rows
    with pytest.raises(IndexError, match=message):
        kernel_call(ops.scatter_rows, x[:1], torch.tensor([0]), 0)  # no rows to scatter into
    # the next launch is unaffected
    assert torch.equal(ops.gather_rows(x, torch.tensor([9, 0])), x[[9, 0]])


def test_argument_checks(ops):
    x = torch.randn(4, 3)
    idx = torch.tensor([0, 2])
    with pytest.raises(TypeError):
        kernel_call(ops.mask_to_indices, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError):
        kernel_call(ops.mask_to_indices, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(TypeError):
        kernel_call(ops.gather_rows, x, idx.int())
    with pytest.raises(ValueError):
        kernel_call(ops.gather_rows, x, idx.view(1, 2))
    with pytest.raises(ValueError):
        kernel_call(ops.gather_rows, torch.tensor(1.0), idx)
    with pytest.raises(ValueError):
        kernel_call(ops.scatter_rows, x[:2], idx, -1)
    with pytest.raises(ValueError):
        kernel_call(ops.scatter_rows, x[:3], idx, 4)


# ---- ThreadSanitizer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tsan_padding():
    build_dir = os.path.join(BUILD_ROOT, "tsan")
    os.makedirs(build_dir, exist_ok=True)
    tsan, reason = tsan_probe(build_dir)
    if tsan is None:
        pytest.skip(reason)
    binary = Tsan.finish(*tsan.build([os.path.join(EMU_DIR, "tsan_padding.cpp")], "tsan_padding"))
    assert_instrumented(binary)
    return tsan, binary


def test_tsan_padding_kernels_clean(tsan_padding):
    # Every mask kind, scan chunks, capped grids (blocks striding over sequences and rows),
    # every copy unit, and out-of-range indices (the device-side check path), under TSan.
    tsan, binary = tsan_padding
    rc, out, err = tsan.run(binary)
    assert "ThreadSanitizer" not in err, f"TSan report on the padding kernels:\n{err[-8000:]}"
    assert rc == 0, f"rc={rc}\n{out}\n{err[-4000:]}"
    lines = out.splitlines()
    assert lines[-1] == "PASSED: 0 failure(s)", out
    assert not any(line.startswith("FAIL") for line in lines), out
    assert sum(line.startswith("ok ") for line in lines) >= 14, out
    assert sum("device-side check failed" in line for line in lines) == 4, out
