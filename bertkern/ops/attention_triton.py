"""Triton launchers of the attention operator ``torch.ops.bertkern.attention_fwd/bwd``.

The operator (schema in csrc/ops.cpp, fake and autograd in bertkern/ops/attention.py) has one
kernel per device: C++ on the CPU (csrc/cpu/attention.cpp), and on CUDA the two functions below,
``attention_fwd`` / ``attention_bwd``, which check their arguments and launch the Triton kernels
of bertkern/kernels/attention.py through ``wrap_triton``, so ``torch.compile`` traces into them
on the GPU (bertkern/ops/attention.py registers them, lazily, and the rule that decomposes the
operator into them under torch.compile).

CPU tensors run here only under TRITON_INTERPRET=1 set before triton was imported (the Triton
interpreter; slow, for tests): call the launchers directly, or ``use_on_cpu(True)`` to make them
the operator's CPU kernel (autograd and opcheck then exercise the Triton path).
"""
from __future__ import annotations

import os

import torch
import triton
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.library import wrap_triton

from bertkern.kernels import attention as kernels


def triton_supports_head_dim(head_dim: int) -> bool:
    """The Triton kernels' head-dim rule: a multiple of 8 from 8 to 128."""
    return head_dim % 8 == 0 and 8 <= head_dim <= 128


def check_triton_head_dim(op: str, head_dim: int) -> None:
    if not triton_supports_head_dim(head_dim):
        raise ValueError(f"{op}: head dim D = {head_dim} is not supported by the Triton kernels; "
                         "expected a multiple of 8 between 8 and 128")


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# CUDA caps grid dims 1 and 2 (heads and sequences here) at 65535.
_MAX_GRID_YZ = 65535


def _block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; head dims that are not powers of two are padded up
    # (masked loads fill zeros).
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting: "highest" (the default) asks for fp32 accuracy,
    # which 3xTF32 gives on tensor cores ("ieee" would run the dots on FMA units and spill
    # heavily); anything else allows plain TF32. Ignored for 16-bit inputs.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _seqlen_bucket(max_seqlen):
    # Autotune key: the power-of-two bucket of max_seqlen (a varlen batch changes max_seqlen
    # every step; retuning per value would be wasteful). Under torch.compile max_seqlen can be
    # a SymInt (even a data-dependent one, from unpad); the value is then passed through as is
    # rather than guarded on.
    return triton.next_power_of_2(max_seqlen) if isinstance(max_seqlen, int) else max_seqlen


def _grid_bucket(batch, heads):
    # Autotune key: the power-of-two bucket of B * H, capped (see kernels.AUTOTUNE_KEY).
    if isinstance(batch, int) and isinstance(heads, int):
        return min(triton.next_power_of_2(max(batch * heads, 1)), kernels.GRID_BUCKET_CAP)
    return kernels.GRID_BUCKET_CAP  # symbolic under torch.compile: one key


def _is_empty(*sizes) -> bool:
    # True only when some size is known to be 0; an unknown (symbolic) size launches the
    # kernels, whose grids are then empty at run time if it is 0.
    return any(guard_or_false(n == 0) for n in sizes)


def _is_plain(t: torch.Tensor) -> bool:
    # Fake / functional tensors (tracing) carry no data: value checks are skipped for them.
    return type(t) is torch.Tensor


def _check_tensor(op, name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (q's device)")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_args(op, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, dropout_seed):
    """Raise TypeError / ValueError naming the bad argument, before any kernel runs."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{op}: q must be a Tensor, got {type(q).__name__}")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must have shape (T, H, D), got {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{op}: q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        raise ValueError(
            f"{op}: q is on {q.device}; the Triton attention runs on CUDA tensors (or CPU tensors "
            "under TRITON_INTERPRET=1); without the interpreter the CPU kernel is C++"
        )
    total, heads, head_dim = q.shape
    check_triton_head_dim(op, head_dim)
    _check_tensor(op, "k", k, q.shape, q.dtype, q.device)
    _check_tensor(op, "v", v, q.shape, q.dtype, q.device)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens must have shape (B + 1,), got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device}, expected {q.device} (q's device)")
    batch = cu_seqlens.shape[0] - 1
    if guard_or_false(heads > _MAX_GRID_YZ) or guard_or_false(batch > _MAX_GRID_YZ):
        raise ValueError(
            f"{op}: at most {_MAX_GRID_YZ} heads and {_MAX_GRID_YZ} sequences per call, got "
            f"H = {heads}, B = {batch}"
        )
    if guard_or_false(max_seqlen < 0):
        raise ValueError(f"{op}: max_seqlen must be >= 0, got {max_seqlen}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0:
        if dropout_seed is None:
            raise ValueError(
                f"{op}: dropout_seed (int64 tensor of shape (1,)) is required when dropout_p > 0")
        _check_tensor(op, "dropout_seed", dropout_seed, (1,), torch.int64, q.device)
        if guard_or_false(max_seqlen * max_seqlen >= 2**31):
            raise ValueError(
                f"{op}: dropout needs max_seqlen^2 < 2^31 (int32 Philox counters), got "
                f"max_seqlen = {max_seqlen}"
            )
    # The values of cu_seqlens are checked only where reading them costs no device sync.
    if q.device.type == "cpu" and _is_plain(cu_seqlens):
        lengths = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((lengths < 0).any()):
            raise ValueError(
                f"{op}: cu_seqlens must be non-decreasing from 0 to T = q.shape[0] = {total}, got "
                f"{cu_seqlens.tolist()}"
            )
        if batch > 0 and int(lengths.max()) > max_seqlen:
            raise ValueError(
                f"{op}: max_seqlen = {max_seqlen} is less than the longest sequence "
                f"({int(lengths.max())})"
            )


def _strides(t):
    return t.stride(0), t.stride(1)


def _last_dim_contiguous(t):
    # The kernels read rows with unit stride along D; any other layout is copied once.
    return t if t.stride(-1) == 1 else t.contiguous()


def _dropout_args(dropout_p, dropout_seed, cu_seqlens):
    """(integer keep threshold, 1 / (1 - dropout_p), seed tensor, DROPOUT) for the kernels."""
    if dropout_p > 0.0:
        dropout_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
        return kernels.dropout_threshold(float(dropout_p)), dropout_scale, dropout_seed, True
    # DROPOUT=False compiles the seed load away; any pointer will do.
    return 0, 1.0, cu_seqlens, False


def attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed):
    """Varlen attention forward. q, k, v: (T, H, D); cu_seqlens (B + 1,) int32.

    Returns out (T, H, D) in q's dtype, and lse (H, T) float32, the natural-log logsumexp of
    each query's scaled scores (before dropout).
    """
    _check_args("attention_fwd", q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, dropout_seed)
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    if _is_empty(total, heads, batch, max_seqlen):
        return out, lse
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    p, dropout_scale, seed, use_dropout = _dropout_args(dropout_p, dropout_seed, cu_seqlens)

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads, batch)

    wrap_triton(kernels.attention_fwd)[grid](
        q, k, v, out, lse, cu_seqlens, seed,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        total, heads, max_seqlen, _seqlen_bucket(max_seqlen), _grid_bucket(batch, heads),
        float(scale), p, dropout_scale,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=bool(causal),
        DROPOUT=use_dropout, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, dropout_p, dropout_seed):
    """Varlen attention backward: (dq, dk, dv), each (T, H, D) in q's dtype.

    dout, out: (T, H, D) like q; lse (H, T) float32 from the forward. Same cu_seqlens,
    max_seqlen, scale, causal, dropout_p and dropout_seed as the forward.
    """
    op = "attention_bwd"
    _check_args(op, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, dropout_seed)
    _check_tensor(op, "dout", dout, q.shape, q.dtype, q.device)
    _check_tensor(op, "out", out, q.shape, q.dtype, q.device)
    total, heads, head_dim = q.shape
    _check_tensor(op, "lse", lse, (heads, total), torch.float32, q.device)
    batch = cu_seqlens.shape[0] - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if _is_empty(total, heads):
        return dq, dk, dv
    if _is_empty(batch, max_seqlen):
        # No sequence holds a token (T > 0 then means cu_seqlens is inconsistent, which only
        # the CPU check can see); nothing attends to anything.
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    p, dropout_scale, seed, use_dropout = _dropout_args(dropout_p, dropout_seed, cu_seqlens)
    block_d = _block_d(head_dim)
    bucket = _seqlen_bucket(max_seqlen)
    grid_bucket = _grid_bucket(batch, heads)
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=bool(causal), DROPOUT=use_dropout,
                 DOT_PRECISION=_dot_precision(q.dtype))

    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    wrap_triton(kernels.attention_delta_bwd)[(triton.cdiv(total, kernels.DELTA_BLOCK_T), heads)](
        out, dout, delta, *_strides(out), *_strides(dout), total,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=kernels.DELTA_BLOCK_T,
    )

    def grid_keys(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_N"]), heads, batch)

    wrap_triton(kernels.attention_dkdv_bwd)[grid_keys](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, seed,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        total, heads, max_seqlen, bucket, grid_bucket, float(scale), p, dropout_scale, **flags,
    )

    def grid_queries(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads, batch)

    wrap_triton(kernels.attention_dq_bwd)[grid_queries](
        q, k, v, dout, lse, delta, dq, cu_seqlens, seed,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
        total, heads, max_seqlen, bucket, grid_bucket, float(scale), p, dropout_scale, **flags,
    )
    return dq, dk, dv


_cpu_lib = None


def use_on_cpu(enable: bool) -> None:
    """Under TRITON_INTERPRET=1: make these launchers the operator's CPU kernel (True), or give
    the CPU back to the C++ kernel (False). Process-wide; bertkern.ops.attention(backend=...) on
    CPU tensors calls it, so the Triton path runs with the operator's own autograd and fake."""
    global _cpu_lib
    if enable and _cpu_lib is None:
        if not _INTERPRET:
            raise RuntimeError("use_on_cpu: Triton runs on CPU tensors only under TRITON_INTERPRET=1")
        _cpu_lib = torch.library.Library("bertkern", "IMPL")
        _cpu_lib.impl("attention_fwd", attention_fwd, "CPU")
        _cpu_lib.impl("attention_bwd", attention_bwd, "CPU")
    elif not enable and _cpu_lib is not None:
        _cpu_lib._destroy()
        _cpu_lib = None
