"""The GPU path of bertkern.Encoder end to end on the CPU (run by tests/test_encoder_gpu_path.py).

Every kernel the Encoder launches runs through its GPU implementation:

  * attention: the Triton kernels (bertkern/kernels/attention.py) under the Triton interpreter,
    by making the Encoder call ``attention_varlen(..., backend="triton")``;
  * layer_norm_fwd / layer_norm_bwd / mask_to_indices / gather_rows / scatter_rows: the CUDA
    kernel source (csrc/cuda/*.cuh) through the host emulation of the CUDA execution model
    (tests/emulation/), by overriding the CPU kernels of the ``bertkern`` operators with
    ``torch.ops.bertkern_emu.*`` for the life of this process. The C++ CPU attention kernels are
    overridden with kernels that raise, so nothing can quietly fall back to them.

Each override counts its calls, and each Triton kernel counts its launches (an interpreter
pre-run hook); every run asserts that all of them fired. Forward + backward on a tiny config are
compared with ``nn.TransformerEncoder`` (same weights) computed in float64, on real tokens, within
FlashAttention's bound: |bertkern - fp64| <= 2 |torch fp32 - fp64| + ATOL * max(1, |fp64|).

With dropout (training), every seed bertkern draws is recorded (SeedLog) and the references are
the encoder recomputed by plain ops with the same masks rebuilt from those seeds
(masked_reference: tests.reference's Philox conventions), in fp64 and fp32. In bf16 the "torch
fp32" of the bound is torch's module in bf16 and the slack is FlashAttention's (twice the bf16
rounding of the reference); the Triton kernels get fp32 copies of q, k, v there (CONFIGS says why).

    TRITON_INTERPRET=1 python -m tests.encoder_gpu_path_worker

TRITON_INTERPRET=1 must be set before triton is imported, hence a fresh process. Prints one line
``ENCODER_GPU_PATH_SUMMARY {json}`` and exits 0 on success; exits 1 with a message on failure.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
import warnings

SUMMARY_PREFIX = "ENCODER_GPU_PATH_SUMMARY "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny config: head dim 16 (the Triton kernels take multiples of 8), S = 9 (not a multiple of
# any tile), padding at the end, in the middle, and a fully padded sequence.
D_MODEL, NHEAD, DIM_FF, NUM_LAYERS = 32, 2, 64, 2
BATCH, SEQLEN = 3, 9
# (batch_first, norm_first, final norm, activation, dropout, dtype)
CONFIGS = [
    (True, False, True, "relu", 0.0, "float32"),
    (True, True, True, "gelu", 0.0, "float32"),
    (False, False, False, "relu", 0.0, "float32"),
    (False, True, True, "relu", 0.0, "float32"),
    # Training with dropout: attention dropout in the Triton kernels (forward, and regenerated in
    # the backward), dropout1 / relu+dropout / dropout2 in bertkern's CPU dropout operator (CUDA
    # has no dropout kernel of its own: there it is F.dropout). The references apply the same
    # masks, rebuilt from the seeds the run drew (see SeedLog, masked_reference).
    (True, False, True, "relu", 0.25, "float32"),
    (False, True, True, "gelu", 0.25, "float32"),
    # bf16 weights and inputs: the emulated CUDA LayerNorm / padding kernels and the Triton
    # kernels in a bf16 model, against torch's bf16 module by the same bound (fp64 reference on
    # the rounded weights). The interpreter's bf16 arithmetic is wrong (the attention alone, two
    # sequences of 7 and 6 tokens, 2 heads of 16: max error 8e8 against 3.8e-3 for the C++ CPU
    # kernel), so in this run the Triton kernels are given fp32 copies of the bf16 q, k, v and
    # their output is rounded back to bf16 (GpuPath: "attention_varlen(bf16 -> fp32)"). gelu:
    # ReLU's gradient jumps where a pre-activation rounds across 0, which the bound does not allow.
    (True, False, True, "gelu", 0.0, "bfloat16"),
]
ATOL = 1e-5  # floor of the bound, relative to max(1, |fp64 reference|)

EMULATED_OPS = ("layer_norm_fwd", "layer_norm_bwd", "mask_to_indices", "gather_rows", "scatter_rows")
TRITON_KERNELS = ("attention_fwd", "attention_delta_bwd", "attention_dkdv_bwd", "attention_dq_bwd")


def key_padding_mask():
    """(B, S) bool, True = padding: padded at the end, padded in the middle, fully padded."""
    import torch

    mask = torch.zeros(BATCH, SEQLEN, dtype=torch.bool)
    mask[0, 7:] = True           # length 7, padding at the end
    mask[1, [1, 4, 5]] = True    # padding in the middle; last position real
    mask[2, :] = True            # all padding
    return mask


# ---- routing every kernel to its GPU implementation ---------------------------------------------

class GpuPath:
    """Installs the overrides; ``calls`` counts emulated-op calls and Triton kernel launches."""

    def __init__(self):
        import torch

        from tests.emulation.loader import load_emulated_ops

        self.emu = load_emulated_ops()
        self.calls = {}
        self._lib = torch.library.Library("bertkern", "IMPL")
        with warnings.catch_warnings():
            # "Overriding a previously registered kernel": that is the point.
            warnings.simplefilter("ignore")
            for name in EMULATED_OPS:
                self._lib.impl(name, self._emulated(name), "CPU")
            for name in ("attention_fwd", "attention_bwd"):
                self._lib.impl(name, self._forbidden(name), "CPU")
        self._install_triton_attention()
        self.seeds = SeedLog()

    def _emulated(self, name):
        emu_op = getattr(self.emu, name)
        self.calls[f"emu.{name}"] = 0

        def kernel(*args, **kwargs):
            self.calls[f"emu.{name}"] += 1
            return emu_op(*args, **kwargs)

        return kernel

    def _forbidden(self, name):
        self.calls[f"cpu.{name}"] = 0

        def kernel(*args, **kwargs):
            self.calls[f"cpu.{name}"] += 1
            raise AssertionError(f"the C++ CPU kernel bertkern::{name} ran on the GPU path")

        return kernel

    def _install_triton_attention(self):
        import bertkern.nn.attention as attention_module
        from bertkern.kernels import attention as kernels
        from triton.runtime.interpreter import InterpretedFunction

        # bertkern.nn.MultiheadAttention looks attention_varlen up in its module's globals at call time.
        import torch

        original = attention_module.attention_varlen
        self.calls["attention_varlen(backend=triton)"] = 0
        self.calls["attention_varlen(bf16 -> fp32)"] = 0

        def attention_varlen_triton(q, k, v, *args, **kwargs):
            if kwargs.get("backend", "auto") != "auto":
                raise AssertionError(f"the Encoder asked for backend={kwargs['backend']!r}")
            kwargs["backend"] = "triton"
            self.calls["attention_varlen(backend=triton)"] += 1
            if q.dtype == torch.bfloat16:  # the interpreter's bf16 math is wrong (CONFIGS)
                self.calls["attention_varlen(bf16 -> fp32)"] += 1
                return original(q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)
            return original(q, k, v, *args, **kwargs)

        attention_module.attention_varlen = attention_varlen_triton

        for name in TRITON_KERNELS:
            fn = getattr(kernels, name)
            while not isinstance(fn, InterpretedFunction):  # through @triton.autotune
                fn = fn.fn
            self.calls[f"triton.{name}"] = 0

            def count(*args, _key=f"triton.{name}", **kwargs):
                self.calls[_key] += 1

            fn.add_pre_run_hook(count)

    def reset(self):
        for key in self.calls:
            self.calls[key] = 0
        self.seeds.log.clear()

    def check_all_live(self, label):
        missing = [k for k, n in self.calls.items() if not k.startswith("cpu.") and n == 0 and "bf16" not in k]
        if missing:
            raise AssertionError(f"{label}: never went through {missing}; calls = {self.calls}")
        fell_back = {k: n for k, n in self.calls.items() if k.startswith("cpu.") and n}
        if fell_back:
            raise AssertionError(f"{label}: C++ CPU attention kernels ran: {fell_back}")


class SeedLog:
    """Records, in call order, every dropout seed bertkern draws: ("attention", seed) from
    bertkern.ops.attention._dropout_seed, ("dropout", seed) from bertkern.ops.dropout._seed (both
    looked up as module globals at call time). The seeds are returned unchanged."""

    def __init__(self):
        import importlib

        # bertkern.ops re-exports functions named like these modules: import the modules by name.
        attention_ops = importlib.import_module("bertkern.ops.attention")
        dropout_ops = importlib.import_module("bertkern.ops.dropout")

        self.log = []
        for module, name, kind in ((attention_ops, "_dropout_seed", "attention"), (dropout_ops, "_seed", "dropout")):
            original = getattr(module, name)

            def record(*args, _original=original, _kind=kind, **kwargs):
                seed = _original(*args, **kwargs)
                if seed is not None:
                    self.log.append((_kind, int(seed.item())))
                return seed

            setattr(module, name, record)


def masked_reference(module, dtype, src, w, mask, batch_first, dropout, seeds):
    """``module`` (an nn.TransformerEncoder) recomputed in ``dtype`` by plain torch ops on the
    packed real tokens, with the dropout masks bertkern drew: per layer, in call order, the
    attention keep masks (tests.reference.attention_dropout_keep_ref) and the dropout1, FFN
    (after the activation) and dropout2 keep masks (tests.reference.dropout_keep_ref, indexed
    over the contiguous (T, E) / (T, FF) tensor). Returns (out in src's layout, src.grad, param
    grads) for the loss (out * w * real).sum()."""
    import math

    import torch
    import torch.nn.functional as F

    from tests.reference import attention_dropout_keep_ref, attention_varlen_ref, dropout_keep_ref

    module = copy.deepcopy(module).to(dtype)
    real = ~mask
    lengths = real.sum(1)
    cu = torch.zeros(real.shape[0] + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    max_seqlen = int(lengths.max())
    expected = [k for _ in module.layers for k in ("attention", "dropout", "dropout", "dropout")]
    if [k for k, _ in seeds] != expected:
        raise AssertionError(f"dropout seeds drawn {[k for k, _ in seeds]}, expected {expected}")
    it = iter(s for _, s in seeds)

    def drop(t):
        keep = dropout_keep_ref(next(it), t.numel(), dropout).reshape(t.shape)
        return t * keep.to(dtype) / (1.0 - dropout)

    xs = src.detach().to(dtype).clone().requires_grad_(True)
    x = (xs if batch_first else xs.transpose(0, 1))[real]            # (T, E), sequence after sequence
    total, e = x.shape
    for layer in module.layers:
        attn = layer.self_attn
        heads = attn.num_heads

        def sa(h):
            q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(total, 3, heads, e // heads).unbind(1)
            keep = attention_dropout_keep_ref(next(it), cu, heads, max_seqlen, dropout)
            o, _ = attention_varlen_ref(q, k, v, cu, 1.0 / math.sqrt(e // heads), False, keep, dropout, upcast=False)
            return drop(F.linear(o.reshape(total, e), attn.out_proj.weight, attn.out_proj.bias))

        def ff(h):
            h = drop(layer.activation(F.linear(h, layer.linear1.weight, layer.linear1.bias)))
            return drop(F.linear(h, layer.linear2.weight, layer.linear2.bias))

        if layer.norm_first:
            x = x + sa(layer.norm1(x))
            x = x + ff(layer.norm2(x))
        else:
            x = layer.norm1(x + sa(x))
            x = layer.norm2(x + ff(x))
    if module.norm is not None:
        x = module.norm(x)
    out = x.new_zeros(real.shape + (e,))
    out[real] = x
    out = out if batch_first else out.transpose(0, 1)
    real_l = (real if batch_first else real.t()).unsqueeze(-1)
    (out * w.to(dtype) * real_l).sum().backward()
    return out.detach(), xs.grad, {n: p.grad for n, p in module.named_parameters()}


# ---- one configuration ----------------------------------------------------------------------------

def run_config(path, batch_first, norm_first, final_norm, activation, dropout, dtype_name, seed):
    import torch
    from torch import nn

    import bertkern

    label = (f"batch_first={batch_first}, norm_first={norm_first}, final_norm={final_norm}, "
             f"activation={activation}, dropout={dropout}, dtype={dtype_name}")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, DIM_FF, dropout=dropout, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    ref32 = nn.TransformerEncoder(layer, NUM_LAYERS, norm=nn.LayerNorm(D_MODEL) if final_norm else None,
                                  enable_nested_tensor=False)
    with torch.no_grad():  # layers start as copies and LayerNorms as (1, 0): make every weight distinct
        for p in ref32.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref32.train()
    if dtype != torch.float32:
        ref32 = ref32.to(dtype)  # "torch fp32" of the bound becomes torch in this dtype; ref64 on its weights
    ref64 = copy.deepcopy(ref32).double()
    model = bertkern.Encoder.from_torch(ref32)
    if any(p.dtype != dtype for p in model.parameters()):
        raise AssertionError(f"{label}: the converted model is not {dtype}")
    assert isinstance(model, bertkern.Encoder)

    mask = key_padding_mask()
    real = ~mask                                        # (B, S)
    keep = real.any(dim=1)                              # sequences with a real token
    bdim = 0 if batch_first else 1                      # batch dim of src / out
    shape = (BATCH, SEQLEN, D_MODEL) if batch_first else (SEQLEN, BATCH, D_MODEL)
    g = torch.Generator().manual_seed(seed + 1)
    src = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(*shape, generator=g)
    real_l = (real if batch_first else real.t()).unsqueeze(-1)   # src layout, (.., .., 1)

    # bertkern on the GPU path, fp32
    path.reset()
    x = src.clone().requires_grad_(True)
    out = model(x, src_key_padding_mask=mask)
    if out.dtype != dtype:
        raise AssertionError(f"{label}: output is {out.dtype}")
    (out.float() * w * real_l).sum().backward()
    path.check_all_live(label)
    if (path.calls["attention_varlen(bf16 -> fp32)"] > 0) != (dtype == torch.bfloat16):
        raise AssertionError(f"{label}: bf16 upcasts {path.calls['attention_varlen(bf16 -> fp32)']}")
    calls = dict(path.calls)
    seeds = list(path.seeds.log)
    if bool(seeds) != (dropout > 0):
        raise AssertionError(f"{label}: dropout seeds drawn: {seeds}")

    # torch references on the sequences that have a real token (torch gives NaN for a fully
    # padded one; it contributes nothing to the loss, so the gradients are the same).
    def reference(module, dtype):
        idx = keep.nonzero().squeeze(1)
        xs = src.index_select(bdim, idx).to(dtype).clone().requires_grad_(True)
        ms = mask.index_select(0, idx)
        o = module(xs, src_key_padding_mask=ms)
        rl = real_l.index_select(bdim, idx)
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as bertkern's loss
        (o.to(loss_dtype) * w.index_select(bdim, idx).to(loss_dtype) * rl).sum().backward()
        return o.detach(), xs.grad, {n: p.grad for n, p in module.named_parameters()}, rl.squeeze(-1)

    idx = keep.nonzero().squeeze(1)
    if dropout == 0:
        out64, dx64, grads64, rl = reference(ref64, torch.float64)
        out32, dx32, grads32, _ = reference(ref32, dtype)
    else:
        # nn.TransformerEncoder cannot be given bertkern's masks: recompute it by plain ops
        # with them, in fp64 and (the "torch fp32" of the bound) in fp32.
        out64, dx64, grads64 = masked_reference(ref32, torch.float64, src, w, mask, batch_first, dropout, seeds)
        out32, dx32, grads32 = masked_reference(ref32, torch.float32, src, w, mask, batch_first, dropout, seeds)
        out64, dx64, out32, dx32 = (t.index_select(bdim, idx) for t in (out64, dx64, out32, dx32))
        rl = real_l.index_select(bdim, idx).squeeze(-1)
        # Dropout did drop: the output differs from the same model's without dropout.
        with torch.no_grad():
            out_eval = model.eval()(src, src_key_padding_mask=mask).index_select(bdim, idx)
        model.train()
        moved = (out.detach().index_select(bdim, idx) - out_eval).abs().max().item()
        if not moved > 0.1:
            raise AssertionError(f"{label}: dropout {dropout} moved the output by only {moved:.3g}")
    got_out = out.detach().index_select(bdim, idx)
    got_dx = x.grad.index_select(bdim, idx)
    grads = {n: p.grad for n, p in model.named_parameters()}
    if set(grads) != set(grads64):
        raise AssertionError(f"{label}: parameter names differ: {sorted(set(grads) ^ set(grads64))}")

    # padding: exactly zero outputs and input gradients; a fully padded sequence is all zeros
    pad_l = ~real_l.squeeze(-1)
    if not torch.equal(out.detach()[pad_l], torch.zeros_like(out.detach()[pad_l])):
        raise AssertionError(f"{label}: outputs at padded positions are not exactly zero")
    if not torch.equal(x.grad[pad_l], torch.zeros_like(x.grad[pad_l])):
        raise AssertionError(f"{label}: input gradients at padded positions are not exactly zero")
    if not torch.isfinite(out).all() or not torch.isfinite(x.grad).all():
        raise AssertionError(f"{label}: non-finite output or input gradient")
    for n, gr in grads.items():
        if gr is None or not torch.isfinite(gr).all():
            raise AssertionError(f"{label}: gradient of {n} is missing or non-finite")

    errors = {}

    def compare(name, got, r64, r32):
        got, r64, r32 = got.double(), r64.double(), r32.double()
        err = (got - r64).abs().max().item()
        err32 = (r32 - r64).abs().max().item()
        scale = max(1.0, r64.abs().max().item())
        slack = ATOL * scale
        if dtype != torch.float32:  # FlashAttention's slack in low precision: twice the rounding of the reference
            r = r64.to(dtype)
            slack = 2 * ((r + 0.3 - 0.3) - r).abs().max().item()
        bound = 2 * err32 + slack
        errors[name] = {"err": err, "torch_err": err32, "bound": bound}
        if not err <= bound:
            raise AssertionError(f"{label}: {name}: max |bertkern - fp64| = {err:.3g} > bound {bound:.3g} "
                                 f"(2 * torch {dtype_name} error {err32:.3g} + {slack:.3g})")

    m = rl.unsqueeze(-1)  # real tokens of the kept sequences, broadcast over features
    compare("out", got_out * m, out64 * m, out32 * m)
    compare("src.grad", got_dx * m, dx64 * m, dx32 * m)
    for n in sorted(grads):
        compare(f"{n}.grad", grads[n], grads64[n], grads32[n])

    worst = max(errors, key=lambda k: errors[k]["err"])
    worst_param = max((k for k in errors if k not in ("out", "src.grad")), key=lambda k: errors[k]["err"])
    return {
        "config": label,
        "dropout": dropout,
        "dtype": dtype_name,
        "seeds": {k: sum(1 for kind, _ in seeds if kind == k) for k in ("attention", "dropout")},
        "calls": calls,
        "max_err_out": errors["out"]["err"],
        "max_err_src_grad": errors["src.grad"]["err"],
        "max_err_param_grad": errors[worst_param]["err"],
        "worst": {"name": worst, **errors[worst]},
        "min_margin": min(e["bound"] - e["err"] for e in errors.values()),
        "n_compared": len(errors),
    }


def main():
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("encoder_gpu_path_worker: TRITON_INTERPRET=1 must be set before the process starts", file=sys.stderr)
        return 2
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    start = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        warnings.filterwarnings("ignore", message=".*nested.*")
        import bertkern  # noqa: F401

        path = GpuPath()
        runs = [run_config(path, *cfg, seed=100 + i) for i, cfg in enumerate(CONFIGS)]
    except Exception:  # noqa: BLE001  (report everything; the test prints it)
        traceback.print_exc()
        print("encoder_gpu_path_worker: FAILED", file=sys.stderr)
        return 1
    totals = {}
    for r in runs:
        for k, n in r["calls"].items():
            totals[k] = totals.get(k, 0) + n
    summary = {
        "ok": True,
        "config": {"d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": DIM_FF, "num_layers": NUM_LAYERS,
                   "batch": BATCH, "seqlen": SEQLEN, "atol": ATOL},
        "calls": totals,
        "max_err_out": max(r["max_err_out"] for r in runs),
        "max_err_src_grad": max(r["max_err_src_grad"] for r in runs),
        "max_err_param_grad": max(r["max_err_param_grad"] for r in runs),
        "min_margin": min(r["min_margin"] for r in runs),
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(SUMMARY_PREFIX + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
