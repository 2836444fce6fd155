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
Compiles run in a process pool, each worker with a fresh Triton cache so that ptxas really runs.
"""
import contextlib
import io
import multiprocessing
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
HEAD_DIMS = (32, 64, 80, 96, 128)
WORKERS = 2
KERNEL_NAMES = ("attention_fwd", "attention_delta_bwd", "attention_dkdv_bwd", "attention_dq_bwd")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")

# Argument types by name (the kernels name their arguments consistently).
_DATA_PTRS = {"Q", "K", "V", "OUT", "DOUT", "DQ", "DK", "DV"}
_PTR_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS": "*i32", "SEED": "*i64"}
_FLOATS = {"sm_scale", "dropout_p", "dropout_scale"}


def _block_d(head_dim):
    return max(16, 1 << (head_dim - 1).bit_length())


def compile_specs(full=None):
    """(kernel, arch, dtype, head_dim, causal, dropout, tile) for everything to compile; tile is
    (BLOCK_M, BLOCK_N, num_warps, num_stages), or (BLOCK_T, num_warps, num_stages) for delta."""
    from bertkern.kernels import attention as kernels

    if full is None:
        full = os.environ.get("BERTKERN_AOT_FULL") == "1"
    tables = {
        "attention_fwd": kernels.FWD_TILES,
        "attention_dkdv_bwd": kernels.DKDV_TILES,
        "attention_dq_bwd": kernels.DQ_TILES,
    }
    specs = []
    for arch in ARCHS:
        for i, head_dim in enumerate(HEAD_DIMS):
            for dtype in (DTYPES if full else (DTYPES[i % 2],)):
                specs.append(("attention_delta_bwd", arch, dtype, head_dim, False, False,
                              (kernels.DELTA_BLOCK_T, 4, 1)))
        for name, table in tables.items():
            for cls, tiles in table.items():
                head_dims = [d for d in HEAD_DIMS if kernels.head_dim_class(_block_d(d)) == cls]
                for t, tile in enumerate(tiles):
                    if full:
                        specs += [(name, arch, dtype, d, causal, dropout, tile)
                                  for dtype in DTYPES for d in head_dims
                                  for causal in (False, True) for dropout in (False, True)]
                        continue
                    for i, d in enumerate(head_dims):
                        specs.append((name, arch, DTYPES[(i + t) % 2], d, False, True, tile))
                    specs.append((name, arch, DTYPES[(t + 1) % 2], head_dims[-1], True, True, tile))
                    if t == 0:
                        specs.append((name, arch, "fp16", head_dims[-1], False, False, tile))
                        specs.append((name, arch, "bf16", head_dims[-1], True, False, tile))
    return specs


def fp32_specs():
    """fp32 (3xTF32 dots): every fp32 tile at its class's largest head dim, dropout on. Checked
    to compile; their spills are reported, not asserted (fp32 is not a tuned path)."""
    from bertkern.kernels import attention as kernels

    tables = {
        "attention_fwd": kernels.FWD_TILES_FP32,
        "attention_dkdv_bwd": kernels.DKDV_TILES_FP32,
        "attention_dq_bwd": kernels.DQ_TILES_FP32,
    }
    specs = []
    for arch in ARCHS:
        specs.append(("attention_delta_bwd", arch, "fp32", 128, False, False, (kernels.DELTA_BLOCK_T, 4, 1)))
        for name, table in tables.items():
            for cls, tiles in table.items():
                head_dim = max(d for d in HEAD_DIMS if kernels.head_dim_class(_block_d(d)) == cls)
                specs += [(name, arch, "fp32", head_dim, False, True, tile) for tile in tiles]
    return specs


def _init_worker(cache_dir):
    # Compiling needs the real JIT functions, not the interpreter's, and a cold cache (a cache
    # hit skips ptxas, and with it the report).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_one(spec):
    """Compile one spec; return (registers, stack bytes, spill store bytes, spill load bytes)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bertkern.kernels import attention as kernels

    name, arch, dtype, head_dim, causal, dropout, tile = spec
    fn = getattr(kernels, name)
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # the JITFunction under @triton.autotune
    if name == "attention_delta_bwd":
        block_t, num_warps, num_stages = tile
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_T=block_t)
    else:
        block_m, block_n, num_warps, num_stages = tile
        # What the operator passes: 3xTF32 for fp32 (torch's default "highest" precision);
        # ignored for 16-bit inputs.
        precision = "tf32x3" if dtype == "fp32" else "tf32"
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=causal,
                          DROPOUT=dropout, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n)
    signature, divisible = {}, []
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        if arg in _DATA_PTRS:
            signature[arg] = f"*{dtype}"
        elif arg in _PTR_TYPES:
            signature[arg] = _PTR_TYPES[arg]
        elif arg in _FLOATS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
        # What the launcher specializes for typical shapes: 16-byte aligned pointers and row /
        # head strides that are multiples of 16 elements.
        if signature[arg].startswith("*") or arg.startswith("stride_"):
            divisible.append(index)
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        triton.compile(source, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return parse_ptxas_log(log.getvalue(), name)


def parse_ptxas_log(text, name):
    entry = _ENTRY.search(text)
    spills = _SPILLS.search(text)
    regs = _REGS.search(text)
    assert entry and spills and regs and entry.group(1) == name, f"unexpected ptxas log:\n{text}"
    stack, stores, loads = (int(g) for g in spills.groups())
    return int(regs.group(1)), stack, stores, loads


def compile_all(specs, workers=WORKERS):
    """{spec: (regs, stack, spill stores, spill loads) | error string}, compiled in parallel."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="bertkern-aot-") as cache_dir:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(cache_dir,)) as pool:
            futures = {spec: pool.submit(compile_one, spec) for spec in specs}
            for spec, future in futures.items():
                try:
                    results[spec] = future.result()
                except Exception as e:  # noqa: BLE001  (reported per spec)
                    results[spec] = f"{type(e).__name__}: {str(e)[-2000:]}"
    return results


def summarize(results):
    """Max registers / stack / spills per (kernel, arch), the numbers the design doc tracks."""
    table = {}
    for (name, arch, *_), report in results.items():
        if isinstance(report, str):
            continue
        row = table.setdefault((name, arch), [0, 0, 0, 0, 0])
        row[0] = max(row[0], report[0])
        for i in range(1, 4):
            row[i] = max(row[i], report[i])
        row[4] += 1
    return {k: dict(max_regs=v[0], max_stack=v[1], max_spill_stores=v[2], max_spill_loads=v[3],
                    compiled=v[4]) for k, v in sorted(table.items())}


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

    import bertkern.ops.attention_triton  # noqa: F401

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
        out, lse = torch.ops.bertkern.attention_triton_fwd(q, k, v, cu_seqlens, max_seqlen, 0.1, True,
                                                           0.1, seed)
        grads = torch.ops.bertkern.attention_triton_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
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
