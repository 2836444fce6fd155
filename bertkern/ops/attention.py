"""Fused scaled-dot-product attention on packed (varlen) or padded tokens.

One operator, ``torch.ops.bertkern.attention_fwd`` / ``attention_bwd`` (schemas in csrc/ops.cpp),
with one kernel per device: the C++ kernels of csrc/cpu/attention.cpp on the CPU, the Triton
kernels of bertkern/kernels/attention.py on CUDA (launched by bertkern/ops/attention_triton.py,
registered below). Its fake, its autograd and, under torch.compile on CUDA, its decomposition
into the Triton launches are registered in this file. Each kernel checks its own arguments
before it runs; the functions here check only what the operator does not see (the layout, the
mask, the backend).

``backend``: "auto" (the device's kernel), "cpu" (CPU tensors), "triton" (CUDA tensors; CPU
tensors only when TRITON_INTERPRET=1 was set before triton was imported, how the Triton kernels
are tested without a GPU: the Triton launchers then become the operator's CPU kernel for the
process, until a call with backend="cpu").

Mask convention (torch's): ``key_padding_mask[b, s] = True`` means padding.
"""
from __future__ import annotations

import math
import os

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from bertkern.errors import kernel_call
from bertkern.ops.padding import Packing

_BACKENDS = ("auto", "triton", "cpu")


def _triton():
    """The Triton launchers; imported on first use, so that ``import bertkern`` stays light and
    TRITON_INTERPRET can still be set by the caller. torch's CPU builds ship without Triton:
    asking for it there is an ImportError that says so."""
    try:
        from bertkern.ops import attention_triton
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ImportError("attention: the Triton kernels need the triton package, which this "
                          "torch build does not include (CPU builds); use backend='auto' or 'cpu'") from e
    return attention_triton


def _check_tensors(**tensors):
    # The dispatcher would reject a non-tensor with a RuntimeError; torch raises TypeError.
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")


def _select_kernel(backend, q):
    if backend not in _BACKENDS:
        raise ValueError(f"attention: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton":
        _triton().check_triton_head_dim("attention", q.shape[-1])
    if backend == "auto" or q.device.type != "cpu":
        if backend == "cpu":
            raise ValueError(f"attention: backend='cpu' needs CPU tensors, got {q.device}")
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        _triton().use_on_cpu(backend == "triton")
    elif backend == "triton":
        raise RuntimeError(
            "attention: backend='triton' on CPU tensors runs only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported, or use backend='cpu'"
        )


def _dropout_seed(dropout_p, device):
    """A Philox seed drawn from torch's generator for the device (torch.manual_seed reproduces
    it); stays on the device, so drawing it never synchronizes."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, dropout_p=0.0, causal=False, scale=None, backend="auto"):
    """Attention on packed tokens: q, k, v (T, H, D), cu_seqlens (B+1,) int32. See attention()."""
    _check_tensors(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    _select_kernel(backend, q)
    if max_seqlen is None:  # one small read; pass max_seqlen (unpad returns it) to avoid it
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    if dropout_p == 1.0:  # every probability dropped: zeros, still connected to v, as F.dropout(p=1) is
        return v.mul(v.new_zeros(()))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = _dropout_seed(float(dropout_p), q.device)
    out, _ = kernel_call(torch.ops.bertkern.attention_fwd, q, k, v, cu_seqlens, max_seqlen, scale,
                         bool(causal), float(dropout_p), seed)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale [+ masks]) v, fused; no S x S matrix is ever stored.

    Layouts:
      * packed (varlen): q, k, v (T, H, D) with ``cu_seqlens`` int32 (B+1,) and ``max_seqlen``
        (the longest sequence; computed from cu_seqlens, with one device read, when None).
      * padded: q, k, v (B, S, H, D) with an optional ``key_padding_mask`` (B, S) bool,
        True = padding; padding may be anywhere. Outputs at padded query positions are zero.

    ``scale`` defaults to 1/sqrt(D); ``causal`` masks keys after the query within each
    sequence; ``dropout_p`` drops attention probabilities (Philox, seeded from torch's
    generator for the device, so torch.manual_seed reproduces a run). A sequence of length 0,
    or all padding, gives zeros and zero gradients. Differentiable in q, k, v, with a
    deterministic backward. dtypes: float32, float16, bfloat16 (float64 with backend="cpu").
    ``backend``: "auto" (CUDA -> Triton, CPU -> C++), "triton", "cpu".
    """
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("attention: pass cu_seqlens (packed layout) or key_padding_mask (padded), not both")
        return attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p, causal=causal,
                                scale=scale, backend=backend)
    if max_seqlen is not None:
        raise ValueError("attention: max_seqlen goes with cu_seqlens (packed layout)")
    _check_tensors(q=q, k=k, v=v)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q, k, v have shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}; expected one (B, S, H, D), or (T, H, D) with cu_seqlens")
    batch, seqlen = q.shape[:2]
    if key_padding_mask is None:
        packing = Packing.full(batch, seqlen, device=q.device)
    elif key_padding_mask.shape != (batch, seqlen):
        raise ValueError(f"attention: key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                         f"expected (B, S) = {(batch, seqlen)}")
    else:
        packing = Packing.from_mask(key_padding_mask)
    out = attention_varlen(packing.pack(q), packing.pack(k), packing.pack(v), packing.cu_seqlens,
                           packing.max_seqlen, dropout_p=dropout_p, causal=causal, scale=scale,
                           backend=backend)
    return packing.unpack(out)


# ---- the operator: CUDA kernel, fake, torch.compile decomposition, autograd ----------------------
# The CPU kernel is registered in C++ (csrc/cpu/attention.cpp); the CUDA kernel is the Triton
# launcher, imported on first use.

@torch.library.register_kernel("bertkern::attention_fwd", "cuda")
def _attention_fwd_cuda(*args):
    return _triton().attention_fwd(*args)


@torch.library.register_kernel("bertkern::attention_bwd", "cuda")
def _attention_bwd_cuda(*args):
    return _triton().attention_bwd(*args)


@torch.library.register_fake("bertkern::attention_fwd")
def _attention_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.register_fake("bertkern::attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.register_fake("bertkern::_philox_words")
def _philox_words_fake(seed, offsets):
    return offsets.new_empty((*offsets.shape, 4))  # the 4 words of each counter, int32 bits


def _functionalize(mode, op, types, args, kwargs):
    """torch.compile (AOTAutograd) on CUDA tensors traces into the Triton launches, as
    torch.library.triton_op does, so Inductor sees the kernels. Elsewhere (CPU, the interpreter,
    torch.export, which keeps custom ops whole) the operator stays opaque."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    q = args[0] if op._opname == "attention_fwd" else args[1]
    if (q.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and not custom_triton_ops_decomposition_disabled()):
        with mode:
            return getattr(_triton(), op._opname)(*args, **kwargs)
    return mode.__torch_dispatch__(op, types, args, kwargs)


for _name in ("attention_fwd", "attention_bwd"):
    torch.library.register_torch_dispatch(f"bertkern::{_name}", FunctionalTensorMode, _functionalize)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.args = (max_seqlen, scale, causal, dropout_p)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, dropout_seed)
    # lse is a by-product for the backward; gradients through it are not supported.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, dropout_seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = kernel_call(torch.ops.bertkern.attention_bwd, dout, q, k, v, out, lse, cu_seqlens,
                             *ctx.args, dropout_seed)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("bertkern::attention_fwd", _backward, setup_context=_setup_context)
