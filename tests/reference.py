"""Pure-PyTorch fp32/fp64 references for every bertkern op, and the tolerance table per dtype.

Tests compare bertkern against these; nothing here calls bertkern.
"""
import torch

# One tolerance table per dtype, for outputs compared against the fp32 reference after the
# reference is rounded to the test dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tolerances(dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    return dict(atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm(x + residual) over the last dim, computed in fp64 (or fp32 for speed).

    Returns (y, z, mean, rstd) with z = x + residual rounded to x.dtype, as an unfused
    `x + residual` would round it; y in x.dtype; mean and rstd in float32 (float64 for float64).
    """
    z = x if residual is None else (x + residual)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    zc = z.to(compute)
    mean = zc.mean(-1)
    var = (zc - mean.unsqueeze(-1)).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (zc - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y.to(x.dtype), z, mean.to(stat), rstd.to(stat)


def layer_norm_bwd_ref(dy, z, weight=None, has_bias=False, eps=1e-5, dresidual_out=None):
    """Gradients (dz, dweight, dbias) of y = LN(z) * weight + bias, by autograd in fp64."""
    zc = z.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True) if weight is not None else None
    b = torch.zeros(z.shape[-1], dtype=torch.float64, requires_grad=True) if has_bias else None
    y = torch.nn.functional.layer_norm(zc, zc.shape[-1:], w, b, eps)
    y.backward(dy.double())
    dz = zc.grad
    if dresidual_out is not None:
        dz = dz + dresidual_out.double()
    dw = w.grad.to(z.dtype) if w is not None else None
    db = b.grad.to(z.dtype) if b is not None else None
    return dz.to(z.dtype), dw, db
