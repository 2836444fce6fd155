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
# (batch_first, norm_first, final norm, activation)
CONFIGS = [
    (True, False, True, "relu"),
    (True, True, True, "gelu"),
    (False, False, False, "relu"),
    (False, True, True, "relu"),
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
        original = attention_module.attention_varlen
        self.calls["attention_varlen(backend=triton)"] = 0

        def attention_varlen_triton(*args, **kwargs):
            if kwargs.get("backend", "auto") != "auto":
                raise AssertionError(f"the Encoder asked for backend={kwargs['backend']!r}")
            kwargs["backend"] = "triton"
            self.calls["attention_varlen(backend=triton)"] += 1
            return original(*args, **kwargs)

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

    def check_all_live(self, label):
        missing = [k for k, n in self.calls.items() if not k.startswith("cpu.") and n == 0]
        if missing:
            raise AssertionError(f"{label}: never went through {missing}; calls = {self.calls}")
        fell_back = {k: n for k, n in self.calls.items() if k.startswith("cpu.") and n}
        if fell_back:
            raise AssertionError(f"{label}: C++ CPU attention kernels ran: {fell_back}")


# ---- one configuration ----------------------------------------------------------------------------

def run_config(path, batch_first, norm_first, final_norm, activation, seed):
    import torch
    from torch import nn

    import bertkern

    label = (f"batch_first={batch_first}, norm_first={norm_first}, final_norm={final_norm}, "
             f"activation={activation}")
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, DIM_FF, dropout=0.0, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    ref32 = nn.TransformerEncoder(layer, NUM_LAYERS, norm=nn.LayerNorm(D_MODEL) if final_norm else None,
                                  enable_nested_tensor=False)
    with torch.no_grad():  # layers start as copies and LayerNorms as (1, 0): make every weight distinct
        for p in ref32.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref32.train()
    ref64 = copy.deepcopy(ref32).double()
    model = bertkern.Encoder.from_torch(ref32)
    assert isinstance(model, bertkern.Encoder)

    mask = key_padding_mask()
    real = ~mask                                        # (B, S)
    keep = real.any(dim=1)                              # sequences with a real token
    bdim = 0 if batch_first else 1                      # batch dim of src / out
    shape = (BATCH, SEQLEN, D_MODEL) if batch_first else (SEQLEN, BATCH, D_MODEL)
    g = torch.Generator().manual_seed(seed + 1)
    src = torch.randn(*shape, generator=g)
    w = torch.randn(*shape, generator=g)
    real_l = (real if batch_first else real.t()).unsqueeze(-1)   # src layout, (.., .., 1)

    # bertkern on the GPU path, fp32
    path.reset()
    x = src.clone().requires_grad_(True)
    out = model(x, src_key_padding_mask=mask)
    (out * w * real_l).sum().backward()
    path.check_all_live(label)
    calls = dict(path.calls)

    # torch references on the sequences that have a real token (torch gives NaN for a fully
    # padded one; it contributes nothing to the loss, so the gradients are the same).
    def reference(module, dtype):
        idx = keep.nonzero().squeeze(1)
        xs = src.index_select(bdim, idx).to(dtype).requires_grad_(True)
        ms = mask.index_select(0, idx)
        o = module(xs, src_key_padding_mask=ms)
        rl = real_l.index_select(bdim, idx)
        (o * w.index_select(bdim, idx).to(dtype) * rl).sum().backward()
        return o.detach(), xs.grad, {n: p.grad for n, p in module.named_parameters()}, rl.squeeze(-1)

    out64, dx64, grads64, rl = reference(ref64, torch.float64)
    out32, dx32, grads32, _ = reference(ref32, torch.float32)

    idx = keep.nonzero().squeeze(1)
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
        bound = 2 * err32 + ATOL * scale
        errors[name] = {"err": err, "torch_fp32_err": err32, "bound": bound}
        if not err <= bound:
            raise AssertionError(f"{label}: {name}: max |bertkern - fp64| = {err:.3g} > bound {bound:.3g} "
                                 f"(2 * torch fp32 error {err32:.3g} + {ATOL:g} * {scale:.3g})")

    m = rl.unsqueeze(-1)  # real tokens of the kept sequences, broadcast over features
    compare("out", got_out * m, out64 * m, out32 * m)
    compare("src.grad", got_dx * m, dx64 * m, dx32 * m)
    for n in sorted(grads):
        compare(f"{n}.grad", grads[n], grads64[n], grads32[n])

    worst = max(errors, key=lambda k: errors[k]["err"])
    worst_param = max((k for k in errors if k not in ("out", "src.grad")), key=lambda k: errors[k]["err"])
    return {
        "config": label,
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
                   "batch": BATCH, "seqlen": SEQLEN, "dtype": "float32", "atol": ATOL},
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
