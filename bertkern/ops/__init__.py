"""Public functional API: thin wrappers over the ``torch.ops.bertkern`` operators."""
from bertkern.ops.layer_norm import layer_norm

__all__ = ["layer_norm"]
