"""bertkern.ops.layer_norm and bertkern.LayerNorm against the fp32/fp64 reference (CPU path,
and the CUDA path when a GPU is present)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bertkern
from bertkern.ops import layer_norm
from tests.devices import devices
from tests.reference import layer_norm_bwd_ref, layer_norm_ref, tolerances

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 1), (3, 1), (5, 7), (4, 768), (3, 1023), (2, 8192), (0, 768), (2, 3, 96)]


def make_inputs(shape, dtype, device="cpu", residual=True, weight=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    x = mk(*shape) * 2 + 0.5
    r = mk(*shape) if residual else None
    w = (1 + 0.3 * mk(n)) if weight else None
    b = 0.2 * mk(n) if bias else None
    return x, r, w, b


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_forward_matches_reference(device, dtype, shape, residual):
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 is CPU-only")
    x, r, w, b = make_inputs(shape, dtype, device, residual=residual)
    y, z = layer_norm(x, w, b, eps=1e-5, residual=r, return_residual=True)
    y_ref, z_ref, _, _ = layer_norm_ref(x.cpu(), w.cpu(), b.cpu(), 1e-5, None if r is None else r.cpu())
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(z.cpu(), z_ref, atol=0, rtol=0)  # z rounds exactly as x + r does
    torch.testing.assert_close(y.cpu(), y_ref, **tolerances(dtype))


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_forward_optional_affine(weight, bias):
    x, r, w, b = make_inputs((6, 33), torch.float32, residual=True, weight=weight, bias=bias)
    y = layer_norm(x, w, b, residual=r)
    torch.testing.assert_close(y, layer_norm_ref(x, w, b, 1e-5, r)[0], **tolerances(torch.float32))


def test_statistics_are_fp32_and_robust():
    # A large mean with a small spread: sum / sum-of-squares formulas lose every digit here.
    g = torch.Generator().manual_seed(1)
    x = (1000 + 0.01 * torch.randn(8, 768, generator=g)).to(torch.float16)
    y, _, mean, rstd = torch.ops.bertkern.layer_norm_fwd(x, None, None, None, 1e-5, False)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32 and mean.shape == (8,)
    y_ref, _, mean_ref, rstd_ref = layer_norm_ref(x)
    torch.testing.assert_close(mean, mean_ref, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(rstd, rstd_ref, atol=0, rtol=1e-3)
    torch.testing.assert_close(y, y_ref, **tolerances(torch.float16))


def test_constant_rows_give_finite_output():
    x = torch.zeros(3, 64)
    w, b = torch.ones(64), torch.full((64,), 0.5)
    y = layer_norm(x, w, b)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, b.expand(3, 64))


BACKWARD_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKWARD_SHAPES = [(1, 1), (5, 7), (4, 768), (3, 1023), (2, 8192), (0, 16), (300, 64)]


def backward_and_reference(device, dtype, shape):
    """The kernel's gradients (dx, dresidual, dweight, dbias), both outputs carrying gradient,
    and the fp64 reference's (dz, dweight, dbias) rounded to dtype."""
    x, r, w, b = make_inputs(shape, dtype, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    x_, r_, w_, b_ = leaves
    y, z = layer_norm(x_, w_, b_, residual=r_, return_residual=True)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    dz_extra = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    torch.autograd.backward([y, z], [dy, dz_extra])
    refs = layer_norm_bwd_ref(dy.cpu(), (x + r).cpu(), w.cpu(), True, 1e-5, dz_extra.cpu())
    return tuple(t.grad.cpu() for t in leaves), refs


def assert_param_grad_close(got, ref, dtype, rows, name):
    """dweight / dbias are sums over the rows of terms of order 1 (dy * xhat, dy with dy, xhat
    ~ N(0, 1)). The kernel forms each term and accumulates in fp32, then rounds the sum once to
    dtype, so the error is (a) that final rounding, at most half an ulp relative: inside the
    table's rtol (fp16 2^-11 < 2e-3, bf16 2^-9 < 1.6e-2, fp32 2^-24 < 1e-5), and (b) the fp32
    errors of the terms and of the running sum, absolute, in units of a term's size: rows
    independent rounding errors of random sign add like a random walk, to about sqrt(rows)
    times one (2^-24 sqrt(rows), far below the table's atol at these sizes). The sum itself
    may cancel to near zero, where rtol gives nothing, so only atol scales, and by sqrt(rows),
    not by rows (a worst-case all-same-sign bound that, at (300, 64) in bf16, let a 10% error
    pass): table atol * sqrt(rows), table rtol. test_backward_tolerance_catches_a_10_percent_error
    proves a 1.1x gradient fails this very check."""
    tol = tolerances(dtype)
    torch.testing.assert_close(got, ref, atol=tol["atol"] * max(1, rows) ** 0.5, rtol=tol["rtol"],
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", BACKWARD_DTYPES)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
def test_backward_matches_reference(device, dtype, shape):
    (dx, dr, dw, db), (dz_ref, dw_ref, db_ref) = backward_and_reference(device, dtype, shape)
    tol = tolerances(dtype, scale=4)  # dz: a row's reductions (mean of dy * xhat) feed every element
    torch.testing.assert_close(dx, dz_ref, **tol)
    torch.testing.assert_close(dr, dz_ref, **tol)
    rows = shape[0] if len(shape) else 1
    assert_param_grad_close(dw, dw_ref, dtype, rows, "dweight")
    assert_param_grad_close(db, db_ref, dtype, rows, "dbias")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", BACKWARD_DTYPES)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
def test_backward_tolerance_catches_a_10_percent_error(device, dtype, shape):
    """The dweight / dbias check of test_backward_matches_reference has teeth: the kernel's
    gradient times 1.1 fails it, for every dtype and shape of that test. Where the exact gradient
    is zero (no rows; dweight with one column, where xhat = 0: the fp64 reference gives ~1e-14
    there), no scaling can show; there the kernel must return exact zeros instead."""
    (_, _, dw, db), (_, dw_ref, db_ref) = backward_and_reference(device, dtype, shape)
    rows = shape[0]
    for name, got, ref in (("dweight", dw, dw_ref), ("dbias", db, db_ref)):
        if ref.numel() == 0 or ref.double().abs().max().item() < 1e-10:
            assert rows == 0 or (name == "dweight" and shape[-1] == 1), f"{name} unexpectedly zero"
            assert torch.equal(got, torch.zeros_like(got)), f"{name}: exact gradient is 0, kernel gave {got}"
            continue
        assert_param_grad_close(got, ref, dtype, rows, name)  # the unscaled gradient passes
        with pytest.raises(AssertionError):
            assert_param_grad_close(got * 1.1, ref, dtype, rows, name)


def test_backward_without_residual_output_used():
    x, r, w, b = make_inputs((7, 40), torch.float32)
    x.requires_grad_(True)
    r.requires_grad_(True)
    layer_norm(x, w, b, residual=r).sum().backward()
    dz_ref, _, _ = layer_norm_bwd_ref(torch.ones(7, 40), x.detach() + r.detach(), w, True)
    torch.testing.assert_close(x.grad, dz_ref, **tolerances(torch.float32, 4))
    torch.testing.assert_close(r.grad, dz_ref, **tolerances(torch.float32, 4))


def test_non_contiguous_input():
    x, r, w, b = make_inputs((64, 48), torch.float32)
    xt, rt = x.t(), r.t()  # (48, 64), strided
    w, b = torch.linspace(0.5, 1.5, 64), torch.linspace(-1, 1, 64)
    y = layer_norm(xt, w, b, residual=rt)
    torch.testing.assert_close(y, layer_norm_ref(xt.contiguous(), w, b, 1e-5, rt.contiguous())[0])
    xs = x[:, ::2]  # every other column
    torch.testing.assert_close(layer_norm(xs), layer_norm_ref(xs.contiguous())[0])


@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_fp64(residual):
    x, r, w, b = make_inputs((3, 5, 7), torch.float64, residual=residual)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b) if t is not None]

    def fn(*ts):
        x_, *rest = ts
        r_ = rest.pop(0) if residual else None
        w_, b_ = rest
        out = layer_norm(x_, w_, b_, residual=r_, return_residual=True)
        return out[0], out[1] * 0.5  # both outputs carry gradient

    assert torch.autograd.gradcheck(fn, inputs)


def test_backward_is_deterministic():
    x, r, w, b = make_inputs((1000, 96), torch.float32)
    results = []
    for threads in (1, 2, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            w_ = w.clone().requires_grad_(True)
            b_ = b.clone().requires_grad_(True)
            x_ = x.clone().requires_grad_(True)
            layer_norm(x_, w_, b_, residual=r).pow(2).sum().backward()
            results.append((x_.grad, w_.grad, b_.grad))
        finally:
            torch.set_num_threads(prev)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def opcheck_samples():
    samples = []
    for dtype in (torch.float32, torch.float64):
        for shape, residual, weight, bias, store in [
            ((4, 8), True, True, True, True),
            ((2, 3, 16), False, True, False, False),
            ((5, 1), True, False, True, False),
            ((0, 8), True, True, True, True),
        ]:
            x, r, w, b = make_inputs(shape, dtype, residual=residual, weight=weight, bias=bias)
            for t in (x, r, w, b):
                if t is not None:
                    t.requires_grad_(True)
            samples.append((x, r, w, b, 1e-5, store))
    return samples


@pytest.mark.parametrize("sample", range(len(opcheck_samples())))
def test_opcheck_forward(sample):
    torch.library.opcheck(torch.ops.bertkern.layer_norm_fwd.default, opcheck_samples()[sample])


@pytest.mark.parametrize("dresidual", [False, True])
@pytest.mark.parametrize("weight", [False, True])
def test_opcheck_backward(dresidual, weight):
    x, _, w, _ = make_inputs((6, 24), torch.float32, residual=False, weight=weight)
    _, _, mean, rstd = torch.ops.bertkern.layer_norm_fwd(x, None, w, None, 1e-5, False)
    dy = torch.randn_like(x)
    dr = torch.randn_like(x) if dresidual else None
    torch.library.opcheck(torch.ops.bertkern.layer_norm_bwd.default, (dy, dr, x, mean, rstd, w, True))


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    n=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    residual=st.booleans(),
    weight=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(lead, n, dtype, residual, weight, bias, seed):
    x, r, w, b = make_inputs((*lead, n), dtype, residual=residual, weight=weight, bias=bias, seed=seed)
    y = layer_norm(x, w, b, residual=r)
    torch.testing.assert_close(y, layer_norm_ref(x, w, b, 1e-5, r)[0], **tolerances(dtype))


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.ones(2, 4, dtype=torch.int32)), TypeError, "x must be float"),
        (dict(weight=torch.ones(5)), ValueError, r"weight has shape \(5,\)"),
        (dict(bias=torch.ones(4, 1)), ValueError, r"bias has shape \(4, 1\)"),
        (dict(residual=torch.ones(2, 5)), ValueError, r"residual has shape \(2, 5\)"),
        (dict(weight=torch.ones(4, dtype=torch.float16)), TypeError, "weight has dtype torch.float16"),
        (dict(residual=torch.ones(2, 4, device="meta")), ValueError, "residual is on meta"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least 1 dimension"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    ],
)
def test_bad_input_raises_before_any_kernel(kwargs, exc, match):
    args = dict(x=torch.ones(2, 4), weight=None, bias=None, residual=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        layer_norm(**args)


def test_bad_input_direct_op_call():
    # The C++ operators check too, for callers that skip the wrapper: a RuntimeError (all the
    # stable ABI carries) whose message names the Python type (docs/api.md, "One build").
    x = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="^ValueError: layer_norm: weight"):
        torch.ops.bertkern.layer_norm_fwd(x, None, torch.ones(3), None, 1e-5, False)
    with pytest.raises(RuntimeError, match="^TypeError: layer_norm: residual"):
        torch.ops.bertkern.layer_norm_fwd(x, torch.ones(2, 4, dtype=torch.float64), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="^ValueError: layer_norm_bwd: mean"):
        torch.ops.bertkern.layer_norm_bwd(x, None, x, torch.zeros(3), torch.zeros(2), None, False)


# ---- int64 indexing --------------------------------------------------------------------------

def test_more_than_2_31_elements_uses_int64_indexing():
    # 2^31 + 2 * 1024 fp16 elements (4 GiB): offsets past 2^31 must not wrap. Only the last rows
    # carry data so the check stays cheap.
    n = 1024
    rows = 2**31 // n + 2
    x = torch.zeros(rows, n, dtype=torch.float16)
    tail = torch.randn(4, n, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    x[-4:] = tail
    w = torch.rand(n).to(torch.float16)
    y = layer_norm(x, w)
    torch.testing.assert_close(y[-4:], layer_norm_ref(tail, w)[0], **tolerances(torch.float16))
    assert torch.equal(y[0], torch.zeros(n, dtype=torch.float16))
    del x, y


# ---- nn.LayerNorm drop-in --------------------------------------------------------------------

@pytest.mark.parametrize("shape,kwargs", [
    ((768,), {}),
    ((33,), dict(eps=1e-12)),
    ((4, 6), {}),
    ((16,), dict(elementwise_affine=False)),
    ((16,), dict(bias=False)),
])
def test_module_is_a_drop_in(shape, kwargs):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(shape, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mod = bertkern.LayerNorm(shape, **kwargs)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(mod.state_dict(), strict=True)
    x = torch.randn(3, 5, *shape)
    r = torch.randn(3, 5, *shape)
    torch.testing.assert_close(mod(x), ref(x))
    y, z = mod(x, residual=r, return_residual=True)
    torch.testing.assert_close(z, x + r)
    torch.testing.assert_close(y, ref(x + r))
    if kwargs.get("elementwise_affine", True):
        mod(x, residual=r).square().sum().backward()
        ref(x + r).square().sum().backward()
        for (name, p), q in zip(mod.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_module_rejects_wrong_trailing_shape():
    with pytest.raises(ValueError, match="normalized_shape"):
        bertkern.LayerNorm(8)(torch.randn(2, 7))


def test_cpu_matches_f_layer_norm_in_fp32():
    x = torch.randn(64, 768)
    w, b = torch.randn(768), torch.randn(768)
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (768,), w, b))
