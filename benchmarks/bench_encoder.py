"""End-to-end encoder benchmarks: bertkern.Encoder / bertkern.BertModel against plain PyTorch and
HF transformers, train step (forward + backward) and inference.

Run with ``pytest benchmarks --benchmark-only`` (``--benchmark-json=out.json``, then
``python -m bertkern.bench report out.json`` for a table and a plot).

Implementations (``impl`` in extra_info):
  bertkern        bertkern.Encoder (from_torch of the torch module: the same weights)
  bertkern_alt_gemm  (CPU) the same, with its GEMMs on the other CPU route than the default
                  (bertkern.ops.set_cpu_gemm: oneDNN where the default is F.linear / MKL, as on
                  Intel, and the reverse on AMD; see bertkern/ops/linear.py): shows how much of
                  a speedup is the GEMM library and how much the kernels and the unpadding
  torch           nn.TransformerEncoder, torch's math path (training path; in inference run
                  with torch.backends.mha fast path disabled)
  torch_nested    nn.TransformerEncoder in eval + inference_mode with enable_nested_tensor:
                  torch's fast path, which also drops padding (inference only)
  bertkern_bert   bertkern.BertModel.from_hf(hf): the whole BERT (embeddings, layers, pooler)
  hf_bert         transformers.BertModel with SDPA attention (skipped without transformers)

Group "... autocast_bf16" (CPU): the same model and uniform batch, bertkern.Encoder and
nn.TransformerEncoder's math path both under torch.autocast(bfloat16); not the fp32 numbers.

Workloads (``workload``): the batch is padded to S; lengths are
  no_padding  all S (called with no src_key_padding_mask)
  uniform     uniform in [S/8, S]
  long_tail   log-normal around S/4 (a realistic corpus: many short, a few long), one of length S

Each case times all its implementations in interleaved rounds (benchmarks/_timing.py:
interleaved_rounds; 9 rounds, 7 for CPU train steps), so load on the machine hits them alike;
every row records real_tokens, padding_fraction, tokens_per_s (real tokens), its own rounds
(median_s, iqr_s, min_s, rounds, round_seconds), interleaved_seconds (every implementation's
median), and the bertkern rows ``speedup_vs_<impl>`` (ratio of medians) with
``speedup_vs_<impl>_ci95`` (paired bootstrap over the rounds, bertkern.bench.stats) against
every baseline of that run (inference also ``speedup_vs_torch_best`` [+ ``_ci95``]: against
the torch path with the lower median, named in ``torch_best``) and, on CPU, ``alt_gemm_ratio``
(bertkern_alt_gemm median / bertkern median: > 1 means the default GEMM route is the faster one
here), ``gemm_only_seconds`` (median of the layers' GEMMs alone on the real tokens, timed in the
same interleaved run: a floor for the same fp32 math on bertkern's GEMM route),
``gemm_share`` (that floor / bertkern time) and ``speedup_bound_vs_torch_best`` (the faster
torch path / that floor: the largest speedup an implementation using bertkern's GEMM route on
the real tokens only could show). Train rows of the main CPU config run with dropout 0 and 0.1
(``dropout`` in extra_info and the group name): torch's CPU SDPA is fused only without dropout.
The dropout-0 train cases leave out bertkern_alt_gemm (and so alt_gemm_ratio): the run-time budget.
CUDA rows synchronize and skip cleanly without a GPU. Every row records ``peak_memory_bytes``: on CUDA
torch.cuda.max_memory_allocated over one call, on CPU the peak of the tensor memory allocated
during one call as torch's profiler records it (benchmarks/_timing.py: cpu_peak_bytes).
"""
import math

import pytest
import torch
from torch import nn

import bertkern
from _timing import cpu_peak_bytes, interleaved_rounds, ratio_info, summary  # benchmarks/_timing.py
from bertkern.bench.stats import median

_needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")

# (device, d_model, nhead, dim_feedforward, layers, batch, seqlen, dtype)
CPU_MODEL = ("cpu", 768, 12, 3072, 2, 32, 128, torch.float32)  # the README's speed-goal config
CPU_SEQLEN_SWEEP = [("cpu", 768, 12, 3072, 2, 64, 64, torch.float32),
                    ("cpu", 768, 12, 3072, 2, 8, 512, torch.float32)]
# Small models, where per-op dispatch rather than the GEMMs sets the time (goal: >= 0.9x torch).
CPU_SMALL_MODELS = [("cpu", 32, 4, 64, 2, 8, 16, torch.float32),
                    ("cpu", 64, 4, 128, 2, 8, 16, torch.float32),
                    ("cpu", 128, 4, 256, 2, 16, 32, torch.float32)]
CUDA_MODELS = [("cuda", 768, 12, 3072, 12, 32, 512, torch.bfloat16),    # BERT-base
               ("cuda", 1024, 16, 4096, 24, 32, 512, torch.bfloat16)]   # BERT-large
WORKLOADS = ["no_padding", "uniform", "long_tail"]


def _lengths(workload, batch, seqlen, generator):
    if workload == "no_padding":
        return torch.full((batch,), seqlen)
    if workload == "uniform":
        lengths = torch.randint(max(1, seqlen // 8), seqlen + 1, (batch,), generator=generator)
    elif workload == "long_tail":
        z = torch.randn(batch, generator=generator)
        lengths = torch.exp(math.log(seqlen / 4) + 0.7 * z).round().clamp(2, seqlen).long()
    else:
        raise ValueError(workload)
    lengths[0] = seqlen  # the batch is padded to its longest sequence
    return lengths


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _case_id(device, d_model, nhead, ffn, layers, batch, seqlen, dtype):
    return f"{device}-d{d_model}h{nhead}f{ffn}L{layers}-{batch}x{seqlen}-{str(dtype).replace('torch.', '')}"


class _Case:
    """One model config + workload: the modules (same weights) and the inputs."""

    def __init__(self, device, d_model, nhead, ffn, layers, batch, seqlen, dtype, workload, mode, autocast=False,
                 dropout=0.1):
        self.device, self.mode, self.dtype, self.autocast = device, mode, dtype, autocast
        self.dropout = dropout if mode == "train" else 0.0  # eval: dropout is off either way
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        lengths = _lengths(workload, batch, seqlen, g)
        self.kpm = (torch.arange(seqlen)[None, :] >= lengths[:, None]).to(device)  # True = padding
        # A batch with no padding is called with no mask, as a script would (torch's fast path
        # then runs its fused dense kernel, not the nested-tensor conversion).
        self.call_mask = None if workload == "no_padding" else self.kpm
        self.real_tokens = int(lengths.sum())
        self.padding_fraction = 1.0 - self.real_tokens / (batch * seqlen)
        self.batch, self.seqlen, self.d_model = batch, seqlen, d_model
        layer = nn.TransformerEncoderLayer(d_model, nhead, ffn, dropout=dropout, batch_first=True)
        self.torch_enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=(mode == "inference"))
        self.torch_enc.to(device=device, dtype=dtype)
        self.bk_enc = bertkern.Encoder.from_torch(self.torch_enc)
        train = mode == "train"
        for m in (self.torch_enc, self.bk_enc):
            m.train(train)
        self.src = torch.randn(batch, seqlen, d_model, generator=g).to(device=device, dtype=dtype)
        self.grad = (torch.randn(batch, seqlen, d_model, generator=g) * (~self.kpm.cpu()).unsqueeze(-1)).to(
            device=device, dtype=dtype)
        self.config = dict(d_model=d_model, nhead=nhead, dim_feedforward=ffn, layers=layers)

    def _encoder_fn(self, module, fast_path=True):
        src, kpm, grad, device = self.src, self.call_mask, self.grad, self.device
        if self.mode == "train":
            leaf = src.detach().requires_grad_()

            def train_step():
                out = module(leaf, src_key_padding_mask=kpm)
                out.backward(grad)
                for p in module.parameters():
                    p.grad = None
                leaf.grad = None
                _sync(device)
            return train_step

        def infer():
            saved = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(fast_path)
            try:
                with torch.inference_mode():
                    module(src, src_key_padding_mask=kpm)
            finally:
                torch.backends.mha.set_fastpath_enabled(saved)
            _sync(device)
        return infer

    def fns(self):
        """{impl: callable} for the encoder implementations of this mode."""
        fns = {"bertkern": self._encoder_fn(self.bk_enc),
               "torch": self._encoder_fn(self.torch_enc, fast_path=False)}
        if self.autocast:
            # bf16 autocast on both sides (torch's nested fast path is left out: on CPU, torch
            # 2.14's _transformer_encoder_layer_fwd raises "expected scalar type Float but
            # found BFloat16" under autocast). GEMMs are F.linear in bf16 either way.
            fns["gemm_only"] = self._gemm_only_fn()
            return {name: _under_autocast(fn, self.device) for name, fn in fns.items()}
        if self.mode == "inference":
            fns["torch_nested"] = self._encoder_fn(self.torch_enc, fast_path=True)
        if self.device == "cpu":
            if _with_alt_gemm_row(self.mode, self.dropout):
                fns["bertkern_alt_gemm"] = _with_alt_gemm(fns["bertkern"])
            fns["gemm_only"] = self._gemm_only_fn()
        return fns

    def _gemm_only_fn(self):
        """The layers' four GEMMs alone on the real tokens (bertkern.ops.linear, the same
        weights; forward, + backward in train): the floor under any implementation that
        computes the same fp32 math on real tokens only."""
        from bertkern.ops.linear import linear

        e, t = self.d_model, self.real_tokens
        g = torch.Generator().manual_seed(1)
        train = self.mode == "train"
        x = torch.randn(t, e, generator=g).to(device=self.device, dtype=self.dtype).requires_grad_(train)
        ffn = self.config["dim_feedforward"]
        h = torch.randn(t, ffn, generator=g).to(device=self.device, dtype=self.dtype).requires_grad_(train)
        layers = self.bk_enc.layers

        def run():
            with torch.set_grad_enabled(train):
                outs = []
                for layer in layers:
                    attn = layer.self_attn
                    outs += [linear(x, attn.in_proj_weight, attn.in_proj_bias),
                             linear(x, attn.out_proj.weight, attn.out_proj.bias),
                             linear(x, layer.linear1.weight, layer.linear1.bias),
                             linear(h, layer.linear2.weight, layer.linear2.bias)]
                if train:
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                    for p in self.bk_enc.parameters():
                        p.grad = None
                    x.grad = h.grad = None
            _sync(self.device)
        return run


def _under_autocast(fn, device):
    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            fn()
    return run


def _with_alt_gemm(fn):
    def run():
        saved = _onednn()
        bertkern.ops.set_cpu_gemm("torch" if saved else "onednn")
        try:
            fn()
        finally:
            bertkern.ops.set_cpu_gemm("onednn" if saved else "torch")
    return run


class _BertCase:
    """HF BertModel (SDPA) vs bertkern.BertModel.from_hf on the same weights and input ids."""

    def __init__(self, device, d_model, nhead, ffn, layers, batch, seqlen, dtype, workload, mode):
        transformers = pytest.importorskip("transformers")
        self.device, self.mode = device, mode
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        lengths = _lengths(workload, batch, seqlen, g)
        attention_mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
        self.real_tokens = int(lengths.sum())
        self.padding_fraction = 1.0 - self.real_tokens / (batch * seqlen)
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=d_model, num_attention_heads=nhead,
                                      intermediate_size=ffn, num_hidden_layers=layers,
                                      max_position_embeddings=max(512, seqlen), attn_implementation="sdpa")
        self.hf = transformers.BertModel(cfg).to(device=device, dtype=dtype)
        self.bk = bertkern.BertModel.from_hf(self.hf)
        for m in (self.hf, self.bk):
            m.train(mode == "train")
        self.input_ids = torch.randint(0, 30522, (batch, seqlen), generator=g).to(device)
        self.attention_mask = attention_mask.to(device)
        self.grad = (torch.randn(batch, seqlen, d_model, generator=g) * attention_mask.unsqueeze(-1)).to(
            device=device, dtype=dtype)

    def _fn(self, model):
        ids, mask, grad, device = self.input_ids, self.attention_mask, self.grad, self.device
        if self.mode == "train":
            def train_step():
                out = model(ids, attention_mask=mask)
                out[0].backward(grad)
                for p in model.parameters():
                    p.grad = None
                _sync(device)
            return train_step

        def infer():
            with torch.inference_mode():
                model(ids, attention_mask=mask)
            _sync(device)
        return infer

    def fns(self):
        return {"bertkern_bert": self._fn(self.bk), "hf_bert": self._fn(self.hf)}


_RESULTS = {}  # (case key) -> {impl: [seconds per round]}, shared by the rows of one case


def _rounds(case):
    """Interleaved rounds per case: 9 where a call is short (inference, CUDA); 7 for CPU
    train steps (> 0.5 s each at the main config), the least for which a ratio interval is
    reported."""
    return 9 if case.mode == "inference" or case.device == "cuda" else 7


def _run_case(benchmark, key, case, impl, headline):
    """Times every implementation of the case in interleaved rounds (cached for the case's
    other rows), then lets pytest-benchmark time `impl` for its own row."""
    fns = case.fns()
    disabled = getattr(benchmark, "disabled", False)
    if key not in _RESULTS and not disabled:
        names = list(fns)
        # target_s: calls shorter than 50 ms (small models) are repeated within a round.
        samples = interleaved_rounds([fns[n] for n in names], rounds=_rounds(case), target_s=0.05)
        _RESULTS[key] = dict(zip(names, samples))
    benchmark.pedantic(fns[impl], rounds=3 if case.device == "cpu" else 10, iterations=1, warmup_rounds=1)
    info = dict(impl=impl, real_tokens=case.real_tokens, padding_fraction=round(case.padding_fraction, 3))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        info["tokens_per_s"] = case.real_tokens / stats.stats.min
    if key in _RESULTS:
        rounds = _RESULTS[key]
        med = {name: median(xs) for name, xs in rounds.items()}
        info.update(summary(rounds[impl]))
        info["interleaved_seconds"] = med  # medians over the rounds
        info["interleaved_tokens_per_s"] = case.real_tokens / med[impl]
        if impl == headline:
            torch_names = [n for n in ("torch", "torch_nested") if n in med]
            for name, t in med.items():
                if name == "bertkern_alt_gemm":  # not a baseline: bertkern itself on the other GEMM route
                    info["alt_gemm_ratio"] = t / med[impl]
                elif name == "gemm_only":  # not a baseline: the GEMMs alone, a floor
                    info["gemm_only_seconds"] = t
                    info["gemm_share"] = t / med[impl]
                    if torch_names:
                        info["speedup_bound_vs_torch_best"] = min(med[n] for n in torch_names) / t
                elif name != impl:
                    info.update(ratio_info(name, rounds[name], rounds[impl]))
            if "torch_nested" in med:
                best = min(torch_names, key=lambda n: med[n])
                ratios = ratio_info(best, rounds[best], rounds[impl])
                info["speedup_vs_torch_best"] = ratios[f"speedup_vs_{best}"]
                info["speedup_vs_torch_best_ci95"] = ratios[f"speedup_vs_{best}_ci95"]
                info["torch_best"] = best
    if case.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fns[impl]()
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["peak_memory_bytes"] = cpu_peak_bytes(fns[impl])
        info["cpu_threads"] = torch.get_num_threads()
        info["cpu_gemm"] = "onednn" if _onednn() else "torch"
    benchmark.extra_info.update(info)


def _onednn():
    from bertkern.ops.linear import onednn_linear_enabled

    return onednn_linear_enabled()


def _with_alt_gemm_row(mode, dropout):
    """The GEMM-route comparison runs in inference and in train with dropout 0.1; the dropout-0
    train cases leave it out (the route's share does not depend on dropout, and the 35-minute
    budget of the full suite on a 2-core machine)."""
    return not (mode == "train" and dropout == 0.0)


def _drop_id(mode, dropout):
    """The dropout part of a train case's id / group ("dropout0", "dropout0.1"); inference has none."""
    return f"dropout{dropout:g}" if mode == "train" else ""


def _params(models, impls, workloads, modes, train_dropouts=(0.1,)):
    out = []
    for m in models:
        marks = [_needs_cuda] if m[0] == "cuda" else []
        for workload in workloads:
            for mode in modes:
                for dropout in (train_dropouts if mode == "train" else (0.1,)):
                    for impl in impls:
                        if (impl == "torch_nested" and mode == "train") or (impl == "bertkern_alt_gemm" and (
                                m[0] != "cpu" or not _with_alt_gemm_row(mode, dropout))):
                            continue
                        drop = _drop_id(mode, dropout)
                        out.append(pytest.param(m, workload, mode, dropout, impl, marks=marks,
                                                id=f"{_case_id(*m)}-{workload}-{mode}{'-' + drop if drop else ''}-{impl}"))
    return out


ENCODER_IMPLS = ["bertkern", "torch", "torch_nested", "bertkern_alt_gemm"]
# The main CPU config trains with dropout 0 and 0.1: torch's CPU SDPA takes its fused kernel
# only without dropout, so the pair separates the dropout's share of the speedup from the
# unpadding's and the kernels'.
ENCODER_PARAMS = (_params([CPU_MODEL], ENCODER_IMPLS, WORKLOADS, ["train", "inference"], train_dropouts=(0.0, 0.1))
                  + _params(CPU_SEQLEN_SWEEP, ENCODER_IMPLS, ["uniform"], ["inference"])
                  + _params(CPU_SMALL_MODELS, ENCODER_IMPLS, ["uniform", "no_padding"], ["train", "inference"])
                  + _params(CUDA_MODELS, ENCODER_IMPLS, WORKLOADS, ["train", "inference"]))


@pytest.mark.parametrize("model,workload,mode,dropout,impl", ENCODER_PARAMS)
def test_encoder(benchmark, model, workload, mode, dropout, impl):
    case = _Case(*model, workload, mode, dropout=dropout)
    drop = _drop_id(mode, dropout)
    benchmark.group = f"encoder {mode} {_case_id(*model)} {workload}" + (f" {drop}" if drop else "")
    key = ("encoder", model, workload, mode, case.dropout)
    _run_case(benchmark, key, case, impl, headline="bertkern")
    benchmark.extra_info.update(mode=mode, workload=workload, device=model[0], batch=model[5], seqlen=model[6],
                                dtype=str(model[7]).replace("torch.", ""), dropout=case.dropout, **case.config)


# bf16 autocast, both sides: what the same batch costs when a script already runs under
# torch.autocast (on this project's Xeon the bf16 GEMMs run on AMX). Not the same numbers as
# fp32; reported apart from the fp32 goal rows.
AUTOCAST_PARAMS = [pytest.param(CPU_MODEL, "uniform", mode, impl, id=f"{_case_id(*CPU_MODEL)}-uniform-{mode}-{impl}-autocast_bf16")
                   for mode in ("train", "inference") for impl in ("bertkern", "torch")]


@pytest.mark.parametrize("model,workload,mode,impl", AUTOCAST_PARAMS)
def test_encoder_autocast_bf16(benchmark, model, workload, mode, impl):
    case = _Case(*model, workload, mode, autocast=True)
    benchmark.group = f"encoder {mode} {_case_id(*model)} {workload} autocast_bf16"
    key = ("encoder_autocast", model, workload, mode)
    _run_case(benchmark, key, case, impl, headline="bertkern")
    benchmark.extra_info.update(mode=mode, workload=workload, device=model[0], batch=model[5], seqlen=model[6],
                                dtype="float32 weights, bf16 autocast", autocast="bfloat16", dropout=case.dropout,
                                **case.config)


BERT_PARAMS = (_params([CPU_MODEL], ["bertkern_bert", "hf_bert"], ["uniform"], ["train", "inference"])
               + _params(CUDA_MODELS, ["bertkern_bert", "hf_bert"], ["uniform", "long_tail"], ["train", "inference"]))


@pytest.mark.parametrize("model,workload,mode,dropout,impl", BERT_PARAMS)
def test_bert(benchmark, model, workload, mode, dropout, impl):  # HF's default dropout 0.1 (train)
    case = _BertCase(*model, workload, mode)
    benchmark.group = f"bert {mode} {_case_id(*model)} {workload}"
    key = ("bert", model, workload, mode)
    _run_case(benchmark, key, case, impl, headline="bertkern_bert")
    benchmark.extra_info.update(mode=mode, workload=workload, device=model[0], batch=model[5], seqlen=model[6],
                                dropout=dropout if mode == "train" else 0.0,
                                d_model=model[1], layers=model[4], dtype=str(model[7]).replace("torch.", ""))
