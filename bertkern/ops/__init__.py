"""Public functional API: thin wrappers over the ``torch.ops.bertkern`` operators.

Mask convention everywhere: ``key_padding_mask[b, s] = True`` means padding (torch's).
"""
from bertkern.ops.attention import attention, attention_varlen
from bertkern.ops.dropout import dropout
from bertkern.ops.layer_norm import layer_norm
from bertkern.ops.linear import linear, set_cpu_gemm
from bertkern.ops.padding import (
    Packing,
    key_padding_mask_from_attention_mask,
    key_padding_mask_from_lengths,
    mask_to_indices,
    pad,
    unpad,
)

__all__ = [
    "attention",
    "attention_varlen",
    "dropout",
    "layer_norm",
    "linear",
    "set_cpu_gemm",
    "Packing",
    "unpad",
    "pad",
    "mask_to_indices",
    "key_padding_mask_from_lengths",
    "key_padding_mask_from_attention_mask",
]
