"""linear: y = x @ weight^T + bias for the encoder's GEMMs, on the fastest GEMM of the machine.

On CPU, torch's ``F.linear`` on float32 calls MKL's sgemm. On AMD CPUs MKL does not take its
AVX-512 code path (it dispatches on the vendor), while oneDNN, which also ships inside torch,
dispatches on the instruction set: on an AMD EPYC (AVX-512) oneDNN's fp32 GEMM ran at about
twice MKL's speed for BERT shapes. On Intel CPUs MKL takes its best path and is as fast as
oneDNN forward and faster backward (measured on a Xeon with AVX-512: oneDNN 0.64x-0.83x of
MKL for forward + backward; benchmarks/bench_linear.py). So the default, ``"auto"``, routes
CPU float32 2-D linears outside autocast through oneDNN (``torch.ops.mkldnn._linear_pointwise``,
the op torch.compile's CPU backend emits; registered as the operator ``bertkern::linear`` with
a fake and autograd) on AMD CPUs only, and everywhere else calls ``F.linear``. CUDA, other
dtypes, autocast and N-d inputs are always ``F.linear``.

``BERTKERN_CPU_GEMM=auto|onednn|torch`` (read at import) or ``set_cpu_gemm(...)`` chooses.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

__all__ = ["linear", "onednn_linear_enabled", "set_cpu_gemm", "cpu_vendor"]

_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_BACKENDS = ("auto", "onednn", "torch")


def _cpuinfo(field: str) -> str:
    """The first ``field`` of /proc/cpuinfo, or "" where it is not known."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor id ("AuthenticAMD", "GenuineIntel", ...), or "" where it is not known."""
    return _cpuinfo("vendor_id")


def cpu_model_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor", ...), or "" where it is not known."""
    return _cpuinfo("model name")


def _resolve(backend: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"set_cpu_gemm: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "onednn" and not _ONEDNN_AVAILABLE:
        raise RuntimeError("set_cpu_gemm: this torch build has no oneDNN (torch.backends.mkldnn)")
    if backend == "auto":
        return _ONEDNN_AVAILABLE and cpu_vendor() == "AuthenticAMD"
    return backend == "onednn"


_env_backend = os.environ.get("BERTKERN_CPU_GEMM", "auto")
if _env_backend not in _BACKENDS or (_env_backend == "onednn" and not _ONEDNN_AVAILABLE):
    warnings.warn(f"BERTKERN_CPU_GEMM={_env_backend!r} is not usable here (expected one of {_BACKENDS}, "
                  "onednn only where torch has oneDNN): using 'auto'", stacklevel=2)
    _env_backend = "auto"
_use_onednn = _resolve(_env_backend)


def onednn_linear_enabled() -> bool:
    """Whether CPU float32 linears go through oneDNN (see the module docstring)."""
    return _use_onednn


def set_cpu_gemm(backend: str) -> None:
    """"auto" (the default: oneDNN on AMD CPUs, else ``F.linear``), "onednn" or "torch"
    (``F.linear``, MKL)."""
    global _use_onednn
    _use_onednn = _resolve(backend)


def _mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T through oneDNN; a (M, K), b (N, K), any strides."""
    if a.numel() == 0 or b.numel() == 0:  # oneDNN refuses empty problems
        return a @ b.t()
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@torch.library.custom_op("bertkern::linear", mutates_args=(), device_types="cpu")
def _linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.numel() == 0 or weight.numel() == 0:  # oneDNN refuses empty problems
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_linear_cpu.register_fake
def _linear_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("bertkern::linear_bwd", mutates_args=(), device_types="cpu")
def _linear_bwd_cpu(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) = (grad @ weight, grad^T @ x, grad.sum(0))."""
    grad = grad.contiguous()
    return _mm_nt(grad, weight.t()), _mm_nt(grad.t(), x.t()), grad.sum(0)


@_linear_bwd_cpu.register_fake
def _linear_bwd_fake(grad, x, weight):
    return torch.empty_like(x), torch.empty_like(weight), grad.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw, db = _linear_bwd_cpu(grad, x, weight)
    return dx, dw, db if ctx.has_bias else None


_linear_cpu.register_autograd(_backward, setup_context=_setup_context)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; CPU float32 (T, K) inputs run on oneDNN (module docstring)."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32
            and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and not torch.is_autocast_enabled("cpu") and _use_onednn):
        return _linear_cpu(x, weight, bias)
    return F.linear(x, weight, bias)
