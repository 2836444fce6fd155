"""bertkern.EncoderLayer / bertkern.Encoder: drop-in nn.TransformerEncoderLayer / Encoder that
compute real tokens only.

Data flow (see DESIGN.md)::

    src (B, S, E) + src_key_padding_mask (B, S), True = padding
      -> gather the T real tokens once                            x (T, E), cu_seqlens, max_seqlen
      -> per layer: one QKV GEMM, varlen fused attention, out_proj,
         fused residual + LayerNorm, FFN, fused residual + LayerNorm
      -> scatter back once                                        (B, S, E), zeros at padding

Constructors, attributes and state_dict keys are torch's, so weights load strictly both ways
and ``Encoder.from_torch`` converts an existing ``nn.TransformerEncoder``.

Masks:
  * ``src_key_padding_mask`` (B, S): bool (True = padding) or float (-inf = padding, 0 = keep);
    these run on the packed fast path.
  * ``mask`` (S, S): a causal mask (torch's ``generate_square_subsequent_mask``, bool or float,
    or any mask with ``is_causal=True``) runs in the fused kernel with ``causal=True``.
  * Any other ``mask`` ((S, S) or (B * nhead, S, S), bool or float), a float key-padding mask
    with values other than 0 / -inf, or a head dim the Triton kernel does not take on CUDA,
    takes the *fallback path*: every layer on the padded batch with
    ``F.scaled_dot_product_attention`` and the masks added; correct, slower.

Outputs at padded positions are zero on every path (torch's training path leaves values
computed from padding there). A query that may attend to no key (a fully padded sequence)
gives zeros and zero gradients, never NaN.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bertkern.nn.layer_norm import LayerNorm
from bertkern.ops.attention import attention_varlen
from bertkern.ops.dropout import dropout as fused_dropout
from bertkern.ops.layer_norm import layer_norm
from bertkern.ops.linear import linear

__all__ = ["EncoderLayer", "Encoder"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _activation_fn(activation):
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueError(f"activation should be 'relu', 'gelu' or a callable, got {activation!r}")
    if not callable(activation):
        raise TypeError(f"activation should be 'relu', 'gelu' or a callable, got {type(activation).__name__}")
    return activation


def _is_relu(fn) -> bool:
    return fn is F.relu or fn is torch.relu


def _dropout(module: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``module(relu(x) if relu else x)`` for the layer's nn.Dropout modules; on CPU one fused
    pass (bertkern.ops.dropout: the mask is never stored). ``x`` is a fresh GEMM output that
    nothing else reads, so a ReLU without dropout runs in place."""
    if type(module) is not nn.Dropout:  # a user's own module: call it as is
        return module(F.relu(x) if relu else x)
    p = module.p if module.training else 0.0
    if p == 0.0:
        return x.relu_() if relu else x
    if x.device.type == "cpu":
        return fused_dropout(x, p, True, relu=relu)
    return module(F.relu(x) if relu else x)


def _norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, return_residual: bool = False):
    """``norm(x + residual)``, fused when ``norm`` is an nn.LayerNorm over the last dim.

    Mixed dtypes (autocast: a bf16 GEMM output next to an fp32 residual stream) are promoted,
    as the unfused ``x + residual`` would be."""
    if residual is not None and residual.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        weight, bias = norm.weight, norm.bias
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return layer_norm(x, weight, bias, norm.eps, residual, return_residual)
    z = x if residual is None else x + residual
    return (norm(z), z) if return_residual else norm(z)


class EncoderLayer(nn.Module):
    """Drop-in ``nn.TransformerEncoderLayer`` (same constructor, attributes, state_dict keys).

    Called on its own it behaves like torch's layer (``forward(src, src_mask,
    src_key_padding_mask, is_causal)``); inside :class:`Encoder` it runs on packed real tokens.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if nhead <= 0 or d_model <= 0 or d_model % nhead != 0:
            raise ValueError(f"EncoderLayer: d_model ({d_model}) must be a positive multiple of nhead ({nhead})")
        factory = {"device": device, "dtype": dtype}
        # nn.MultiheadAttention holds in_proj_weight / in_proj_bias / out_proj exactly as torch's
        # layer does; only its parameters are used, never its forward.
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                               batch_first=batch_first, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation_fn(activation)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "EncoderLayer":
        """A bertkern.EncoderLayer with ``layer``'s settings and a copy of its weights."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"from_torch expects an nn.TransformerEncoderLayer, got {type(layer).__name__}")
        attn = layer.self_attn
        w = layer.linear1.weight
        new = cls(
            attn.embed_dim, attn.num_heads, layer.linear1.out_features, dropout=layer.dropout.p,
            activation=copy.deepcopy(layer.activation) if isinstance(layer.activation, nn.Module) else layer.activation,
            layer_norm_eps=layer.norm1.eps, batch_first=attn.batch_first, norm_first=layer.norm_first,
            bias=layer.linear1.bias is not None, device="meta", dtype=w.dtype,
        )
        new.self_attn.dropout = attn.dropout
        new.dropout1.p, new.dropout2.p = layer.dropout1.p, layer.dropout2.p
        # Built on the meta device and given copies of the weights: no random init is drawn,
        # so converting (like torch's deepcopy of the layer) leaves the RNG stream untouched.
        state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        new.load_state_dict(state, strict=True, assign=True)
        new.train(layer.training)
        return new

    # ---- the layer on a token matrix (N, E); `attend` maps q, k, v (N, H, D) -> (N, H, D) ----
    def _sa_block(self, x: torch.Tensor, attend) -> torch.Tensor:
        attn = self.self_attn
        n, e = x.shape
        heads = attn.num_heads
        qkv = linear(x, attn.in_proj_weight, attn.in_proj_bias).view(n, 3, heads, e // heads)
        q, k, v = qkv.unbind(1)
        p = attn.dropout if self.training else 0.0
        a = attend(q, k, v, p).reshape(n, e)
        return _dropout(self.dropout1, linear(a, attn.out_proj.weight, attn.out_proj.bias))

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.linear1.weight, self.linear1.bias)
        if _is_relu(self.activation):
            h = _dropout(self.dropout, h, relu=True)  # relu + dropout in one pass
        else:
            h = _dropout(self.dropout, self.activation(h))
        return _dropout(self.dropout2, linear(h, self.linear2.weight, self.linear2.bias))

    def _forward_tokens(self, x: torch.Tensor, attend) -> torch.Tensor:
        if self.norm_first:
            # x = x + sa(norm1(x)); x = x + ff(norm2(x)), the second add fused into norm2.
            h, x = _norm(self.norm2, self._sa_block(_norm(self.norm1, x), attend), residual=x, return_residual=True)
            f = self._ff_block(h)
            return x + f.to(x.dtype) if f.dtype != x.dtype else x + f
        x = _norm(self.norm1, self._sa_block(x, attend), residual=x)
        return _norm(self.norm2, self._ff_block(x), residual=x)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return _run([self], None, self.self_attn.batch_first, self.self_attn.num_heads,
                    src, src_mask, src_key_padding_mask, is_causal)


class Encoder(nn.Module):
    """Drop-in ``nn.TransformerEncoder`` (same constructor, attributes, state_dict keys).

    ``encoder_layer``: a :class:`EncoderLayer` or an ``nn.TransformerEncoderLayer`` (its settings
    and weights are read); each of the ``num_layers`` layers starts as a copy, as in torch.
    ``norm``: optional final norm (an ``nn.LayerNorm`` runs fused). ``enable_nested_tensor`` and
    ``mask_check`` are accepted for compatibility: bertkern always removes padding.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` as torch's; see the
    module docstring for masks and paths. Outputs at padded positions are zero.
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        if isinstance(encoder_layer, nn.TransformerEncoderLayer):
            encoder_layer = EncoderLayer.from_torch(encoder_layer)
        if not isinstance(encoder_layer, EncoderLayer):
            raise TypeError("Encoder: encoder_layer must be a bertkern.EncoderLayer or an nn.TransformerEncoderLayer, "
                            f"got {type(encoder_layer).__name__}")
        if num_layers < 0:
            raise ValueError(f"Encoder: num_layers must be >= 0, got {num_layers}")
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = enable_nested_tensor
        self.mask_check = mask_check
        self._d_model = encoder_layer.self_attn.embed_dim
        self._nhead = encoder_layer.self_attn.num_heads
        self._batch_first = encoder_layer.self_attn.batch_first

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoder) -> "Encoder":
        """A bertkern.Encoder with ``module``'s settings and a copy of its weights."""
        if not isinstance(module, nn.TransformerEncoder):
            raise TypeError(f"from_torch expects an nn.TransformerEncoder, got {type(module).__name__}")
        if len(module.layers) == 0:
            raise ValueError("from_torch: the nn.TransformerEncoder has no layers")
        new = cls(module.layers[0], len(module.layers), norm=copy.deepcopy(module.norm),
                  enable_nested_tensor=module.enable_nested_tensor, mask_check=module.mask_check)
        new.load_state_dict(module.state_dict(), strict=True)
        new.train(module.training)
        return new

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        return _run(self.layers, self.norm, self._batch_first, self._nhead, src, mask, src_key_padding_mask, is_causal)

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       causal: bool = False) -> torch.Tensor:
        """Run every layer (and the final norm) on packed tokens: x (T, E), cu_seqlens (B+1,)
        int32, max_seqlen the longest sequence (what bertkern.ops.unpad returns)."""
        if x.dim() != 2 or x.shape[-1] != self._d_model:
            raise ValueError(f"forward_packed: x must have shape (T, {self._d_model}), got {tuple(x.shape)}")
        return _run_packed(self.layers, self.norm, x, cu_seqlens, max_seqlen, causal)


# ---- the two paths ------------------------------------------------------------------------------

def _run_packed(layers, norm, x, cu_seqlens, max_seqlen, causal):
    def attend(q, k, v, p):
        return attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, causal=causal)

    for layer in layers:
        x = layer._forward_tokens(x, attend)
    if norm is not None:
        x = _norm(norm, x)
    return x


def _run_padded(layers, norm, x, attn_bias, pad_mask):
    """Fallback: x (B, S, E) padded; attn_bias float, broadcastable to (B, H, S, S), -inf =
    masked. Rows with no visible key give zeros; padded positions are zeroed at the end."""
    batch, seqlen, e = x.shape
    no_key = None
    if attn_bias is not None:
        no_key = torch.isneginf(attn_bias).all(dim=-1, keepdim=True)  # (.., S, 1)
        attn_bias = attn_bias.masked_fill(no_key, 0.0)  # keep SDPA finite; those rows are zeroed

    def attend(q, k, v, p):
        heads, d = q.shape[1], q.shape[2]

        def bhsd(t):
            return t.reshape(batch, seqlen, heads, d).transpose(1, 2)

        bias = None if attn_bias is None else attn_bias.to(q.dtype)
        o = F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), attn_mask=bias, dropout_p=p)
        if no_key is not None:
            o = o.masked_fill(no_key, 0.0)
        return o.transpose(1, 2).reshape(batch * seqlen, heads, d)

    h = x.reshape(batch * seqlen, e)
    for layer in layers:
        h = layer._forward_tokens(h, attend)
    if norm is not None:
        h = _norm(norm, h)
    h = h.reshape(batch, seqlen, h.shape[-1])
    if pad_mask is not None:
        h = h.masked_fill(pad_mask.unsqueeze(-1), 0.0)
    return h


def _causal_bool(seqlen, device):
    return torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).triu(1)


def _is_causal_mask(mask, seqlen):
    """torch's _detect_is_causal_mask, for bool (True = masked) and float (-inf) masks."""
    if mask.shape != (seqlen, seqlen):
        return False
    causal = _causal_bool(seqlen, mask.device)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, causal))
    return bool(torch.equal(torch.isneginf(mask), causal) and (mask.masked_fill(causal, 0.0) == 0).all())


def _additive(mask):
    return torch.zeros_like(mask, dtype=torch.float32).masked_fill(mask, float("-inf")) if mask.dtype == torch.bool \
        else mask.float()


def _run(layers, norm, batch_first, nhead, src, mask, key_padding_mask, is_causal):
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"Encoder: src must be a Tensor, got {type(src).__name__}")
    if len(layers) == 0:
        d_model = src.shape[-1]
    else:
        d_model = layers[0].self_attn.embed_dim
    if src.dtype not in _DTYPES:
        raise TypeError(f"Encoder: src must be float32, float16, bfloat16 (or float64 on CPU), got {src.dtype}")
    if src.dtype == torch.float64 and src.device.type != "cpu":
        raise TypeError("Encoder: float64 is supported on CPU only")
    unbatched = src.dim() == 2
    if src.dim() not in (2, 3) or src.shape[-1] != d_model:
        raise ValueError(f"Encoder: src must have shape {'(B, S, E)' if batch_first else '(S, B, E)'} "
                         f"(or (S, E) unbatched) with E = d_model = {d_model}, got {tuple(src.shape)}")
    if unbatched:
        src = src.unsqueeze(0 if batch_first else 1)
        if key_padding_mask is not None and key_padding_mask.dim() == 1:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    batch, seqlen = (src.shape[0], src.shape[1]) if batch_first else (src.shape[1], src.shape[0])

    # -- key padding mask: bool (B, S), True = padding, or float additive (-inf = padding) --
    pad_mask, kpm_bias = None, None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"Encoder: src_key_padding_mask must be a Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
            raise TypeError("Encoder: src_key_padding_mask must be bool (True = padding) or float (-inf = padding), "
                            f"got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, seqlen):
            raise ValueError(f"Encoder: src_key_padding_mask must have shape (B, S) = {(batch, seqlen)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != src.device:
            raise ValueError(f"Encoder: src_key_padding_mask is on {key_padding_mask.device} but src is on {src.device}")
        if key_padding_mask.dtype == torch.bool:
            pad_mask = key_padding_mask
        else:
            pad_mask = torch.isneginf(key_padding_mask)
            if bool(((key_padding_mask != 0) & ~pad_mask).any()):  # a real additive bias, not just padding
                kpm_bias = key_padding_mask.float()

    # -- attention mask: causal -> fused kernel; anything else -> fallback --
    causal = bool(is_causal)
    attn_mask = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"Encoder: mask must be a Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"Encoder: mask must be bool (True = masked) or float (additive), got {mask.dtype}")
        if tuple(mask.shape) not in ((seqlen, seqlen), (batch * nhead, seqlen, seqlen)):
            raise ValueError(f"Encoder: mask must have shape (S, S) = {(seqlen, seqlen)} or (B * nhead, S, S) = "
                             f"{(batch * nhead, seqlen, seqlen)}, got {tuple(mask.shape)}")
        if mask.device != src.device:
            raise ValueError(f"Encoder: mask is on {mask.device} but src is on {src.device}")
        if is_causal is None:
            causal = _is_causal_mask(mask, seqlen)
        if not causal:
            attn_mask = mask

    head_dim = d_model // nhead
    triton_ok = src.device.type == "cpu" or (head_dim % 8 == 0 and head_dim <= 128)
    if attn_mask is not None or kpm_bias is not None or not triton_ok:
        x = src if batch_first else src.transpose(0, 1)
        bias = None
        if attn_mask is not None:
            m = _additive(attn_mask)
            bias = m.view(1, 1, seqlen, seqlen) if m.dim() == 2 else m.view(batch, nhead, seqlen, seqlen)
        if causal:
            c = _additive(_causal_bool(seqlen, src.device)).view(1, 1, seqlen, seqlen)
            bias = c if bias is None else bias + c
        if pad_mask is not None:
            k = kpm_bias if kpm_bias is not None else _additive(pad_mask)
            k = k.view(batch, 1, 1, seqlen)
            bias = k if bias is None else bias + k
        out = _run_padded(layers, norm, x, bias, pad_mask)
        out = out if batch_first else out.transpose(0, 1)
        return out.squeeze(0 if batch_first else 1) if unbatched else out

    e = src.shape[-1]
    if pad_mask is None and batch_first:
        # No padding: the batch is already packed; no gather, no scatter.
        x = src.reshape(batch * seqlen, e)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=src.device) * seqlen
        out = _run_packed(layers, norm, x, cu, seqlen, causal)
        out = out.reshape(batch, seqlen, out.shape[-1])
        return out.squeeze(0) if unbatched else out
    if pad_mask is None:
        pad_mask = torch.zeros(batch, seqlen, dtype=torch.bool, device=src.device)
    indices, cu, max_seqlen = torch.ops.bertkern.mask_to_indices(pad_mask)
    if not batch_first:
        # token (b, s) lives in row s * B + b of src viewed as (S * B, E): gather / scatter there,
        # so neither src nor the output is ever transposed.
        indices = (indices % seqlen) * batch + torch.div(indices, seqlen, rounding_mode="floor")
    x = torch.ops.bertkern.gather_rows(src.reshape(batch * seqlen, e), indices)
    x = _run_packed(layers, norm, x, cu, max_seqlen, causal)
    out = torch.ops.bertkern.scatter_rows(x, indices, batch * seqlen)
    e_out = x.shape[-1]
    out = out.view(batch, seqlen, e_out) if batch_first else out.view(seqlen, batch, e_out)
    return out.squeeze(0 if batch_first else 1) if unbatched else out

