"""Fused-or-called: how a layer runs a submodule under the module contract (``_contract``).

Each helper runs bertkern's fused kernel when the submodule is the stock class with nothing
attached, and otherwise calls the submodule as a module on the same tokens. Shared by
bertkern's own layers and by the Hugging Face layers that ``bertkern.hf.optimize`` runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertkern.nn._contract import is_stock, pure_torch
from bertkern.nn.layer_norm import LayerNorm
from bertkern.ops.dropout import dropout as fused_dropout
from bertkern.ops.layer_norm import layer_norm
from bertkern.ops.linear import linear

__all__ = ["call_linear", "call_norm", "call_dropout", "LINEARS", "LAYER_NORMS"]

LINEARS = (nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Linear)
LAYER_NORMS = (nn.LayerNorm, LayerNorm)


def call_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; for a stock ``nn.Linear`` with nothing attached, bertkern's GEMM route."""
    if is_stock(module, *LINEARS) and not pure_torch():
        return linear(x, module.weight, module.bias)
    return module(x)


def call_dropout(module: nn.Module, x: torch.Tensor, relu: bool = False, inplace_ok: bool = False) -> torch.Tensor:
    """``module(relu(x) if relu else x)`` for an nn.Dropout module; a stock one runs
    ``bertkern.ops.dropout``, which picks the kernel for the device (on CPU one fused pass, the
    mask never stored). ``inplace_ok``: ``x`` is a fresh GEMM output that nothing else reads, so
    a ReLU without dropout may run in place."""
    if not is_stock(module, nn.Dropout) or pure_torch():  # a user's own module, or hooks: call it
        return module(F.relu(x) if relu else x)
    p = module.p if module.training else 0.0
    if p == 0.0 and relu:
        return x.relu_() if inplace_ok else F.relu(x)
    return fused_dropout(x, p, True, relu=relu)


def call_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, return_residual: bool = False):
    """``norm(x + residual)``, fused when ``norm`` is a stock LayerNorm over the last dim with
    nothing attached; any other norm module is called on the sum.

    Mixed dtypes (autocast: a bf16 GEMM output next to an fp32 residual stream) are promoted,
    as the unfused ``x + residual`` would be."""
    if residual is not None and residual.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    if is_stock(norm, *LAYER_NORMS) and len(norm.normalized_shape) == 1 and not pure_torch():
        weight, bias = norm.weight, norm.bias
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return layer_norm(x, weight, bias, norm.eps, residual, return_residual)
    z = x if residual is None else x + residual
    return (norm(z), z) if return_residual else norm(z)
