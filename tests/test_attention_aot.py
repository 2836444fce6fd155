"""Every Triton attention kernel compiles for sm_80 and sm_90 with zero spill stores, no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` runs Triton's whole
pipeline down to ptxas, which reports registers and spills (the log TRITON_DUMP_PTXAS_LOG
prints). Compiling catches what the interpreter lets through (a dot of mismatched dtypes, a
tile layout ptxas cannot fit, bf16 code paths), and the spill count is the register budget
check for every autotune config.

Each autotune tile is compiled for the head dims of its class (bertkern.kernels.attention's
*_TILES tables: BLOCK_D <= 64 gets head dims 32, 64; BLOCK_D = 128 gets 80, 96, 128), on both
archs. The default matrix (160 compiles, plus 20 for fp32; about 2-4 minutes on 2 cores)
covers, per kernel and arch: every (tile, head dim) with dropout on and causal off (BERT
training; fp16 and bf16 alternating over the head dims); every tile with causal and dropout on
(the most code) at its class's largest head dim; and, for one tile per class, both off and
causal alone.
BERTKERN_AOT_FULL=1 compiles the full product (tiles x head dims x {fp16, bf16} x
{causal} x {dropout}, 740 compiles, about 10-15 minutes on 2 cores).
Compiles run in a process pool, each worker with a fresh Triton cache so that ptxas really runs
(bertkern.kernels.aot).
"""
import os

import pytest

# The compile machinery lives in the package (bertkern.kernels.aot), shared with the static GPU
# cost model (python -m bertkern.bench gpu-model).
from bertkern.kernels.aot import (ARCHS, DTYPES, HEAD_DIMS, KERNEL_NAMES, WORKERS,  # noqa: F401
                                  compile_all, compile_one, compile_specs, fp32_specs,
                                  parse_ptxas_log, summarize)


@pytest.fixture(scope="module")
def ptxas_reports():
    pytest.importorskip("triton")
    return compile_all(compile_specs() + fp32_specs())


@pytest.mark.aot
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_attention_kernel_compiles_without_spills(kernel, arch, ptxas_reports):
    mine = {spec: r for spec, r in ptxas_reports.items()
            if spec[0] == kernel and spec[1] == arch and spec[2] != "fp32"}
    assert mine, f"no compile specs for {kernel} on sm_{arch}"
    failed = {spec[2:]: r for spec, r in mine.items() if isinstance(r, str)}
    assert not failed, f"{kernel} failed to compile for sm_{arch}: {failed}"
    spilling = {spec[2:]: r for spec, r in mine.items() if r[2] != 0}
    assert not spilling, (
        f"{kernel} spills on sm_{arch} for (dtype, head_dim, causal, dropout, tile): "
        f"(regs, stack, spill stores, spill loads) {spilling}")
    print(f"{kernel} sm_{arch}: {summarize(mine)[(kernel, arch)]}")


@pytest.mark.aot
@pytest.mark.timeout(1200)
def test_fp32_kernels_compile(ptxas_reports):
    mine = {spec: r for spec, r in ptxas_reports.items() if spec[2] == "fp32"}
    assert mine
    failed = {spec: r for spec, r in mine.items() if isinstance(r, str)}
    assert not failed, f"fp32 kernels failed to compile: {failed}"
    spilling = {spec: r for spec, r in mine.items() if r[2] != 0}
    print(f"fp32 (3xTF32) specs that spill (regs, stack, stores, loads): {spilling or 'none'}")


def trace_ops_for_torch_compile():
    """What torch.compile's AOTAutograd does to the operators, on fake CUDA tensors (no GPU):
    functionalize and trace both, with a data-dependent T and max_seqlen (as unpad produces
    them). Each wrap_triton launch must become a triton_kernel_wrapper_functional node."""
    import logging

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import bertkern  # noqa: F401  (the operator, its CUDA kernel and its torch.compile decomposition)

    # Without a driver Triton's mutation analysis falls back to "may mutate every input", and
    # says so at length; the fallback is correct, just conservative.
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env):
        total = shape_env.create_unbacked_symint()
        torch._check(total >= 0)
        q, k, v, dout = (torch.empty((total, 2, 80), device="cuda", dtype=torch.bfloat16) for _ in range(4))
        cu_seqlens = torch.empty(5, device="cuda", dtype=torch.int32)
        seed = torch.empty(1, device="cuda", dtype=torch.int64)
        max_seqlen_t = torch.empty(1, device="cuda", dtype=torch.int64)

    def step(q, k, v, cu_seqlens, seed, dout, max_seqlen_t):
        max_seqlen = max_seqlen_t.item()
        torch._check(max_seqlen >= 0)
        out, lse = torch.ops.bertkern.attention_fwd(q, k, v, cu_seqlens, max_seqlen, 0.1, True, 0.1, seed)
        grads = torch.ops.bertkern.attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                 0.1, True, 0.1, seed)
        return out, lse, *grads

    graph = make_fx(dispatch_functionalize(step), tracing_mode="fake")(
        q, k, v, cu_seqlens, seed, dout, max_seqlen_t)
    launches = [n for n in graph.graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]
    # forward, delta, dK/dV, dQ
    assert len(launches) == 4, graph.code
    return graph


@pytest.mark.aot
def test_operators_trace_for_torch_compile_without_gpu():
    # A fresh process: the interpreter must be off, whatever this one was started with.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.test_attention_aot", "--trace"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    # python -m tests.test_attention_aot [KERNEL ...]: print the full report (regs / spills per
    # spec; BERTKERN_AOT_FULL=1 for the full matrix). --trace: run trace_ops_for_torch_compile.
    import json
    import sys
    import time

    if sys.argv[1:] == ["--trace"]:
        print(trace_ops_for_torch_compile().code)
        sys.exit(0)
    start = time.time()
    specs = compile_specs()
    if len(sys.argv) > 1:  # optional filter on the kernel name
        specs = [s for s in specs if s[0] in sys.argv[1:]]
    reports = compile_all(specs)
    for spec, report in reports.items():
        print(spec, report)
    print(json.dumps({f"{k[0]} sm_{k[1]}": v for k, v in summarize(reports).items()}, indent=1))
    print(f"{len(specs)} compiles in {time.time() - start:.0f} s")
