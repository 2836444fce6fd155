"""nn.Modules built on bertkern.ops."""
from bertkern.nn.attention import MultiheadAttention
from bertkern.nn.encoder import Encoder, EncoderLayer
from bertkern.nn.layer_norm import LayerNorm

__all__ = ["Encoder", "EncoderLayer", "LayerNorm", "MultiheadAttention"]
