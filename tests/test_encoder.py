"""bertkern.Encoder / EncoderLayer against nn.TransformerEncoder (the reference) with copied weights.

The reference is torch's own module run in float64 on the same weights; bertkern runs in
float32 on the packed fast path (or the fallback path for general masks). Compared on real
tokens: outputs and every parameter gradient; outputs at padded positions must be zero.
"""
import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bertkern

pytestmark = pytest.mark.filterwarnings(
    "ignore:enable_nested_tensor is True:UserWarning",
    "ignore:Support for mismatched src_key_padding_mask:UserWarning",
    "ignore:Converting mask without torch.bool dtype:UserWarning",
)


def make_kpm(kind, batch, seqlen, generator=None):
    """(B, S) bool, True = padding."""
    kpm = torch.zeros(batch, seqlen, dtype=torch.bool)
    if kind == "none":
        return kpm
    if kind == "right":
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=generator)
        lengths[0] = seqlen
        return torch.arange(seqlen).unsqueeze(0) >= lengths.unsqueeze(1)
    if kind == "scattered":
        kpm = torch.rand(batch, seqlen, generator=generator) < 0.4
        kpm[:, 0] = False  # every sequence keeps a token: torch's reference is NaN otherwise
        return kpm
    raise ValueError(kind)


def torch_encoder(d_model=32, nhead=4, ffn=48, layers=2, dropout=0.0, activation="relu", batch_first=True,
                  norm_first=False, bias=True, final_norm=True, eps=1e-5, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, nhead, ffn, dropout=dropout, activation=activation,
                                       layer_norm_eps=eps, batch_first=batch_first, norm_first=norm_first,
                                       bias=bias)
    norm = nn.LayerNorm(d_model, eps=eps, bias=bias) if final_norm else None
    enc = nn.TransformerEncoder(layer, layers, norm=norm, enable_nested_tensor=False)
    # Non-trivial LayerNorm affine parameters so the test sees them.
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return enc


def to_layout(x_bsd, batch_first):
    return x_bsd if batch_first else x_bsd.transpose(0, 1).contiguous()


def real_rows(out, kpm, batch_first):
    return out[~kpm] if batch_first else out.transpose(0, 1)[~kpm]


def run_pair(ref_enc, bk_enc, src, kpm=None, mask=None, is_causal=None, batch_first=True, grads=True):
    """Forward + backward through the fp64 reference and bertkern; returns both results."""
    ref = copy.deepcopy(ref_enc).double()
    torch.manual_seed(1)
    s = src.shape
    w = torch.randn(s[0], s[1], s[2], dtype=torch.float64)
    batch, seqlen = (s[0], s[1]) if batch_first else (s[1], s[0])
    if kpm is None:
        real = torch.ones(batch, seqlen, dtype=torch.bool)
    else:
        real = ~kpm if kpm.dtype == torch.bool else ~torch.isneginf(kpm)
    real_l = real if batch_first else real.T
    results = []
    for enc, dtype in ((ref, torch.float64), (bk_enc, torch.float32)):
        x = src.to(dtype).requires_grad_(grads)
        m = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype))
        k = None if kpm is None else kpm
        out = enc(x, mask=m, src_key_padding_mask=k, is_causal=is_causal)
        g = {}
        if grads:
            loss = (out * w.to(dtype) * real_l.unsqueeze(-1)).sum()
            loss.backward()
            g = {n: p.grad.double().clone() for n, p in enc.named_parameters()}
            g["src"] = x.grad.double()
        results.append((out.detach().double(), g))
    return results, real_l


def assert_close_scaled(actual, expected, rtol=1e-4, name=""):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


def check_parity(results, real_l, grads=True):
    (ref_out, ref_g), (out, g) = results
    assert_close_scaled(out[real_l], ref_out[real_l], 2e-5, "output")
    # Padded positions are zero.
    assert out[~real_l].abs().max().item() == 0.0 if (~real_l).any() else True
    if grads:
        assert ref_g.keys() == g.keys()
        for name in ref_g:
            assert_close_scaled(g[name], ref_g[name], 1e-4, name)


CONFIGS = [
    dict(),  # post-LN, relu, batch_first, bias, final norm
    dict(batch_first=False),
    dict(norm_first=True),
    dict(norm_first=True, batch_first=False, final_norm=False),
    dict(activation="gelu"),
    dict(activation=lambda t: F.silu(t)),
    dict(bias=False),
    dict(d_model=30, nhead=3, ffn=40),  # odd number of heads, head dim 10
    dict(d_model=40, nhead=5, ffn=24, layers=3, eps=1e-12),
    dict(layers=1, final_norm=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v if not callable(v) else 'callable'}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("kind", ["none", "right", "scattered"])
def test_parity_outputs_and_grads(cfg, kind):
    ref = torch_encoder(**cfg)
    bk = bertkern.Encoder.from_torch(ref)
    g = torch.Generator().manual_seed(2)
    batch, seqlen, d = 4, 11, ref.layers[0].self_attn.embed_dim
    kpm = make_kpm(kind, batch, seqlen, g)
    src = to_layout(torch.randn(batch, seqlen, d, generator=g), cfg.get("batch_first", True))
    results, real_l = run_pair(ref, bk, src, kpm=None if kind == "none" else kpm,
                               batch_first=cfg.get("batch_first", True))
    check_parity(results, real_l)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_causal_mask_runs_fused_and_matches(batch_first, mask_dtype, monkeypatch):
    ref = torch_encoder(batch_first=batch_first)
    bk = bertkern.Encoder.from_torch(ref)
    batch, seqlen = 3, 9
    kpm = make_kpm("scattered", batch, seqlen, torch.Generator().manual_seed(3))
    src = to_layout(torch.randn(batch, seqlen, 32), batch_first)
    causal = nn.Transformer.generate_square_subsequent_mask(seqlen)
    if mask_dtype == torch.bool:
        causal = torch.isneginf(causal)
    # The fused path: the padded SDPA fallback must not run.
    import bertkern.nn.encoder as enc_mod

    def no_fallback(*a, **k):
        raise AssertionError("causal mask took the fallback path")

    monkeypatch.setattr(enc_mod, "_run_padded", no_fallback)
    results, real_l = run_pair(ref, bk, src, kpm=kpm, mask=causal, batch_first=batch_first)
    check_parity(results, real_l)
    # is_causal=True with the mask is the same computation.
    out = bk(src, mask=causal, src_key_padding_mask=kpm, is_causal=True)
    torch.testing.assert_close(out.double()[real_l], results[1][0][real_l])


def count_paths(monkeypatch):
    """Wrap the Encoder's two paths and the attention each runs (looked up as module globals at
    call time) with call counters; returns the dict of counts."""
    import bertkern.nn.attention as attn_mod
    import bertkern.nn.encoder as enc_mod

    calls = {"padded": 0, "packed": 0, "sdpa_attention": 0, "varlen_attention": 0}

    def counted(key, fn):
        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(enc_mod, "_run_padded", counted("padded", enc_mod._run_padded))
    monkeypatch.setattr(enc_mod, "_run_packed", counted("packed", enc_mod._run_packed))
    monkeypatch.setattr(attn_mod.MultiheadAttention, "_forward_padded",
                        counted("sdpa_attention", attn_mod.MultiheadAttention._forward_padded))
    monkeypatch.setattr(attn_mod, "attention_varlen", counted("varlen_attention", attn_mod.attention_varlen))
    return calls


@pytest.mark.parametrize("mask_kind", ["bool_SS", "float_SS", "float_BHSS", "float_kpm_bias"])
def test_general_masks_take_the_fallback_and_match(mask_kind, monkeypatch):
    ref = torch_encoder(norm_first=True)
    bk = bertkern.Encoder.from_torch(ref)
    batch, seqlen, nhead = 3, 8, 4
    g = torch.Generator().manual_seed(4)
    kpm = make_kpm("right", batch, seqlen, g)
    src = torch.randn(batch, seqlen, 32, generator=g)
    mask = None
    key_mask = kpm
    if mask_kind == "bool_SS":
        mask = torch.rand(seqlen, seqlen, generator=g) < 0.3
        mask.fill_diagonal_(False)  # every query sees itself: no all-masked row in the reference
    elif mask_kind == "float_SS":
        mask = torch.randn(seqlen, seqlen, generator=g)
    elif mask_kind == "float_BHSS":
        mask = torch.randn(batch * nhead, seqlen, seqlen, generator=g)
    else:  # a float key padding mask carrying a real additive bias besides -inf padding
        key_mask = torch.randn(batch, seqlen, generator=g).masked_fill(kpm, float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        key_mask_used = key_mask
    else:
        key_mask_used = key_mask if key_mask.dtype != torch.bool else key_mask.float().masked_fill(key_mask, float("-inf"))
    calls = count_paths(monkeypatch)
    results, real_l = run_pair(ref, bk, src, kpm=key_mask_used, mask=mask)
    check_parity(results, real_l)
    # The fallback ran for bertkern's forward (torch's reference calls none of these): once for
    # the Encoder, then once inside each layer (a layer called as torch calls it, with the padded
    # batch, runs its block through the same function); every layer's attention went through SDPA
    # with the masks, and neither the packed path nor the varlen attention kernel ran.
    n = len(bk.layers)
    assert calls == {"padded": 1 + n, "packed": 0, "sdpa_attention": n, "varlen_attention": 0}, calls


def test_fallback_counter_sees_the_fast_path_too(monkeypatch):
    """The counters of count_paths can tell the paths apart: a plain key padding mask runs packed."""
    bk = bertkern.Encoder.from_torch(torch_encoder())
    calls = count_paths(monkeypatch)
    bk(torch.randn(3, 7, 32), src_key_padding_mask=make_kpm("right", 3, 7, torch.Generator().manual_seed(5)))
    assert calls == {"padded": 0, "packed": 1, "sdpa_attention": 0, "varlen_attention": len(bk.layers)}, calls


def test_float_key_padding_mask_zero_inf_is_the_fast_path(monkeypatch):
    ref = torch_encoder()
    bk = bertkern.Encoder.from_torch(ref)
    kpm = make_kpm("right", 3, 7, torch.Generator().manual_seed(5))
    src = torch.randn(3, 7, 32)
    import bertkern.nn.encoder as enc_mod

    out_bool = bk(src, src_key_padding_mask=kpm)
    monkeypatch.setattr(enc_mod, "_run_padded", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fallback")))
    out_float = bk(src, src_key_padding_mask=torch.zeros(3, 7).masked_fill(kpm, float("-inf")))
    torch.testing.assert_close(out_float, out_bool, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])  # 0.3: training through the fused CPU dropout
def test_fully_padded_sequence_gives_zeros_and_finite_grads(dropout, monkeypatch):
    bk = bertkern.Encoder.from_torch(torch_encoder(dropout=dropout)).train()
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1] = True
    kpm[2, 4:] = True
    src = torch.randn(3, 6, 32, requires_grad=True)
    out = bk(src, src_key_padding_mask=kpm)
    assert out[1].abs().max().item() == 0.0
    assert out[kpm].abs().max().item() == 0.0
    out.square().sum().backward()
    assert torch.isfinite(src.grad).all()
    assert src.grad[1].abs().max().item() == 0.0
    for name, p in bk.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # Also on the fallback path (a general mask: shown to run by the counters) and for a batch
    # that is all padding.
    calls = count_paths(monkeypatch)
    out = bk(src, mask=torch.randn(6, 6), src_key_padding_mask=kpm)
    assert calls["padded"] > 0 and calls["packed"] == 0 and calls["varlen_attention"] == 0, calls
    assert torch.isfinite(out).all() and out[1].abs().max().item() == 0.0
    assert bk(src, src_key_padding_mask=torch.ones(3, 6, dtype=torch.bool)).abs().max().item() == 0.0


def test_training_parity_adamw_20_steps():
    ref = torch_encoder(d_model=32, nhead=4, ffn=64, layers=2, dropout=0.0)
    bk = bertkern.Encoder.from_torch(ref)
    head_ref, head_bk = nn.Linear(32, 5), None
    head_bk = copy.deepcopy(head_ref)
    opt_ref = torch.optim.AdamW(list(ref.parameters()) + list(head_ref.parameters()), lr=3e-3)
    opt_bk = torch.optim.AdamW(list(bk.parameters()) + list(head_bk.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(6)
    losses_ref, losses_bk = [], []
    ref.train()
    bk.train()
    for _ in range(20):
        kpm = make_kpm("right", 6, 12, g)
        src = torch.randn(6, 12, 32, generator=g)
        target = torch.randint(0, 5, (6, 12), generator=g)
        for enc, head, opt, losses in ((ref, head_ref, opt_ref, losses_ref), (bk, head_bk, opt_bk, losses_bk)):
            logits = head(enc(src, src_key_padding_mask=kpm))
            loss = F.cross_entropy(logits[~kpm], target[~kpm])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses_ref[-1] < losses_ref[0]
    torch.testing.assert_close(torch.tensor(losses_bk), torch.tensor(losses_ref), rtol=1e-4, atol=1e-5)


def test_state_dict_keys_and_strict_loads_both_ways():
    ref = torch_encoder(layers=3)
    layer = bertkern.EncoderLayer(32, 4, 48, dropout=0.0, batch_first=True)
    bk = bertkern.Encoder(layer, 3, norm=nn.LayerNorm(32))
    assert list(bk.state_dict().keys()) == list(ref.state_dict().keys())
    for k in ("layers.0.self_attn.in_proj_weight", "layers.2.self_attn.out_proj.bias", "layers.1.linear1.weight",
              "layers.1.linear2.bias", "layers.0.norm1.weight", "layers.0.norm2.bias", "norm.weight"):
        assert k in bk.state_dict()
    bk.load_state_dict(ref.state_dict(), strict=True)
    ref2 = torch_encoder(layers=3, seed=9)
    ref2.load_state_dict(bk.state_dict(), strict=True)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ref2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    # Constructed from a torch layer: settings read, each layer an independent copy.
    tl = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.2, activation="gelu", batch_first=True, norm_first=True)
    enc = bertkern.Encoder(tl, 2)
    assert enc.layers[0].norm_first and enc.layers[0].self_attn.batch_first
    assert enc.layers[0].activation is F.gelu and enc.layers[1].dropout1.p == 0.2
    assert enc.layers[0].self_attn.dropout == 0.2
    assert enc.layers[0].linear1.weight.data_ptr() != enc.layers[1].linear1.weight.data_ptr()
    torch.testing.assert_close(enc.layers[1].linear1.weight, tl.linear1.weight)


def test_converting_a_torch_layer_draws_no_random_numbers():
    layer = nn.TransformerEncoderLayer(32, 4, 48, batch_first=True)
    state = torch.get_rng_state()
    enc = bertkern.Encoder(layer, 3)
    assert torch.equal(torch.get_rng_state(), state)  # as nn.TransformerEncoder(layer, 3)
    assert all(p.device.type == "cpu" and p.requires_grad for p in enc.parameters())
    torch.testing.assert_close(enc.layers[2].self_attn.in_proj_weight, layer.self_attn.in_proj_weight)
    assert enc.layers[0].self_attn.in_proj_weight.data_ptr() != layer.self_attn.in_proj_weight.data_ptr()


def test_encoder_layer_alone_matches_torch_layer():
    torch.manual_seed(0)
    tl = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True).train()
    bl = bertkern.EncoderLayer.from_torch(tl)
    kpm = make_kpm("right", 3, 7, torch.Generator().manual_seed(1))
    src = torch.randn(3, 7, 32)
    torch.testing.assert_close(bl(src, src_key_padding_mask=kpm)[~kpm], tl(src, src_key_padding_mask=kpm)[~kpm],
                               rtol=1e-5, atol=1e-5)


def test_unbatched_input():
    ref = torch_encoder()
    bk = bertkern.Encoder.from_torch(ref)
    src = torch.randn(7, 32)
    torch.testing.assert_close(bk(src), ref(src), rtol=1e-5, atol=1e-5)
    kpm = torch.tensor([False] * 5 + [True] * 2)
    out = bk(src, src_key_padding_mask=kpm)
    torch.testing.assert_close(out[:5], ref(src, src_key_padding_mask=kpm)[:5], rtol=1e-5, atol=1e-5)


def test_dropout_in_training_only_and_seeded():
    bk = bertkern.Encoder.from_torch(torch_encoder(dropout=0.3))
    kpm = make_kpm("right", 3, 9, torch.Generator().manual_seed(1))
    src = torch.randn(3, 9, 32)
    bk.eval()
    torch.testing.assert_close(bk(src, src_key_padding_mask=kpm), bk(src, src_key_padding_mask=kpm), rtol=0, atol=0)
    bk.train()
    torch.manual_seed(5)
    a = bk(src, src_key_padding_mask=kpm)
    torch.manual_seed(5)
    b = bk(src, src_key_padding_mask=kpm)
    c = bk(src, src_key_padding_mask=kpm)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    bk.eval()
    assert not torch.equal(a, bk(src, src_key_padding_mask=kpm))


def test_float64():
    ref = torch_encoder()
    bk = bertkern.Encoder.from_torch(ref).double()
    kpm = make_kpm("scattered", 3, 8, torch.Generator().manual_seed(7))
    src = torch.randn(3, 8, 32, dtype=torch.float64)
    out = bk(src, src_key_padding_mask=kpm)
    torch.testing.assert_close(out[~kpm], ref.double()(src, src_key_padding_mask=kpm)[~kpm], rtol=1e-10, atol=1e-10)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="multiple of nhead"):
        bertkern.EncoderLayer(30, 4)
    with pytest.raises(ValueError, match="activation"):
        bertkern.EncoderLayer(32, 4, activation="swish")
    with pytest.raises(TypeError, match="encoder_layer"):
        bertkern.Encoder(nn.Linear(3, 3), 2)
    bk = bertkern.Encoder(bertkern.EncoderLayer(32, 4, 48, batch_first=True), 2)
    src = torch.randn(3, 7, 32)
    with pytest.raises(ValueError, match=r"src_key_padding_mask must have shape \(B, S\)"):
        bk(src, src_key_padding_mask=torch.zeros(7, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="src_key_padding_mask must be bool"):
        bk(src, src_key_padding_mask=torch.zeros(3, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask must have shape"):
        bk(src, mask=torch.zeros(7, 8))
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        bk(src.to(torch.int32))
    with pytest.raises(ValueError, match="d_model = 32"):
        bk(torch.randn(3, 7, 16))


def test_empty_batch_and_zero_length():
    bk = bertkern.Encoder.from_torch(torch_encoder())
    assert bk(torch.randn(0, 5, 32), src_key_padding_mask=torch.zeros(0, 5, dtype=torch.bool)).shape == (0, 5, 32)
    assert bk(torch.randn(2, 0, 32), src_key_padding_mask=torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 0, 32)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    bk = bertkern.Encoder.from_torch(torch_encoder(dropout=0.0)).train()
    compiled = torch.compile(bk, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(8)
    for kind in ("right", "scattered"):
        kpm = make_kpm(kind, 4, 10, g)
        src = torch.randn(4, 10, 32, generator=g, requires_grad=True)
        eager = bk(src, src_key_padding_mask=kpm)
        got = compiled(src, src_key_padding_mask=kpm)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        (ge,) = torch.autograd.grad(eager.square().sum(), src)
        (gc,) = torch.autograd.grad(got.square().sum(), src)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


def test_autocast_bf16_on_cpu_runs_close():
    ref = torch_encoder()
    bk = bertkern.Encoder.from_torch(ref)
    kpm = make_kpm("right", 3, 10, torch.Generator().manual_seed(9))
    src = torch.randn(3, 10, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bk(src, src_key_padding_mask=kpm)
        out_ref = ref(src, src_key_padding_mask=kpm)
    out.float().square().sum().backward()
    assert torch.isfinite(src.grad).all()
    # bf16 GEMMs: close to torch's own autocast result at bf16 accuracy.
    err = (out.float() - out_ref.float())[~kpm].abs().max().item()
    ref_err = (out_ref.float() - ref(src, src_key_padding_mask=kpm))[~kpm].abs().max().item()
    assert err <= 2 * ref_err + 1e-2, (err, ref_err)


def _ddp_worker(rank, world, init_file, state, src, kpm, w, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        enc = bertkern.Encoder(bertkern.EncoderLayer(32, 4, 48, dropout=0.0, batch_first=True), 2,
                               norm=nn.LayerNorm(32))
        enc.load_state_dict(state)
        model = DDP(enc)
        half = src.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        out = model(src[sl], src_key_padding_mask=kpm[sl])
        (out * w[sl]).sum().backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in enc.named_parameters()}, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_matches_single_process():
    import torch.multiprocessing as mp

    ref = torch_encoder()
    state = bertkern.Encoder.from_torch(ref).state_dict()
    g = torch.Generator().manual_seed(10)
    kpm = make_kpm("right", 4, 9, g)
    src = torch.randn(4, 9, 32, generator=g)
    w = torch.randn(4, 9, 32, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "grads.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), state, src, kpm, w, out_path), nprocs=2, join=True)
        ddp_grads = torch.load(out_path)
    single = bertkern.Encoder(bertkern.EncoderLayer(32, 4, 48, dropout=0.0, batch_first=True), 2, norm=nn.LayerNorm(32))
    single.load_state_dict(state)
    # DDP averages the two ranks' gradients: the single process takes the mean of the halves.
    losses = [(single(src[s], src_key_padding_mask=kpm[s]) * w[s]).sum() for s in (slice(0, 2), slice(2, 4))]
    (sum(losses) / 2).backward()
    for n, p in single.named_parameters():
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_is_deterministic(threads):
    bk = bertkern.Encoder.from_torch(torch_encoder())
    kpm = make_kpm("scattered", 4, 12, torch.Generator().manual_seed(11))
    src = torch.randn(4, 12, 32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grads = []
        for _ in range(2):
            bk.zero_grad()
            bk(src, src_key_padding_mask=kpm).square().sum().backward()
            grads.append([p.grad.clone() for p in bk.parameters()])
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)


def test_from_torch_keeps_mode_and_rejects_other_modules():
    ref = torch_encoder().eval()
    assert not bertkern.Encoder.from_torch(ref).training
    with pytest.raises(TypeError):
        bertkern.Encoder.from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        bertkern.EncoderLayer.from_torch(nn.Linear(2, 2))



@pytest.mark.parametrize("kind", ["none", "right", "scattered"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_inference_mode_matches_torch(kind, batch_first):
    """What the benchmarks time: eval mode under torch.inference_mode(). Without padding on CPU
    fp32 the layers take torch's fused layer kernel (EncoderLayer._unpadded_inference); with
    padding, the packed kernels. Against torch's module under inference_mode (its own fast path)
    and the fp64 reference; outputs are inference tensors, as torch's are."""
    ref = torch_encoder(batch_first=batch_first).eval()
    bk = bertkern.Encoder.from_torch(ref).eval()
    g = torch.Generator().manual_seed(12)
    kpm = make_kpm(kind, 4, 11, g)
    src = to_layout(torch.randn(4, 11, 32, generator=g), batch_first)
    k = None if kind == "none" else kpm
    with torch.inference_mode():
        out = bk(src, src_key_padding_mask=k)
        out_torch = ref(src, src_key_padding_mask=k)
    with torch.no_grad():
        out64 = copy.deepcopy(ref).double()(src.double(), src_key_padding_mask=k)
    assert out.is_inference() and out_torch.is_inference()
    assert out.shape == out_torch.shape == src.shape
    real_l = ~kpm if batch_first else ~kpm.T
    assert_close_scaled(out.double()[real_l], out64[real_l], 2e-5, "output vs fp64")
    torch.testing.assert_close(out[real_l], out_torch[real_l], rtol=1e-5, atol=1e-5)
    if (~real_l).any():
        assert out[~real_l].abs().max().item() == 0.0


def _fa_atol(ref, dtype):
    """FlashAttention's absolute slack: twice the rounding error of the reference, rounded to the
    low dtype, at its own magnitude (``2 * (ref + 0.3 - 0.3 - ref).abs().max()`` in that dtype)."""
    r = ref.to(dtype)
    return 2 * ((r + 0.3 - 0.3) - r).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg,kind,grads", [
    (dict(activation="gelu"), "right", True),
    (dict(norm_first=True, activation="gelu", batch_first=False), "scattered", True),
    # ReLU: the forward only. Its gradient is discontinuous at 0, which the criterion (made for
    # smooth functions) does not allow for: measured in bf16 with this seed, one layer-0
    # pre-activation with |h| = 2.9e-4 in fp32 rounds to the other side of zero in bertkern's run
    # (its packed 2-D GEMM rounds differently from torch's 3-D one; the max error of h is the
    # same, 7.0e-3, in both) and moves linear1's weight gradient by 0.57 against torch's 0.105.
    (dict(), "right", False),
], ids=["post_ln-gelu-right", "pre_ln-gelu-seq_first-scattered", "post_ln-relu-right-forward"])
def test_low_precision_within_flash_attention_bound(dtype, cfg, kind, grads):
    """bertkern.Encoder with fp16 / bf16 weights and inputs on CPU against the fp32 reference
    (nn.TransformerEncoder in fp32 on the same rounded weights and inputs), by FlashAttention's
    criterion: max |bertkern - fp32| <= 2 max |torch low - fp32| + slack, where "torch low" is
    nn.TransformerEncoder itself run in the same dtype on CPU (torch's CPU fp16 and bf16 paths run
    every op this encoder uses). The output on real tokens, and (grads) the input gradient and
    every parameter gradient, in training mode (dropout 0: torch's slow path, with autograd)."""
    batch_first = cfg.get("batch_first", True)
    low_torch = torch_encoder(**cfg).train().to(dtype)
    ref32 = copy.deepcopy(low_torch).float()  # the rounded weights, computed in fp32
    bk = bertkern.Encoder.from_torch(low_torch)
    assert all(p.dtype == dtype for p in bk.parameters())
    g = torch.Generator().manual_seed(13)
    kpm = make_kpm(kind, 4, 11, g)
    src = to_layout(torch.randn(4, 11, 32, generator=g), batch_first).to(dtype)
    w = to_layout(torch.randn(4, 11, 32, generator=g), batch_first)
    real_l = (~kpm if batch_first else ~kpm.T).unsqueeze(-1)
    results = []
    for module, run_dtype in ((ref32, torch.float32), (low_torch, dtype), (bk, dtype)):
        x = src.detach().to(run_dtype).clone().requires_grad_(grads)  # a fresh leaf per run
        out = module(x, src_key_padding_mask=kpm)
        assert out.dtype == run_dtype
        got = {"out": (out.detach().float() * real_l)}
        if grads:
            (out.float() * w * real_l).sum().backward()
            got["src.grad"] = x.grad.float()
            got.update({f"{n}.grad": p.grad.float() for n, p in module.named_parameters()})
        results.append((got, out.detach()))
    (ref, _), (low, _), (ours, ours_out) = results
    assert ours_out[~real_l.squeeze(-1)].abs().max().item() == 0.0  # zeros at padding
    assert ref.keys() == ours.keys() == low.keys() and len(ref) == (2 + 26 if grads else 1)
    report = []
    for name in ref:
        err = (ours[name] - ref[name]).abs().max().item()
        err_torch = (low[name] - ref[name]).abs().max().item()
        bound = 2 * err_torch + _fa_atol(ref[name], dtype)
        report.append(f"{name}: {err:.3g} <= {bound:.3g} (torch {err_torch:.3g})")
        assert torch.isfinite(ours[name]).all(), name
        assert err <= bound, "\n".join(report)
    if os.environ.get("BERTKERN_TEST_REPORT"):
        print(f"\n{dtype} {cfg} {kind}\n" + "\n".join(report))
