"""The module contract: when a fused kernel may stand in for a submodule's call.

bertkern's layers read a submodule's weights and run a fused kernel only when the submodule is
exactly the stock class with nothing attached: no forward / backward hooks (its own or
global: FSDP2, weight norm, pruning and ``register_forward_hook`` all live there), no
parametrizations (``torch.nn.utils.parametrize`` swaps the class, so the type test sees it).
Anything else is called as a module, so user code always runs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` as a module would run anything besides its ``forward``."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _global_hooks())


def is_stock(m: nn.Module | None, *classes: type) -> bool:
    """``m`` is exactly one of ``classes`` (not a subclass) with no hooks attached."""
    return m is not None and type(m) in classes and not has_hooks(m)


def pure_torch() -> bool:
    """True while a tracer that only knows torch's own operators records the model
    (``torch.onnx.export``, ``torch.jit.trace``): the layers then run the padded path on
    standard operators, which every exporter and runtime understands."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
