"""Ahead-of-time compilation of the Triton attention kernels for sm_80 / sm_90, no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` runs Triton's whole
pipeline down to ptxas, which reports registers and spills (the log TRITON_DUMP_PTXAS_LOG
prints), and yields the cubin (``compiled.asm["cubin"]``) that :mod:`bertkern.bench.sass`
disassembles. Two users: tests/test_attention_aot.py (every autotune tile compiles with zero
spills) and ``python -m bertkern.bench gpu-model`` (the static cost model).

A spec is ``(kernel, arch, dtype, head_dim, causal, dropout, tile)``; tile is
``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, or ``(BLOCK_T, num_warps, num_stages)`` for the
delta kernel. Arguments are typed by name (the kernels name their arguments consistently), with
the specialization the launcher gets for typical shapes: 16-byte aligned pointers and strides
that are multiples of 16 elements.

Compiles run in a process pool (spawned, not forked: the parent may hold torch threads), each
worker with a fresh Triton cache so that ptxas really runs (a cache hit skips ptxas and its log).
"""
import contextlib
import io
import multiprocessing
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
HEAD_DIMS = (32, 64, 80, 96, 128)
WORKERS = 2
KERNEL_NAMES = ("attention_fwd", "attention_delta_bwd", "attention_dkdv_bwd", "attention_dq_bwd")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")

# Argument types by name.
_DATA_PTRS = {"Q", "K", "V", "OUT", "DOUT", "DQ", "DK", "DV"}
_PTR_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS": "*i32", "SEED": "*i64"}
_FLOATS = {"sm_scale", "dropout_p", "dropout_scale"}


def block_d(head_dim):
    """BLOCK_D the operator uses for a head dim: the next power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def tile_tables(fp32=False):
    """{kernel name: {head-dim class: [tile, ...]}} as bertkern.kernels.attention has them now."""
    from bertkern.kernels import attention as kernels

    if fp32:
        return {"attention_fwd": kernels.FWD_TILES_FP32, "attention_dkdv_bwd": kernels.DKDV_TILES_FP32,
                "attention_dq_bwd": kernels.DQ_TILES_FP32}
    return {"attention_fwd": kernels.FWD_TILES, "attention_dkdv_bwd": kernels.DKDV_TILES,
            "attention_dq_bwd": kernels.DQ_TILES}


def delta_tile():
    from bertkern.kernels import attention as kernels

    return (kernels.DELTA_BLOCK_T, 4, 1)


def compile_specs(full=None, archs=ARCHS):
    """(kernel, arch, dtype, head_dim, causal, dropout, tile) for the spill check.

    The default matrix covers, per kernel and arch: every (tile, head dim) with dropout on and
    causal off (fp16 and bf16 alternating over the head dims); every tile with causal and
    dropout on at its class's largest head dim; and, for one tile per class, both off and causal
    alone. ``full`` (default: BERTKERN_AOT_FULL=1) is the whole product.
    """
    from bertkern.kernels import attention as kernels

    if full is None:
        full = os.environ.get("BERTKERN_AOT_FULL") == "1"
    specs = []
    for arch in archs:
        for i, head_dim in enumerate(HEAD_DIMS):
            for dtype in (DTYPES if full else (DTYPES[i % 2],)):
                specs.append(("attention_delta_bwd", arch, dtype, head_dim, False, False, delta_tile()))
        for name, table in tile_tables().items():
            for cls, tiles in table.items():
                head_dims = [d for d in HEAD_DIMS if kernels.head_dim_class(block_d(d)) == cls]
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


def fp32_specs(archs=ARCHS):
    """fp32 (3xTF32 dots): every fp32 tile at its class's largest head dim, dropout on."""
    from bertkern.kernels import attention as kernels

    specs = []
    for arch in archs:
        specs.append(("attention_delta_bwd", arch, "fp32", 128, False, False, delta_tile()))
        for name, table in tile_tables(fp32=True).items():
            for cls, tiles in table.items():
                head_dim = max(d for d in HEAD_DIMS if kernels.head_dim_class(block_d(d)) == cls)
                specs += [(name, arch, "fp32", head_dim, False, True, tile) for tile in tiles]
    return specs


def init_worker(cache_dir):
    # Compiling needs the real JIT functions, not the interpreter's, and a cold cache (a cache
    # hit skips ptxas, and with it the report).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def jit_function(name):
    """The JITFunction of a kernel of bertkern.kernels.attention (under @triton.autotune)."""
    import triton

    from bertkern.kernels import attention as kernels

    fn = getattr(kernels, name)
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def compile_triton(fn, signature, constexprs, arch, num_warps, num_stages, divisible=(),
                   expected_name=None):
    """Compile one JIT function for sm_<arch>. Returns a dict: name, regs, stack, spill_stores,
    spill_loads, shared (bytes, static + dynamic), num_warps, cubin (bytes)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, stack, stores, loads = parse_ptxas_log(log.getvalue(), expected_name or fn.__name__)
    meta = compiled.metadata
    return dict(name=meta.name, regs=regs, stack=stack, spill_stores=stores, spill_loads=loads,
                shared=int(meta.shared), num_warps=int(meta.num_warps), cubin=compiled.asm["cubin"])


def compile_spec(spec):
    """Compile one attention spec; the dict of :func:`compile_triton`."""
    name, arch, dtype, head_dim, causal, dropout, tile = spec
    fn = jit_function(name)
    if name == "attention_delta_bwd":
        block_t, num_warps, num_stages = tile
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_T=block_t)
    else:
        block_m, block_n, num_warps, num_stages = tile
        # What the operator passes: 3xTF32 for fp32 (torch's default "highest" precision);
        # ignored for 16-bit inputs.
        precision = "tf32x3" if dtype == "fp32" else "tf32"
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), CAUSAL=causal,
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
        if signature[arg].startswith("*") or arg.startswith("stride_"):
            divisible.append(index)
    return compile_triton(fn, signature, constexprs, arch, num_warps, num_stages, divisible, name)


def compile_one(spec):
    """Compile one spec; return (registers, stack bytes, spill store bytes, spill load bytes)."""
    r = compile_spec(spec)
    return r["regs"], r["stack"], r["spill_stores"], r["spill_loads"]


def parse_ptxas_log(text, name):
    entry = _ENTRY.search(text)
    spills = _SPILLS.search(text)
    regs = _REGS.search(text)
    assert entry and spills and regs and entry.group(1) == name, f"unexpected ptxas log:\n{text}"
    stack, stores, loads = (int(g) for g in spills.groups())
    return int(regs.group(1)), stack, stores, loads


def run_pool(fn, items, workers=WORKERS):
    """{item: fn(item) | error string}, in a spawned process pool with a fresh Triton cache."""
    results = {}
    if not items:
        return results
    with tempfile.TemporaryDirectory(prefix="bertkern-aot-") as cache_dir:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                                 initargs=(cache_dir,)) as pool:
            futures = {item: pool.submit(fn, item) for item in items}
            for item, future in futures.items():
                try:
                    results[item] = future.result()
                except Exception as e:  # noqa: BLE001  (reported per item)
                    results[item] = f"{type(e).__name__}: {str(e)[-2000:]}"
    return results


def compile_all(specs, workers=WORKERS):
    """{spec: (regs, stack, spill stores, spill loads) | error string}, compiled in parallel."""
    return run_pool(compile_one, specs, workers)


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
