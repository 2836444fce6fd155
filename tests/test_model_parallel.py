"""The model-parallel baselines of benchmarks/model_parallel.py compute what the unsplit encoder
computes, so that bench_model_parallel.py compares correct computations:

  * LayerSplitEncoder (layers split over devices; here the same device repeated) gives the
    unsplit encoder's outputs and gradients, for nn.TransformerEncoder and bertkern.Encoder
    (packed path, padded fallback path, batch_first=False), train and eval;
  * GPipe over 2 gloo processes (PipelineRunner, 4 micro-batches, mask passed per micro-batch)
    gives the single-process loss, outputs and gradients, for both stacks.
"""
import os
import sys

import pytest
import torch
from torch import nn

import bertkern

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from model_parallel import (  # noqa: E402  (benchmarks/model_parallel.py)
    IMPLS, EncoderConfig, LayerSplitEncoder, PipelineRunner, devices_for_split, make_batch, make_encoder,
    split_bounds, token_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

TINY = EncoderConfig(d_model=32, nhead=4, dim_feedforward=64, num_layers=4, dropout=0.0, batch=8, seqlen=24)
TOL = dict(rtol=1e-4, atol=1e-5)


def _reference(impl, cfg, train=True):
    """Loss, output and gradients of the whole batch through the unsplit encoder."""
    encoder = make_encoder(impl, cfg)
    x, mask, target, _ = make_batch(cfg)
    encoder.train(train)
    if not train:
        with torch.no_grad():
            return None, encoder(x, src_key_padding_mask=mask), None, mask
    out = encoder(x, src_key_padding_mask=mask)
    loss = token_loss(out, target)
    loss.backward()
    return loss.item(), out.detach(), {n: p.grad for n, p in encoder.named_parameters()}, mask


def test_split_bounds():
    assert split_bounds(4, 2) == [(0, 2), (2, 4)]
    assert split_bounds(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    with pytest.raises(ValueError):
        split_bounds(2, 3)


def test_devices_for_split_reports_repeated_single_device():
    devices = devices_for_split(3)
    assert len(devices) == 3
    if not torch.cuda.is_available():
        assert devices == [torch.device("cpu")] * 3
    elif torch.cuda.device_count() < 3:
        assert devices == [torch.device("cuda", 0)] * 3


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_split_matches_unsplit(impl, stages):
    cfg = TINY
    loss_ref, out_ref, grads_ref, mask = _reference(impl, cfg)
    keep = ~mask
    encoder = make_encoder(impl, cfg)
    split = LayerSplitEncoder(encoder, ["cpu"] * stages)
    assert [len(s.layers) for s in split.stages] == [b - a for a, b in split_bounds(cfg.num_layers, stages)]
    assert split.stages[-1].norm is encoder.norm and all(s.norm is None for s in split.stages[:-1])
    x, mask, target, _ = make_batch(cfg)
    out = split(x, src_key_padding_mask=mask)
    loss = token_loss(out, target)
    loss.backward()
    torch.testing.assert_close(out.detach()[keep], out_ref[keep], **TOL)
    torch.testing.assert_close(loss.item(), loss_ref, **TOL)
    grads = {n: p.grad for n, p in encoder.named_parameters()}  # the split shares the parameters
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL, msg=name)

    _, out_eval_ref, _, _ = _reference(impl, cfg, train=False)
    split.eval()
    with torch.no_grad():
        out_eval = split(x, src_key_padding_mask=mask)
    torch.testing.assert_close(out_eval[keep], out_eval_ref[keep], **TOL)
    assert not out_eval[mask].any()  # bertkern, and torch's eval fast path: zeros at padding


def test_layer_split_bertkern_fallback_and_seq_first():
    """bertkern stages called one by one on the padded batch (an attention mask forces it), and
    the packed path with batch_first=False, both equal the unsplit bertkern.Encoder."""
    cfg = TINY
    encoder = make_encoder("bertkern", cfg).eval()
    split = LayerSplitEncoder(encoder, ["cpu", "cpu"])
    x, mask, _, _ = make_batch(cfg)
    band = torch.ones(cfg.seqlen, cfg.seqlen, dtype=torch.bool).triu(3)  # neither causal nor empty
    with torch.no_grad():
        torch.testing.assert_close(split(x, mask=band, src_key_padding_mask=mask),
                                   encoder(x, mask=band, src_key_padding_mask=mask), **TOL)
        torch.testing.assert_close(split(x), encoder(x), **TOL)  # no mask: packed, all tokens real

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.nhead, cfg.dim_feedforward, 0.0, batch_first=False)
    seq_first = bertkern.Encoder.from_torch(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)).eval()
    split = LayerSplitEncoder(seq_first, ["cpu", "cpu"])
    xs = x.transpose(0, 1).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(split(xs, src_key_padding_mask=mask),
                                   seq_first(xs, src_key_padding_mask=mask), **TOL)


@pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_split_cuda(impl):
    cfg = TINY
    _, out_ref, _, mask = _reference(impl, cfg, train=False)
    devices = devices_for_split(2)
    split = LayerSplitEncoder(make_encoder(impl, cfg), devices).eval()
    x, mask, _, _ = make_batch(cfg)
    with torch.no_grad():
        out = split(x, src_key_padding_mask=mask)
    assert out.device == devices[-1]
    keep = ~mask
    torch.testing.assert_close(out.cpu()[keep], out_ref[keep], rtol=1e-3, atol=1e-3)


def test_gpipe_two_gloo_ranks_match_single_process():
    """2 processes, 2 layers each, 4 micro-batches of 2 sequences: loss, outputs (real tokens)
    and every parameter's gradient equal the single-process whole-batch computation."""
    cfg = TINY
    with PipelineRunner(cfg, world_size=2, n_microbatches=4, threads_per_rank=1, timeout_s=300) as runner:
        assert [i["layers"] for i in runner.info] == [[0, 2], [2, 4]]
        assert [i["threads"] for i in runner.info] == [1, 1]
        results = {impl: runner.collect(impl) for impl in IMPLS}
        assert runner.median_step_seconds("torch", "inference", iters=1, warmup=0) > 0
        saved = {impl: sum(m["saved_activation_bytes"] for m in runner.memory(impl, "train")) for impl in IMPLS}
        assert 0 < saved["bertkern"] < saved["torch"]  # bertkern keeps real tokens only
    for impl, got in results.items():
        loss_ref, out_ref, grads_ref, mask = _reference(impl, cfg)
        keep = ~mask
        torch.testing.assert_close(got["loss"], loss_ref, **TOL)
        torch.testing.assert_close(got["train_output"][keep], out_ref[keep], **TOL)
        assert got["grads"].keys() == grads_ref.keys()
        for name, grad in grads_ref.items():
            torch.testing.assert_close(got["grads"][name], grad, **TOL, msg=f"{impl} {name}")
        _, out_eval_ref, _, _ = _reference(impl, cfg, train=False)
        torch.testing.assert_close(got["inference_output"][keep], out_eval_ref[keep], **TOL)
        assert not got["inference_output"][mask].any()
