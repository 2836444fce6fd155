"""Dropout (optionally fused with the ReLU before it): public function, fakes and autograd.

On CPU the kernel is ``torch.ops.bertkern.dropout_fwd`` / ``dropout_bwd`` (csrc/cpu/dropout.cpp):
one pass, the mask hashed from the element index with Philox and never stored. On other
devices ``F.dropout`` (torch's fused CUDA kernel) and ``F.relu``. This is the one place that
picks the kernel for a device: bertkern's layers call :func:`dropout` (``nn._fused.call_dropout``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bertkern.errors import kernel_call

__all__ = ["dropout"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _seed(p: float) -> torch.Tensor | None:
    """A Philox seed from torch's CPU generator, so torch.manual_seed reproduces a run."""
    return None if p == 0.0 else torch.randint(0, 2**62, (1,), dtype=torch.int64)


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, relu: bool = False) -> torch.Tensor:
    """``F.dropout(F.relu(x) if relu else x, p, training)`` in one pass.

    x: any shape, float32 / float64 / float16 / bfloat16. p in [0, 1]. Returns a tensor shaped
    like x. Kept elements are scaled by 1 / (1 - p). On CPU the mask comes from Philox
    (seeded from torch's CPU generator: ``torch.manual_seed`` reproduces it; it matches
    ``F.dropout`` in distribution, not bit for bit); the backward is deterministic.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dropout: x must be a Tensor, got {type(x).__name__}")
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be a number in [0, 1], got {p!r}")
    p = float(p) if training else 0.0
    if p == 0.0 and not relu:
        return x
    if x.device.type != "cpu" or x.dtype not in _DTYPES or p == 1.0:
        return F.dropout(F.relu(x) if relu else x, p, training)
    return kernel_call(torch.ops.bertkern.dropout_fwd, x, p, _seed(p), relu)


@torch.library.register_fake("bertkern::dropout_fwd")
def _dropout_fwd_fake(x, p, seed, relu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bertkern::dropout_bwd")
def _dropout_bwd_fake(grad, y, p, seed, relu):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, p, seed, relu = inputs
    ctx.p, ctx.relu = p, relu
    # relu: the mask is read off the output (y > 0); plain dropout regenerates it from the seed.
    ctx.save_for_backward(output if relu else None, seed)


def _backward(ctx, grad):
    y, seed = ctx.saved_tensors
    dx = kernel_call(torch.ops.bertkern.dropout_bwd, grad, y, ctx.p, seed, ctx.relu)
    return dx, None, None, None


torch.library.register_autograd("bertkern::dropout_fwd", _backward, setup_context=_setup_context)
