"""Fused (residual +) LayerNorm: public function, fake kernels and autograd.

The kernels are ``torch.ops.bertkern.layer_norm_fwd`` / ``layer_norm_bwd`` (C++ on CPU in
csrc/cpu/layer_norm.cpp, CUDA C++ in csrc/cuda/layer_norm.{cuh,cu}); their schemas are in
csrc/ops.cpp.
"""
from __future__ import annotations

import torch

from bertkern.errors import kernel_call


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_args(x, residual, weight, bias, eps):
    """Raise TypeError / ValueError naming the bad argument, before any kernel runs."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have at least 1 dimension, got a 0-d tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"layer_norm: x must be float32, float16, bfloat16 (or float64 on CPU), got {x.dtype}"
        )
    if x.dtype == torch.float64 and x.device.type != "cpu":
        raise TypeError(f"layer_norm: float64 is supported on CPU only (for gradcheck), x is on {x.device}")
    if eps < 0:
        raise ValueError(f"layer_norm: eps must be >= 0, got {eps}")
    n = x.shape[-1]
    for name, t, expected in (
        ("residual", residual, tuple(x.shape)),
        ("weight", weight, (n,)),
        ("bias", bias, (n,)),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"layer_norm: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
        if tuple(t.shape) != expected:
            raise ValueError(
                f"layer_norm: {name} has shape {tuple(t.shape)}, expected {expected}"
                + (" (x.shape)" if name == "residual" else " (x.shape[-1],)")
            )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    return_residual: bool = False,
):
    """LayerNorm over the last dimension of ``x + residual``, fused in one kernel.

    Args:
        x: (..., N) float32 / float16 / bfloat16 (float64 on CPU). Any leading dims, any
            strides (non-contiguous input is copied once).
        weight, bias: (N,) in x's dtype, or None.
        eps: added to the variance.
        residual: (..., N) like x, or None. z = x + residual is rounded to x's dtype, exactly as
            an unfused ``x + residual`` would be.
        return_residual: also return z (what a pre-LN block carries to the next layer).

    Returns:
        y = (z - mean(z)) / sqrt(var(z) + eps) * weight + bias, shaped like x; or (y, z) when
        return_residual. Statistics and accumulation are float32 (float64 for float64 input).
    """
    _check_args(x, residual, weight, bias, eps)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight, bias)
    )
    # z is materialized only when someone reads it: the caller, or the backward.
    store_residual = residual is not None and (return_residual or needs_grad)
    y, residual_out, _, _ = kernel_call(
        torch.ops.bertkern.layer_norm_fwd, x, residual, weight, bias, float(eps), store_residual
    )
    if not return_residual:
        return y
    return y, (x if residual is None else residual_out)


@torch.library.register_fake("bertkern::layer_norm_fwd")
def _layer_norm_fwd_fake(x, residual, weight, bias, eps, store_residual):
    _check_args(x, residual, weight, bias, eps)
    y = x.new_empty(x.shape)
    residual_out = x.new_empty(x.shape) if (residual is not None and store_residual) else x.new_empty((0,))
    stats = x.new_empty(x.shape[:-1], dtype=_stat_dtype(x.dtype))
    return y, residual_out, stats, torch.empty_like(stats)


@torch.library.register_fake("bertkern::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, dresidual_out, z, mean, rstd, weight, has_bias):
    _check_args(z, dy, weight, None, 0.0)
    n = z.shape[-1]
    dweight = z.new_empty((n,)) if weight is not None else z.new_empty((0,))
    dbias = z.new_empty((n,)) if has_bias else z.new_empty((0,))
    return z.new_empty(z.shape), dweight, dbias


def _setup_context(ctx, inputs, output):
    # Unused outputs (residual_out when the caller drops it, mean, rstd) get None gradients
    # instead of materialized zeros, which the backward would otherwise read.
    ctx.set_materialize_grads(False)
    x, residual, weight, bias, eps, store_residual = inputs
    _, residual_out, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.stored_residual = residual is not None and store_residual
    ctx.has_bias = bias is not None
    ctx.eps = eps
    if ctx.stored_residual:
        z_parts = (residual_out, None)
    elif residual is not None:
        z_parts = (x, residual)  # z is recomputed in backward: cheaper than keeping a copy
    else:
        z_parts = (x, None)
    ctx.save_for_backward(*z_parts, weight, mean, rstd)


def _backward(ctx, dy, dresidual_out, dmean, drstd):
    z_a, z_b, weight, mean, rstd = ctx.saved_tensors
    z = z_a if z_b is None else z_a + z_b
    if dy is None:
        dy = torch.zeros_like(z)
    if not ctx.stored_residual:
        dresidual_out = None
    dz, dweight, dbias = kernel_call(
        torch.ops.bertkern.layer_norm_bwd, dy, dresidual_out, z, mean, rstd, weight, ctx.has_bias
    )
    return (
        dz,
        dz if ctx.has_residual else None,
        dweight if weight is not None else None,
        dbias if ctx.has_bias else None,
        None,
        None,
    )


torch.library.register_autograd("bertkern::layer_norm_fwd", _backward, setup_context=_setup_context)
