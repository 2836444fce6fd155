"""bertkern.nn.MultiheadAttention: nn.MultiheadAttention that also runs on packed real tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertkern.errors import ValueAndAssertionError, ValueAndRuntimeError
from bertkern.nn._contract import pure_torch
from bertkern.nn._fused import call_linear
from bertkern.ops.attention import attention_varlen
from bertkern.ops.linear import linear

__all__ = ["MultiheadAttention"]

def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool (True = masked) -> 0 / -inf; float masks are already additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def causal_mask(seqlen: int, device) -> torch.Tensor:
    """(S, S) bool, True above the diagonal (keys after the query)."""
    return torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).triu(1)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention`` (same constructor, parameters and state_dict keys).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False, *, cu_seqlens=None, max_seqlen=None)``
    returns ``(attn_output, attn_weights)`` as torch's does:

    * **packed** (``cu_seqlens`` given): self-attention with ``query is key is value`` of shape
      (T, E), the real tokens of B sequences back to back (what ``bertkern.ops.unpad``
      returns); ``cu_seqlens`` (B + 1,) int32, ``max_seqlen`` the longest. One fused varlen
      kernel; returns ``((T, E), None)``. Only ``is_causal`` masks; ``need_weights=False``.
    * **padded self-attention without weights** (how a transformer layer calls it): one
      ``F.scaled_dot_product_attention`` with the masks added; a query that can see no key
      gives zeros (torch: NaN).
    * anything else (cross-attention, ``need_weights=True``, ``add_bias_kv``...): torch's.

    ``out_proj`` is called as a module unless it is the stock class with nothing attached, so
    an adapter or hook on it acts (torch's own forward reads its weight and skips it).
    """

    def reset_parameters(self) -> None:
        """Re-initialize as torch's constructor does (the name deferred-init walks call)."""
        self._reset_parameters()

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False, *, cu_seqlens=None, max_seqlen=None):
        if cu_seqlens is not None:
            return self._forward_packed(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        cu_seqlens, max_seqlen, bool(is_causal)), None
        if (not need_weights and query is key and key is value and query.dim() == 3
                and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn):
            return self._forward_padded(query, key_padding_mask, attn_mask, bool(is_causal)), None
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

    def _out(self, a: torch.Tensor) -> torch.Tensor:
        return call_linear(self.out_proj, a)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        if pure_torch():
            return F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return linear(x, self.in_proj_weight, self.in_proj_bias)

    def _forward_packed(self, x, key, value, key_padding_mask, need_weights, attn_mask, cu_seqlens, max_seqlen,
                        causal):
        if key is not x or value is not x:
            raise ValueError("MultiheadAttention: the packed layout (cu_seqlens) is self-attention only: "
                             "pass the same tensor as query, key and value")
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("MultiheadAttention: with cu_seqlens there is no padding to mask; "
                             "key_padding_mask and attn_mask must be None (is_causal is supported)")
        if need_weights:
            raise ValueError("MultiheadAttention: the packed layout (cu_seqlens) never forms the attention "
                             "weights; pass need_weights=False")
        if x.dim() != 2 or x.shape[1] != self.embed_dim:
            raise ValueAndAssertionError(f"MultiheadAttention: packed input must have shape (T, {self.embed_dim}), "
                                         f"got {tuple(x.shape)}")
        if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn:
            raise ValueError("MultiheadAttention: the packed layout needs kdim = vdim = embed_dim, "
                             "no add_bias_kv and no add_zero_attn")
        total, e = x.shape
        heads = self.num_heads
        q, k, v = self._in(x).view(total, 3, heads, e // heads).unbind(1)
        p = self.dropout if self.training else 0.0
        a = attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, causal=causal)
        return self._out(a.reshape(total, e))

    def _forward_padded(self, x, key_padding_mask, attn_mask, causal):
        if x.shape[-1] != self.embed_dim:
            raise ValueAndAssertionError(f"MultiheadAttention: was expecting embedding dimension of "
                                         f"{self.embed_dim}, but got {x.shape[-1]}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, seqlen, e = x.shape
        heads = self.num_heads
        bias = None
        if attn_mask is not None:
            if tuple(attn_mask.shape) == (seqlen, seqlen):
                bias = additive_mask(attn_mask).view(1, 1, seqlen, seqlen)
            elif tuple(attn_mask.shape) == (batch * heads, seqlen, seqlen):
                bias = additive_mask(attn_mask).view(batch, heads, seqlen, seqlen)
            else:
                raise ValueAndRuntimeError(
                    f"MultiheadAttention: attn_mask must have shape (S, S) = {(seqlen, seqlen)} or "
                    f"(B * num_heads, S, S) = {(batch * heads, seqlen, seqlen)}, got {tuple(attn_mask.shape)}")
        elif causal:
            bias = additive_mask(causal_mask(seqlen, x.device)).view(1, 1, seqlen, seqlen)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, seqlen):
                raise ValueAndAssertionError(
                    f"MultiheadAttention: key_padding_mask must have shape (B, S) = {(batch, seqlen)}, "
                    f"got {tuple(key_padding_mask.shape)}")
            kpm = additive_mask(key_padding_mask).view(batch, 1, 1, seqlen)
            bias = kpm if bias is None else bias + kpm
        q, k, v = self._in(x.reshape(batch * seqlen, e)).view(batch, seqlen, 3, heads, e // heads).permute(2, 0, 3, 1, 4)
        no_key = None
        if bias is not None:
            # (.., S, 1): a query that sees no key (== -inf, not isneginf: the legacy ONNX
            # exporter has no symbolic for isneginf)
            no_key = (bias == float("-inf")).all(dim=-1, keepdim=True)
            bias = bias.masked_fill(no_key, 0.0).to(q.dtype)  # SDPA stays finite; those rows are zeroed
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, S, D)
        if no_key is not None:
            o = o.masked_fill(no_key, 0.0)
        out = self._out(o.transpose(1, 2).reshape(batch, seqlen, e))
        return out if self.batch_first else out.transpose(0, 1)
