"""The module contract: what a training script does to nn.TransformerEncoder acts on bertkern.Encoder.

Each case attaches the same thing (an adapter, a hook, a subclass, a parametrization, frozen
weights, quantization, PEFT LoRA) to ``nn.TransformerEncoder`` and to ``bertkern.Encoder``
holding the same weights, and compares outputs and gradients on real tokens; the fused fast
path must never skip user code. Also: NestedTensor input, float masks under torch.compile,
dropout=1.0, error types, torch.jit.script, to_torch().
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bertkern
from bertkern.errors import ValueAndAssertionError

from tests.test_encoder import make_kpm, torch_encoder

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",
    "ignore:torch.quantize_per_tensor:UserWarning",
    "ignore:enable_nested_tensor is True:UserWarning",
    "ignore:Support for mismatched:UserWarning",
    "ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning",
)

D = 32


def pair(**cfg):
    ref = torch_encoder(**cfg)
    return ref, bertkern.Encoder.from_torch(ref)


def batch(kind="scattered", b=4, s=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, D, generator=g), make_kpm(kind, b, s, g)


def outputs_and_grads(enc, src, kpm, **kwargs):
    """Output on real tokens and every parameter gradient of a fixed weighted loss."""
    enc.zero_grad(set_to_none=True)
    out = enc(src, src_key_padding_mask=kpm, **kwargs)
    w = torch.linspace(-1, 1, out.shape[-1])
    (out[~kpm] * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    return out[~kpm].detach(), grads


def assert_same(ref_enc, bk_enc, src, kpm, rtol=1e-4, atol=1e-5, **kwargs):
    ref_out, ref_g = outputs_and_grads(ref_enc, src, kpm, **kwargs)
    out, g = outputs_and_grads(bk_enc, src, kpm, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    assert g.keys() == ref_g.keys()
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
    return out


class LoRALinear(nn.Linear):
    """A LoRA-style adapter as users write it: an nn.Linear subclass adding B(A(x))."""

    def __init__(self, base: nn.Linear, r=4):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.lora_a = nn.Linear(base.in_features, r, bias=False)
        self.lora_b = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.5)

    def forward(self, x):
        return super().forward(x) + self.lora_b(self.lora_a(x))


class ScaledLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return 1.5 * super().forward(x) + 0.25


# ---- adapters, subclasses, parametrizations --------------------------------------------------

@pytest.mark.parametrize("where", ["linear1", "linear2"])
def test_lora_subclass_adapter_acts(where):
    ref = torch_encoder(dropout=0.0)
    torch.manual_seed(3)
    setattr(ref.layers[0], where, LoRALinear(getattr(ref.layers[0], where)))
    bk = bertkern.Encoder.from_torch(ref)
    assert type(getattr(bk.layers[0], where)) is LoRALinear  # kept, not replaced
    src, kpm = batch()
    out = assert_same(ref, bk, src, kpm)
    plain = bertkern.Encoder.from_torch(torch_encoder(dropout=0.0))
    assert (plain(src, src_key_padding_mask=kpm)[~kpm] - out).abs().max() > 0.1  # the adapter matters


def test_adapter_attached_after_conversion_acts():
    ref, bk = pair(dropout=0.0)
    torch.manual_seed(4)
    ref.layers[1].linear1 = LoRALinear(ref.layers[1].linear1)
    bk.layers[1].linear1 = copy.deepcopy(ref.layers[1].linear1)
    assert_same(ref, bk, *batch(), )


def test_out_proj_adapter_acts():
    """torch's nn.MultiheadAttention reads out_proj.weight and skips an adapter placed there;
    bertkern calls out_proj as a module. Reference: the adapter folded into the weight."""
    ref, bk = pair(dropout=0.0)
    torch.manual_seed(5)
    lora = LoRALinear(bk.layers[0].self_attn.out_proj)
    bk.layers[0].self_attn.out_proj = lora
    with torch.no_grad():
        merged = ref.layers[0].self_attn.out_proj
        merged.weight.add_(lora.lora_b.weight @ lora.lora_a.weight)
    src, kpm = batch()
    torch.testing.assert_close(bk(src, src_key_padding_mask=kpm)[~kpm], ref(src, src_key_padding_mask=kpm)[~kpm],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_norm_subclass_forward_acts(norm_first):
    ref = torch_encoder(dropout=0.0, norm_first=norm_first)
    for layer in ref.layers:
        for name in ("norm1", "norm2"):
            old = getattr(layer, name)
            new = ScaledLayerNorm(D, eps=old.eps)
            new.load_state_dict(old.state_dict())
            setattr(layer, name, new)
    final = ScaledLayerNorm(D)
    final.load_state_dict(ref.norm.state_dict())
    ref.norm = final
    bk = bertkern.Encoder.from_torch(ref)
    assert type(bk.layers[0].norm2) is ScaledLayerNorm and type(bk.norm) is ScaledLayerNorm
    assert_same(ref, bk, *batch())


def test_parametrizations_weight_norm_and_pruning_act():
    from torch.nn.utils import parametrizations, prune

    ref, bk = pair(dropout=0.0)
    for enc in (ref, bk):
        parametrizations.weight_norm(enc.layers[0].linear1)
        prune.l1_unstructured(enc.layers[1].linear2, "weight", amount=0.5)
        parametrizations.orthogonal(enc.layers[1].self_attn.out_proj)
    with torch.no_grad():  # give the weight-norm magnitude a value the plain weight would not have
        for enc in (ref, bk):
            enc.layers[0].linear1.parametrizations.weight.original0.mul_(1.7)
    assert_same(ref, bk, *batch())


def test_dynamic_quantization_works_on_packed_tokens(monkeypatch):
    ref, bk = pair(dropout=0.0)
    qref = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ref), {nn.Linear}, dtype=torch.qint8)
    qbk = torch.ao.quantization.quantize_dynamic(copy.deepcopy(bk), {nn.Linear}, dtype=torch.qint8)
    assert type(qbk.layers[0].linear1) is torch.ao.nn.quantized.dynamic.Linear and not qbk.training
    # torch 2.14's own layer fails in eval with a quantized linear (its fast-path check reads
    # linear1.weight.device; a quantized weight is a method): the reference runs its math path.
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    # No padding: packed tokens are the same matrix, so the activation ranges (and so the
    # dynamic quantization) are identical to torch's.
    src, kpm = batch("none")
    with torch.no_grad():
        torch.testing.assert_close(qbk(src, src_key_padding_mask=kpm), qref(src, src_key_padding_mask=kpm),
                                   rtol=1e-5, atol=1e-5)
        # With padding torch quantizes padding rows too; close to the float model either way.
        src, kpm = batch()
        out = qbk(src, src_key_padding_mask=kpm)[~kpm]
        assert (out - bk.eval()(src, src_key_padding_mask=kpm)[~kpm]).abs().max() < 0.1
        assert (out - qref(src, src_key_padding_mask=kpm)[~kpm]).abs().max() < 0.1
        assert (out - bk(src, src_key_padding_mask=kpm)[~kpm]).abs().max() > 0  # quantized for real


# ---- hooks -----------------------------------------------------------------------------------

SUBMODULES = ["", "self_attn", "self_attn.out_proj", "linear1", "linear2", "norm1", "norm2", "dropout"]


@pytest.mark.parametrize("train", [False, True])
def test_forward_hooks_fire_like_torch(train):
    ref, bk = pair(dropout=0.0)
    ref.train(train)
    bk.train(train)
    counts = {}

    def counter(tag):
        def hook(module, args, output):
            counts[tag] = counts.get(tag, 0) + 1
        return hook

    for tag, enc in (("torch", ref), ("bk", bk)):
        for i, layer in enumerate(enc.layers):
            for name in SUBMODULES:
                layer.get_submodule(name).register_forward_hook(counter(f"{tag}.{i}.{name}"))
        enc.norm.register_forward_hook(counter(f"{tag}.norm"))
    src, kpm = batch()
    with torch.no_grad():
        ref(src, src_key_padding_mask=kpm)
        bk(src, src_key_padding_mask=kpm)
    # torch's MultiheadAttention never calls out_proj as a module: bertkern does (it honours an
    # adapter there); every other hook fires exactly as often as torch's.
    expected = {k.replace("torch.", "bk."): v for k, v in counts.items() if k.startswith("torch.")}
    for i in range(len(bk.layers)):
        expected[f"bk.{i}.self_attn.out_proj"] = 1
    got = {k: v for k, v in counts.items() if k.startswith("bk.")}
    assert got == expected


def test_hooks_that_modify_outputs_take_effect():
    ref, bk = pair(dropout=0.0)
    for enc in (ref, bk):
        enc.layers[0].register_forward_hook(lambda m, a, out: out * 0.5)
        enc.layers[1].self_attn.register_forward_hook(lambda m, a, out: (out[0] * 2.0 + 0.1, out[1]))
        enc.layers[1].linear1.register_forward_pre_hook(lambda m, args: (args[0] * 0.75,))
        enc.layers[0].norm2.register_forward_hook(lambda m, a, out: out - 0.3)
    assert_same(ref, bk, *batch())


def test_layer_hook_receives_packed_tokens_with_cu_seqlens():
    _, bk = pair(dropout=0.0)
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((args[0].shape, kwargs["cu_seqlens"].tolist(), kwargs["max_seqlen"], output.shape))

    bk.layers[0].register_forward_hook(hook, with_kwargs=True)
    src, kpm = batch("right")
    bk(src, src_key_padding_mask=kpm)
    lengths = (~kpm).sum(1)
    total = int(lengths.sum())
    assert seen == [((total, D), [0] + lengths.cumsum(0).tolist(), int(lengths.max()), (total, D))]


def test_self_attn_hook_gets_torch_output_convention():
    _, bk = pair(dropout=0.0)
    outs = []
    bk.layers[0].self_attn.register_forward_hook(lambda m, a, out: outs.append(out))
    src, kpm = batch()
    bk(src, src_key_padding_mask=kpm)
    (out,) = outs
    assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
    assert out[0].shape == (int((~kpm).sum()), D)


def test_global_module_hooks_fire():
    _, bk = pair(dropout=0.0)
    fired = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: fired.append(type(m).__name__))
    try:
        bk(*batch()[:1], src_key_padding_mask=batch()[1])
    finally:
        handle.remove()
    for name in ("EncoderLayer", "MultiheadAttention", "Linear", "LayerNorm", "Dropout"):
        assert name in fired


def test_backward_hooks_fire():
    ref, bk = pair(dropout=0.0)
    grads = {}
    for tag, enc in (("torch", ref), ("bk", bk)):
        enc.layers[0].linear2.register_full_backward_hook(
            lambda m, gi, go, tag=tag: grads.__setitem__(tag, go[0].detach()))
    src, kpm = batch()
    assert_same(ref, bk, src, kpm)
    # torch's hook sees (B, S, F) with padding rows, bertkern's the packed rows: compare those.
    torch.testing.assert_close(grads["bk"], grads["torch"][~kpm], rtol=1e-4, atol=1e-6)


class HalvedTorchSignature(bertkern.EncoderLayer):
    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return super().forward(src, src_mask, src_key_padding_mask, is_causal) * 0.5


class HalvedKwargs(bertkern.EncoderLayer):
    def forward(self, src, *args, **kwargs):
        return super().forward(src, *args, **kwargs) * 0.5


class HalvedTorch(nn.TransformerEncoderLayer):
    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return super().forward(src, src_mask, src_key_padding_mask, is_causal) * 0.5


@pytest.mark.parametrize("cls", [HalvedTorchSignature, HalvedKwargs])
def test_layer_subclass_forward_override_acts(cls):
    ref = torch_encoder(dropout=0.0)
    torch_layer = HalvedTorch(D, 4, 48, dropout=0.0, batch_first=True)
    torch_layer.load_state_dict(ref.layers[0].state_dict())
    ref.layers[0] = torch_layer
    bk = bertkern.Encoder.from_torch(torch_encoder(dropout=0.0))
    layer = cls(D, 4, 48, dropout=0.0, batch_first=True)
    layer.load_state_dict(ref.layers[0].state_dict())
    bk.layers[0] = layer
    assert_same(ref, bk, *batch())


def test_torch_layer_subclass_is_kept_and_called():
    layer = HalvedTorch(D, 4, 48, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    bk = bertkern.Encoder(layer, 2)
    assert all(type(l) is HalvedTorch for l in bk.layers)
    bk.load_state_dict(ref.state_dict())
    assert_same(ref, bk, *batch())
    with pytest.raises(TypeError, match="overrides forward"):
        bertkern.EncoderLayer.from_torch(layer)


def test_torch_attention_kept_when_hooked():
    """A hooked nn.MultiheadAttention is kept by conversion and given the padded batch."""
    ref = torch_encoder(dropout=0.0)
    calls = []
    ref.layers[0].self_attn.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    bk = bertkern.Encoder.from_torch(ref)
    assert type(bk.layers[0].self_attn) is nn.MultiheadAttention
    assert type(bk.layers[1].self_attn) is bertkern.nn.MultiheadAttention
    src, kpm = batch("right")
    kpm[2] = True  # an empty sequence: no NaN from torch's attention
    ref_out, bk_out = ref(src, src_key_padding_mask=kpm), bk(src, src_key_padding_mask=kpm)
    torch.testing.assert_close(bk_out[~kpm], ref_out[~kpm], rtol=1e-4, atol=1e-5)
    bk_out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in bk.parameters() if p.grad is not None)


# ---- conversion keeps everything -------------------------------------------------------------

def test_conversion_keeps_requires_grad_and_modes():
    layer = nn.TransformerEncoderLayer(D, 4, 48, dropout=0.0, batch_first=True)
    layer.linear1.requires_grad_(False)
    layer.self_attn.in_proj_weight.requires_grad_(False)
    layer.norm2.eval()
    for enc in (bertkern.Encoder(layer, 2), bertkern.Encoder.from_torch(nn.TransformerEncoder(layer, 2)),
                bertkern.Encoder(bertkern.EncoderLayer.from_torch(layer), 2)):
        frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
        assert frozen == {f"layers.{i}.{n}" for i in range(2)
                          for n in ("linear1.weight", "linear1.bias", "self_attn.in_proj_weight")}
        assert not enc.layers[1].norm2.training and enc.layers[1].norm1.training
    # Frozen weights do not train; the result matches torch with the same frozen weights.
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    bk = bertkern.Encoder.from_torch(ref)
    src, kpm = batch()
    assert_same(ref, bk, src, kpm)
    assert bk.layers[0].linear1.weight.grad is None and bk.layers[0].linear2.weight.grad is not None


def test_conversion_keeps_dtype_and_mixed_dtypes():
    layer = nn.TransformerEncoderLayer(D, 4, 48, dropout=0.0, batch_first=True, dtype=torch.float64)
    layer.norm1.float()
    bk = bertkern.EncoderLayer.from_torch(layer)
    assert bk.linear1.weight.dtype == torch.float64 and bk.norm1.weight.dtype == torch.float32
    assert bk.self_attn.in_proj_weight.dtype == torch.float64


def test_to_torch_round_trip():
    ref, bk = pair(dropout=0.0)
    bk.layers[0].linear2.requires_grad_(False)
    bk.layers[1].linear1 = LoRALinear(bk.layers[1].linear1)
    back = bk.to_torch()
    assert type(back) is nn.TransformerEncoder and all(type(l) is nn.TransformerEncoderLayer for l in back.layers)
    assert type(back.layers[0].self_attn) is nn.MultiheadAttention and type(back.norm) is nn.LayerNorm
    assert type(back.layers[1].linear1) is LoRALinear
    assert not back.layers[0].linear2.weight.requires_grad
    assert back.state_dict().keys() == bk.state_dict().keys()
    assert back.layers[0].linear1.weight.data_ptr() != bk.layers[0].linear1.weight.data_ptr()
    src, kpm = batch()
    torch.testing.assert_close(back(src, src_key_padding_mask=kpm)[~kpm], bk(src, src_key_padding_mask=kpm)[~kpm],
                               rtol=1e-4, atol=1e-5)
    layer = bertkern.EncoderLayer(D, 4, 48, dropout=0.2, activation="gelu", batch_first=False, norm_first=True)
    plain = layer.to_torch()
    assert plain.norm_first and not plain.self_attn.batch_first and plain.dropout1.p == 0.2
    assert plain.activation is F.gelu


# ---- PEFT (the real package) ---------------------------------------------------------------------

def test_peft_lora_same_outputs_and_grads_as_torch():
    peft = pytest.importorskip("peft")
    ref, bk = pair(dropout=0.0)
    cfg = dict(r=4, lora_alpha=8, target_modules=["linear1", "linear2"], init_lora_weights=False)
    torch.manual_seed(7)
    pref = peft.get_peft_model(ref, peft.LoraConfig(**cfg))
    torch.manual_seed(7)
    pbk = peft.get_peft_model(bk, peft.LoraConfig(**cfg))
    trainable = {n for n, p in pbk.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    src, kpm = batch()
    assert_same(pref, pbk, src, kpm)
    merged = pbk.merge_and_unload()
    assert type(merged) is bertkern.Encoder and type(merged.layers[0].linear1) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(src, src_key_padding_mask=kpm)[~kpm],
                                   pref(src, src_key_padding_mask=kpm)[~kpm], rtol=1e-4, atol=1e-5)


def test_peft_lora_on_out_proj_acts():
    """torch's attention skips a PEFT adapter on out_proj (it reads the weight): there the
    reference is the merged torch model, where the adapter is in the weight."""
    peft = pytest.importorskip("peft")
    _, bk = pair(dropout=0.0)
    torch.manual_seed(8)
    pbk = peft.get_peft_model(bk, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["out_proj"],
                                                  init_lora_weights=False))
    src, kpm = batch()
    out = pbk(src, src_key_padding_mask=kpm)[~kpm]
    assert (out - bertkern.Encoder.from_torch(torch_encoder(dropout=0.0))(src, src_key_padding_mask=kpm)[~kpm]
            ).abs().max() > 1e-2
    merged_torch = copy.deepcopy(pbk).merge_and_unload().to_torch()
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), merged_torch(src, src_key_padding_mask=kpm)[~kpm],
                                   rtol=1e-4, atol=1e-5)


# ---- inputs and masks ------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_nested_tensor_src(train):
    ref, bk = pair(dropout=0.0)
    bk.train(train)
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randn(n, D, generator=g) for n in (5, 1, 9, 3)]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged, requires_grad=train)
    out = bk(nt)
    assert out.is_nested and out.layout == torch.jagged
    padded = torch.nested.to_padded_tensor(nt.detach(), 0.0)
    kpm = torch.tensor([[s >= n for s in range(9)] for n in (5, 1, 9, 3)])
    expected = ref(padded, src_key_padding_mask=kpm)
    for i, n in enumerate((5, 1, 9, 3)):
        torch.testing.assert_close(out.unbind()[i], expected[i, :n], rtol=1e-4, atol=1e-5)
    if train:
        out.values().sum().backward()
        assert nt.grad is not None and all(p.grad is not None for p in bk.parameters())
    with pytest.raises(ValueError, match="NestedTensor"):
        bk(nt, src_key_padding_mask=kpm)


def test_nested_tensor_src_pays_for_no_padding(monkeypatch):
    _, bk = pair(dropout=0.0)
    import bertkern.nn.attention as attention_module
    totals = []
    original = attention_module.attention_varlen
    monkeypatch.setattr(attention_module, "attention_varlen",
                        lambda q, *a, **k: totals.append(q.shape[0]) or original(q, *a, **k))
    nt = torch.nested.nested_tensor([torch.randn(n, D) for n in (5, 1, 9)], layout=torch.jagged)
    bk(nt)
    assert totals == [15, 15]


def test_float_key_padding_mask_compiles_fullgraph():
    torch._dynamo.reset()
    _, bk = pair(dropout=0.0)
    src, kpm = batch()
    fmask = torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))
    compiled = torch.compile(bk, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(src, src_key_padding_mask=fmask), bk(src, src_key_padding_mask=kpm),
                               rtol=1e-5, atol=1e-5)
    # A float mask carrying a real bias cannot take the packed path inside a graph: it fails
    # loudly at run time instead of silently dropping the bias.
    with pytest.raises(RuntimeError, match="only 0 and -inf"):
        compiled(src, src_key_padding_mask=fmask + 0.5 * (~kpm))


def test_dropout_one_matches_torch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, 48, dropout=1.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
    bk = bertkern.Encoder.from_torch(ref).train()
    src, kpm = batch()
    # With every activation dropped the result is deterministic: compare outputs and grads.
    assert_same(ref, bk, src, kpm)


def test_meta_device_forward_returns_shapes():
    with torch.device("meta"):
        bk = bertkern.Encoder(bertkern.EncoderLayer(D, 4, 48, batch_first=True), 2, norm=nn.LayerNorm(D))
        src = torch.randn(3, 7, D)
        kpm = torch.zeros(3, 7, dtype=torch.bool)
    out = bk(src, src_key_padding_mask=kpm)
    assert out.device.type == "meta" and out.shape == (3, 7, D)


# ---- errors --------------------------------------------------------------------------------------

def test_errors_are_also_torchs_exception_types():
    with pytest.raises(AssertionError, match="divisible"):
        bertkern.EncoderLayer(30, 4)
    with pytest.raises(ValueError):
        bertkern.EncoderLayer(30, 4)
    with pytest.raises(RuntimeError, match="activation"):
        bertkern.EncoderLayer(D, 4, activation="swish")
    bk = bertkern.Encoder(bertkern.EncoderLayer(D, 4, 48, batch_first=True), 2)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 4, 48, batch_first=True), 2, enable_nested_tensor=False)
    src = torch.randn(3, 7, D)
    cases = [
        (dict(src_key_padding_mask=torch.zeros(7, 3, dtype=torch.bool)), AssertionError, ValueError),
        (dict(src_key_padding_mask=torch.zeros(3, 7, dtype=torch.int64)), AssertionError, TypeError),
        (dict(mask=torch.zeros(7, 8)), RuntimeError, ValueError),
        (dict(mask=torch.zeros(7, 7, dtype=torch.int64)), AssertionError, TypeError),
    ]
    for kwargs, torch_type, ours in cases:
        with pytest.raises(torch_type):
            ref(src, **kwargs)
        with pytest.raises(torch_type) as info:
            bk(src, **kwargs)
        assert isinstance(info.value, ours), kwargs
    for bad_src, torch_type in ((src.to(torch.int32), RuntimeError), (torch.randn(3, 7, 16), AssertionError),
                                (torch.randn(3, 7, 2, D), AssertionError)):
        with pytest.raises(torch_type):
            ref(bad_src)
        with pytest.raises(torch_type):
            bk(bad_src)
    with pytest.raises(ValueAndAssertionError):
        bk(torch.randn(3, 7, 16))


def test_pad_rejects_duplicate_indices():
    x = torch.randn(3, 4)
    with pytest.raises((IndexError, ValueError), match="duplicate|unique"):
        bertkern.ops.pad(x, torch.tensor([0, 2, 2]), 2, 3)


def test_jit_script_raises_a_clear_error():
    for module in (bertkern.EncoderLayer(D, 4, 48), bertkern.Encoder(bertkern.EncoderLayer(D, 4, 48), 1)):
        with pytest.raises(RuntimeError, match="torch.compile.*torch.export"):
            torch.jit.script(module)


# ---- unpadded inference: torch's fused layer, for the stock layer only ----------------------------

def test_unpadded_inference_uses_torchs_fused_layer_only_when_stock(monkeypatch):
    ref, bk = pair(dropout=0.1, norm_first=True, activation="gelu")
    ref.eval()
    bk.eval()
    calls = []
    original = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or original(*a))
    src, kpm = batch("none")
    expected = ref.double()(src.double(), src_key_padding_mask=kpm).float()
    with torch.no_grad():
        torch.testing.assert_close(bk(src, src_key_padding_mask=kpm), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bk(src), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # two layers, twice
    # Padding, grad mode, training or anything attached: bertkern's own path.
    with torch.no_grad():
        bk(*batch("right")[:1], src_key_padding_mask=batch("right")[1])
    bk(src)
    fired = []
    bk.layers[1].linear2.register_forward_hook(lambda m, a, o: fired.append(1))
    with torch.no_grad():
        torch.testing.assert_close(bk(src), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 5 and fired == [1]  # layer 0 still fused, layer 1 called its hooked linear2
