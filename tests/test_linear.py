"""bertkern.ops.linear (the encoder's GEMMs: oneDNN on AMD CPUs for float32, else F.linear) against an fp64 reference."""
import pytest
import torch
import torch.nn.functional as F

import bertkern
import importlib

linear_mod = importlib.import_module("bertkern.ops.linear")  # the module (bertkern.ops.linear is the function)

needs_onednn = pytest.mark.skipif(not linear_mod._ONEDNN_AVAILABLE, reason="torch built without oneDNN")


@pytest.fixture(params=["onednn", "torch"])
def cpu_gemm(request):
    """Runs the test on each CPU GEMM route (whatever "auto" picks on this machine)."""
    if request.param == "onednn" and not linear_mod._ONEDNN_AVAILABLE:
        pytest.skip("torch built without oneDNN")
    saved = linear_mod.onednn_linear_enabled()
    linear_mod.set_cpu_gemm(request.param)
    yield request.param
    linear_mod.set_cpu_gemm("onednn" if saved else "torch")


def ref_linear(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (64, 96, 288), (33, 768, 3072), (0, 8, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_fp64(cpu_gemm, shape, bias):
    t, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True) if bias else None
    dy = torch.randn(t, n, generator=g)
    y = bertkern.ops.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (t, n)
    tol = dict(rtol=1e-5, atol=1e-5 * max(k, 1) ** 0.5)
    torch.testing.assert_close(y.double(), ref_linear(x, w, b), **tol)
    y.backward(dy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    ref_linear(xd, wd, bd).backward(dy.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5 * max(n, 1) ** 0.5)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-5 * max(t, 1) ** 0.5)
    if bias:
        torch.testing.assert_close(b.grad.double(), bd.grad, rtol=1e-5, atol=1e-5 * max(t, 1) ** 0.5)


@needs_onednn
def test_runs_on_onednn_and_can_be_switched_off():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    saved = linear_mod.onednn_linear_enabled()
    linear_mod.set_cpu_gemm("onednn")
    with torch.profiler.profile() as prof:
        bertkern.ops.linear(x, w)
    names = {e.name for e in prof.events()}
    assert "bertkern::linear" in names
    linear_mod.set_cpu_gemm("torch")
    try:
        assert not linear_mod.onednn_linear_enabled()
        with torch.profiler.profile() as prof:
            bertkern.ops.linear(x, w)
        assert "bertkern::linear" not in {e.name for e in prof.events()}
    finally:
        linear_mod.set_cpu_gemm("onednn" if saved else "torch")
    with pytest.raises(ValueError, match="onednn"):
        linear_mod.set_cpu_gemm("mkl")


@needs_onednn
@pytest.mark.parametrize("vendor,onednn", [("AuthenticAMD", True), ("GenuineIntel", False), ("", False)])
def test_auto_picks_onednn_on_amd_only(monkeypatch, vendor, onednn):
    saved = linear_mod.onednn_linear_enabled()
    monkeypatch.setattr(linear_mod, "cpu_vendor", lambda: vendor)
    try:
        linear_mod.set_cpu_gemm("auto")
        assert linear_mod.onednn_linear_enabled() is onednn
    finally:
        linear_mod.set_cpu_gemm("onednn" if saved else "torch")


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = linear_mod.cpu_vendor()
    assert isinstance(vendor, str)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "vendor_id" in text:
        assert vendor and vendor in text


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_and_nd_inputs_are_f_linear(dtype):
    x, w, b = torch.randn(2, 5, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype), torch.randn(3, dtype=dtype)
    torch.testing.assert_close(bertkern.ops.linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(bertkern.ops.linear(x[0], w, b), F.linear(x[0], w, b), rtol=0, atol=0)


def test_autocast_gives_the_autocast_dtype():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bertkern.ops.linear(x, w).dtype == torch.bfloat16


@needs_onednn
def test_opcheck():
    x, w, b = torch.randn(5, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True), torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.bertkern.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.bertkern.linear.default, (x, w, None))
    torch.library.opcheck(torch.ops.bertkern.linear_bwd.default, (torch.randn(5, 3), x.detach(), w.detach()))


def test_deterministic(cpu_gemm):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 256, generator=g, requires_grad=True)
    w = torch.randn(512, 256, generator=g, requires_grad=True)
    outs = []
    for _ in range(2):
        x.grad = w.grad = None
        y = bertkern.ops.linear(x, w)
        y.square().sum().backward()
        outs.append((y.detach().clone(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
