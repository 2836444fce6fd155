"""Hugging Face BERT-family encoders run on packed real tokens, in place.

``optimize(module)`` finds every supported HF base model inside ``module`` and gives that
instance a ``forward`` of its own (an instance attribute: the class, the parameters, the
state_dict and ``save_pretrained`` are untouched; ``restore`` deletes it). The new forward:

    input_ids / inputs_embeds (B, S) + attention_mask (B, S), HF's convention: 1 = keep
      -> position / token-type ids computed on the padded batch exactly as HF's embeddings do
      -> the T real tokens gathered once; ``model.embeddings`` called (as a module) on them
      -> each layer on packed tokens (T, H): query / key / value, varlen fused attention,
         attention.output.dense + dropout + LayerNorm(residual) fused, intermediate dense +
         activation, output.dense + dropout + LayerNorm(residual) fused; every Linear,
         LayerNorm, Dropout and activation that is not the stock class with nothing attached
         (a PEFT LoRA layer, a hook) is called as a module on the packed tokens
      -> padding put back once: last_hidden_state (B, S, H) with zeros at padded positions;
         ``model.pooler`` called as a module; hidden_states (output_hidden_states=True) are the
         embedding output and every layer's output, each with zeros at padded positions.

A call falls back to transformers' own forward (the class's, never a wrong answer) for what is
not fused here: a model configured as a decoder (``is_decoder``, cross-attention), a batch
with padding under a question-answering head (its loss reads every
padded position), ``output_attentions``, ``head_mask``, cross-attention / cache / decoder
arguments, positional arguments past ``inputs_embeds``, a 3-D / 4-D attention mask, a
batch whose position 0 is padding in a model with a pooler (left padding: HF pools the value
it computed at that padding token),
``output_hidden_states`` given as layer indices, gradient checkpointing in training, hooks on
the layer containers (BertLayer, BertAttention, ...; transformers' own output-capturing hooks
excepted), and while an exporter records the model (torch.onnx, torch.jit.trace).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from bertkern.nn._contract import has_hooks, is_stock, pure_torch
from bertkern.nn._fused import LINEARS, call_dropout, call_linear, call_norm
from bertkern.ops.attention import attention_varlen
from bertkern.ops.linear import linear
from bertkern.ops.padding import Packing, key_padding_mask_from_attention_mask

__all__ = ["optimize", "restore", "is_optimized", "SUPPORTED"]

# transformers class name -> the output class its forward returns.
SUPPORTED = {
    "BertModel": "BaseModelOutputWithPoolingAndCrossAttentions",
    "RobertaModel": "BaseModelOutputWithPoolingAndCrossAttentions",
    "XLMRobertaModel": "BaseModelOutputWithPoolingAndCrossAttentions",
    "CamembertModel": "BaseModelOutputWithPoolingAndCrossAttentions",
    "ElectraModel": "BaseModelOutputWithPastAndCrossAttentions",
}
_MARK = "_bertkern_optimized"
# Keyword arguments the fast path takes, with the values it takes them at.
_BENIGN = {"num_items_in_batch": "any",  # a loss argument heads pass on (HF Trainer): no effect here
           "head_mask": None, "encoder_hidden_states": None, "encoder_attention_mask": None, "cache": None,
           "past_key_values": None, "use_cache": (None, False), "output_attentions": (None, False)}


def _supported_classes():
    import transformers

    return tuple(getattr(transformers, name) for name in SUPPORTED if hasattr(transformers, name))


def _check_config(model: nn.Module) -> None:
    config = model.config
    name = type(model).__name__
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"bertkern.hf.optimize: {name} uses position_embedding_type="
                         f"{config.position_embedding_type!r}; bertkern supports 'absolute' only")
    for i, layer in enumerate(model.encoder.layer):
        for path in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.self.dropout",
                     "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                     "output.dense", "output.LayerNorm"):
            try:
                layer.get_submodule(path)
            except AttributeError:
                raise ValueError(f"bertkern.hf.optimize: {name}.encoder.layer[{i}] has no {path}: not the BERT "
                                 "layer layout bertkern runs") from None


def optimize(module: nn.Module) -> nn.Module:
    """Make every supported HF encoder stack inside ``module`` run on bertkern's kernels, in
    place; returns ``module``. Raises TypeError when there is none (naming what is supported)
    and ValueError for a supported class configured in a way bertkern does not run."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"bertkern.hf.optimize expects an nn.Module, got {type(module).__name__}")
    classes = _supported_classes()
    stacks = [m for m in module.modules() if isinstance(m, classes)]
    if not stacks:
        found = sorted({type(m).__name__ for m in module.modules() if hasattr(m, "config")})
        raise TypeError(f"bertkern.hf.optimize: no supported encoder in {type(module).__name__}"
                        f"{' (found ' + ', '.join(found) + ')' if found else ''}; supported: "
                        f"{', '.join(SUPPORTED)} and every head model built on them (BERT-architecture "
                        "checkpoints such as MiniLM included). DistilBERT and decoders are not supported.")
    for m in stacks:
        _check_config(m)
    # A question-answering head takes a softmax over every position, padding included: there
    # transformers' values at padded positions (computed from the padding tokens) are part of
    # the loss, so such a stack falls back whenever its batch has padding.
    exact = {id(sub) for head in module.modules() if type(head).__name__.endswith("ForQuestionAnswering")
             for sub in head.modules()}
    for m in stacks:
        if not m.__dict__.get(_MARK, False):
            m.forward = _FastForward(m, exact_padding=id(m) in exact)
            m.__dict__[_MARK] = True
    return module


def restore(module: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: every optimized stack inside ``module`` runs transformers' forward."""
    for m in module.modules():
        if m.__dict__.pop(_MARK, False):
            m.__dict__.pop("forward", None)
    return module


def is_optimized(module: nn.Module) -> bool:
    return any(m.__dict__.get(_MARK, False) for m in module.modules())


# ---- the forward -----------------------------------------------------------------------------

class _FastForward:
    """The ``forward`` that :func:`optimize` gives a model instance. An object rather than a
    closure, so that ``copy.deepcopy`` (EMA copies, ``model.copy()``) and pickling
    (``torch.save(model)``) carry it over to the copy's own weights. Its signature is
    transformers' (``inspect.signature(model.forward)`` is unchanged for Trainer, PEFT,
    sentence-transformers)."""

    def __init__(self, model: nn.Module, exact_padding: bool):
        self.model = model
        self.exact_padding = exact_padding

    @property
    def __signature__(self):
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, *args, **kwargs):
        model = self.model
        if args or not _fast_path_ok(model, input_ids, attention_mask, inputs_embeds, kwargs, self.exact_padding) \
                or _packs_rows(attention_mask, position_ids, input_ids if input_ids is not None else inputs_embeds):
            return type(model).forward(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                       *args, **kwargs)
        return _packed_forward(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, kwargs)


def _packs_rows(attention_mask, position_ids, ref) -> bool:
    """Position ids that restart inside a row with no attention mask: transformers 5.25 and
    later read them as sequences packed into the row (attention within each), older versions
    as plain positions. Its own forward gives whichever the installed version does."""
    if attention_mask is not None or position_ids is None or not isinstance(position_ids, torch.Tensor) \
            or position_ids.dim() != 2 or ref.dim() < 2:
        return False
    return Packing.from_position_ids(position_ids.expand(*ref.shape[:2])) is not None


def _user_hooks(m: nn.Module) -> bool:
    """Hooks besides transformers' own output-capturing ones (inert unless outputs are asked for)."""
    if not has_hooks(m):
        return False
    hooks = list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()) + \
        list(m._backward_hooks.values()) + list(m._backward_pre_hooks.values())
    from torch.nn.modules import module as _module

    hooks += list(_module._global_forward_hooks.values()) + list(_module._global_forward_pre_hooks.values())
    return any(getattr(h, "__module__", "") != "transformers.utils.output_capturing" for h in hooks) or \
        bool(_module._global_backward_hooks or _module._global_backward_pre_hooks)


def _fast_path_ok(model, input_ids, attention_mask, inputs_embeds, kwargs, exact_padding=False) -> bool:
    if pure_torch() or (input_ids is None) == (inputs_embeds is None):
        return False  # an exporter records transformers' path; HF raises the input error itself
    for key, value in kwargs.items():
        if key in ("return_dict", "output_hidden_states"):
            continue
        if key not in _BENIGN:
            return False
        allowed = _BENIGN[key]
        if allowed != "any" and not any(value is a for a in (allowed if isinstance(allowed, tuple) else (allowed,))):
            return False
    config = model.config
    if getattr(config, "output_attentions", False) or getattr(config, "is_decoder", False) \
            or getattr(config, "add_cross_attention", False):
        return False  # decoder use (causal, cache, cross-attention): transformers' forward
    hidden = kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False))
    if hidden is not None and not isinstance(hidden, bool):
        return False  # layer indices: transformers selects them
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref.dim() != (2 if input_ids is not None else 3):
        return False
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(ref.shape[:2]):
        return False
    if inputs_embeds is not None and inputs_embeds.dtype == torch.float64 and inputs_embeds.device.type != "cpu":
        return False
    if exact_padding and attention_mask is not None and not bool(attention_mask.bool().all()):
        return False  # a question-answering head reads every padded position (see optimize)
    if (getattr(model, "pooler", None) is not None and attention_mask is not None
            and not bool(attention_mask[:, :1].all())):
        # HF's pooler reads position 0, which this batch pads (left padding): transformers
        # computes a value for that padding token and pools it; only its forward gives that.
        return False
    containers = [model.embeddings, model.encoder]
    for layer in model.encoder.layer:
        if model.training and getattr(layer, "gradient_checkpointing", False):
            return False
        containers += [layer, layer.attention, layer.attention.self, layer.attention.output, layer.intermediate,
                       layer.output]
    return not any(_user_hooks(m) for m in containers)


def _packed_forward(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, kwargs):
    from transformers import modeling_outputs

    config = model.config
    emb = model.embeddings
    ref = input_ids if input_ids is not None else inputs_embeds
    batch, seqlen = ref.shape[:2]
    device = ref.device
    # Ids on the padded batch, as transformers' embeddings compute them.
    if position_ids is None:
        if hasattr(emb, "create_position_ids_from_input_ids"):  # RoBERTa family: from the pad token
            position_ids = (emb.create_position_ids_from_input_ids(input_ids, emb.padding_idx) if input_ids is not None
                            else emb.create_position_ids_from_inputs_embeds(inputs_embeds, emb.padding_idx))
        else:
            position_ids = emb.position_ids[:, :seqlen]
    position_ids = position_ids.expand(batch, seqlen)
    if token_type_ids is None:
        token_type_ids = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
    token_type_ids = token_type_ids.expand(batch, seqlen)

    # Padding removed once (with no attention_mask, pack / unpack are reshapes).
    packing = (Packing.full(batch, seqlen, device) if attention_mask is None
               else Packing.from_mask(key_padding_mask_from_attention_mask(attention_mask)))
    real = packing.pack
    x = emb(input_ids=None if input_ids is None else real(input_ids)[None],
            token_type_ids=real(token_type_ids)[None], position_ids=real(position_ids)[None],
            inputs_embeds=None if inputs_embeds is None else real(inputs_embeds)[None])[0]
    if hasattr(model, "embeddings_project"):  # ELECTRA with embedding_size != hidden_size
        x = model.embeddings_project(x)

    want_hidden = bool(kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False)))
    hidden_states = [x] if want_hidden else None
    for layer in model.encoder.layer:
        x = _layer(layer, x, packing.cu_seqlens, packing.max_seqlen)
        if want_hidden:
            hidden_states.append(x)
    last = packing.unpack(x)
    fields = {"last_hidden_state": last}
    output_cls = getattr(modeling_outputs, SUPPORTED[_supported_name(model)])
    if "pooler_output" in output_cls.__dataclass_fields__:
        pooler = getattr(model, "pooler", None)
        fields["pooler_output"] = pooler(last) if pooler is not None else None
    if want_hidden:
        fields["hidden_states"] = tuple(packing.unpack(h) for h in hidden_states[:-1]) + (last,)
    out = output_cls(**fields)
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _supported_name(model) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return cls.__name__
    raise TypeError(type(model).__name__)


def _gelu_in_place(inter, h) -> bool:
    """transformers' exact GELU after a stock dense, with no autograd to feed."""
    act, dense = inter.intermediate_act_fn, inter.dense
    return (not (torch.is_grad_enabled() and (h.requires_grad or dense.weight.requires_grad))
            and type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu
            and not has_hooks(act) and is_stock(dense, *LINEARS) and dense.bias is not None and not pure_torch())


def _layer(layer, x, cu_seqlens, max_seqlen):
    """One BERT layer on packed tokens x (T, H): post-LN, as transformers' BertLayer."""
    sa = layer.attention.self
    total = x.shape[0]
    heads, head_dim = sa.num_attention_heads, sa.attention_head_size

    def split(t):
        return t.view(total, heads, head_dim)

    inference = not torch.is_grad_enabled() and not pure_torch()

    def dense(m, t):
        if inference and is_stock(m, *LINEARS) and m.bias is not None:
            return linear(t, m.weight, None).add_(m.bias)  # no broadcast copy of the bias first
        return call_linear(m, t)

    q, k, v = split(dense(sa.query, x)), split(dense(sa.key, x)), split(dense(sa.value, x))
    p = sa.dropout.p if sa.training else 0.0
    a = attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, scale=sa.scaling).reshape(total, heads * head_dim)
    so = layer.attention.output
    h = call_norm(so.LayerNorm, call_dropout(so.dropout, dense(so.dense, a)), residual=x)
    inter = layer.intermediate
    if _gelu_in_place(inter, h):
        # Inference: the GEMM output is ours alone, so bias and exact GELU are applied in place
        # (no second (T, 4H) tensor: measured 3-8% of the whole MiniLM forward on CPU).
        i = torch.ops.aten.gelu_(linear(h, inter.dense.weight, None).add_(inter.dense.bias))
    else:
        i = inter.intermediate_act_fn(call_linear(inter.dense, h))
    out = layer.output
    return call_norm(out.LayerNorm, call_dropout(out.dropout, dense(out.dense, i)), residual=h)
