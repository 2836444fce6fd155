"""nn.Modules built on bertkern.ops."""
from bertkern.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm"]
