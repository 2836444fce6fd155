"""bertkern.EncoderLayer / bertkern.Encoder: drop-in nn.TransformerEncoderLayer / Encoder that
compute real tokens only.

Data flow (README "What drop-in means", docs/drop-in.md)::

    src (B, S, E) + src_key_padding_mask (B, S), True = padding
      -> gather the T real tokens once (bertkern.ops.padding.Packing) x (T, E), cu_seqlens, max_seqlen
      -> per layer, called as a module: layer(x, is_causal=..., cu_seqlens=..., max_seqlen=...)
         self_attn(x, x, x, need_weights=False, cu_seqlens=...)   one QKV GEMM, varlen attention
         norm1 / norm2 fused with the residual add, linear1 / linear2 on (T, E)
      -> scatter back once                                        (B, S, E), zeros at padding

The module contract: every layer is called as a module (hooks, ``checkpoint_wrapper``, FSDP2's
hooks and subclass overrides act) and every submodule that is not exactly the stock class with
nothing attached is called as a module too (``bertkern.nn._contract``); the fused kernels are
the fast path of the stock case only. A layer that cannot take packed tokens (a torch layer
kept as it is, a subclass whose ``forward`` has torch's exact signature) is given the padded
batch of the same tokens.

Masks:
  * ``src_key_padding_mask`` (B, S): bool (True = padding) or float (-inf = padding, 0 = keep);
    these run on the packed fast path.
  * ``mask`` (S, S): a causal mask (torch's ``generate_square_subsequent_mask``, bool or float,
    or any mask with ``is_causal=True``) runs in the fused kernel with ``causal=True``.
  * Any other ``mask`` ((S, S) or (B * nhead, S, S), bool or float), a float key-padding mask
    with values other than 0 / -inf, a head dim the Triton kernel does not take on CUDA, or an
    ONNX export / ``torch.jit.trace`` takes the *padded path*: every layer called as torch
    calls it, ``layer(src, src_mask=..., src_key_padding_mask=..., is_causal=...)``, attention
    by ``F.scaled_dot_product_attention`` with the masks added; correct, slower.

Outputs at padded positions are zero on every path (torch's training path leaves values
computed from padding there). A query that may attend to no key (a fully padded sequence)
gives zeros and zero gradients, never NaN.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bertkern.errors import (TypeAndAssertionError, TypeAndAttributeError, TypeAndRuntimeError,
                             ValueAndAssertionError, ValueAndRuntimeError)
from bertkern.nn._contract import is_stock, pure_torch
from bertkern.nn._fused import LAYER_NORMS as _LAYER_NORMS
from bertkern.nn._fused import call_dropout, call_linear, call_norm
from bertkern.nn.attention import MultiheadAttention, causal_mask
from bertkern.nn.layer_norm import LayerNorm
from bertkern.ops.padding import Packing

__all__ = ["EncoderLayer", "Encoder"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OUT_PROJ = nn.modules.linear.NonDynamicallyQuantizableLinear
# torch's submodule classes in an nn.TransformerEncoderLayer -> what from_torch builds for them.
_STOCK = {"linear1": (nn.Linear,), "linear2": (nn.Linear,), "norm1": _LAYER_NORMS, "norm2": _LAYER_NORMS,
          "dropout": (nn.Dropout,), "dropout1": (nn.Dropout,), "dropout2": (nn.Dropout,)}


def _activation_fn(activation):
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueAndRuntimeError(f"activation should be 'relu', 'gelu' or a callable, got {activation!r}")
    if not callable(activation):
        raise TypeError(f"activation should be 'relu', 'gelu' or a callable, got {type(activation).__name__}")
    return activation


def _is_relu(fn) -> bool:
    return fn is F.relu or fn is torch.relu


def _preserve_flags(new: nn.Module, old: nn.Module) -> None:
    """Copy ``requires_grad`` of every parameter and ``training`` of every submodule that the two
    modules share by name (conversion keeps frozen weights frozen and per-module modes)."""
    old_params = dict(old.named_parameters())
    for name, p in new.named_parameters():
        if name in old_params:
            p.requires_grad_(old_params[name].requires_grad)
    old_modules = dict(old.named_modules())
    for name, m in new.named_modules():
        if name in old_modules:
            m.training = old_modules[name].training


def _load_copies(new: nn.Module, old: nn.Module, kept: set[str]) -> None:
    """Give ``new`` (built on the meta device) copies of ``old``'s weights, except under the
    submodule names in ``kept`` (deep copies that already hold theirs). No random init is drawn."""
    def is_kept(key):
        return any(key == k or key.startswith(k + ".") for k in kept)

    state = {k: v.detach().clone() for k, v in old.state_dict().items() if not is_kept(k)}
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not is_kept(k)]
    if missing or unexpected:
        raise RuntimeError(f"conversion: state_dict mismatch, missing {missing}, unexpected {unexpected}")
    _preserve_flags(new, old)


def _carry_submodules(new: nn.Module, old: nn.Module) -> set[str]:
    """Between torch's and bertkern's layer: deep-copy into ``new`` each FFN / norm / dropout
    submodule of ``old`` that is not a stock class with nothing attached (an adapter, a hooked
    or subclassed norm), carry the stock dropouts' rates; return the names carried over."""
    kept = set()
    for name, classes in _STOCK.items():
        sub = getattr(old, name)
        if not is_stock(sub, *classes):
            setattr(new, name, copy.deepcopy(sub))
            kept.add(name)
        elif isinstance(sub, nn.Dropout):
            getattr(new, name).p = sub.p
    return kept


def _overrides_forward_without_packing(cls: type) -> bool:
    """An EncoderLayer subclass whose own ``forward`` cannot take cu_seqlens (torch's signature)."""
    cached = _PACKED_SIGNATURES.get(cls)
    if cached is None:
        params = inspect.signature(cls.forward).parameters
        cached = "cu_seqlens" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        _PACKED_SIGNATURES[cls] = cached
    return not cached


_PACKED_SIGNATURES: dict[type, bool] = {}


class EncoderLayer(nn.Module):
    """Drop-in ``nn.TransformerEncoderLayer`` (same constructor, attributes, state_dict keys).

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False, *,
    cu_seqlens=None, max_seqlen=None)``:

    * without ``cu_seqlens``: torch's layer on a padded (or unbatched) ``src``; padding is
      removed and put back inside, outputs at padded positions are zero.
    * with ``cu_seqlens`` (B + 1,) int32 and ``max_seqlen``: ``src`` is (T, E), the real tokens
      of B sequences back to back (what ``bertkern.ops.unpad`` returns); returns (T, E). This is
      how :class:`Encoder` calls its layers, so a layer's hooks see packed tokens.

    ``self_attn`` is a :class:`bertkern.nn.MultiheadAttention`; every submodule that is not the
    stock class with nothing attached (an adapter, a hook, a parametrization) is called as a
    module on the packed tokens.
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
            raise ValueAndAssertionError(
                f"EncoderLayer: d_model ({d_model}) must be a positive multiple of nhead ({nhead}) "
                "(embed_dim must be divisible by num_heads)")
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
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

    # ---- conversion --------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "EncoderLayer":
        """A bertkern.EncoderLayer with ``layer``'s settings and a copy of its weights.

        Keeps ``requires_grad``, train / eval mode (per submodule), dtype and device. A
        submodule that is not torch's stock class with nothing attached (a LoRA layer, a
        quantized or parametrized linear, a hooked norm) is kept: deep-copied, not replaced.
        """
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"from_torch expects an nn.TransformerEncoderLayer, got {type(layer).__name__}")
        if type(layer).forward is not nn.TransformerEncoderLayer.forward:
            raise TypeError(f"from_torch: {type(layer).__name__} overrides forward, which a converted layer would "
                            "skip; pass the layer to bertkern.Encoder as it is (it is called on the padded batch)")
        attn = layer.self_attn
        w = layer.linear1.weight if isinstance(getattr(layer.linear1, "weight", None), torch.Tensor) \
            else attn.in_proj_weight
        new = cls(
            attn.embed_dim, attn.num_heads, layer.linear1.out_features, dropout=layer.dropout.p,
            activation=copy.deepcopy(layer.activation) if isinstance(layer.activation, nn.Module) else layer.activation,
            layer_norm_eps=layer.norm1.eps, batch_first=attn.batch_first, norm_first=layer.norm_first,
            bias=attn.in_proj_bias is not None, device="meta", dtype=w.dtype,
        )
        kept = _carry_submodules(new, layer)
        if not is_stock(attn, nn.MultiheadAttention):
            new.self_attn = copy.deepcopy(attn)  # torch's forward, given the padded batch
            kept.add("self_attn")
        elif not is_stock(attn.out_proj, _OUT_PROJ):
            new.self_attn.out_proj = copy.deepcopy(attn.out_proj)
            kept.add("self_attn.out_proj")
        new.self_attn.dropout = attn.dropout
        # Built on the meta device and given copies of the weights: no random init is drawn,
        # so converting (like torch's deepcopy of the layer) leaves the RNG stream untouched.
        _load_copies(new, layer, kept)
        return new

    def to_torch(self) -> nn.TransformerEncoderLayer:
        """A plain ``nn.TransformerEncoderLayer`` with this layer's settings and copies of its
        weights (``requires_grad`` and modes kept). Non-stock submodules are deep-copied; a
        ``self_attn`` whose ``out_proj`` is not stock stays a bertkern.nn.MultiheadAttention,
        because torch's attention reads out_proj's weight and would skip the adapter."""
        attn = self.self_attn
        ref = attn.in_proj_weight
        new = nn.TransformerEncoderLayer(
            attn.embed_dim, attn.num_heads, self.linear1.out_features, dropout=self.dropout.p,
            activation=copy.deepcopy(self.activation) if isinstance(self.activation, nn.Module) else self.activation,
            layer_norm_eps=self.norm1.eps, batch_first=attn.batch_first, norm_first=self.norm_first,
            bias=attn.in_proj_bias is not None, device="meta", dtype=ref.dtype)
        kept = _carry_submodules(new, self)
        if not is_stock(attn, MultiheadAttention) or not is_stock(attn.out_proj, _OUT_PROJ):
            new.self_attn = copy.deepcopy(attn)
            kept.add("self_attn")
        new.self_attn.dropout = attn.dropout
        _load_copies(new, self, kept)
        return new

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        if cu_seqlens is not None:
            if src_mask is not None or src_key_padding_mask is not None:
                raise ValueError("EncoderLayer: with cu_seqlens the tokens are packed: src_mask and "
                                 "src_key_padding_mask must be None (is_causal is supported)")
            e = self.self_attn.embed_dim
            if not isinstance(src, torch.Tensor) or src.dim() != 2 or src.shape[-1] != e:
                raise ValueAndAssertionError(f"EncoderLayer: packed src must have shape (T, {e}), "
                                             f"got {tuple(getattr(src, 'shape', ()))}")
            fused = self._unpadded_inference(src, cu_seqlens, max_seqlen, bool(is_causal))
            if fused is not None:
                return fused
            return self._block(src, {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, "is_causal": bool(is_causal)})
        attn = self.self_attn
        return _run([self], None, attn.batch_first, attn.embed_dim, attn.num_heads, src, src_mask,
                    src_key_padding_mask, is_causal, call_layers=False)

    def _unpadded_inference(self, x, cu_seqlens, max_seqlen, causal):
        """Inference on CPU when no sequence is shorter than the longest (nothing to remove):
        torch's fused layer kernel (``torch._transformer_encoder_layer_fwd``, what
        nn.TransformerEncoderLayer's fast path runs) is one op per layer, where bertkern's path
        is ten, and faster on CPU at every size measured (benchmarks/bench_encoder.py, the
        no_padding and small-model rows). Only for the stock layer with nothing attached;
        returns None otherwise."""
        attn = self.self_attn
        if (self.training or torch.is_grad_enabled() or causal or x.device.type != "cpu" or x.dtype != torch.float32
                or not isinstance(max_seqlen, int) or max_seqlen == 0 or pure_torch() or torch.compiler.is_compiling()):
            return None
        batch = cu_seqlens.shape[0] - 1
        if x.shape[0] != batch * max_seqlen or attn.num_heads % 2 == 1:
            return None
        gelu = self.activation is F.gelu
        if not (gelu or self.activation is F.relu) or self.norm1.eps != self.norm2.eps:
            return None
        if not (is_stock(attn, MultiheadAttention) and is_stock(attn.out_proj, _OUT_PROJ)
                and is_stock(self.linear1, nn.Linear) and is_stock(self.linear2, nn.Linear)
                and is_stock(self.norm1, *_LAYER_NORMS) and is_stock(self.norm2, *_LAYER_NORMS)
                and all(is_stock(d, nn.Dropout) for d in (self.dropout, self.dropout1, self.dropout2))):
            return None
        weights = (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                   self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias,
                   self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias)
        if any(w is None or w.dtype != x.dtype for w in weights):
            return None
        e = attn.embed_dim
        out = torch._transformer_encoder_layer_fwd(x.view(batch, max_seqlen, e), e, attn.num_heads,
                                                   *weights[:4], gelu, self.norm_first, self.norm1.eps,
                                                   *weights[4:], None, None)
        return out.view(x.shape)

    def _block(self, x: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
        """The layer on tokens: x (T, E) packed (attn_kwargs has cu_seqlens) or a padded batch in
        the layer's layout (attn_kwargs has the masks)."""
        if self.norm_first:
            # x = x + sa(norm1(x)); x = x + ff(norm2(x)), the second add fused into norm2.
            h, x = call_norm(self.norm2, self._sa_block(call_norm(self.norm1, x), attn_kwargs), residual=x,
                         return_residual=True)
            f = self._ff_block(h)
            return x + f.to(x.dtype) if f.dtype != x.dtype else x + f
        x = call_norm(self.norm1, self._sa_block(x, attn_kwargs), residual=x)
        return call_norm(self.norm2, self._ff_block(x), residual=x)

    def _sa_block(self, x: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
        attn = self.self_attn
        if "cu_seqlens" in attn_kwargs and not isinstance(attn, MultiheadAttention):
            # torch's own attention (kept by conversion): give it the padded batch of the tokens.
            a = _call_padded(lambda xp, kpm, mask, causal: attn(xp, xp, xp, key_padding_mask=kpm, need_weights=False,
                                                                  attn_mask=mask, is_causal=causal)[0],
                             x, attn_kwargs["cu_seqlens"], attn_kwargs["max_seqlen"], attn_kwargs["is_causal"],
                             attn.batch_first)
        else:
            a = attn(x, x, x, need_weights=False, **attn_kwargs)[0]
        return call_dropout(self.dropout1, a)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        h = call_linear(self.linear1, x)
        fresh = is_stock(self.linear1, nn.Linear)  # h is ours alone: a ReLU may run in place
        if _is_relu(self.activation):
            h = call_dropout(self.dropout, h, relu=True, inplace_ok=fresh)  # relu + dropout in one pass
        else:
            h = call_dropout(self.dropout, self.activation(h))
        return call_dropout(self.dropout2, call_linear(self.linear2, h))

    def __prepare_scriptable__(self):
        raise _script_error(type(self).__name__)


def _script_error(name: str) -> TypeAndRuntimeError:
    return TypeAndRuntimeError(
        f"torch.jit.script cannot compile bertkern.{name} (its kernels are custom operators with "
        "data-dependent sizes, and TorchScript is deprecated by PyTorch). Use torch.compile, "
        "torch.export.export, torch.onnx.export(..., dynamo=True), or .to_torch() for a plain torch module.")


class Encoder(nn.Module):
    """Drop-in ``nn.TransformerEncoder`` (same constructor, attributes, state_dict keys).

    ``encoder_layer``: a :class:`EncoderLayer` or an ``nn.TransformerEncoderLayer`` (converted
    by :meth:`EncoderLayer.from_torch` when it is torch's stock class with no hooks; any other
    layer, e.g. a subclass with its own forward, is kept and called on the padded batch); each
    of the ``num_layers`` layers starts as a deep copy, as in torch. ``norm``: optional final
    norm (a stock ``nn.LayerNorm`` runs fused). ``enable_nested_tensor`` and ``mask_check`` are
    accepted for compatibility: bertkern always removes padding.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)`` as torch's; ``src``
    may also be a NestedTensor (jagged layout: no padding at all), and then the result is one.
    See the module docstring for masks and paths. Outputs at padded positions are zero.
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        if _convertible(encoder_layer):
            encoder_layer = EncoderLayer.from_torch(encoder_layer)
        attn = getattr(encoder_layer, "self_attn", None) if isinstance(encoder_layer, nn.Module) else None
        if attn is None or not all(hasattr(attn, a) for a in ("embed_dim", "num_heads", "batch_first")):
            raise TypeAndAttributeError(
                "Encoder: encoder_layer must be a bertkern.EncoderLayer or an nn.TransformerEncoderLayer "
                f"(a module with a self_attn attention), got {type(encoder_layer).__name__}")
        if num_layers < 0:
            raise ValueError(f"Encoder: num_layers must be >= 0, got {num_layers}")
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = enable_nested_tensor
        self.mask_check = mask_check
        self._d_model = attn.embed_dim
        self._nhead = attn.num_heads
        self._batch_first = attn.batch_first

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoder) -> "Encoder":
        """A bertkern.Encoder with ``module``'s settings and a copy of its weights; each layer
        converted as by :meth:`EncoderLayer.from_torch` (or kept, when it cannot be), keeping
        ``requires_grad``, modes, dtype, device and non-stock submodules."""
        if not isinstance(module, nn.TransformerEncoder):
            raise TypeError(f"from_torch expects an nn.TransformerEncoder, got {type(module).__name__}")
        if len(module.layers) == 0:
            raise ValueError("from_torch: the nn.TransformerEncoder has no layers")
        layers = [EncoderLayer.from_torch(l) if _convertible(l) else copy.deepcopy(l) for l in module.layers]
        new = cls(layers[0], 0, norm=copy.deepcopy(module.norm),
                  enable_nested_tensor=module.enable_nested_tensor, mask_check=module.mask_check)
        new.layers = nn.ModuleList(layers)
        new.num_layers = len(layers)
        new.training = module.training
        return new

    def to_torch(self) -> nn.TransformerEncoder:
        """A plain ``nn.TransformerEncoder`` with copies of these layers (see
        :meth:`EncoderLayer.to_torch`) and weights; a bertkern.LayerNorm final norm becomes an
        ``nn.LayerNorm``."""
        layers = [l.to_torch() if isinstance(l, EncoderLayer) else copy.deepcopy(l) for l in self.layers]
        norm = self.norm
        if is_stock(norm, LayerNorm):
            plain = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                                 bias=norm.bias is not None, device="meta")
            _load_copies(plain, norm, set())
            norm = plain
        else:
            norm = copy.deepcopy(norm)
        template = layers[0] if layers else EncoderLayer(self._d_model, self._nhead, 1, batch_first=self._batch_first,
                                                         device="meta").to_torch()
        new = nn.TransformerEncoder(template, 0, norm=norm, enable_nested_tensor=False, mask_check=self.mask_check)
        new.layers = nn.ModuleList(layers)
        new.num_layers = len(layers)
        new.enable_nested_tensor = self.enable_nested_tensor
        new.use_nested_tensor = self.use_nested_tensor
        new.training = self.training
        return new

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        return _run(self.layers, self.norm, self._batch_first, self._d_model, self._nhead, src, mask,
                    src_key_padding_mask, is_causal, call_layers=True)

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       causal: bool = False, hidden_states: list | None = None) -> torch.Tensor:
        """Run every layer (and the final norm) on packed tokens: x (T, E), cu_seqlens (B+1,)
        int32, max_seqlen the longest sequence (what bertkern.ops.unpad returns). A list passed
        as ``hidden_states`` gets every layer's output (T, E) appended."""
        if x.dim() != 2 or x.shape[-1] != self._d_model:
            raise ValueAndAssertionError(f"forward_packed: x must have shape (T, {self._d_model}), got {tuple(x.shape)}")
        return _run_packed(self.layers, self.norm, x, cu_seqlens, max_seqlen, causal, call_layers=True,
                           hidden_states=hidden_states)

    def __prepare_scriptable__(self):
        raise _script_error(type(self).__name__)


def _convertible(layer) -> bool:
    """torch's stock layer class with nothing attached to the layer itself: converted. A
    subclass or a hooked layer is kept as it is (torch deep-copies it with its hooks too)."""
    return type(layer) is nn.TransformerEncoderLayer and not (layer._forward_hooks or layer._forward_pre_hooks
                                                              or layer._backward_hooks or layer._backward_pre_hooks)


def _takes_packed(layer: nn.Module) -> bool:
    """Whether ``layer(x, is_causal=..., cu_seqlens=..., max_seqlen=...)`` is understood."""
    inner = getattr(layer, "_checkpoint_wrapped_module", None)  # checkpoint_wrapper passes kwargs on
    if inner is not None:
        return _takes_packed(inner)
    if not isinstance(layer, EncoderLayer):
        return False
    if type(layer).forward is EncoderLayer.forward:  # also FSDP2's class swap, which keeps forward
        return True
    return not _overrides_forward_without_packing(type(layer))


# ---- the two paths ------------------------------------------------------------------------------

def _call_padded(fn, x, cu_seqlens, max_seqlen, causal, batch_first):
    """``fn(x_padded, key_padding_mask, attn_mask, is_causal)`` on the padded batch of the packed
    tokens ``x`` (T, E), in the layout ``batch_first`` says; returns its result packed again."""
    packing = Packing.from_cu_seqlens(cu_seqlens, max_seqlen, x.shape[0], batch_first)
    # An empty sequence would be a row with no key (NaN in torch's attention, NaN gradients
    # after): let it see its first (zero, never gathered) position.
    kpm = packing.key_padding_mask()
    kpm[:, :1] = False
    mask = causal_mask(max_seqlen, x.device) if causal else None
    return packing.pack(fn(packing.unpack(x), kpm, mask, causal))


def _call_layer_packed(layer, x, cu_seqlens, max_seqlen, causal):
    if _takes_packed(layer):
        return layer(x, is_causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    attn = getattr(layer, "self_attn", None)
    return _call_padded(lambda xp, kpm, mask, c: layer(xp, src_mask=mask, src_key_padding_mask=kpm, is_causal=c),
                        x, cu_seqlens, max_seqlen, causal, getattr(attn, "batch_first", True))


def _run_packed(layers, norm, x, cu_seqlens, max_seqlen, causal, call_layers, hidden_states=None):
    for layer in layers:
        if call_layers:
            x = _call_layer_packed(layer, x, cu_seqlens, max_seqlen, causal)
        else:
            x = layer._block(x, {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, "is_causal": causal})
        if hidden_states is not None:
            hidden_states.append(x)
    if norm is not None:
        x = call_norm(norm, x)
    return x


def _run_padded(layers, norm, x, mask, key_padding_mask, causal, pad_mask, batch_first, call_layers):
    """The padded path: x in the user's layout; every layer called as torch's encoder calls it
    (or, for a standalone layer, its own block); padded positions zeroed at the end."""
    for layer in layers:
        if call_layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=key_padding_mask, is_causal=causal)
        else:
            x = layer._block(x, {"attn_mask": mask, "key_padding_mask": key_padding_mask, "is_causal": causal})
    if norm is not None:
        x = call_norm(norm, x)
    if pad_mask is not None:
        x = x.masked_fill((pad_mask if batch_first else pad_mask.T).unsqueeze(-1), 0.0)
    return x


def _is_causal_mask(mask, seqlen):
    """torch's _detect_is_causal_mask, for bool (True = masked) and float (-inf) masks."""
    if mask.shape != (seqlen, seqlen):
        return False
    causal = causal_mask(seqlen, mask.device)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, causal))
    return bool(torch.equal(mask == float("-inf"), causal) and (mask.masked_fill(causal, 0.0) == 0).all())


def _run_nested(layers, norm, d_model, src, mask, key_padding_mask, is_causal, call_layers):
    """A NestedTensor src (B, j, E): its values are the packed real tokens already."""
    if mask is not None or key_padding_mask is not None:
        raise ValueError("Encoder: a NestedTensor src holds no padding: pass no mask or src_key_padding_mask "
                         "(is_causal=True for causal attention)")
    if src.dim() != 3 or src.size(-1) != d_model:
        raise ValueAndAssertionError(f"Encoder: a NestedTensor src must be (B, j, E) with E = d_model = {d_model}, "
                                     f"got {src.dim()}-D")
    if src.layout != torch.jagged:
        src = torch.nested.as_nested_tensor(list(src.unbind()), layout=torch.jagged)
    values, offsets = src.values(), src.offsets()
    cu_seqlens = offsets.to(torch.int32)
    max_seqlen = src._maybe_max_seqlen
    if max_seqlen is None:
        max_seqlen = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    out = _run_packed(layers, norm, values, cu_seqlens, max_seqlen, bool(is_causal), call_layers)
    return torch.nested.nested_tensor_from_jagged(out, offsets, max_seqlen=max_seqlen)


def _run(layers, norm, batch_first, d_model, nhead, src, mask, key_padding_mask, is_causal, call_layers):
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"Encoder: src must be a Tensor, got {type(src).__name__}")
    if src.dtype not in _DTYPES:
        raise TypeAndRuntimeError(f"Encoder: src must be float32, float16, bfloat16 (or float64 on CPU), got {src.dtype}")
    if src.dtype == torch.float64 and src.device.type not in ("cpu", "meta"):
        raise TypeAndRuntimeError("Encoder: float64 is supported on CPU only")
    if src.is_nested:
        return _run_nested(layers, norm, d_model, src, mask, key_padding_mask, is_causal, call_layers)
    unbatched = src.dim() == 2
    if src.dim() not in (2, 3) or src.shape[-1] != d_model:
        raise ValueAndAssertionError(
            f"Encoder: src must have shape {'(B, S, E)' if batch_first else '(S, B, E)'} (or (S, E) unbatched) "
            f"with E = d_model = {d_model}, got {tuple(src.shape)}")
    if unbatched:
        src = src.unsqueeze(0 if batch_first else 1)
        if isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dim() == 1:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    batch, seqlen = (src.shape[0], src.shape[1]) if batch_first else (src.shape[1], src.shape[0])
    on_meta = src.device.type == "meta"

    # -- key padding mask: bool (B, S), True = padding, or float additive (-inf = padding) --
    pad_mask, kpm_bias = None, None
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"Encoder: src_key_padding_mask must be a Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
            raise TypeAndAssertionError(
                "Encoder: src_key_padding_mask must be bool (True = padding) or float (-inf = padding), "
                f"got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, seqlen):
            raise ValueAndAssertionError(f"Encoder: src_key_padding_mask must have shape (B, S) = {(batch, seqlen)}, "
                                         f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != src.device:
            raise ValueAndRuntimeError(
                f"Encoder: src_key_padding_mask is on {key_padding_mask.device} but src is on {src.device}")
        if key_padding_mask.dtype == torch.bool:
            pad_mask = key_padding_mask
        else:
            pad_mask = key_padding_mask == float("-inf")
            bias_values = (key_padding_mask != 0) & ~pad_mask
            if pure_torch():  # the padded path adds any float mask; a tracer must not bake in a branch
                kpm_bias = key_padding_mask
            elif torch.compiler.is_compiling():
                # Inside a graph the branch cannot depend on the data: a 0 / -inf mask runs
                # packed; a mask that carries a real bias fails at run time, never silently.
                torch._assert_async(~bias_values.any(), "bertkern.Encoder under torch.compile: a float "
                                    "src_key_padding_mask must hold only 0 and -inf (use a bool mask, or run eager)")
            elif not on_meta and bool(bias_values.any()):  # a real additive bias, not just padding
                kpm_bias = key_padding_mask

    # -- attention mask: causal -> fused kernel; anything else -> padded path --
    causal = bool(is_causal)
    attn_mask = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"Encoder: mask must be a Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeAndAssertionError(f"Encoder: mask must be bool (True = masked) or float (additive), got {mask.dtype}")
        if tuple(mask.shape) not in ((seqlen, seqlen), (batch * nhead, seqlen, seqlen)):
            raise ValueAndRuntimeError(
                f"Encoder: mask must have shape (S, S) = {(seqlen, seqlen)} or (B * nhead, S, S) = "
                f"{(batch * nhead, seqlen, seqlen)}, got {tuple(mask.shape)}")
        if mask.device != src.device:
            raise ValueAndRuntimeError(f"Encoder: mask is on {mask.device} but src is on {src.device}")
        if is_causal is None and not on_meta:
            causal = _is_causal_mask(mask, seqlen)
        if not causal:
            attn_mask = mask

    head_dim = d_model // nhead
    if src.device.type in ("cpu", "meta"):
        triton_ok = True
    else:
        from bertkern.ops.attention_triton import triton_supports_head_dim  # imports triton

        triton_ok = triton_supports_head_dim(head_dim)
    if attn_mask is not None or kpm_bias is not None or not triton_ok or pure_torch():
        kpm = kpm_bias if kpm_bias is not None else pad_mask
        mask_for_layers = attn_mask if attn_mask is not None else (causal_mask(seqlen, src.device) if causal else None)
        out = _run_padded(layers, norm, src, mask_for_layers, kpm, causal, pad_mask, batch_first, call_layers)
        return out.squeeze(0 if batch_first else 1) if unbatched else out

    # Padding removed once here and put back once at exit (no padding, batch-first: reshapes).
    packing = (Packing.full(batch, seqlen, src.device, batch_first) if pad_mask is None
               else Packing.from_mask(pad_mask, batch_first))
    x = _run_packed(layers, norm, packing.pack(src), packing.cu_seqlens, packing.max_seqlen, causal, call_layers)
    out = packing.unpack(x)
    # Unbatched: reshaped, again as no autograd view (see Packing.unpack: FSDP2's output hooks).
    return torch.ops.aten._unsafe_view(out, (seqlen, out.shape[-1])) if unbatched else out
