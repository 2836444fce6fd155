"""The scale contract: bertkern.Encoder under the machinery that trains big models.

* FSDP2 (``fully_shard`` per layer, then on the encoder), 2 CPU processes over gloo: the same
  losses, gradients and updated weights as a single unsharded ``nn.TransformerEncoder`` with the
  same weights fed the whole batch; also with the encoder built on the meta device and
  materialized after sharding.
* Deferred init (the path FSDP uses): built on ``meta``, ``to_empty``, then
  ``reset_parameters()`` or ``load_state_dict``.
* Activation checkpointing per layer (``apply_activation_checkpointing``, a wrapper module
  around ``torch.utils.checkpoint``, a layer subclass that checkpoints itself): the same outputs
  and gradients as the unwrapped model, also with dropout (the recompute redraws the same masks),
  and the layer's forward provably runs twice.
* Forward on the meta device (shape inference): a meta result of the right shape.

Everything in fp32 on CPU with small shapes; DDP is covered in tests/test_encoder.py.
"""
import copy
import os
import tempfile

import pytest
import torch
from torch import nn

import bertkern

pytestmark = pytest.mark.filterwarnings(
    "ignore:enable_nested_tensor is True:UserWarning",
    "ignore:Support for mismatched src_key_padding_mask:UserWarning",
    "ignore:Converting mask without torch.bool dtype:UserWarning",
    "ignore:.*returned a view tensor:UserWarning",
)

D_MODEL, NHEAD, FFN, LAYERS, BATCH, SEQLEN = 32, 4, 48, 2, 4, 9


# ---- helpers ------------------------------------------------------------------------------------

def make_kpm(batch=BATCH, seqlen=SEQLEN, seed=0):
    """(B, S) bool, True = padding at the end; sequence 0 is full, none is empty."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
    lengths[0] = seqlen
    lengths[-1] = min(int(lengths[-1]), seqlen - 3)  # some padding for certain
    return torch.arange(seqlen).unsqueeze(0) >= lengths.unsqueeze(1)


def torch_encoder(dropout=0.0, final_norm=True, batch_first=True, seed=0):
    """The reference nn.TransformerEncoder, with non-trivial LayerNorm affine parameters and
    distinct layers (not the identical copies torch's constructor makes)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FFN, dropout=dropout, batch_first=batch_first)
    norm = nn.LayerNorm(D_MODEL) if final_norm else None
    enc = nn.TransformerEncoder(layer, LAYERS, norm=norm, enable_nested_tensor=False)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            p.add_((0.1 if "norm" in name else 0.02) * torch.randn_like(p))
    return enc


def bk_encoder(dropout=0.0, final_norm=True, batch_first=True):
    """A fresh bertkern.Encoder of the same configuration (built on the current default device)."""
    layer = bertkern.EncoderLayer(D_MODEL, NHEAD, FFN, dropout=dropout, batch_first=batch_first)
    return bertkern.Encoder(layer, LAYERS, norm=nn.LayerNorm(D_MODEL) if final_norm else None)


def assert_close_scaled(actual, expected, rtol=1e-4, name=""):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-3),
                               msg=lambda m: f"{name}: {m}")


def batch_data(seed=1, batch_first=True):
    g = torch.Generator().manual_seed(seed)
    kpm = make_kpm(seed=seed)
    src = torch.randn(BATCH, SEQLEN, D_MODEL, generator=g)
    # Loss weights, zero at padding: torch's outputs there are not zero and must not count.
    w = torch.randn(BATCH, SEQLEN, D_MODEL, generator=g) * (~kpm).unsqueeze(-1)
    if not batch_first:
        src, w = src.transpose(0, 1).contiguous(), w.transpose(0, 1).contiguous()
    return src, kpm, w


# ---- 1. FSDP2 -----------------------------------------------------------------------------------

class _Head(nn.Module):
    """A model around the encoder that changes its output in place (``x *= w``), as a residual
    add or an in-place activation after the encoder would."""

    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, src, kpm, w):
        h = self.enc(src, src_key_padding_mask=kpm)
        h.mul_(w)
        return h


def _fsdp_worker(rank, world, init_file, state, final_norm, variant, src, kpm, w, out_dir):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        if variant == "meta_init":
            with torch.device("meta"):
                enc = bk_encoder(final_norm=final_norm)
        else:
            enc = bk_encoder(final_norm=final_norm)
            enc.load_state_dict(state)
        for layer in enc.layers:
            fully_shard(layer, mesh=mesh)
        model = enc
        if variant == "inplace_after_encoder":
            model = _Head(enc)  # the encoder an FSDP module that is not the root (reshards after forward)
            fully_shard(enc, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            fully_shard(enc, mesh=mesh)
        if variant == "meta_init":
            enc.to_empty(device="cpu")
            set_model_state_dict(enc, state, options=StateDictOptions(full_state_dict=True))
        sharded = all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for p in enc.parameters())
        sharded = sharded and all(isinstance(m, FSDPModule) for m in (enc, *enc.layers))

        half = src.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, outs, grads = [], [], None
        for step in range(2 if variant != "inplace_after_encoder" else 1):
            if variant == "inplace_after_encoder":
                out = model(src[sl], kpm[sl], w[sl])
                loss = out.sum()
            else:
                out = model(src[sl], src_key_padding_mask=kpm[sl])
                loss = (out * w[sl]).sum()
            opt.zero_grad()
            # FSDP2 averages gradients over the ranks (reduce-scatter with avg): scaled by the
            # world size, each rank's loss makes the averaged gradient the full-batch sum's.
            (loss * world).backward()
            if step == 0:
                grads = {n: p.grad.full_tensor() for n, p in enc.named_parameters()}
            opt.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item())
            outs.append(out.detach())
        params = {n: p.full_tensor().detach() for n, p in enc.named_parameters()}
        torch.save(outs, os.path.join(out_dir, f"outs{rank}.pt"))
        if rank == 0:
            torch.save({"grads": grads, "losses": losses, "params": params, "sharded": sharded},
                       os.path.join(out_dir, "result.pt"))
        # Both ranks reach teardown together: a rank that destroys its gloo group while the
        # other still talks to it can abort the other process ("terminate called without an
        # active exception", seen once in CI under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_fsdp(final_norm, variant):
    import torch.multiprocessing as mp

    ref = torch_encoder(final_norm=final_norm)
    state = ref.state_dict()  # bertkern's keys are torch's
    src, kpm, w = batch_data()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp_worker, args=(2, os.path.join(tmp, "init"), state, final_norm, variant, src, kpm, w, tmp),
                 nprocs=2, join=True)
        res = torch.load(os.path.join(tmp, "result.pt"))
        outs = [torch.load(os.path.join(tmp, f"outs{r}.pt")) for r in range(2)]
    return ref, res, outs, (src, kpm, w)


def _reference_steps(ref, src, kpm, w, steps):
    """The single-process, unsharded torch encoder on the whole batch, SGD as the workers do."""
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses, outs, grads = [], [], None
    for step in range(steps):
        out = ref(src, src_key_padding_mask=kpm)
        loss = (out * w).sum()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt.step()
        losses.append(loss.item())
        outs.append(out.detach())
    return losses, outs, grads


@pytest.mark.parametrize("variant", ["eager_init", "meta_init"])
@pytest.mark.parametrize("final_norm", [True, False], ids=["final_norm", "no_final_norm"])
def test_fsdp2_two_processes_matches_single_unsharded_torch(final_norm, variant):
    ref, res, outs, (src, kpm, w) = _run_fsdp(final_norm, variant)
    assert res["sharded"], "fully_shard left a module or parameter unsharded"
    losses, ref_outs, ref_grads = _reference_steps(ref, src, kpm, w, steps=2)
    assert ref_grads.keys() == res["grads"].keys()
    for name, g in ref_grads.items():
        assert_close_scaled(res["grads"][name], g, 1e-4, f"grad {name}")
    for step in range(2):
        got = torch.cat([outs[0][step], outs[1][step]])
        assert_close_scaled(got[~kpm], ref_outs[step][~kpm], 2e-5, f"output step {step}")
        assert got[kpm].abs().max().item() == 0.0
        assert res["losses"][step] == pytest.approx(losses[step], rel=1e-4, abs=1e-4)
    for name, p in ref.named_parameters():  # after two SGD steps on sharded weights
        assert_close_scaled(res["params"][name], p.detach(), 1e-4, f"param {name}")


def test_fsdp2_inplace_op_on_encoder_output():
    """An in-place op on the encoder's output keeps FSDP's backward hooks: the output is not a view."""
    ref, res, outs, (src, kpm, w) = _run_fsdp(True, "inplace_after_encoder")
    _, _, ref_grads = _reference_steps(ref, src, kpm, w, steps=1)
    for name, g in ref_grads.items():
        assert_close_scaled(res["grads"][name], g, 1e-4, f"grad {name}")


# ---- 2. deferred init ---------------------------------------------------------------------------

def _meta_encoder(final_norm=True, dropout=0.0):
    with torch.device("meta"):
        enc = bk_encoder(dropout=dropout, final_norm=final_norm)
    assert all(p.is_meta for p in enc.parameters())
    return enc


def _check_runs_finite(enc):
    src, kpm, w = batch_data(seed=3)
    src.requires_grad_(True)
    out = enc(src, src_key_padding_mask=kpm)
    assert out.shape == (BATCH, SEQLEN, D_MODEL) and torch.isfinite(out).all()
    (out * w).sum().backward()
    assert torch.isfinite(src.grad).all()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_deferred_init_reset_parameters_initializes_every_parameter():
    """bertkern.nn.MultiheadAttention has reset_parameters() (torch's has only _reset_parameters())."""
    enc = _meta_encoder()
    enc.to_empty(device="cpu")
    with torch.no_grad():  # to_empty's memory is uninitialized: make a missed parameter visible
        for p in enc.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    for m in enc.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    missed = [n for n, p in enc.named_parameters() if not torch.isfinite(p).all()]
    assert not missed, f"not initialized by any reset_parameters(): {missed}"
    _check_runs_finite(enc)


def test_deferred_init_reset_parameters_with_attention_init_runs():
    """The walk that works today: reset_parameters(), and _reset_parameters() for attention."""
    enc = _meta_encoder()
    enc.to_empty(device="cpu")
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    for m in enc.modules():
        for fn in ("reset_parameters", "_reset_parameters"):
            if callable(getattr(m, fn, None)):
                getattr(m, fn)()
    for name, p in enc.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
    layer = enc.layers[0]
    assert layer.linear1.weight.std() > 0 and layer.linear1.weight.abs().max() <= D_MODEL ** -0.5
    assert torch.equal(layer.norm1.weight, torch.ones(D_MODEL)) and layer.self_attn.in_proj_weight.std() > 0
    _check_runs_finite(enc)


def _run_with_grads(enc, src, kpm, w):
    src = src.clone().requires_grad_(True)
    out = enc(src, src_key_padding_mask=kpm)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    grads["src"] = src.grad
    return out.detach(), grads


@pytest.mark.parametrize("how", ["to_empty_then_load", "load_assign_on_meta"])
def test_deferred_init_load_state_dict_matches_torch(how):
    ref = torch_encoder()
    enc = _meta_encoder()
    if how == "to_empty_then_load":
        enc.to_empty(device="cpu")
        enc.load_state_dict(ref.state_dict(), strict=True)
    else:
        enc.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    assert all(p.device.type == "cpu" and p.requires_grad for p in enc.parameters())
    src, kpm, w = batch_data(seed=4)
    out, grads = _run_with_grads(enc, src, kpm, w)
    ref_out, ref_grads = _run_with_grads(ref, src, kpm, w)
    assert_close_scaled(out[~kpm], ref_out[~kpm], 2e-5, "output")
    assert out[kpm].abs().max().item() == 0.0
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_scaled(grads[name], ref_grads[name], 1e-4, name)


# ---- 3. activation checkpointing ----------------------------------------------------------------

class CheckpointedLayer(nn.Module):
    """A user's wrapper module: torch's layer signature, ``torch.utils.checkpoint`` inside (the
    encoder gives it the padded batch, as to any layer that cannot take packed tokens)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.self_attn = inner.self_attn  # what the encoder reads the layout from

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return torch.utils.checkpoint.checkpoint(self.inner, src, src_mask, src_key_padding_mask, is_causal,
                                                 use_reentrant=False)


class SelfCheckpointingLayer(bertkern.EncoderLayer):
    """An EncoderLayer subclass whose forward takes ``**kwargs`` (so it is given packed tokens)
    and checkpoints the stock forward."""

    def forward(self, src, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(super().forward, src, *args, use_reentrant=False, **kwargs)


def _canon(name):
    return name.replace("_checkpoint_wrapped_module.", "").replace("inner.", "")


def _checkpointed(enc, how):
    """A deep copy of ``enc`` with every layer checkpointed; returns (model, one module per layer
    that is called once in the forward and once more in the recompute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    model = copy.deepcopy(enc)
    if how in ("apply_activation_checkpointing", "apply_activation_checkpointing_reentrant"):
        impl = CheckpointImpl.REENTRANT if how.endswith("reentrant") else CheckpointImpl.NO_REENTRANT
        inner = list(model.layers)
        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=impl),
            check_fn=lambda m: isinstance(m, bertkern.EncoderLayer))
        assert all(type(l).__name__ == "CheckpointWrapper" for l in model.layers)
        return model, inner
    if how == "wrapper_module":
        inner = list(model.layers)
        model.layers = nn.ModuleList([CheckpointedLayer(l) for l in inner])
        return model, inner
    if how == "self_checkpointing_subclass":
        for layer in model.layers:
            layer.__class__ = SelfCheckpointingLayer
        # the subclass is called once as a module; its stock forward runs twice: count linear1
        return model, [l.linear1 for l in model.layers]
    raise ValueError(how)


AC = ["apply_activation_checkpointing", "apply_activation_checkpointing_reentrant", "wrapper_module",
      "self_checkpointing_subclass"]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("how", AC)
def test_activation_checkpointing_matches_unwrapped(how, dropout):
    enc = bertkern.Encoder.from_torch(torch_encoder(dropout=dropout)).train()
    model, counted = _checkpointed(enc, how)
    calls = []
    # A pre-hook: the recompute stops early once it has what the backward needs (torch's
    # checkpoint early stop), before a forward hook at the end of the module would fire.
    handles = [m.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, tuple(args[0].shape))))
               for i, m in enumerate(counted)]
    src, kpm, w = batch_data(seed=5)
    torch.manual_seed(123)
    ref_out, ref_grads = _run_with_grads(enc, src, kpm, w)
    torch.manual_seed(123)
    src_g = src.clone().requires_grad_(True)
    out = model(src_g, src_key_padding_mask=kpm)
    n_forward = len(calls)
    (out * w).sum().backward()
    for h in handles:
        h.remove()
    # Checkpointing happened: each layer ran once in forward and once more in the backward.
    assert n_forward == LAYERS, calls
    assert sorted(i for i, _ in calls) == sorted(list(range(LAYERS)) * 2), calls
    tokens = int((~kpm).sum())
    # Packed (T, E) tokens, except through a wrapper with torch's signature: the padded batch.
    expected_shape = (BATCH, SEQLEN, D_MODEL) if how == "wrapper_module" else (tokens, D_MODEL)
    assert all(shape == expected_shape for _, shape in calls), calls
    grads = {_canon(n): p.grad for n, p in model.named_parameters()}
    grads["src"] = src_g.grad
    # Same computation, same dropout masks (the recompute restores the RNG state).
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if dropout:  # dropout really acts: another seed, other masks
        torch.manual_seed(124)
        assert not torch.allclose(enc(src, src_key_padding_mask=kpm).detach(), ref_out)


# ---- 4. forward on the meta device --------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_dropout"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, None], ids=["bool_mask", "float_mask", "no_mask"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_forward_on_meta(batch_first, mask_dtype, train):
    with torch.device("meta"):
        enc = bk_encoder(dropout=0.1, batch_first=batch_first).train(train)
    shape = (BATCH, SEQLEN, D_MODEL) if batch_first else (SEQLEN, BATCH, D_MODEL)
    src = torch.empty(shape, device="meta", requires_grad=train)
    kpm = None if mask_dtype is None else torch.empty(BATCH, SEQLEN, dtype=mask_dtype, device="meta")
    out = enc(src, src_key_padding_mask=kpm)
    assert out.is_meta and out.shape == shape and out.dtype == torch.float32
    if train:
        out.sum().backward()
        assert src.grad.is_meta and src.grad.shape == shape
        assert all(p.grad is not None and p.grad.is_meta for p in enc.parameters())
    # Unbatched, and a causal mask.
    assert enc(torch.empty(SEQLEN, D_MODEL, device="meta")).shape == (SEQLEN, D_MODEL)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQLEN, device="meta")
    assert enc(src, mask=causal, src_key_padding_mask=kpm, is_causal=True).shape == shape


def test_mask_to_indices_on_meta_is_the_upper_bound():
    kpm = torch.empty(BATCH, SEQLEN, dtype=torch.bool, device="meta")
    indices, cu, max_seqlen = torch.ops.bertkern.mask_to_indices(kpm)
    assert indices.is_meta and indices.shape == (BATCH * SEQLEN,) and indices.dtype == torch.int64
    assert cu.is_meta and cu.shape == (BATCH + 1,) and cu.dtype == torch.int32
    assert max_seqlen == SEQLEN and isinstance(max_seqlen, int)
    x = torch.empty(BATCH, SEQLEN, 5, device="meta")
    packed, *_ = bertkern.ops.unpad(x, kpm)
    assert packed.is_meta and packed.shape == (BATCH * SEQLEN, 5)
    assert bertkern.ops.pad(packed, indices, BATCH, SEQLEN).shape == (BATCH, SEQLEN, 5)
    with pytest.raises(TypeError, match="bool"):
        torch.ops.bertkern.mask_to_indices(torch.empty(BATCH, SEQLEN, device="meta"))


def test_mask_to_indices_under_fake_mode_stays_data_dependent():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

    kpm = make_kpm()
    with FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)) as mode:
        indices, cu, max_seqlen = torch.ops.bertkern.mask_to_indices(mode.from_tensor(kpm, static_shapes=True))
    assert free_unbacked_symbols(indices.shape[0]) and free_unbacked_symbols(max_seqlen)
    assert tuple(cu.shape) == (BATCH + 1,)
