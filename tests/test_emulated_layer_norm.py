"""The CUDA LayerNorm kernels (csrc/cuda/layer_norm.cuh) run on the CPU through the host emulation
of the CUDA execution model (tests/emulation/), against the references of tests/reference.py,
and under ThreadSanitizer. No GPU and no bertkern import needed.
"""
import os

import pytest
import torch

from bertkern.errors import kernel_call  # the C++ checks' Python types, as bertkern's API raises them
from tests.emulation.loader import BUILD_ROOT, HERE as EMU_DIR
from tests.emulation.loader import load_emulated_ops
from tests.emulation.tsan import TSAN_EXITCODE, Tsan, assert_instrumented, tsan_probe
from tests.reference import layer_norm_bwd_ref, layer_norm_ref, tolerances

pytestmark = pytest.mark.emulated

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


@pytest.fixture(scope="module")
def ops():
    return load_emulated_ops()


# (residual, weight, bias, store_residual, dresidual_out)
OPTIONS = {
    "plain": (False, False, False, False, False),
    "affine": (False, True, True, False, False),
    "residual_stored": (True, True, True, True, True),
    "residual_not_stored": (True, True, False, False, True),
    "bias_only_residual": (True, False, True, True, False),
}


def make_inputs(shape, dtype, residual, weight, bias, dresidual, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = (randn(*shape) + offset).to(dtype)
    res = randn(*shape).to(dtype) if residual else None
    w = (1 + 0.5 * randn(n)).to(dtype) if weight else None
    b = randn(n).to(dtype) if bias else None
    dy = randn(*shape).to(dtype)
    dres = randn(*shape).to(dtype) if dresidual else None
    return x, res, w, b, dy, dres


def check_fwd_bwd(ops, x, res, w, b, dy, dres, store_residual):
    """Run the emulated fwd and bwd and compare every output with tests/reference.py."""
    dtype = x.dtype
    tol = tolerances(dtype)
    y, res_out, mean, rstd = ops.layer_norm_fwd(x, res, w, b, EPS, store_residual)
    y_ref, z_ref, mean_ref, rstd_ref = layer_norm_ref(x, w, b, EPS, res)
    assert y.shape == x.shape and y.dtype == dtype
    assert mean.shape == x.shape[:-1] and rstd.shape == x.shape[:-1]
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(mean, mean_ref, **tolerances(torch.float32))
    torch.testing.assert_close(rstd, rstd_ref, **tolerances(torch.float32))
    if res is not None and store_residual:
        assert res_out.shape == x.shape
        assert torch.equal(res_out, z_ref), "residual_out must be x + residual rounded once"
    else:
        assert res_out.shape == (0,)

    z = res_out if (res is not None and store_residual) else z_ref
    has_bias = b is not None
    dz, dw, db = ops.layer_norm_bwd(dy, dres, z, mean, rstd, w, has_bias)
    dz_ref, dw_ref, db_ref = layer_norm_bwd_ref(dy, z, w, has_bias, EPS, dres)
    assert dz.shape == z.shape and dz.dtype == dtype
    torch.testing.assert_close(dz, dz_ref, **tol)
    if w is not None:
        torch.testing.assert_close(dw, dw_ref, **tol)
    else:
        assert dw.shape == (0,)
    if has_bias:
        torch.testing.assert_close(db, db_ref, **tol)
    else:
        assert db.shape == (0,)
    return (y, res_out, mean, rstd), (dz, dw, db)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("n", [1, 7, 768, 1023, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(ops, dtype, n, options):
    residual, weight, bias, store, dresidual = OPTIONS[options]
    m = 2 if n == 8192 else 5
    x, res, w, b, dy, dres = make_inputs((m, n), dtype, residual, weight, bias, dresidual, seed=n)
    check_fwd_bwd(ops, x, res, w, b, dy, dres, store)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_3d_and_noncontiguous(ops, dtype):
    n = 96
    g = torch.Generator().manual_seed(3)
    # x, residual and dy are transposed views, weight a strided view, bias contiguous.
    x = torch.randn(n, 3, 4, generator=g).to(dtype).permute(1, 2, 0)
    res = torch.randn(4, 3, n, generator=g).to(dtype).transpose(0, 1)
    dy = torch.randn(n, 3, 4, generator=g).to(dtype).permute(1, 2, 0)
    dres = torch.randn(3, 4, n, generator=g).to(dtype)
    w = torch.randn(2 * n, generator=g).to(dtype)[::2]
    b = torch.randn(n, generator=g).to(dtype)
    assert not x.is_contiguous() and not res.is_contiguous() and not w.is_contiguous()
    (y, res_out, mean, rstd), (dz, dw, db) = check_fwd_bwd(ops, x, res, w, b, dy, dres, True)
    assert y.shape == (3, 4, n) and mean.shape == (3, 4) and dz.shape == (3, 4, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_pointers_take_the_scalar_path(ops, dtype):
    # N % VEC == 0 but every tensor starts one element past a 16-byte boundary: VEC = 1.
    m, n = 4, 256

    def misaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        assert out.data_ptr() % 16 != 0
        return out

    x, res, w, b, dy, dres = make_inputs((m, n), dtype, True, True, True, True, seed=11)
    x, res, w, b, dy, dres = map(misaligned, (x, res, w, b, dy, dres))
    check_fwd_bwd(ops, x, res, w, b, dy, dres, True)


def test_rows_far_from_zero(ops):
    # Rows with mean 1000 and spread 1: the variance from (z - mean) in registers (the loop
    # path: a Welford merge) keeps it (a float32 sum / sum-of-squares formula is ~6% off in
    # rstd here). Against a float64 reference; the
    # remaining y error is float32 rounding of z - mean, as in torch's own float32 layer_norm.
    x, _, w, b, _, _ = make_inputs((4, 768), torch.float32, False, True, True, False, seed=2,
                                   offset=1000.0)
    y, _, mean, rstd = ops.layer_norm_fwd(x, None, w, b, EPS, False)
    y_ref, _, mean_ref, rstd_ref = layer_norm_ref(x.double(), w.double(), b.double(), EPS)
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-3)


def test_grid_stride_over_rows(ops):
    # With the grid capped at 1 block, the block normalizes several groups of rows and reuses its
    # shared scratch arrays, as a large M does on the GPU. Rows are independent and each is
    # reduced in a fixed order, so y, the statistics and dz are bitwise those of the full grid;
    # dweight / dbias are summed over other partial rows (another fixed order): close, not equal.
    x, res, w, b, dy, dres = make_inputs((10, 200), torch.float32, True, True, True, True, seed=5)
    full = check_fwd_bwd(ops, x, res, w, b, dy, dres, True)
    previous = ops._set_row_block_cap(1)
    try:
        capped = check_fwd_bwd(ops, x, res, w, b, dy, dres, True)
        assert ops._layer_norm_last_plan(False)[4:6] == [4, 1]  # 3 groups of 4 rows, one block
        assert ops._layer_norm_last_plan(True)[4:6] == [8, 1]  # 2 groups of 8 rows
    finally:
        ops._set_row_block_cap(previous)
    for a, c in zip(full[0] + full[1][:1], capped[0] + capped[1][:1]):
        assert torch.equal(a, c)
    for a, c in zip(full[1][1:], capped[1][1:]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# Shape classes of the launch plans (csrc/cuda/layer_norm_launch.cuh), as
# (dtype, M, N, misaligned, row block cap) -> expected forward and backward plans
# [registers, vec, iters, threads_x, rows_y] (plus the block count where it matters).
SHAPE_CLASSES = {
    # several rows a block (a warp, or 64 threads, a row), the last group of rows partly empty
    "rows_fp16_768": (torch.float16, 13, 768, False, 0, [1, 8, 3, 32, 4], [1, 8, 2, 64, 4]),
    "rows_fp32_768": (torch.float32, 9, 768, False, 0, [1, 4, 6, 32, 4], [1, 4, 3, 64, 4]),
    "rows_fp16_768_strided": (torch.float16, 11, 768, False, 1, [1, 8, 3, 32, 4], [1, 8, 2, 64, 4]),
    # N % VEC != 0: unvectorized register path (64 threads a row; bwd a block per row)
    "odd_n_bf16_1023": (torch.bfloat16, 3, 1023, False, 0, [1, 1, 16, 64, 2], [1, 1, 8, 128, 1]),
    "small_odd_n_fp32_7": (torch.float32, 11, 7, False, 0, [1, 1, 1, 32, 4], [1, 1, 1, 32, 8]),
    # a block per row; N not a multiple of threads * VEC (idle packs in the last iteration)
    "block_row_fp16_3000": (torch.float16, 3, 3000, False, 0, [1, 8, 3, 128, 1], [1, 8, 2, 192, 1]),
    "block_row_fp32_2000_strided": (torch.float32, 7, 2000, False, 2, [1, 4, 4, 128, 1], [1, 4, 4, 128, 1]),
    "block_row_fp32_1030": (torch.float32, 2, 1030, False, 0, [1, 1, 16, 96, 1], [1, 1, 8, 160, 1]),
    "block_row_misaligned_fp16_4096": (torch.float16, 2, 4096, True, 0, [1, 1, 16, 256, 1], [1, 1, 8, 512, 1]),
    # the loop path: rows longer than the registers of 512 threads hold
    "loop_bwd_fp32_12000": (torch.float32, 2, 12000, False, 0, [1, 4, 8, 384, 1], [0, 4, 0, 512, 1]),
    "loop_fp16_32776": (torch.float16, 2, 32776, False, 0, [0, 8, 0, 512, 1], [0, 8, 0, 512, 1]),
    "loop_fp32_16385": (torch.float32, 2, 16385, False, 0, [0, 1, 0, 512, 1], [0, 1, 0, 512, 1]),
}


def misaligned(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("name", list(SHAPE_CLASSES))
def test_shape_classes(ops, name):
    dtype, m, n, misalign, cap, fwd_plan, bwd_plan = SHAPE_CLASSES[name]
    x, res, w, b, dy, dres = make_inputs((m, n), dtype, True, True, True, True, seed=m + n)
    if misalign:
        x, res, w, b, dy, dres = map(misaligned, (x, res, w, b, dy, dres))
    previous = ops._set_row_block_cap(cap)
    try:
        check_fwd_bwd(ops, x, res, w, b, dy, dres, True)
        assert ops._layer_norm_last_plan(False)[:5] == fwd_plan
        assert ops._layer_norm_last_plan(True)[:5] == bwd_plan
    finally:
        ops._set_row_block_cap(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dweight_dbias_over_many_partial_rows(ops, dtype):
    # M = 2000, N = 40: 250 blocks of 8 warps, each writing a partial row of dweight / dbias
    # that the reduce kernel sums in a fixed order; then with 7 blocks striding over the rows
    # (each warp summing ~36 rows in registers before the in-block fold).
    x, res, w, b, dy, dres = make_inputs((2000, 40), dtype, False, True, True, False, seed=21)
    check_fwd_bwd(ops, x, res, w, b, dy, dres, False)
    plan = ops._layer_norm_last_plan(True)
    assert plan[:7] == [1, 8 if dtype != torch.float32 else 4, 1, 32, 8, 250, 250]
    assert plan[7] == 2  # the row kernel and the partial-row reduction: no zero-fill launches
    previous = ops._set_row_block_cap(7)
    try:
        check_fwd_bwd(ops, x, res, w, b, dy, dres, False)
        assert ops._layer_norm_last_plan(True)[5:7] == [7, 7]
    finally:
        ops._set_row_block_cap(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_grid_capped_by_rows_per_block(ops, dtype):
    # M = 600, N = 2048: a block per row, 600 rows, but the backward grid is clamp(ceil(M / 8),
    # 128, 256) = 128 blocks (each owns >= 4 rows, so the partial rows stay few), striding over
    # the rows with the real cap (no test cap); dweight / dbias from 128 partial rows.
    x, res, w, b, dy, dres = make_inputs((600, 2048), dtype, False, True, True, False, seed=17)
    check_fwd_bwd(ops, x, res, w, b, dy, dres, False)
    vec, iters = (4, 4) if dtype == torch.float32 else (8, 2)
    assert ops._layer_norm_last_plan(True)[:7] == [1, vec, iters, 128, 1, 128, 128]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dweight_dbias_over_several_row_chunks(ops, dtype):
    # M = 300, N = 40: 38 blocks (8 rows each) write partial rows of dweight / dbias.
    x, res, w, b, dy, dres = make_inputs((300, 40), dtype, False, True, True, False, seed=9)
    check_fwd_bwd(ops, x, res, w, b, dy, dres, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_rows(ops, dtype):
    for shape in [(0, 64), (2, 0, 64)]:
        x = torch.randn(shape).to(dtype)
        w = torch.randn(64).to(dtype)
        b = torch.randn(64).to(dtype)
        y, res_out, mean, rstd = ops.layer_norm_fwd(x, x.clone(), w, b, EPS, True)
        assert y.shape == shape and res_out.shape == shape
        assert mean.shape == shape[:-1] and rstd.shape == shape[:-1]
        dz, dw, db = ops.layer_norm_bwd(x, None, x, mean, rstd, w, True)
        assert dz.shape == shape
        assert torch.equal(dw, torch.zeros(64, dtype=dtype))
        assert torch.equal(db, torch.zeros(64, dtype=dtype))
        dz, dw, db = ops.layer_norm_bwd(x, None, x, mean, rstd, None, False)
        assert dw.shape == (0,) and db.shape == (0,)


def test_zero_columns(ops):
    x = torch.randn(3, 0)
    y, res_out, mean, rstd = ops.layer_norm_fwd(x, None, None, None, EPS, False)
    assert y.shape == (3, 0) and res_out.shape == (0,)
    assert torch.equal(mean, torch.zeros(3))
    torch.testing.assert_close(rstd, torch.full((3,), EPS ** -0.5))
    dz, dw, db = ops.layer_norm_bwd(x, None, x, mean, rstd, torch.randn(0), True)
    assert dz.shape == (3, 0) and dw.shape == (0,) and db.shape == (0,)


@pytest.mark.parametrize("shape", [(200, 96), (3000, 40), (40, 2000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic(ops, dtype, shape):
    # Thread scheduling differs from run to run; every sum has a fixed order (the partial rows
    # of dweight / dbias belong to fixed blocks, reduced in block order), so the bits don't.
    x, res, w, b, dy, dres = make_inputs(shape, dtype, True, True, True, True, seed=17)
    fwd1 = ops.layer_norm_fwd(x, res, w, b, EPS, True)
    fwd2 = ops.layer_norm_fwd(x, res, w, b, EPS, True)
    for a, c in zip(fwd1, fwd2):
        assert torch.equal(a, c)
    _, z, mean, rstd = fwd1
    bwd1 = ops.layer_norm_bwd(dy, dres, z, mean, rstd, w, True)
    bwd2 = ops.layer_norm_bwd(dy, dres, z, mean, rstd, w, True)
    assert ops._layer_norm_last_plan(True)[6] > 1  # several partial rows
    for a, c in zip(bwd1, bwd2):
        assert torch.equal(a, c)


def test_argument_checks(ops):
    x = torch.randn(2, 8)
    with pytest.raises(TypeError):
        kernel_call(ops.layer_norm_fwd, x.double(), None, None, None, EPS, False)
    with pytest.raises(TypeError):
        kernel_call(ops.layer_norm_fwd, x, None, torch.randn(8, dtype=torch.float16), None, EPS, False)
    with pytest.raises(ValueError):
        kernel_call(ops.layer_norm_fwd, x, None, torch.randn(7), None, EPS, False)
    with pytest.raises(ValueError):
        kernel_call(ops.layer_norm_fwd, x, torch.randn(2, 7), None, None, EPS, False)
    y, _, mean, rstd = ops.layer_norm_fwd(x, None, None, None, EPS, False)
    with pytest.raises(ValueError):
        kernel_call(ops.layer_norm_bwd, x, None, x, mean[:1], rstd, None, False)


# ---- ThreadSanitizer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tsan_binaries():
    build_dir = os.path.join(BUILD_ROOT, "tsan")
    os.makedirs(build_dir, exist_ok=True)
    tsan, reason = tsan_probe(build_dir)
    if tsan is None:
        pytest.skip(reason)
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    # Build both in parallel (one per core on a 2-core machine).
    jobs = [
        tsan.build([os.path.join(EMU_DIR, "tsan_layer_norm.cpp")], "tsan_layer_norm", [f"-I{torch_include}"]),
        tsan.build([os.path.join(EMU_DIR, "tsan_planted_race.cpp")], "tsan_planted_race"),
        tsan.build([os.path.join(EMU_DIR, "emu_selftest.cpp")], "emu_selftest"),
    ]
    binaries = [Tsan.finish(proc, out) for proc, out in jobs]
    for binary in binaries:
        assert_instrumented(binary)
    return (tsan, *binaries)


def test_tsan_layer_norm_kernels_clean(tsan_binaries):
    tsan, main_bin, _, _ = tsan_binaries
    rc, out, err = tsan.run(main_bin)
    assert "ThreadSanitizer" not in err, f"TSan report on the LayerNorm kernels:\n{err[-8000:]}"
    assert rc == 0, f"rc={rc}\n{out}\n{err[-4000:]}"
    lines = out.splitlines()
    assert lines[-1] == "PASSED: 0 failure(s)", out
    assert not any(line.startswith("FAIL") for line in lines), out
    assert sum(line.startswith("ok ") for line in lines) >= 25, out


def test_tsan_planted_race_clean_with_barriers(tsan_binaries):
    tsan, _, race_bin, _ = tsan_binaries
    rc, out, err = tsan.run(race_bin, "all")
    assert "ThreadSanitizer" not in err, err[-8000:]
    assert rc == 0, f"rc={rc}\n{out}\n{err[-4000:]}"
    assert "checked: 0 wrong rows" in out, out


@pytest.mark.parametrize("variant", ["missing_after_write", "missing_before_reuse"])
def test_tsan_reports_planted_race(tsan_binaries, variant):
    tsan, _, race_bin, _ = tsan_binaries
    rc, out, err = tsan.run(race_bin, variant)
    assert "FATAL" not in err, err[-4000:]
    assert "unchecked:" in out, f"the kernel did not run to the end:\n{out}\n{err[-4000:]}"
    assert "WARNING: ThreadSanitizer: data race" in err, f"rc={rc}, TSan missed the race:\n{err[-4000:]}"
    assert "planted_race.cuh" in err, err[-4000:]
    assert rc == TSAN_EXITCODE, rc


def test_emulation_selftest(tsan_binaries):
    # Shuffle semantics (xor / up / down / idx, widths), index mapping, early exit, under TSan.
    tsan, _, _, selftest_bin = tsan_binaries
    rc, out, err = tsan.run(selftest_bin)
    assert "ThreadSanitizer" not in err, err[-8000:]
    assert rc == 0 and out.splitlines()[-1] == "PASSED: 0 failure(s)", f"rc={rc}\n{out}\n{err[-4000:]}"


@pytest.mark.parametrize(
    "misuse, message",
    [
        ("divergent_syncthreads", "divergent __syncthreads"),
        ("shuffle_exited_lane", "has exited"),
        ("shuffle_with_exited_lanes", "has exited"),
        ("partial_warp_shuffle", "which has only 16 threads"),
        ("partial_mask", "only the full mask"),
        ("hang", "did not finish in 1 s"),
    ],
)
def test_emulation_refuses_misuse(tsan_binaries, misuse, message):
    # What is undefined behaviour (or a hang) on the GPU is a fatal error in the emulation.
    tsan, _, _, selftest_bin = tsan_binaries
    env = {"CUDA_HOST_EMU_TIMEOUT_S": "1" if misuse == "hang" else "120"}
    rc, out, err = tsan.run(selftest_bin, misuse, env=env)
    assert "was not caught" not in out, out
    assert rc != 0, f"{misuse}: rc=0\n{out}\n{err[-4000:]}"
    assert "cuda_host_emu: fatal: " in err and message in err, err[-4000:]


def test_emulation_rejects_invalid_launch_configuration(tsan_binaries):
    tsan, _, _, selftest_bin = tsan_binaries
    rc, out, err = tsan.run(selftest_bin, "bad_config")
    assert rc == 0 and "PASSED bad_config" in out, f"rc={rc}\n{out}\n{err[-4000:]}"
