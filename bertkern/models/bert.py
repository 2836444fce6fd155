"""bertkern.models.BertModel: HF-compatible BERT encoder that computes real tokens only.

Data flow::

    input_ids (B, S) + attention_mask (B, S), HF's convention: 1 = keep, 0 = padding
      -> key_padding_mask = attention_mask == 0          (torch's convention, True = padding)
      -> indices (T,), cu_seqlens (B+1,), max_seqlen      bertkern.ops.padding.Packing
      -> gather the T real ids (word, position, token type), embed, LayerNorm, dropout  (T, H)
      -> bertkern.Encoder.forward_packed: every layer on the T real tokens           (T, H)
      -> scatter back once                                  last_hidden_state (B, S, H)
      -> pooler: tanh(dense(last_hidden_state[:, 0]))       pooler_output (B, H)

Outputs at padded positions are zero (HF leaves there whatever its layers computed from the
padding tokens). HF's attention_mask is converted at this boundary only.

While an exporter that knows torch's operators only records the model
(``bertkern.nn._contract.pure_torch()``: ``torch.onnx.export``, dynamo or legacy, and
``torch.jit.trace``) the model runs the *padded path* instead, on standard operators only:
embeddings of the whole padded batch (B, S, H) -> ``self.encoder(hidden,
src_key_padding_mask=...)``, which takes its own padded path (SDPA with additive masks) ->
zeros at padded positions -> pooler. Same numbers on real tokens, and batch and sequence
length stay dynamic in the exported graph. ``torch.export.export`` and ``torch.compile`` keep
the packed path with bertkern's custom operators.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bertkern.nn._contract import pure_torch
from bertkern.nn.encoder import Encoder, EncoderLayer
from bertkern.nn.layer_norm import LayerNorm
from bertkern.ops.padding import Packing, key_padding_mask_from_attention_mask

__all__ = ["BertConfig", "BertModel", "BertModelOutput"]

_gelu_tanh = functools.partial(F.gelu, approximate="tanh")

# HF's ACT2FN names -> the same function. "gelu" is the exact erf GELU; the tanh-approximation
# variants ("gelu_new" computes the tanh formula by hand, "gelu_pytorch_tanh" calls F.gelu) agree
# with F.gelu(approximate="tanh") to rounding.
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "relu": F.relu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclasses.dataclass
class BertConfig:
    """BERT hyper-parameters, with HF ``transformers.BertConfig``'s field names and defaults
    (bert-base-uncased). ``hidden_act`` is one of ``"gelu"`` (exact erf GELU), ``"relu"``,
    ``"gelu_new"`` / ``"gelu_pytorch_tanh"`` (tanh approximation), ``"silu"`` / ``"swish"``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig: {name} must be a positive int, got {value!r}")
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers < 0:
            raise ValueError(f"BertConfig: num_hidden_layers must be an int >= 0, got {self.num_hidden_layers!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"BertConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig: hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"BertConfig: {name} must be in [0, 1], got {p!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"BertConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig: pad_token_id must be None or in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_token_id!r}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BertConfig":
        """The fields of a ``transformers.BertConfig``. Raises ValueError for what bertkern does
        not implement: a decoder (``is_decoder``, ``add_cross_attention``), a
        ``position_embedding_type`` other than ``"absolute"`` (transformers 5 ignores that field;
        a checkpoint trained with relative positions would give wrong numbers), an
        ``hidden_act`` that is not a supported name."""
        if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
            raise ValueError("BertConfig.from_hf: is_decoder / add_cross_attention (a causal or cross-attending "
                             "BERT decoder) is not supported; bertkern.models.BertModel is an encoder")
        position_embedding_type = getattr(hf_config, "position_embedding_type", "absolute")
        if position_embedding_type not in (None, "absolute"):
            raise ValueError("BertConfig.from_hf: only position_embedding_type='absolute' is supported, got "
                             f"{position_embedding_type!r}")
        if not isinstance(hf_config.hidden_act, str) or hf_config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig.from_hf: hidden_act must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {hf_config.hidden_act!r}")
        return cls(**{f.name: getattr(hf_config, f.name) for f in dataclasses.fields(cls)})


class BertModelOutput(collections.OrderedDict):
    """What :class:`BertModel` returns, read the way transformers' ``ModelOutput`` is read: by
    attribute (``out.last_hidden_state``), key (``out["pooler_output"]``) or position
    (``out[0]``, ``out.to_tuple()``); fields that are None are left out of the keys and the
    tuple, as in transformers.

    ``last_hidden_state`` (B, S, H), zeros at padded positions; ``pooler_output`` (B, H), None
    for a model built with ``add_pooling_layer=False``; ``hidden_states`` (with
    ``output_hidden_states=True``): the embedding output and every layer's output, (B, S, H)
    each, zeros at padded positions.
    """

    FIELDS = ("last_hidden_state", "pooler_output", "hidden_states")

    def __init__(self, last_hidden_state=None, pooler_output=None, hidden_states=None):
        super().__init__()
        for name, value in zip(self.FIELDS, (last_hidden_state, pooler_output, hidden_states)):
            if value is not None:
                super().__setitem__(name, value)

    def __getattr__(self, name):
        if name in BertModelOutput.FIELDS:
            return self.get(name)
        raise AttributeError(f"BertModelOutput has no attribute {name!r}")

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __reduce__(self):
        return (type(self), tuple(self.get(f) for f in self.FIELDS))


# torch.export / torch.compile see through it as they do through transformers' ModelOutput.
torch.utils._pytree.register_pytree_node(
    BertModelOutput,
    lambda out: (list(out.values()), list(out.keys())),
    lambda values, keys: BertModelOutput(**dict(zip(keys, values))),
    serialized_type_name="bertkern.models.bert.BertModelOutput",
)


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, LayerNorm, dropout; on token ids of any shape
    (the model calls it on the packed real tokens, shape (T,); under an exporter on the padded
batch, (B, S)). Parameter names are HF's."""

    def __init__(self, config: BertConfig, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id, **factory)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, **factory)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, **factory)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **factory)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = words + self.position_embeddings(position_ids)
        if token_type_ids is None:  # all type 0: one row, broadcast
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token)), as HF's."""

    def __init__(self, config: BertConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, device=device, dtype=dtype)
        self.activation = nn.Tanh()

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(first_token))


class BertModel(nn.Module):
    """BERT encoder (embeddings, post-LN layers, pooler) that runs on real tokens only.

    Same computation and parameter names (for embeddings and pooler) as HF's
    ``transformers.BertModel``; the layers are :class:`bertkern.EncoderLayer` (torch's names:
    ``self_attn.in_proj_weight`` = HF's query / key / value stacked, ``self_attn.out_proj``,
    ``norm1``, ``linear1``, ``linear2``, ``norm2``). :meth:`from_hf` converts an HF model.

    Dropout sits where HF puts it: after the embedding LayerNorm, on the attention
    probabilities (``self_attn.dropout``), after the attention output projection
    (``dropout1``) and after the FFN output projection (``dropout2``); none inside the FFN
    (each layer's ``dropout`` has p = 0). The attention-probability dropout uses bertkern's
    Philox stream, so a training step matches HF's in distribution, not bit for bit.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"BertModel: config must be a bertkern.models.BertConfig, got {type(config).__name__} "
                            "(for an HF model use BertModel.from_hf)")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embeddings = BertEmbeddings(config, **factory)
        layer = EncoderLayer(
            config.hidden_size, config.num_attention_heads, config.intermediate_size,
            dropout=config.hidden_dropout_prob, activation=_ACTIVATIONS[config.hidden_act],
            layer_norm_eps=config.layer_norm_eps, batch_first=True, norm_first=False, **factory,
        )
        layer.self_attn.dropout = config.attention_probs_dropout_prob
        layer.dropout.p = 0.0  # HF has no dropout between intermediate and output
        self.encoder = Encoder(layer, config.num_hidden_layers, enable_nested_tensor=False)
        self.pooler = BertPooler(config, **factory) if add_pooling_layer else None

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BertModel: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"BertModel: input_ids must be a Tensor, got {type(input_ids).__name__}")
            if input_ids.dim() != 2:
                raise ValueError(f"BertModel: input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"BertModel: input_ids must be int64 or int32, got {input_ids.dtype}")
            ref = input_ids
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise TypeError("BertModel: inputs_embeds must be a floating-point Tensor (B, S, H)")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"BertModel: inputs_embeds must have shape (B, S, {self.config.hidden_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            ref = inputs_embeds
        shape = tuple(ref.shape[:2])
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"BertModel: {name} must be a Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"BertModel: {name} must have the shape of input_ids (or of inputs_embeds without H), (B, S) = {shape}, "
                                 f"got {tuple(t.shape)}")
            if t.device != ref.device:
                raise ValueError(f"BertModel: {name} is on {t.device} but the input is on {ref.device}")
            if name != "attention_mask" and t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"BertModel: {name} must be int64 or int32, got {t.dtype}")
        if position_ids is None and shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"BertModel: sequence length {shape[1]} exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BertModelOutput | tuple:
        """Encode a padded batch; HF's ``BertModel.forward`` keywords.

        Args:
            input_ids: (B, S) int64 / int32 token ids; or ``inputs_embeds`` (B, S, H) instead.
            attention_mask: (B, S), HF's convention: 1 = real token, 0 = padding (bool, int or
                float). Padding may be anywhere (right, left, in between). None = no padding.
            token_type_ids: (B, S) segment ids; None = all 0.
            position_ids: (B, S) absolute positions; None = 0 .. S-1 in every row, as HF does
                (so with left padding the first real token is not at position 0, as in HF).
                With no attention_mask, a position that is not the previous + 1 starts a new
                sequence packed into the same row, attended separately (transformers >= 5.25).
            output_hidden_states: also return the embedding output and every layer's output.
            return_dict: False returns ``to_tuple()``.
            ``head_mask``, ``output_attentions=True`` and decoder arguments
            (``encoder_hidden_states``, ``past_key_values``, ``use_cache=True``) raise
            ValueError: bertkern never forms the attention matrix. ``bertkern.hf.optimize`` on
            the transformers model falls back to transformers for those calls instead.

        Returns:
            :class:`BertModelOutput`: ``last_hidden_state`` (B, S, H), zeros at padded positions
            (HF leaves there values computed from the padding tokens); ``pooler_output`` (B, H):
            ``tanh(dense(last_hidden_state[:, 0]))``, HF's pooler on position 0 (for a row whose
            position 0 is padding that is ``tanh(dense.bias)``, where HF pools its value at the
            padding token); ``hidden_states`` when asked. A row that is all padding gives a zero
            last_hidden_state, never NaN.
        """
        if head_mask is not None or output_attentions:
            raise ValueError("BertModel: head_mask / output_attentions need the attention matrix, which bertkern "
                             "never forms; run the transformers model under bertkern.hf.optimize (it falls back "
                             "to transformers for such calls)")
        for key, value in kwargs.items():
            if key not in ("encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache",
                           "use_cache") or not (value is None or value is False):
                raise ValueError(f"BertModel: {key} is not supported (bertkern.BertModel is an encoder)")
        self._check_inputs(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, seqlen = ref.shape[:2]
        hidden_size = self.config.hidden_size
        device = ref.device
        # No attention_mask but position ids that restart inside a row: sequences packed into the
        # rows (transformers' padding-free layout), attention within each (Packing.from_position_ids).
        packed_rows = None
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=device).expand(batch, seqlen)
        elif attention_mask is None:
            packed_rows = Packing.from_position_ids(position_ids)

        layers = [] if output_hidden_states else None
        if pure_torch():
            if output_hidden_states:
                raise ValueError("BertModel: output_hidden_states is not exported; export last_hidden_state")
            if packed_rows is not None:
                raise ValueError("BertModel: sequences packed into rows (position_ids restarting with no "
                                 "attention_mask) are not exported; export with an attention_mask")
            hidden = self._forward_padded(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        else:
            # Padding removed once (with no attention_mask, pack / unpack are reshapes).
            if packed_rows is not None:
                packing = packed_rows
            elif attention_mask is None:
                packing = Packing.full(batch, seqlen, device)
            else:
                packing = Packing.from_mask(key_padding_mask_from_attention_mask(attention_mask))
            real = packing.pack
            x = self.embeddings(None if input_ids is None else real(input_ids), real(position_ids),
                                None if token_type_ids is None else real(token_type_ids),
                                None if inputs_embeds is None else real(inputs_embeds))
            if layers is not None:
                layers.append(x)
            x = self.encoder.forward_packed(x, packing.cu_seqlens, packing.max_seqlen, hidden_states=layers)
            hidden = packing.unpack(x)

        pooled = None
        if self.pooler is not None:
            first = hidden[:, 0] if seqlen > 0 else hidden.new_zeros(batch, hidden_size)
            pooled = self.pooler(first)
        hidden_states = None
        if layers is not None:
            hidden_states = tuple(packing.unpack(h) for h in layers[:-1]) + (hidden,)
        out = BertModelOutput(hidden, pooled, hidden_states)
        return out.to_tuple() if return_dict is False else out

    def _forward_padded(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds) -> torch.Tensor:
        """The pure-torch padded path (exporters): the layers on the whole padded batch, padded
        positions masked out of attention as keys and zeroed in the output."""
        if attention_mask is None:
            return self.encoder(self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds))
        key_padding_mask = key_padding_mask_from_attention_mask(attention_mask)  # True = padding
        # The packed path never reads ids at padded positions: give the lookups a valid index
        # there (any garbage, e.g. -100 or an id past the vocabulary, would fail the gather).
        if input_ids is not None:
            input_ids = input_ids.masked_fill(key_padding_mask, 0)
        position_ids = position_ids.masked_fill(key_padding_mask, 0)
        if token_type_ids is not None:
            token_type_ids = token_type_ids.masked_fill(key_padding_mask, 0)
        x = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)
        hidden = self.encoder(x, src_key_padding_mask=key_padding_mask)
        # The Encoder zeros padded positions already; kept explicit, as the packed path's scatter.
        return hidden.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)

    @classmethod
    def from_pretrained(cls, path_or_name: str, **hf_kwargs) -> "BertModel":
        """Load a BERT checkpoint with ``transformers.BertModel.from_pretrained(path_or_name,
        **hf_kwargs)`` (a local folder or a hub name transformers can resolve; a checkpoint of a
        ``BertFor...`` head loads its encoder) and convert it with :meth:`from_hf`."""
        try:
            import transformers
        except ImportError as e:  # optional extra
            raise ImportError("BertModel.from_pretrained needs the `transformers` package") from e
        return cls.from_hf(transformers.BertModel.from_pretrained(path_or_name, **hf_kwargs))

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> "BertModel":
        """A BertModel with ``hf_model``'s config and a copy of its weights, on its device, in its
        dtype and train / eval mode. ``hf_model`` is a ``transformers.BertModel`` (for a
        ``BertFor...`` head model pass ``model.bert``). Raises ValueError for configurations
        bertkern does not implement (see :meth:`BertConfig.from_hf`)."""
        try:
            import transformers
        except ImportError as e:  # optional extra
            raise ImportError("BertModel.from_hf needs the `transformers` package") from e
        if not isinstance(hf_model, transformers.BertModel):
            hint = " (pass model.bert)" if isinstance(getattr(hf_model, "bert", None), transformers.BertModel) else ""
            raise TypeError(f"BertModel.from_hf expects a transformers.BertModel, got {type(hf_model).__name__}{hint}")
        config = BertConfig.from_hf(hf_model.config)
        ref = hf_model.embeddings.word_embeddings.weight
        new = cls(config, add_pooling_layer=hf_model.pooler is not None, device=ref.device, dtype=ref.dtype)

        def copy_weight_bias(dst: nn.Module, src: nn.Module):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)

        with torch.no_grad():
            src_emb, dst_emb = hf_model.embeddings, new.embeddings
            for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
                getattr(dst_emb, name).weight.copy_(getattr(src_emb, name).weight)
            copy_weight_bias(dst_emb.LayerNorm, src_emb.LayerNorm)
            for dst, src in zip(new.encoder.layers, hf_model.encoder.layer):
                sa = src.attention.self
                dst.self_attn.in_proj_weight.copy_(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]))
                dst.self_attn.in_proj_bias.copy_(torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))
                copy_weight_bias(dst.self_attn.out_proj, src.attention.output.dense)
                copy_weight_bias(dst.norm1, src.attention.output.LayerNorm)
                copy_weight_bias(dst.linear1, src.intermediate.dense)
                copy_weight_bias(dst.linear2, src.output.dense)
                copy_weight_bias(dst.norm2, src.output.LayerNorm)
            if new.pooler is not None:
                copy_weight_bias(new.pooler.dense, hf_model.pooler.dense)
        new.train(hf_model.training)
        return new
