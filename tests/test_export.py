"""Exporting bertkern.Encoder and bertkern.BertModel, checked against eager PyTorch.

* ``torch.onnx.export(..., dynamo=True)``: the layers take the pure-torch padded path
  (``bertkern.nn._contract.pure_torch()``), so the ONNX graph holds standard operators only;
  exported once, then run by onnxruntime (CPUExecutionProvider) at other batch sizes and
  sequence lengths, with other padding patterns (a fully padded row, left padding, holes).
* ``torch.export.export``: keeps the packed path with bertkern's custom operators; the
  program's ``.module()`` runs at other shapes too.
* the legacy ``torch.onnx.export(..., dynamo=False)`` and ``torch.jit.trace``: the padded path.
* ``torch.jit.script``: refused, with a message that names the ways that work.

Outputs are compared on every position (fp32, atol 1e-5): eager zeros padded positions, and so
must the exported graph. Tiny models (d_model 32, 4 heads, 2 layers), CPU only.
"""
import pytest
import torch
from torch import nn

import bertkern
from bertkern import BertConfig, BertModel

pytestmark = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning",
    "ignore:.*torch.jit.(trace|script).*is deprecated:FutureWarning",
    "ignore:The feature will be removed:DeprecationWarning",  # the legacy exporter's logging setup
    "ignore:.*legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:.*The axis name:UserWarning",  # torch.onnx renaming dims that share a constraint
    "ignore:.*torchvision is not installed:UserWarning",
)

ATOL = {"atol": 1e-5, "rtol": 0.0}
D_MODEL, NHEAD, FFN, LAYERS = 32, 4, 64, 2
VOCAB, MAX_POS = 97, 40

# Exported at (batch, seq) = (3, 7) with right padding; run at other shapes and patterns.
# Rows are "length" (right padding) or an explicit string of "x" (real) and "." (padding).
EXPORT_ROWS = (7, [7, 4, 2])
RUN_ROWS = [
    (5, [5, 0]),                                   # a fully padded row
    (9, [9, "..xxxxxxx", "xx...xxxx", 1]),         # left padding, a hole, a single token
    (6, ["..xx.x"]),                               # batch 1
]


def padding_mask(seqlen, rows):
    """(B, S) bool, True = padding."""
    out = []
    for r in rows:
        if isinstance(r, int):
            out.append([s >= r for s in range(seqlen)])
        else:
            assert len(r) == seqlen
            out.append([c == "." for c in r])
    return torch.tensor(out, dtype=torch.bool)


def perturb(module, seed):
    """Non-trivial LayerNorm affines and biases, so a dropped or mis-wired term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def make_encoder(batch_first):
    torch.manual_seed(0)
    if batch_first:
        layer = bertkern.EncoderLayer(D_MODEL, NHEAD, FFN, dropout=0.1, batch_first=True)
        enc = bertkern.Encoder(layer, LAYERS)
    else:  # the other layout, with a GELU and a final norm
        layer = bertkern.EncoderLayer(D_MODEL, NHEAD, FFN, dropout=0.1, activation="gelu", batch_first=False)
        enc = bertkern.Encoder(layer, LAYERS, norm=nn.LayerNorm(D_MODEL))
    return perturb(enc, 1).eval()


def encoder_inputs(batch_first, seqlen, rows, seed):
    g = torch.Generator().manual_seed(seed)
    kpm = padding_mask(seqlen, rows)
    src = torch.randn(kpm.shape[0], seqlen, D_MODEL, generator=g)
    return (src if batch_first else src.transpose(0, 1).contiguous()), kpm


def encoder_dynamic_shapes(batch_first):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return {"src": {0: batch, 1: seq} if batch_first else {0: seq, 1: batch},
            "src_key_padding_mask": {0: batch, 1: seq}}


def make_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=LAYERS, num_attention_heads=NHEAD,
                        intermediate_size=48, max_position_embeddings=MAX_POS, hidden_act="gelu")
    return perturb(BertModel(config), 1).eval()


def bert_inputs(seqlen, rows, seed):
    g = torch.Generator().manual_seed(seed)
    attention_mask = (~padding_mask(seqlen, rows)).long()  # HF's convention: 1 = real token
    batch = attention_mask.shape[0]
    input_ids = torch.randint(1, VOCAB, (batch, seqlen), generator=g)
    input_ids[0, 0] = 0  # the pad id as a real token
    token_type_ids = torch.randint(0, 2, (batch, seqlen), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def bert_dynamic_shapes():
    # seq has an upper bound: BertModel checks seqlen <= max_position_embeddings (position ids).
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=MAX_POS)
    return {name: {0: batch, 1: seq} for name in ("input_ids", "attention_mask", "token_type_ids")}


def assert_matches(out, ref, kpm, batch_first=True):
    """``out`` equals eager's ``ref`` on every position; both are exactly zero at padding."""
    out = torch.as_tensor(out)
    torch.testing.assert_close(out, ref, **ATOL)
    pad = kpm if batch_first else kpm.T
    assert torch.all(ref[pad] == 0) and torch.all(out[pad] == 0)


def ort_session(path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_standard_onnx(path):
    """Only ONNX's own operators, and symbolic (dynamic) batch and sequence dims on the inputs."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, (inp.name, dims)


def bertkern_ops(graph):
    return {n.target.name().split("::")[1].split(".")[0] for n in graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "bertkern"}


# ---- torch.onnx.export(..., dynamo=True) -------------------------------------------------------


def check_encoder_onnx(path, enc, batch_first):
    """Standard operators only; onnxruntime matches eager at other shapes and paddings."""
    assert_standard_onnx(path)
    sess = ort_session(path)
    for i, (seqlen, rows) in enumerate(RUN_ROWS):
        src, kpm = encoder_inputs(batch_first, seqlen, rows, seed=10 + i)
        with torch.no_grad():
            ref = enc(src, src_key_padding_mask=kpm)
        (out,) = sess.run(None, {"src": src.numpy(), "src_key_padding_mask": kpm.numpy()})
        assert_matches(out, ref, kpm, batch_first)

@pytest.mark.parametrize("batch_first", [True, False])
def test_onnx_dynamo_encoder(tmp_path, batch_first):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    enc = make_encoder(batch_first)
    src, kpm = encoder_inputs(batch_first, *EXPORT_ROWS, seed=0)
    path = tmp_path / "encoder.onnx"
    torch.onnx.export(enc, (src,), str(path), kwargs={"src_key_padding_mask": kpm}, dynamo=True,
                      dynamic_shapes=encoder_dynamic_shapes(batch_first),
                      input_names=["src", "src_key_padding_mask"], output_names=["out"], verbose=False)
    check_encoder_onnx(path, enc, batch_first)


def test_onnx_dynamo_bert(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = make_bert()
    inputs = bert_inputs(*EXPORT_ROWS, seed=0)
    path = tmp_path / "bert.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(model, (inputs.pop("input_ids"),), str(path), kwargs=inputs, dynamo=True,
                      dynamic_shapes=bert_dynamic_shapes(), input_names=names,
                      output_names=["last_hidden_state", "pooler_output"], verbose=False)
    assert_standard_onnx(path)
    sess = ort_session(path)
    for i, (seqlen, rows) in enumerate(RUN_ROWS):
        inputs = bert_inputs(seqlen, rows, seed=10 + i)
        with torch.no_grad():
            ref = model(**inputs)
        hidden, pooled = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert_matches(hidden, ref.last_hidden_state, inputs["attention_mask"] == 0)
        torch.testing.assert_close(torch.as_tensor(pooled), ref.pooler_output, **ATOL)


# ---- torch.export.export: the packed path with bertkern's operators ---------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_export_encoder(batch_first):
    enc = make_encoder(batch_first)
    src, kpm = encoder_inputs(batch_first, *EXPORT_ROWS, seed=0)
    ep = torch.export.export(enc, (src,), {"src_key_padding_mask": kpm},
                             dynamic_shapes=encoder_dynamic_shapes(batch_first))
    assert {"mask_to_indices", "gather_rows", "scatter_rows", "attention_fwd"} <= bertkern_ops(ep.graph)
    module = ep.module()
    for i, (seqlen, rows) in enumerate(RUN_ROWS):
        src, kpm = encoder_inputs(batch_first, seqlen, rows, seed=10 + i)
        with torch.no_grad():
            ref = enc(src, src_key_padding_mask=kpm)
            out = module(src, src_key_padding_mask=kpm)
        assert_matches(out, ref, kpm, batch_first)


def test_torch_export_bert():
    model = make_bert()
    inputs = bert_inputs(*EXPORT_ROWS, seed=0)
    ids = inputs.pop("input_ids")
    ep = torch.export.export(model, (ids,), inputs, dynamic_shapes=bert_dynamic_shapes())
    assert {"mask_to_indices", "scatter_rows", "attention_fwd"} <= bertkern_ops(ep.graph)
    module = ep.module()
    for i, (seqlen, rows) in enumerate(RUN_ROWS):
        inputs = bert_inputs(seqlen, rows, seed=10 + i)
        ids = inputs.pop("input_ids")
        with torch.no_grad():
            ref = model(ids, **inputs)
            out = module(ids, **inputs)
        assert_matches(out[0], ref.last_hidden_state, inputs["attention_mask"] == 0)
        torch.testing.assert_close(out[1], ref.pooler_output, **ATOL)


# ---- the legacy TorchScript-based exporter and torch.jit.trace -------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_onnx_legacy_encoder(tmp_path, batch_first):
    """The legacy TorchScript-based exporter: the padded path exports with dynamic axes (it
    uses ``== -inf``, not ``isneginf``, which this exporter has no symbolic for)."""
    pytest.importorskip("onnxruntime")
    enc = make_encoder(batch_first)
    src, kpm = encoder_inputs(batch_first, *EXPORT_ROWS, seed=0)
    path = tmp_path / "encoder_legacy.onnx"
    seq_batch = {0: "batch", 1: "seq"} if batch_first else {0: "seq", 1: "batch"}
    torch.onnx.export(enc, (src, None, kpm), str(path), dynamo=False,
                      input_names=["src", "src_key_padding_mask"], output_names=["out"],
                      dynamic_axes={"src": seq_batch, "src_key_padding_mask": {0: "batch", 1: "seq"},
                                    "out": seq_batch})
    check_encoder_onnx(path, enc, batch_first)


@pytest.mark.parametrize("batch_first", [True, False])
def test_jit_trace_encoder(batch_first):
    enc = make_encoder(batch_first)
    src, kpm = encoder_inputs(batch_first, *EXPORT_ROWS, seed=0)
    traced = torch.jit.trace(enc, example_kwarg_inputs={"src": src, "src_key_padding_mask": kpm})
    assert "bertkern::" not in str(traced.inlined_graph)  # the padded path: torch's operators only
    for i, (seqlen, rows) in enumerate(RUN_ROWS):
        src, kpm = encoder_inputs(batch_first, seqlen, rows, seed=10 + i)
        with torch.no_grad():
            ref = enc(src, src_key_padding_mask=kpm)
            out = traced(src, kpm)
        assert_matches(out, ref, kpm, batch_first)


def test_jit_trace_bert():
    model = make_bert()
    traced = torch.jit.trace(model, example_kwarg_inputs=bert_inputs(*EXPORT_ROWS, seed=0), strict=False)
    assert "bertkern::" not in str(traced.inlined_graph)
    for i, (seqlen, rows) in enumerate(RUN_ROWS):
        inputs = bert_inputs(seqlen, rows, seed=10 + i)
        with torch.no_grad():
            ref = model(**inputs)
            out = traced(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
            hidden, pooled = out["last_hidden_state"], out["pooler_output"]  # the output traces as a dict
        assert_matches(hidden, ref.last_hidden_state, inputs["attention_mask"] == 0)
        torch.testing.assert_close(pooled, ref.pooler_output, **ATOL)


# ---- torch.jit.script: refused, pointing at what works -----------------------------------------

@pytest.mark.parametrize("make", [lambda: bertkern.Encoder(bertkern.EncoderLayer(D_MODEL, NHEAD, FFN), LAYERS),
                                  lambda: bertkern.EncoderLayer(D_MODEL, NHEAD, FFN)],
                         ids=["Encoder", "EncoderLayer"])
def test_jit_script_raises(make):
    with pytest.raises(RuntimeError, match="torch.jit.script") as info:
        torch.jit.script(make())
    message = str(info.value)
    for name in ("torch.compile", "torch.export", "torch.onnx.export"):
        assert name in message, message
