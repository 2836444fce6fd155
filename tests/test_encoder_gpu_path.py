"""The GPU path of bertkern.Encoder end to end on the CPU: forward + backward of a tiny Encoder
with the attention in the Triton kernels (Triton interpreter) and LayerNorm / mask_to_indices /
gather_rows / scatter_rows in the CUDA kernel source (host emulation), against
nn.TransformerEncoder in float64: fp32 without dropout, fp32 training with dropout (against the
encoder recomputed with the masks rebuilt from the seeds the run drew), and a bf16 model.

TRITON_INTERPRET=1 must be set before triton is imported, and this pytest process may have
imported it already, so the work is done by tests/encoder_gpu_path_worker.py in a fresh process;
see it for what is patched and how each override is shown to be live.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
SUMMARY_PREFIX = "ENCODER_GPU_PATH_SUMMARY "

EMULATED_OPS = ("layer_norm_fwd", "layer_norm_bwd", "mask_to_indices", "gather_rows", "scatter_rows")
TRITON_KERNELS = ("attention_fwd", "attention_delta_bwd", "attention_dkdv_bwd", "attention_dq_bwd")


@pytest.fixture(scope="module")
def emulation_built():
    """Build (or load from tests/emulation/_build) the emulation extension here, so the worker
    only loads it. Without a C++ toolchain it cannot be built: skip. A compile error in the
    kernel source is a failure, not a skip."""
    pytest.importorskip("triton")
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler!r}) to build the CUDA host emulation")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not available to build the CUDA host emulation")
    from tests.emulation.loader import load_emulated_ops

    load_emulated_ops()


@pytest.mark.triton_interpret
@pytest.mark.emulated
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_encoder_gpu_path_matches_fp64_reference(emulation_built):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tests.encoder_gpu_path_worker"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the worker ran past {TIMEOUT_S} s:\n{(e.stderr or '')[-4000:]}", pytrace=False)
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    if proc.returncode != 0:
        pytest.fail(f"worker exited with {proc.returncode}\n{log}", pytrace=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(SUMMARY_PREFIX)]
    assert len(lines) == 1, f"expected one summary line\n{log}"
    summary = json.loads(lines[0][len(SUMMARY_PREFIX):])

    assert summary["ok"] is True
    runs = summary["runs"]
    assert len(runs) >= 7
    assert {"batch_first=True" in r["config"] for r in runs} == {True, False}  # both layouts ran
    # training with dropout ran, in both layouts, and a bf16 model ran
    assert {"batch_first=True" in r["config"] for r in runs if r["dropout"] > 0} == {True, False}
    assert any(r["dtype"] == "bfloat16" for r in runs)
    num_layers = summary["config"]["num_layers"]
    for run in runs:
        calls = run["calls"]
        # every dropout seed drawn, one per dropout site per layer (each mask then checked against
        # the reference rebuilt from its seed), none without dropout
        if run["dropout"] > 0:
            assert run["seeds"] == {"attention": num_layers, "dropout": 3 * num_layers}, run
        else:
            assert run["seeds"] == {"attention": 0, "dropout": 0}, run
        # bf16: the Triton kernels were given fp32 copies (the interpreter's bf16 math is wrong)
        upcast = calls["attention_varlen(bf16 -> fp32)"]
        assert upcast == (calls["attention_varlen(backend=triton)"] if run["dtype"] == "bfloat16" else 0), run
        # every kernel went through its GPU implementation in every run ...
        for op in EMULATED_OPS:
            assert calls[f"emu.{op}"] > 0, (run["config"], op, calls)
        for kernel in TRITON_KERNELS:
            assert calls[f"triton.{kernel}"] > 0, (run["config"], kernel, calls)
        assert calls["attention_varlen(backend=triton)"] > 0, (run["config"], calls)
        # ... one Triton forward and one backward per layer, and never the C++ CPU attention
        assert calls["triton.attention_fwd"] == calls["attention_varlen(backend=triton)"]
        assert calls["triton.attention_dq_bwd"] == calls["triton.attention_fwd"]
        assert calls["cpu.attention_fwd"] == 0 and calls["cpu.attention_bwd"] == 0
        # within the bound (checked in the worker too), and close in absolute terms
        assert run["min_margin"] > 0, run
        limit = 1e-4 if run["dtype"] == "float32" else 0.25  # bf16: errors of 2e-2 to 8e-2 measured
        assert run["max_err_out"] < limit, run
        assert run["max_err_src_grad"] < limit, run
        assert run["max_err_param_grad"] < limit, run


@pytest.mark.skip(reason="the Triton interpreter's bf16 arithmetic is wrong: bertkern's Triton attention "
                         "alone on bf16 q, k, v (sequences of 7 and 6 tokens, 2 heads of 16) under "
                         "TRITON_INTERPRET=1 is off by 8e8 at most, where the C++ CPU kernel on the same "
                         "inputs is off by 3.8e-3 (torch's bf16 reference by 5.5e-3); the bf16 run of "
                         "test_encoder_gpu_path_matches_fp64_reference gives the Triton kernels fp32 "
                         "copies of q, k, v instead. Needs a GPU.")
def test_encoder_gpu_path_bf16_attention_in_the_triton_interpreter():
    raise AssertionError("unreachable: skipped")
