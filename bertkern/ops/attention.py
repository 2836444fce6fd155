"""Fused scaled-dot-product attention on packed (varlen) or padded tokens.

Backends:
  * "triton": the Triton kernels of bertkern/kernels/attention.py, through the operators
    ``bertkern::attention_triton_fwd/bwd`` (``torch.library.triton_op``, defined in
    bertkern/ops/attention_triton.py). CUDA tensors; CPU tensors only when TRITON_INTERPRET=1
    was set before triton was imported (how the kernels are tested without a GPU).
  * "cpu": the C++ kernels of csrc/cpu/attention.cpp, ``bertkern::attention_fwd/bwd``.
  * "auto": CUDA tensors -> "triton", CPU tensors -> "cpu".

Mask convention (torch's): ``key_padding_mask[b, s] = True`` means padding.
"""
from __future__ import annotations

import math
import os

import torch

from bertkern.ops.padding import pad, unpad

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "triton", "cpu")


def _triton_ops():
    """Import (once) the module that defines the Triton operators; triton is imported lazily so
    that ``import bertkern`` stays light and TRITON_INTERPRET can still be set by the caller."""
    from bertkern.ops import attention_triton  # noqa: F401

    return torch.ops.bertkern.attention_triton_fwd, torch.ops.bertkern.attention_triton_bwd


def _check_qkv(q, k, v, packed, backend):
    names = ("q", "k", "v")
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, S, H, D)"
    if q.dim() != (3 if packed else 4):
        raise ValueError(f"attention: q has shape {tuple(q.shape)}, expected {layout}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"attention: {name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype} but q has dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    allowed = _DTYPES + ((torch.float64,) if backend == "cpu" else ())
    if q.dtype not in allowed:
        raise TypeError(
            f"attention: q has dtype {q.dtype}; expected float32, float16 or bfloat16"
            + (" (float64 with backend='cpu')" if backend != "cpu" else " or float64")
        )
    head_dim = q.shape[-1]
    if backend == "triton" and (head_dim % 8 != 0 or not 8 <= head_dim <= 128):
        raise ValueError(f"attention: head dim {head_dim} unsupported by the Triton kernels; "
                         "expected a multiple of 8 up to 128")
    if head_dim == 0:
        raise ValueError("attention: head dim must be >= 1")


def _resolve_backend(backend, device):
    if backend not in _BACKENDS:
        raise ValueError(f"attention: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"attention: backend='cpu' needs CPU tensors, got {device}")
    return backend


def _require_runnable(backend, device):
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
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
    backend = _resolve_backend(backend, q.device)
    _check_qkv(q, k, v, True, backend)
    _require_runnable(backend, q.device)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError(
            f"attention: cu_seqlens must be a 1-D int32 tensor (B+1,), got "
            f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} of shape {tuple(getattr(cu_seqlens, 'shape', ()))}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if cu_seqlens.numel() < 1:
        raise ValueError("attention: cu_seqlens must have B+1 >= 1 entries")
    if max_seqlen is None:  # one small read; pass max_seqlen (unpad returns it) to avoid it
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p == 1.0:  # every probability dropped: zeros, still connected to v, as F.dropout(p=1) is
        return v.mul(v.new_zeros(()))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = _dropout_seed(float(dropout_p), q.device)
    if backend == "triton":
        fwd, _ = _triton_ops()
    else:
        fwd = torch.ops.bertkern.attention_fwd
    out, _ = fwd(q, k, v, cu_seqlens, max_seqlen, scale, bool(causal), float(dropout_p), seed)
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
    resolved = _resolve_backend(backend, q.device)
    _check_qkv(q, k, v, False, resolved)
    batch, seqlen, heads, head_dim = q.shape
    if key_padding_mask is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=q.device)
        out = attention_varlen(
            q.reshape(batch * seqlen, heads, head_dim), k.reshape(batch * seqlen, heads, head_dim),
            v.reshape(batch * seqlen, heads, head_dim), cu, seqlen,
            dropout_p=dropout_p, causal=causal, scale=scale, backend=resolved)
        return out.reshape(batch, seqlen, heads, head_dim)
    if key_padding_mask.shape != (batch, seqlen):
        raise ValueError(f"attention: key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                         f"expected (B, S) = {(batch, seqlen)}")
    q_p, indices, cu, max_len = unpad(q, key_padding_mask)
    k_p = torch.ops.bertkern.gather_rows(k.reshape(batch * seqlen, heads, head_dim), indices)
    v_p = torch.ops.bertkern.gather_rows(v.reshape(batch * seqlen, heads, head_dim), indices)
    out = attention_varlen(q_p, k_p, v_p, cu, max_len, dropout_p=dropout_p, causal=causal,
                           scale=scale, backend=resolved)
    return pad(out, indices, batch, seqlen)


# ---- C++ CPU operator: fakes and autograd --------------------------------------------------------

def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("bertkern::attention_fwd")
def _attention_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed):
    total, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("bertkern::attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("bertkern::_philox_words")
def _philox_words_fake(seed, offsets):
    return offsets.new_empty((*offsets.shape, 4))  # the 4 words of each counter, int32 bits


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.args = (max_seqlen, scale, causal, dropout_p)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, dropout_seed)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, dropout_seed = ctx.saved_tensors
    max_seqlen, scale, causal, dropout_p = ctx.args
    dq, dk, dv = torch.ops.bertkern.attention_bwd(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("bertkern::attention_fwd", _backward, setup_context=_setup_context)
