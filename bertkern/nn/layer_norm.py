"""bertkern.LayerNorm: nn.LayerNorm with a fused residual add."""
from __future__ import annotations

import math

import torch
from torch import nn

from bertkern.nn._contract import pure_torch
from bertkern.ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """Drop-in for ``nn.LayerNorm``: same constructor, parameters and state_dict keys.

    ``forward(x, residual=None, return_residual=False)`` normalizes ``x + residual`` in one
    kernel (see :func:`bertkern.ops.layer_norm`); with ``return_residual=True`` it returns
    ``(y, x + residual)``. A multi-dim ``normalized_shape`` is normalized as one flat last dim.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, return_residual: bool = False):
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape) or x.dim() < k:
            raise ValueError(
                f"LayerNorm: input has shape {tuple(x.shape)}, expected trailing dims "
                f"{tuple(self.normalized_shape)} (normalized_shape)"
            )
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"LayerNorm: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        if pure_torch():  # an exporter that knows torch's operators only
            z = x if residual is None else x + residual
            y = super().forward(z)
            return (y, z) if return_residual else y
        lead = x.shape[: x.dim() - k]
        n = math.prod(self.normalized_shape)

        def flat(t):
            return None if t is None else t.reshape(*lead, n)

        weight = None if self.weight is None else self.weight.reshape(n)
        bias = None if self.bias is None else self.bias.reshape(n)
        out = layer_norm(flat(x), weight, bias, self.eps, flat(residual), return_residual)
        if return_residual:
            y, z = out
            return y.reshape(x.shape), z.reshape(x.shape)
        return out.reshape(x.shape)
