"""A static GPU cost model of bertkern's kernels, anchored on torch's own FlashAttention-2.

``python -m bertkern.bench gpu-model [--arch 80,90] [--out DIR] [--quick] [--cuda-objects DIR]``
needs no GPU. It compiles every attention tile the launchers can pick (Triton, for sm_80 and
sm_90, through bertkern.kernels.aot) and bertkern's CUDA C++ kernels (nvcc -cubin of
csrc/cuda's headers), disassembles the cubins and the FlashAttention-2 kernels bundled in
torch's libtorch_cuda.so, and applies one throughput model to all of them. It writes
``report.md`` and ``gpu_model.json`` to --out (default benchmarks/results/gpu-model/).

**Everything here is a model, not a measurement.** What it is good for: comparing kernels under
the same assumptions (bertkern vs FA2, one tile vs another, dropout vs none), spotting the pipe
that binds, register spills, occupancy cliffs, duplicated matmul work. What it is not: a
prediction of wall time to better than a factor of ~1.5.

Attention kernels (compute-bound model)
---------------------------------------
* The main loop is the innermost loop (closed by a backward branch) with the most tensor-core
  FLOPs per iteration (ties: the fewest instructions, i.e. the unmasked copy of a loop the
  source has twice). One iteration handles one BLOCK_M x BLOCK_N tile of attention scores.
* Per iteration and CTA (num_warps warps each executing the loop body once), the clocks each
  pipe of one SM needs: tensor = MMA FLOPs (from the SASS MMA shapes) / tensor FLOP/clk/SM;
  mufu, fp32, int = thread-instructions / that pipe's lanes per clock; memory = bytes moved
  through the L1/shared-memory data path / 128 B/clk; issue = warp-instructions / 4 schedulers.
  Per score element: divided by BLOCK_M * BLOCK_N.
* Pipes overlap perfectly and nothing stalls on latency: an iteration costs the max over pipes.
  Two exceptions: (1) latency hiding: with fewer than LATENCY_WARPS (8, two per scheduler)
  resident warps on an SM, time is scaled by LATENCY_WARPS / warps; (2) on sm_90, HMMA
  (mma.sync, what FA2 and Triton's non-wgmma path issue) is charged at HMMA_SM90_FRACTION (2/3)
  of the wgmma (HGMMA) peak. This factor is an assumption of the model (no published figure is
  cited for it here). It cuts in favour of whichever kernel uses wgmma: on sm_90 bertkern's
  Triton kernels issue HGMMA where Triton picks wgmma, FA2 (in torch) only HMMA, so a higher
  true HMMA rate makes FA2 faster and the bertkern / FA2 ratios smaller. The report therefore
  repeats the H100 ratios with HMMA at the full peak (``hmma_sensitivity`` in the JSON), the
  bound most favourable to FA2 (within the model the truth lies between the two columns), and
  says how far they move: only as far as FA2's loops are tensor-bound; where its modeled loops
  are bound by the shared-memory data path or issue instead, the factor does not matter and the
  other pipe assumptions do.
* Prologue / epilogue (instructions outside every loop) are charged once per CTA at the issue
  rate. CTAs run in waves of SMs x CTAs-per-SM (occupancy from registers, shared memory,
  threads and the 32-CTA limit); the last, partial wave is charged with its own occupancy.
* Not modeled: HBM / L2 traffic of the attention kernels (K and V re-reads hit L2 at BERT
  sizes), instruction-cache misses, bank conflicts, barrier and dependency stalls, clock
  throttling. The small memory-bound kernels (delta = rowsum(dO * O), FA2's dot_do_o and
  convert_dq) are charged bytes / HBM bandwidth.
* Autotune: for each shape, the tile with the least modeled time is "what autotune picks";
  every tile is listed. FA2's tiles are what its launch templates select (FA2_PLAN below, which
  mirrors flash_fwd_launch_template.h / flash_bwd_launch_template.h for sm_80 / sm_90; checked
  against what libtorch_cuda.so contains).
* Useful FLOPs (the FA convention): forward 4 * S^2 * D per head, backward 2.5x that.

Memory-bound CUDA kernels (LayerNorm, pad / unpad)
--------------------------------------------------
An op (LayerNorm forward / backward, unpad's gather, pad) is the launches bertkern makes for it,
one after the other; a launch costs max(HBM bytes / bandwidth, Little's law bound, issue bound,
dependent chain), and the op is reported as the fraction of HBM bandwidth its *minimum* bytes
achieve (min bytes / time / BW):
* The main loop of a memory kernel (sass.memory_main) is the loop that holds its data loads:
  the global loads (LDG) of the launch's access width, each counted in its innermost enclosing
  loop, the loop with the most of them (the function body for a loop-free kernel). Not the
  function's innermost loop: in the LayerNorm register kernels that is the shared-memory fold of
  per-warp partial sums (row_sum), with no global load at all.
* Loads in flight per thread: the data LDGs issued back to back, from the main loop's first,
  before the first instruction that names a register one of them writes (R4 of LDG.E.128 is
  R4..R7) or the first branch: the memory-level parallelism of the first batch. Assumed: the
  loads of that batch are in flight together, later batches do not overlap it. So weight / bias
  loads issued after the reduction (L1 / L2 hits) do not count, nor do the LayerNorm forward's
  residual loads (behind the runtime ``if (residual)`` branch; the SASS unpacks x before it, so
  x and residual are not in flight together), nor narrower loads (mean / rstd, row indices).
* Little's law: bytes in flight = resident CTAs (occupancy, or the grid when smaller) x threads
  x loads in flight per thread (above, capped by 3x the packs each thread has) x the access
  width; sustained rate = bytes in flight / MEMORY_LATENCY_NS.
* Issue: warp-instructions per byte moved by the main loop's loads/stores, times the bytes the
  kernel touches (including L1 / L2 re-reads, e.g. weight and bias per row), over the issue
  rate of the SMs the grid occupies.
* Dependent chain: the work items (rows, row groups) the resident CTAs run one after another,
  each costing its dependent round trips of MEMORY_LATENCY_NS (what bounds small inputs).
* The ceiling is 100% of the spec bandwidth: real HBM tops out near 90% of it; kernel launch
  overhead (a few us per launch) is not included either.
* The launch plans mirror csrc/cuda/layer_norm_launch.cuh (layer_norm_fwd_plan /
  layer_norm_bwd_plan: the register path layer_norm_*_reg_kernel<T, VEC, ITERS> with the
  partial-row reduction, else the loop path) and padding_launch.cuh (row_copy_plan;
  scatter_rows_launch: fill_inverse, invert_indices, pad_rows_kernel). tests/test_gpu_model.py
  compiles the C++ plan functions with nvcc and checks the mirror against them on a grid of
  shapes, so a change to the C++ plans fails that test until the mirror follows.
* The SASS: compiled now from csrc/cuda's headers with ``nvcc -cubin`` for each arch (a
  generated translation unit that instantiates every kernel the launchers can pick with the
  extension's c10::Half / c10::BFloat16 (header-only, from torch's include folder; __half /
  __nv_bfloat16 when torch ships no headers) and setup.py's -O3 --use_fast_math; the kernel
  headers themselves need no torch), cached on the headers' content. Without nvcc, the
  built extension (bertkern/_C*.so) when it holds device code. Object files of another build
  only when given explicitly (``--cuda-objects DIR``). When none is available the memory-bound
  tables are skipped and the report and the JSON (``cuda_source``) say so; nothing falls back
  silently to stale objects.

For gpu-check (bertkern.bench.gpu_check), :func:`peaks_for_device_name` gives a named GPU's spec
peaks and :func:`prediction_for_benchmark` the model's figure for one CUDA benchmark case
(``attention_predictions`` / ``memory_predictions`` in the JSON, at the benchmarks' shapes).
"""
import functools
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from bertkern.bench import sass

# ------------------------------------------------------------------------------------------
# Hardware (per SM per clock; spec-sheet figures)
# ------------------------------------------------------------------------------------------
HW = {
    # H100 SXM5: 132 SMs, 989 dense fp16 TFLOP/s at 1.83 GHz = 4096 FLOP/clk/SM; 128 FP32
    # lanes, 16 SFU (MUFU) lanes, 64 INT32 lanes per SM; 3.35 TB/s HBM3.
    "H100": dict(arch=90, sms=132, clock_ghz=1.83, tensor=4096, mufu=16, fp32=128, int=64, issue=4,
                 lsu_bytes=128, hbm_tbs=3.35, regs=65536, smem=228 * 1024, threads=2048, ctas=32),
    # H200: the same SM and clocks, HBM3e at 4.8 TB/s.
    "H200": dict(arch=90, sms=132, clock_ghz=1.83, tensor=4096, mufu=16, fp32=128, int=64, issue=4,
                 lsu_bytes=128, hbm_tbs=4.8, regs=65536, smem=228 * 1024, threads=2048, ctas=32),
    # A100 SXM4 80GB: 108 SMs, 312 dense fp16 TFLOP/s at 1.41 GHz = 2048 FLOP/clk/SM; 64 FP32,
    # 16 SFU, 64 INT32 lanes per SM; 2.039 TB/s HBM2e (the 40GB part has 1.555).
    "A100": dict(arch=80, sms=108, clock_ghz=1.41, tensor=2048, mufu=16, fp32=64, int=64, issue=4,
                 lsu_bytes=128, hbm_tbs=2.039, regs=65536, smem=164 * 1024, threads=2048, ctas=32),
}
GPU_OF_ARCH = {90: "H100", 80: "A100"}
GPUS_OF_ARCH = {90: ("H100", "H200"), 80: ("A100",)}
LATENCY_WARPS = 8
HMMA_SM90_FRACTION = 2 / 3
MEMORY_LATENCY_NS = 700.0
SMEM_RESERVED_PER_CTA = 1024  # sm_80+ reserve 1 KB of shared memory per CTA

# BERT-base-shaped attention: B sequences of S tokens, H heads.
BERT = dict(B=32, H=12, S=512)
HEAD_DIMS = (64, 128)
DROPOUTS = (0.0, 0.1)
# The attention benchmark's cases (benchmarks/bench_attention_gpu.py SHAPES: B, H, S, D), which
# gpu-check sets next to the model's figures.
BENCH_ATTENTION_SHAPES = ((32, 12, 512, 64), (32, 6, 512, 128))
# Matmuls per main-loop iteration (read from the kernels): forward S = QK^T, O += PV; dK/dV
# S^T, dP^T, dV += P^T dO, dK += dS^T Q; dQ S, dP, dQ += dS K; FA2's one backward kernel
# S, dP, dV, dK, dQ.
MATMULS = {"attention_fwd": 2, "attention_dkdv_bwd": 4, "attention_dq_bwd": 3, "fa2_fwd": 2, "fa2_bwd": 5}

CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bertkern",
                         "gpu_model")
DEFAULT_OUT = os.path.join("benchmarks", "results", "gpu-model")


# ------------------------------------------------------------------------------------------
# Occupancy
# ------------------------------------------------------------------------------------------
def occupancy(regs, smem, threads, hw):
    """CTAs per SM (and what limits it) for a kernel of regs/thread, smem bytes/CTA, threads/CTA."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (hw["regs"] // regs_per_warp) // warps
    by_smem = hw["smem"] // (smem + SMEM_RESERVED_PER_CTA) if smem else hw["ctas"]
    by_threads = hw["threads"] // (warps * 32)
    limits = dict(regs=by_regs, smem=by_smem, threads=by_threads, ctas=hw["ctas"])
    ctas = min(limits.values())
    return ctas, min(limits, key=limits.get)


# ------------------------------------------------------------------------------------------
# The pipe model of one main loop
# ------------------------------------------------------------------------------------------
def loop_clocks(main, num_warps, hw, hmma_fraction=None):
    """Clocks one SM's pipes need for one iteration of a CTA's main loop. hmma_fraction: the
    sm_90 HMMA (mma.sync) rate as a fraction of the wgmma peak (default HMMA_SM90_FRACTION)."""
    p = main.per_pipe
    tensor_rate = hw["tensor"]
    if hw["arch"] >= 90 and main.mma_count:
        uses_hgmma = any(k in ("HGMMA", "IGMMA", "QGMMA") for k in main.opcodes)
        if not uses_hgmma:
            tensor_rate *= HMMA_SM90_FRACTION if hmma_fraction is None else hmma_fraction
    return {
        "tensor": main.mma_flops * num_warps / tensor_rate,
        "mufu": p["mufu"] * num_warps * 32 / hw["mufu"],
        "fp32": p["fp32"] * num_warps * 32 / hw["fp32"],
        "int": p["int"] * num_warps * 32 / hw["int"],
        "memory": main.lsu_bytes * num_warps / hw["lsu_bytes"],
        "issue": main.instructions * num_warps / hw["issue"],
    }


def latency_factor(warps_on_sm):
    return max(1.0, LATENCY_WARPS / max(warps_on_sm, 1))


@dataclass
class AttnKernel:
    """One compiled attention kernel config and its loop analysis."""
    key: dict  # kernel, arch, dtype, head_dim, dropout, tile...
    kind: str  # attention_fwd, attention_dkdv_bwd, attention_dq_bwd, fa2_fwd, fa2_bwd
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    regs: int
    spill_stores: int
    smem: int
    report: object  # sass.LoopReport

    def row(self, hw):
        ctas, limit = occupancy(self.regs, self.smem, self.num_warps * 32, hw)
        main = self.report.main
        elements = self.block_m * self.block_n
        clocks = loop_clocks(main, self.num_warps, hw)
        per_elem = {k: v / elements for k, v in clocks.items()}
        bound = max(per_elem, key=per_elem.get)
        min_flops = MATMULS[self.kind] * 2 * self.block_m * self.block_n * self.block_d
        return dict(
            **self.key, kind=self.kind, tile=[self.block_m, self.block_n, self.num_warps],
            regs=self.regs, spill_stores=self.spill_stores, smem=self.smem, ctas_per_sm=ctas,
            occupancy_limit=limit, warps_per_sm=ctas * self.num_warps,
            loop_instructions=main.instructions, loop_mix=main.per_pipe, loop_mma=main.mma_count,
            mma_loops=sum(1 for _, m in self.report.loops if m.mma_flops),
            mma_ops=sorted(k for k in main.opcodes if k in sass.TENSOR),
            outside_instructions=self.report.outside.instructions,
            clk_per_elem=per_elem, bound=bound,
            mma_flops_per_iter=main.mma_flops * self.num_warps, min_flops_per_iter=min_flops,
            duplication=main.mma_flops * self.num_warps / min_flops if min_flops else None,
        )

    def time_s(self, hw, shape, hmma_fraction=None):
        """Modeled seconds for one launch on shape (B, H, S): grid, waves, latency penalty."""
        B, H, S = shape["B"], shape["H"], shape["S"]
        row_block = self.block_n if self.kind in ("attention_dkdv_bwd", "fa2_bwd") else self.block_m
        loop_block = self.block_m if self.kind in ("attention_dkdv_bwd", "fa2_bwd") else self.block_n
        iters = -(-S // loop_block)
        ctas_total = -(-S // row_block) * H * B
        ctas_sm, _ = occupancy(self.regs, self.smem, self.num_warps * 32, hw)
        ctas_sm = max(ctas_sm, 1)
        clocks = loop_clocks(self.report.main, self.num_warps, hw, hmma_fraction)
        per_iter = max(clocks.values())
        overhead = self.report.outside.instructions * self.num_warps / hw["issue"]
        per_cta = iters * per_iter + overhead
        resident = hw["sms"] * ctas_sm
        full_waves, rem = divmod(ctas_total, resident)
        clk = full_waves * ctas_sm * per_cta * latency_factor(ctas_sm * self.num_warps)
        if rem:
            n = -(-rem // hw["sms"])
            clk += n * per_cta * latency_factor(n * self.num_warps)
        return clk / (hw["clock_ghz"] * 1e9)


# ------------------------------------------------------------------------------------------
# bertkern's Triton kernels: compile (cached), disassemble, analyse
# ------------------------------------------------------------------------------------------
def _source_digest():
    import triton

    from bertkern.kernels import attention

    with open(attention.__file__, "rb") as f:
        h = hashlib.sha1(f.read())
    h.update(triton.__version__.encode())
    return h.hexdigest()[:16]


def _compile_and_disassemble(spec):
    """Worker: compile one spec, return its metadata and SASS listing."""
    from bertkern.kernels import aot

    r = aot.compile_spec(spec)
    r["sass"] = sass.disassemble_cubin(r.pop("cubin"))
    return r


def _cache_path(kind, key):
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:24]
    return os.path.join(CACHE_DIR, kind, digest + ".json.gz")


def _cache_get(kind, key):
    path = _cache_path(kind, key)
    try:
        with gzip.open(path, "rt") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_put(kind, key, value):
    path = _cache_path(kind, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with gzip.open(tmp, "wt") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def triton_specs(archs, dtypes, head_dims=HEAD_DIMS, dropouts=(False, True)):
    """Every tile the launchers can pick for these head dims (non-causal), plus delta."""
    from bertkern.kernels import aot
    from bertkern.kernels import attention as kernels

    specs = []
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                specs.append(("attention_delta_bwd", arch, dtype, d, False, False, aot.delta_tile()))
                cls = kernels.head_dim_class(aot.block_d(d))
                for name, table in aot.tile_tables().items():
                    for tile in table[cls]:
                        for dropout in dropouts:
                            specs.append((name, arch, dtype, d, False, dropout, tile))
    return specs


def compile_triton_kernels(specs, workers=2, log=print):
    """{spec: dict(regs, spill_stores, shared, num_warps, sass) | error string}, cached."""
    from bertkern.kernels import aot

    digest = _source_digest()
    results, todo = {}, []
    for spec in specs:
        hit = _cache_get("triton", (digest, spec))
        if hit is not None:
            results[spec] = hit
        else:
            todo.append(spec)
    if todo:
        log(f"compiling {len(todo)} Triton kernel configs ({len(specs) - len(todo)} cached) ...")
        start = time.time()
        fresh = aot.run_pool(_compile_and_disassemble, todo, workers)
        for spec, r in fresh.items():
            if not isinstance(r, str):
                _cache_put("triton", (digest, spec), r)
            results[spec] = r
        log(f"  {len(todo)} compiles in {time.time() - start:.0f} s")
    return results


def triton_kernel(spec, r):
    name, arch, dtype, head_dim, _causal, dropout, tile = spec
    fn = next(f for f in sass.parse_sass(r["sass"]) if f.name == name)
    from bertkern.kernels import aot

    if name == "attention_delta_bwd":
        bm, bn = tile[0], 1
    else:
        bm, bn = tile[0], tile[1]
    key = dict(impl="bertkern", kernel=name, arch=arch, dtype=dtype, head_dim=head_dim, dropout=dropout)
    return AttnKernel(key, name, bm, bn, aot.block_d(head_dim), r["num_warps"], r["regs"],
                      r["spill_stores"], r["shared"], sass.analyse(fn))


# ------------------------------------------------------------------------------------------
# FlashAttention-2 in libtorch_cuda.so
# ------------------------------------------------------------------------------------------
# What FA2's launch templates pick on sm_80 / sm_90 (not sm_86/89), non-causal:
#   forward  Flash_fwd_kernel_traits<D, kBlockM, kBlockN, kNWarps, Is_Q_in_regs, Share_Q_K_smem>
#   backward Flash_bwd_kernel_traits<D, kBlockM, kBlockN, kNWarps, AtomLayoutMSdP, AtomLayoutNdKV,
#            AtomLayoutMdQ, Is_V_in_regs, No_double_buffer> (the >= 144 KB shared memory branch)
FA2_PLAN = {
    (64, False): dict(fwd=(64, 128, 128, 4, 0, 0), bwd=(64, 128, 128, 8, 4, 4, 4, 0, 0)),
    (64, True): dict(fwd=(64, 128, 64, 4, 0, 0), bwd=(64, 128, 128, 8, 4, 4, 4, 0, 0)),
    (128, False): dict(fwd=(128, 128, 64, 4, 0, 0), bwd=(128, 64, 128, 8, 2, 4, 2, 0, 0)),
    (128, True): dict(fwd=(128, 128, 32, 4, 0, 0), bwd=(128, 64, 128, 8, 2, 4, 2, 0, 0)),
}
_FA2_ELEM = {"fp16": "half_t", "bf16": "bfloat16_t"}


def libtorch_cuda():
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so")
    return path if os.path.exists(path) else None


def _lib_key(path):
    st = os.stat(path)
    return (os.path.basename(path), st.st_size, int(st.st_mtime))


@functools.cache
def fa2_index(arch):
    """{(kind, traits tuple, elem, bools tuple): (mangled, res usage)} of the FA2 kernels in
    libtorch_cuda.so for sm_<arch>; {} when there are none (cached on disk)."""
    path = libtorch_cuda()
    if path is None:
        return {}
    key = ("fa2-index", _lib_key(path), arch)
    hit = _cache_get("fa2", key)
    if hit is None:
        usage = sass.resource_usage(path, f"sm_{arch}")
        names = [n for n in usage if n.startswith("_ZN13pytorch_flash")]
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                                   text=True, check=False).stdout.splitlines() if names else []
        hit = [[n, d, usage[n]] for n, d in zip(names, demangled)]
        _cache_put("fa2", key, hit)
    index = {}
    for mangled, dem, usage in hit:
        m = re.search(r"pytorch_flash::(flash_fwd_kernel|flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel)"
                      r"<Flash_(?:fwd|bwd)_kernel_traits<([^<>]*?), cutlass::(\w+), Flash_kernel_traits<[^<>]*> >"
                      r"((?:, (?:true|false))*)>", dem)
        if not m:
            continue
        kind = "fa2_fwd" if m.group(1) == "flash_fwd_kernel" else "fa2_bwd"
        traits = tuple(int(t == "true") if t in ("true", "false") else int(t)
                       for t in (x.strip() for x in m.group(2).split(",")))
        bools = tuple(int(b.strip() == "true") for b in m.group(4).split(",") if b.strip())
        index[(kind, traits, m.group(3), bools)] = (mangled, usage)
    return index


def fa2_smem(kind, traits):
    """Dynamic shared memory of an FA2 kernel, as its kernel_traits.h computes it (16-bit)."""
    if kind == "fa2_fwd":
        d, bm, bn, _, _, share_qk = traits
        q, kv = bm * d * 2, 2 * bn * d * 2
        return max(q, kv) if share_qk else q + kv
    d, bm, bn, _, _, _, _, v_in_regs, no_double = traits
    qdo = bm * d * 2 * (2 if no_double else 3)
    kv = bn * d * 2 * 2
    ds = p = bm * bn * 2
    dq = bm * d * 2
    if v_in_regs:
        return qdo + max(kv, kv // 2 + ds + max(p, dq))
    return qdo + kv + ds + max(p, dq)


def fa2_kernel(kind, arch, dtype, head_dim, dropout):
    """The FA2 kernel FA2's launcher picks (even seqlens and head dim, no causal / local /
    alibi / softcap), as an AttnKernel; None when libtorch_cuda.so has no such cubin."""
    index = fa2_index(arch)
    traits = FA2_PLAN[(head_dim, dropout)]["fwd" if kind == "fa2_fwd" else "bwd"]
    # fwd: Is_dropout, Is_causal, Is_local, Has_alibi, Is_even_MN, Is_even_K, Is_softcap, Return_softmax
    # bwd: Is_dropout, Is_causal, Is_local, Has_alibi, Is_even_MN, Is_even_K, Is_softcap
    bools = (int(dropout), 0, 0, 0, 1, 1, 0, 0) if kind == "fa2_fwd" else (int(dropout), 0, 0, 0, 1, 1, 0)
    hit = index.get((kind, traits, _FA2_ELEM[dtype], bools))
    if hit is None:
        return None
    mangled, usage = hit
    path = libtorch_cuda()
    key = ("fa2-sass", _lib_key(path), arch, mangled)
    text = _cache_get("fa2", key)
    if text is None:
        text = sass.disassemble_binary(path, f"sm_{arch}", mangled)
        _cache_put("fa2", key, text)
    fn = next(f for f in sass.parse_sass(text) if f.name == mangled)
    bm, bn, warps = traits[1], traits[2], traits[3]
    key = dict(impl="fa2", kernel=kind, arch=arch, dtype=dtype, head_dim=head_dim, dropout=dropout,
               traits=list(traits))
    return AttnKernel(key, kind, bm, bn, head_dim, warps, usage["REG"], usage.get("LOCAL", 0),
                      fa2_smem(kind, traits) + usage.get("SHARED", 0), sass.analyse(fn))


# ------------------------------------------------------------------------------------------
# Shape-level model: fwd, fwd+bwd
# ------------------------------------------------------------------------------------------
def _mem_time(nbytes, hw):
    return nbytes / (hw["hbm_tbs"] * 1e12)


def attention_summary(kernels, fa2, gpu, head_dim, dtype, dropout, shape=BERT, hmma_fraction=None):
    """Modeled fwd and fwd+bwd time / TFLOP/s for bertkern (best tile per kernel) and FA2."""
    hw = HW[gpu]
    arch = hw["arch"]
    B, H, S = shape["B"], shape["H"], shape["S"]
    T = B * S
    fwd_flops = 4 * S * S * head_dim * B * H
    out = dict(gpu=gpu, arch=arch, head_dim=head_dim, dtype=dtype, dropout=dropout, shape=dict(shape))

    picks = {}
    for name in ("attention_fwd", "attention_dkdv_bwd", "attention_dq_bwd"):
        cands = [k for k in kernels if k.key["kernel"] == name and k.key["arch"] == arch
                 and k.key["head_dim"] == head_dim and k.key["dtype"] == dtype
                 and k.key["dropout"] == (dropout > 0)]
        if not cands:
            return None
        timed = sorted(((k.time_s(hw, shape, hmma_fraction), k) for k in cands), key=lambda tk: tk[0])
        picks[name] = dict(time_s=timed[0][0], tile=[timed[0][1].block_m, timed[0][1].block_n,
                                                     timed[0][1].num_warps],
                           all={str([k.block_m, k.block_n, k.num_warps]): t for t, k in timed})
    delta_bytes = T * H * head_dim * 2 * 2 + T * H * 4
    t_delta = _mem_time(delta_bytes, hw)
    bk_fwd = picks["attention_fwd"]["time_s"]
    bk_bwd = t_delta + picks["attention_dkdv_bwd"]["time_s"] + picks["attention_dq_bwd"]["time_s"]
    out["bertkern"] = dict(fwd_s=bk_fwd, bwd_s=bk_bwd, delta_s=t_delta, picks=picks,
                           fwd_tflops=fwd_flops / bk_fwd / 1e12,
                           fwdbwd_tflops=3.5 * fwd_flops / (bk_fwd + bk_bwd) / 1e12)
    f_fwd, f_bwd = fa2.get(("fa2_fwd", arch, dtype, head_dim, dropout > 0)), \
        fa2.get(("fa2_bwd", arch, dtype, head_dim, dropout > 0))
    if f_fwd is not None and f_bwd is not None:
        # dot_do_o (reads O, dO; writes dsoftmax_sum; zeroes the fp32 dq accumulator) and
        # convert_dq (reads the fp32 accumulator, writes dQ): memory bound.
        t_dot = _mem_time(T * H * head_dim * 2 * 2 + T * H * 4 + T * H * head_dim * 4, hw)
        t_conv = _mem_time(T * H * head_dim * (4 + 2), hw)
        fa_fwd = f_fwd.time_s(hw, shape, hmma_fraction)
        fa_bwd = t_dot + f_bwd.time_s(hw, shape, hmma_fraction) + t_conv
        out["fa2"] = dict(fwd_s=fa_fwd, bwd_s=fa_bwd, fwd_tile=[f_fwd.block_m, f_fwd.block_n, f_fwd.num_warps],
                          bwd_tile=[f_bwd.block_m, f_bwd.block_n, f_bwd.num_warps],
                          fwd_tflops=fwd_flops / fa_fwd / 1e12,
                          fwdbwd_tflops=3.5 * fwd_flops / (fa_fwd + fa_bwd) / 1e12)
        out["ratio_fwd"] = out["bertkern"]["fwd_tflops"] / out["fa2"]["fwd_tflops"]
        out["ratio_fwdbwd"] = out["bertkern"]["fwdbwd_tflops"] / out["fa2"]["fwdbwd_tflops"]
    return out


def _attn_figures(s, impl):
    d = s.get(impl)
    return None if d is None else dict(fwd_tflops=d["fwd_tflops"], fwdbwd_tflops=d["fwdbwd_tflops"])


def attention_predictions(kernels, fa2, archs, dtypes):
    """Modeled TFLOP/s at the attention benchmark's shapes (BENCH_ATTENTION_SHAPES), for every
    GPU of the archs, both dropouts; on sm_90 also under HMMA at the full tensor peak."""
    out = []
    for arch in archs:
        for gpu in GPUS_OF_ARCH[arch]:
            for dtype in dtypes:
                for B, H, S, D in BENCH_ATTENTION_SHAPES:
                    for p in DROPOUTS:
                        shape = dict(B=B, H=H, S=S)
                        s = attention_summary(kernels, fa2, gpu, D, dtype, p, shape)
                        if s is None:
                            continue
                        row = dict(gpu=gpu, dtype=dtype, shape=[B, H, S, D], dropout=p,
                                   bertkern=_attn_figures(s, "bertkern"), fa2=_attn_figures(s, "fa2"))
                        if arch >= 90:
                            s1 = attention_summary(kernels, fa2, gpu, D, dtype, p, shape, hmma_fraction=1.0)
                            row["hmma_full"] = dict(bertkern=_attn_figures(s1, "bertkern"),
                                                    fa2=_attn_figures(s1, "fa2"))
                        out.append(row)
    return out


def hmma_sensitivity(data):
    """The sm_90 summary rows again with HMMA (mma.sync) at the full wgmma peak instead of
    HMMA_SM90_FRACTION: how much the bertkern / FA2 ratios hinge on that assumption."""
    out = []
    for arch in data["archs"]:
        if arch < 90:
            continue
        gpu = GPU_OF_ARCH[arch]
        for dtype in data["dtypes"]:
            for d in HEAD_DIMS:
                for p in DROPOUTS:
                    base = attention_summary(data["kernels"], data["fa2"], gpu, d, dtype, p)
                    full = attention_summary(data["kernels"], data["fa2"], gpu, d, dtype, p, hmma_fraction=1.0)
                    if base is None or full is None or "fa2" not in base:
                        continue
                    out.append(dict(gpu=gpu, dtype=dtype, head_dim=d, dropout=p,
                                    ratio_fwd=base["ratio_fwd"], ratio_fwdbwd=base["ratio_fwdbwd"],
                                    ratio_fwd_full=full["ratio_fwd"], ratio_fwdbwd_full=full["ratio_fwdbwd"],
                                    bertkern_fwdbwd_tflops=base["bertkern"]["fwdbwd_tflops"],
                                    bertkern_fwdbwd_tflops_full=full["bertkern"]["fwdbwd_tflops"],
                                    fa2_fwdbwd_tflops=base["fa2"]["fwdbwd_tflops"],
                                    fa2_fwdbwd_tflops_full=full["fa2"]["fwdbwd_tflops"]))
    return out


# ------------------------------------------------------------------------------------------
# Memory-bound CUDA kernels: csrc/cuda's launch plans (mirrored), their cubins, the model
# ------------------------------------------------------------------------------------------
# Constants of csrc/cuda/layer_norm_launch.cuh, layer_norm.cuh and padding_launch.cuh. The plan
# functions below mirror the C++ ones of the same names; tests/test_gpu_model.py compiles the C++
# plans with nvcc and checks the two agree on a grid of shapes.
LN_REG_ITERS = {1: (1, 2, 4, 8, 16), 4: (1, 2, 3, 4, 6, 8), 8: (1, 2, 3, 4)}  # RegIters<VEC>
LN_FWD_MAX_ELEMS, LN_BWD_MAX_ELEMS, LN_BWD_MAX_SCALAR_ELEMS = 32, 16, 8
LN_MULTI_ROW_MAX_N, LN_MAX_MULTI_ROW_THREADS = 1024, 64
LN_FWD_BLOCK_THREADS, LN_BWD_BLOCK_THREADS, LN_MAX_ROW_THREADS = 128, 256, 512
LN_MAX_ROW_BLOCKS, LN_BWD_SMS, LN_BWD_THREADS_PER_SM = 65536, 132, 3 * LN_BWD_BLOCK_THREADS
LN_COL_TILE, LN_ROW_THREADS, LN_FINAL_THREADS = 32, 8, 256
LN_REDUCE_ROW_THREADS = 32  # kReduceRowThreads: the partial-row reduction's block is 32 x 32
LN_BWD_MAX_PARTIALS, LN_BWD_MIN_PARTIALS, LN_BWD_MIN_ROWS_PER_BLOCK = 256, 128, 8
ROW_COPY_THREADS, MAX_PADDING_BLOCKS, INDEX_THREADS = 256, 65536, 256
_ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}


def _cdiv(a, b):
    return -(-a // b)


def layer_norm_vec(n, elem, aligned=True):
    vec = 16 // elem
    return vec if aligned and n % vec == 0 else 1


def _reg_iters_at_least(vec, need, max_elems):
    need = max(need, 1)
    return next((i for i in LN_REG_ITERS.get(vec, ()) if i >= need and i * vec <= max_elems), 0)


def _reg_iters_max(vec, max_elems):
    return max((i for i in LN_REG_ITERS.get(vec, ()) if i * vec <= max_elems), default=0)


def layer_norm_threads(n_packs):
    return min(512, max(32, _cdiv((n_packs + 1) // 2, 32) * 32))


def layer_norm_dwdb_plan(m, n):
    col_tiles = _cdiv(n, LN_COL_TILE)
    chunks = 1024 // max(col_tiles, 1)
    chunks = min(65535, max(1, min(chunks, _cdiv(m, 4 * LN_ROW_THREADS))))
    rows = _cdiv(_cdiv(m, chunks), LN_ROW_THREADS) * LN_ROW_THREADS
    rows_per_chunk = rows if rows > 0 else LN_ROW_THREADS
    n_chunks = _cdiv(m, rows_per_chunk) if m > 0 else 1
    return dict(col_tiles=col_tiles, n_chunks=n_chunks, rows_per_chunk=rows_per_chunk)


def layer_norm_row_plan(m, n, vec, max_elems, block_threads, max_blocks=LN_MAX_ROW_BLOCKS):
    packs = n // vec
    plan = dict(registers=False, vec=vec, iters=0, threads_x=32, rows_y=1)
    row_groups, several = m, False
    if n <= LN_MULTI_ROW_MAX_N:
        tx = 32
        while tx <= LN_MAX_MULTI_ROW_THREADS and not several:
            iters = _reg_iters_at_least(vec, _cdiv(packs, tx), max_elems)
            if iters > 0:
                several = True
                plan.update(registers=True, iters=iters, threads_x=tx, rows_y=block_threads // tx)
                row_groups = _cdiv(m, plan["rows_y"])
            tx *= 2
    if not several:
        iters = _reg_iters_at_least(vec, _cdiv(packs, 4 * 32), max_elems) or _reg_iters_max(vec, max_elems)
        threads = _cdiv(_cdiv(packs, iters), 32) * 32 if iters else 0
        if iters > 0 and threads <= LN_MAX_ROW_THREADS:
            plan.update(registers=True, iters=iters, threads_x=threads)
        else:
            plan["threads_x"] = layer_norm_threads(packs)
        plan["rows_y"] = 1
    plan["blocks"] = max(1, min(row_groups, max(max_blocks, 1)))
    return plan


def layer_norm_fwd_plan(m, n, elem, aligned=True):
    vec = layer_norm_vec(n, elem, aligned)
    return layer_norm_row_plan(m, n, vec, 16 if vec == 1 else LN_FWD_MAX_ELEMS, LN_FWD_BLOCK_THREADS)


def layer_norm_bwd_plan(m, n, elem, aligned=True, dwdb=True):
    vec = layer_norm_vec(n, elem, aligned)
    plan = layer_norm_row_plan(m, n, vec, LN_BWD_MAX_SCALAR_ELEMS if vec == 1 else LN_BWD_MAX_ELEMS,
                               LN_BWD_BLOCK_THREADS)
    plan.update(dwdb=dwdb, n_partials=0, loop_dwdb=None)
    if plan["registers"]:
        cap = LN_BWD_SMS * max(1, LN_BWD_THREADS_PER_SM // (plan["threads_x"] * plan["rows_y"]))
        partials = min(LN_BWD_MAX_PARTIALS, max(LN_BWD_MIN_PARTIALS, _cdiv(m, LN_BWD_MIN_ROWS_PER_BLOCK)))
        plan["blocks"] = min(plan["blocks"], cap, partials)
        plan["n_partials"] = plan["blocks"]
    else:
        plan["loop_dwdb"] = layer_norm_dwdb_plan(m, n)
    return plan


def row_copy_plan(n_rows, n_packs):
    tx = min(ROW_COPY_THREADS, max(32, _cdiv(n_packs, 32) * 32))
    rows_y = ROW_COPY_THREADS // tx
    return dict(threads_x=tx, rows_y=rows_y, blocks=max(1, min(_cdiv(n_rows, rows_y), MAX_PADDING_BLOCKS)))


def _launch(key, grid, threads, ppt, vec_bytes, hbm, touched, items, rounds):
    """One kernel launch as the memory model sees it: grid x threads, packs per thread (a cap on
    the loads in flight), bytes from / to HBM, bytes through the load / store path (including L2
    re-reads), work items in all (rows, row groups; a CTA runs its share one after another),
    dependent memory round trips per item."""
    return dict(key=key, grid=grid, threads=threads, packs_per_thread=max(1, ppt), vec_bytes=vec_bytes,
                hbm_bytes=hbm, touched_bytes=touched, items=items, rounds=rounds)


def layer_norm_fwd_launches(m, n, dtype, residual=False, residual_out=False):
    """([launch], minimum bytes) of bertkern's LayerNorm forward (16-byte aligned tensors, weight
    and bias present): reads x (+ residual), writes y (+ residual_out) and mean / rstd."""
    elem = _ELEM[dtype]
    row = n * elem
    reads, writes = (2 if residual else 1) * row, (2 if residual_out else 1) * row
    plan = layer_norm_fwd_plan(m, n, elem)
    vec = plan["vec"]
    min_bytes = m * (reads + writes + 8) + 2 * row
    if plan["registers"]:
        # A row group per CTA iteration, loaded once into registers (one round trip); weight and
        # bias re-read per row from L1 / L2.
        return [_launch(("layer_norm_fwd_reg_kernel", dtype, (vec, plan["iters"])), plan["blocks"],
                        plan["threads_x"] * plan["rows_y"], plan["iters"], vec * elem, min_bytes,
                        m * (reads + writes + 8 + 2 * row), _cdiv(m, plan["rows_y"]), 1)], min_bytes
    threads = plan["threads_x"]
    # Loop path: x (+ residual) read twice (the second time from L2), two round trips a row.
    return [_launch(("layer_norm_fwd_kernel", dtype, (vec,)), plan["blocks"], threads,
                    _cdiv(n // vec, threads), vec * elem, min_bytes, m * (2 * reads + writes + 8 + 2 * row),
                    m, 2)], min_bytes


def layer_norm_bwd_launches(m, n, dtype, dresidual=False):
    """([launch], minimum bytes) of bertkern's LayerNorm backward with dweight and dbias: reads
    dy, z (+ dresidual_out), mean / rstd, weight; writes dz, dweight, dbias."""
    elem = _ELEM[dtype]
    row = n * elem
    reads = (3 if dresidual else 2) * row
    plan = layer_norm_bwd_plan(m, n, elem)
    vec = plan["vec"]
    min_bytes = m * (reads + row + 8) + row + 2 * n * elem
    if plan["registers"]:
        partials = plan["n_partials"] * n * 8
        main = _launch(("layer_norm_bwd_reg_kernel", dtype, (vec, plan["iters"])), plan["blocks"],
                       plan["threads_x"] * plan["rows_y"], plan["iters"], vec * elem,
                       m * (reads + row + 8) + row + partials, m * (reads + row + 8 + row) + partials,
                       _cdiv(m, plan["rows_y"]), 1)
        # Each reduce thread walks n_partials / kReduceRowThreads partial rows (4 in flight assumed).
        reduce = _launch(("layer_norm_bwd_partials_reduce_kernel", dtype, ()), _cdiv(n, LN_COL_TILE),
                         LN_COL_TILE * LN_REDUCE_ROW_THREADS, _cdiv(plan["n_partials"], LN_REDUCE_ROW_THREADS), 4,
                         partials + 2 * n * elem, partials + 2 * n * elem, _cdiv(n, LN_COL_TILE),
                         max(1, _cdiv(plan["n_partials"], 4 * LN_REDUCE_ROW_THREADS)))
        return [main, reduce], min_bytes
    threads = plan["threads_x"]
    dz = _launch(("layer_norm_bwd_dz_kernel", dtype, (vec,)), plan["blocks"], threads, _cdiv(n // vec, threads),
                 vec * elem, m * (reads + row + 8) + row, m * (2 * reads + row + 8 + 2 * row), m, 2)
    p = plan["loop_dwdb"]
    partials = p["n_chunks"] * n * 8
    dwdb = _launch(("layer_norm_bwd_dwdb_partial_kernel", dtype, ()), p["col_tiles"] * p["n_chunks"],
                   LN_COL_TILE * LN_ROW_THREADS, _cdiv(p["rows_per_chunk"], LN_ROW_THREADS), elem,
                   m * (2 * row + 8) + partials, m * (2 * row + 8) + partials, p["col_tiles"] * p["n_chunks"],
                   max(1, _cdiv(p["rows_per_chunk"], 4 * LN_ROW_THREADS)))
    final = _launch(("layer_norm_bwd_dwdb_final_kernel", dtype, ()), _cdiv(n, LN_FINAL_THREADS), LN_FINAL_THREADS,
                    p["n_chunks"], 4, partials + 2 * n * elem, partials + 2 * n * elem, _cdiv(n, LN_FINAL_THREADS),
                    p["n_chunks"])
    return [dz, dwdb, final], min_bytes


def _copy_unit(row_bytes):
    """(word type, VEC, pack bytes) of a row copy with 16-byte aligned base pointers."""
    if row_bytes % 16 == 0:
        return "u32", 4, 16
    if row_bytes % 4 == 0:
        return "u32", 1, 4
    return ("u16", 1, 2) if row_bytes % 2 == 0 else ("u8", 1, 1)


def gather_launches(tokens, hidden, dtype):
    """([launch], minimum bytes) of unpad's row gather (gather_rows_kernel): T rows of x by index."""
    row = hidden * _ELEM[dtype]
    word, vec, pack = _copy_unit(row)
    packs = row // pack
    plan = row_copy_plan(tokens, packs)
    # Row groups one after the other per CTA: the index, then the row (two round trips).
    return [_launch(("gather_rows_kernel", word, (vec,)), plan["blocks"], plan["threads_x"] * plan["rows_y"],
                    _cdiv(packs, plan["threads_x"]), pack, tokens * (2 * row + 8), tokens * (2 * row + 8),
                    _cdiv(tokens, plan["rows_y"]), 2)], 2 * tokens * row


def pad_launches(tokens, n_dst, hidden, dtype):
    """([launch], minimum bytes) of pad (scatter_rows_launch): fill_inverse over the n_dst padded
    rows, invert_indices over the T tokens, pad_rows_kernel writing every padded row once."""
    row = hidden * _ELEM[dtype]
    word, vec, pack = _copy_unit(row)
    packs = row // pack
    plan = row_copy_plan(n_dst, packs)
    fill_grid = min(_cdiv(n_dst, INDEX_THREADS), MAX_PADDING_BLOCKS)
    inv_grid = min(_cdiv(tokens, INDEX_THREADS), MAX_PADDING_BLOCKS)
    return [
        _launch(("fill_inverse_kernel", "i64", ()), fill_grid, INDEX_THREADS, 1, 8, 8 * n_dst, 8 * n_dst,
                _cdiv(n_dst, INDEX_THREADS), 1),
        _launch(("invert_indices_kernel", "i64", ()), inv_grid, INDEX_THREADS, 1, 8, 16 * tokens, 16 * tokens,
                _cdiv(tokens, INDEX_THREADS), 2),
        _launch(("pad_rows_kernel", word, (vec,)), plan["blocks"], plan["threads_x"] * plan["rows_y"],
                _cdiv(packs, plan["threads_x"]), pack, n_dst * (row + 8) + tokens * row,
                n_dst * (row + 8) + tokens * row, _cdiv(n_dst, plan["rows_y"]), 2),
    ], (tokens + n_dst) * row


# The C++ kernels, by demangled name: bertkern::cuda::<name><type[, ints]>.
_CUDA_KERNEL = re.compile(r"bertkern::cuda::(\w+_kernel)<([^<>]*)>")
_CUDA_DTYPE = {"unsigned int": "u32", "unsigned short": "u16", "unsigned char": "u8", "__half": "fp16",
               "c10::Half": "fp16", "__nv_bfloat16": "bf16", "c10::BFloat16": "bf16", "float": "fp32",
               "long": "i64", "long long": "i64", "bool": "bool", "int": "i32"}

# A translation unit instantiating every kernel the launch plans can pick (the launchers with a
# launcher that only names the kernel), for nvcc -cubin; no ATen / torch headers.
_CUDA_TU = r"""// Generated by bertkern.bench.gpu_model (static GPU cost model).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
@EXTRA_INCLUDES@
#include "cuda/layer_norm_launch.cuh"
#include "cuda/padding_launch.cuh"

namespace {
struct Instantiate {
  template <typename Kernel, typename... Args>
  void operator()(dim3, dim3, Kernel kernel, Args...) const { (void)kernel; }
  void check_aligned(const void*, size_t, const char*) const {}
};

template <typename T>
void layer_norm_kernels() {
  using namespace bertkern::cuda;
  const LayerNormPlan plan{};
  layer_norm_fwd_launch<T>(Instantiate{}, plan, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                           nullptr, nullptr, 0, 0, 0.f);
  layer_norm_bwd_launch<T>(Instantiate{}, plan, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                           nullptr, nullptr, nullptr, nullptr, 0, 0);
}
}  // namespace

void bertkern_gpu_model_instantiate() {
  using namespace bertkern::cuda;
  layer_norm_kernels<@HALF@>();
  layer_norm_kernels<@BFLOAT16@>();
  layer_norm_kernels<float>();
  gather_rows_launch(Instantiate{}, nullptr, nullptr, nullptr, 0, 0, 0);
  scatter_rows_launch(Instantiate{}, nullptr, nullptr, nullptr, nullptr, 0, 0, 0);
}
"""
# setup.py's nvcc flags for the extension (less -lineinfo and the arch list).
NVCC_FLAGS = ("-O3", "-std=c++20", "--use_fast_math")


def csrc_dir():
    """csrc/ of the source checkout bertkern is imported from, or None."""
    import bertkern

    path = os.path.join(os.path.dirname(os.path.dirname(bertkern.__file__)), "csrc")
    return path if os.path.isdir(os.path.join(path, "cuda")) else None


def nvcc_path():
    """nvcc as setup.py finds it: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, PATH; None if absent."""
    import shutil

    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_tu():
    """(source, extra nvcc args): the extension's c10::Half / c10::BFloat16 (header-only c10
    types, from torch's include folder) when torch ships its headers, else __half /
    __nv_bfloat16 (the same storage and float conversions)."""
    import torch

    include = os.path.join(os.path.dirname(torch.__file__), "include")
    if os.path.exists(os.path.join(include, "c10", "util", "BFloat16.h")):
        text = _CUDA_TU.replace("@EXTRA_INCLUDES@", "#include <c10/util/BFloat16.h>\n#include <c10/util/Half.h>\n")
        return text.replace("@HALF@", "c10::Half").replace("@BFLOAT16@", "c10::BFloat16"), ["-I", include]
    text = _CUDA_TU.replace("@EXTRA_INCLUDES@", "")
    return text.replace("@HALF@", "__half").replace("@BFLOAT16@", "__nv_bfloat16"), []


def _cuda_headers_digest(nvcc, arch):
    import glob

    h = hashlib.sha1(repr(_cuda_tu()).encode())
    for path in sorted(glob.glob(os.path.join(csrc_dir(), "cuda", "*.cuh"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    h.update(version.encode())
    h.update(repr((NVCC_FLAGS, arch)).encode())
    return h.hexdigest()[:24]


def compile_cuda_cubin(arch, nvcc=None):
    """The SASS and resource usage of csrc/cuda's kernels for sm_<arch>, compiled now from the
    headers with nvcc -cubin (cached on their content): dict(sass, usage, source, nvcc)."""
    import tempfile

    nvcc = nvcc or nvcc_path()
    if nvcc is None or csrc_dir() is None:
        raise FileNotFoundError("nvcc or csrc/cuda not found")
    key = ("cuda-cubin", _cuda_headers_digest(nvcc, arch))
    hit = _cache_get("cuda", key)
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "gpu_model_kernels.cu"), os.path.join(tmp, "kernels.cubin")
        text, extra = _cuda_tu()
        with open(src, "w") as f:
            f.write(text)
        proc = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, "-I", csrc_dir(), *extra, "-o", cubin,
                               src],
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc -cubin for sm_{arch} failed: {proc.stderr[-3000:]}")
        with open(cubin, "rb") as f:
            data = f.read()
        usage = sass.resource_usage(cubin)
    hit = dict(sass=sass.disassemble_cubin(data), usage=usage, nvcc=nvcc,
               source=f"nvcc -cubin -arch=sm_{arch} of csrc/cuda/*_launch.cuh (generated instantiations)")
    _cache_put("cuda", key, hit)
    return hit


def _demangle(names):
    if not names:
        return []
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                          check=False).stdout.splitlines()


def _cuda_functions(text, usage, source, when):
    """{(name, dtype, ints): info} of the bertkern::cuda kernels in a SASS listing."""
    functions = sass.parse_sass(text)
    found = {}
    for f, dem in zip(functions, _demangle([f.name for f in functions])):
        m = _CUDA_KERNEL.search(dem)
        if not m:
            continue
        args = [a.strip() for a in m.group(2).split(",")]
        ints = tuple(int(a) for a in args[1:] if re.fullmatch(r"-?\d+", a))
        key = (m.group(1), _CUDA_DTYPE.get(args[0], args[0]), ints)
        u = usage.get(f.name, {})
        found.setdefault(key, dict(regs=u.get("REG", 0), smem=u.get("SHARED", 0), spills=u.get("LOCAL", 0),
                                   report=sass.analyse(f), function=f, name=dem, source=source, source_mtime=when))
    return found


def cuda_binaries(objects_dir=None):
    """The built extension (bertkern/_C*.so), or, only when asked explicitly (objects_dir,
    ``--cuda-objects DIR``), the object files / cubins / shared libraries in that folder, newest
    first. Nothing else: other objects may predate csrc/cuda."""
    import glob

    if objects_dir:
        found = [f for ext in ("o", "cubin", "so") for f in glob.glob(os.path.join(objects_dir, f"*.{ext}"))]
        return sorted(found, key=os.path.getmtime, reverse=True)
    import bertkern

    return glob.glob(os.path.join(os.path.dirname(bertkern.__file__), "_C*.so"))


def csrc_mtime():
    """Last edit of csrc/cuda (for the staleness note), or None outside a source checkout."""
    import glob

    root = csrc_dir()
    files = glob.glob(os.path.join(root, "cuda", "*")) if root else []
    if not files:
        return None
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(max(os.path.getmtime(f) for f in files)))


def _binary_kernels(arch, paths):
    out = {}
    for path in paths:
        try:
            text = sass.disassemble_binary(path, f"sm_{arch}")
            usage = sass.resource_usage(path, f"sm_{arch}")
        except (RuntimeError, FileNotFoundError):
            continue  # no device code (a CPU-only build) or no cubin for this arch
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
        found = _cuda_functions(text, usage, os.path.relpath(path), when)
        out.update({k: v for k, v in found.items() if k not in out})  # the newest binary wins
    return out


def cuda_kernels(arch, objects_dir=None, log=print):
    """({kernel key: dict(regs, smem, spills, report, name, source, source_mtime)}, source note)
    for sm_<arch>. Source, in order: the binaries of objects_dir when given; the kernels compiled
    now from csrc/cuda with nvcc -cubin (always the current source); the built extension when
    it holds device code. ({}, note) when none of these has them."""
    if objects_dir:
        found = _binary_kernels(arch, cuda_binaries(objects_dir))
        return found, dict(kind="explicit", detail=f"--cuda-objects {objects_dir}")
    nvcc, note = nvcc_path(), None
    if nvcc and csrc_dir():
        try:
            hit = compile_cuda_cubin(arch, nvcc)
            when = time.strftime("%Y-%m-%d %H:%M")
            return _cuda_functions(hit["sass"], hit["usage"], "nvcc -cubin (csrc/cuda)", when), \
                dict(kind="nvcc", detail=hit["source"])
        except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
            note = f"compiling csrc/cuda with nvcc failed ({str(e)[:500]})"
            log(f"gpu-model: {note}")
    found = _binary_kernels(arch, cuda_binaries())
    if found:
        return found, dict(kind="extension", detail=", ".join(sorted({v["source"] for v in found.values()})))
    return {}, dict(kind="missing", detail=note or "no nvcc and no CUDA device code in bertkern/_C*.so")


def memory_launch_model(launch, info, gpu):
    """Modeled seconds (and what bounds them) of one launch of a memory-bound kernel."""
    hw = HW[gpu]
    ctas_sm, _ = occupancy(info["regs"], info["smem"], launch["threads"], hw)
    ctas_sm = max(1, ctas_sm)
    resident = min(launch["grid"], hw["sms"] * ctas_sm)
    # the loop holding the data loads (of the launch's access width) and their first batch
    mem = sass.memory_main(info["function"], launch["vec_bytes"])
    in_flight = min(mem.loads_in_flight, max(1, launch["packs_per_thread"] * 3))
    bytes_in_flight = resident * launch["threads"] * in_flight * launch["vec_bytes"]
    bw = hw["hbm_tbs"] * 1e12
    t_bw = launch["hbm_bytes"] / bw
    t_lat = launch["hbm_bytes"] / (bytes_in_flight / (MEMORY_LATENCY_NS * 1e-9))
    instr_per_byte = mem.main.instructions / max(1, mem.main.lsu_bytes)
    active_sms = min(hw["sms"], launch["grid"])
    t_issue = launch["touched_bytes"] * instr_per_byte / (hw["issue"] * active_sms * hw["clock_ghz"] * 1e9)
    # The dependent chain: the work items (of all CTAs) the resident CTAs run one after another,
    # each some dependent round trips, plus one latency for the last stores to drain.
    t_chain = (_cdiv(launch["items"], resident) * launch["rounds"] + 1) * MEMORY_LATENCY_NS * 1e-9
    times = dict(bandwidth=t_bw, latency=max(t_lat, t_chain), issue=t_issue)
    return dict(time_s=max(times.values()), bound=max(times, key=times.get), ctas_per_sm=ctas_sm,
                regs=info["regs"], loads_in_flight=in_flight)


def memory_op_model(op, launches, min_bytes, kernels, gpu, **shape):
    """One op (its launches one after the other): modeled time and the fraction of HBM bandwidth
    its minimum bytes achieve; None when a kernel's SASS is missing."""
    parts = []
    for launch in launches:
        info = kernels.get(launch["key"])
        if info is None:
            return None
        parts.append(dict(memory_launch_model(launch, info, gpu), kernel=_kernel_label(launch["key"]),
                          grid=launch["grid"], threads=launch["threads"]))
    t = sum(p["time_s"] for p in parts)
    main = max(parts, key=lambda p: p["time_s"])
    return dict(op=op, gpu=gpu, **shape, time_s=t, min_bytes=min_bytes,
                hbm_fraction=min_bytes / t / (HW[gpu]["hbm_tbs"] * 1e12), bound=main["bound"],
                kernels=parts)


def _kernel_label(key):
    name, dtype, ints = key
    return f"{name}<{', '.join([dtype, *map(str, ints)])}>"


# The table's grid: hidden sizes and row counts, fp16 / bf16.
MEMORY_NS = (768, 1024, 4096, 8192)
MEMORY_ROWS = (16384, 1024)


def memory_ops(rows, n, dtype):
    """(op, launches, min bytes) of every modeled memory-bound op at (rows, n): LayerNorm forward
    (+ residual), backward; unpad (gather of ``rows`` tokens); pad (``rows`` tokens into
    ``rows`` / 0.5625 padded rows, the benchmark's expected fill)."""
    out = [("layer_norm_fwd", *layer_norm_fwd_launches(rows, n, dtype)),
           ("layer_norm_fwd_residual", *layer_norm_fwd_launches(rows, n, dtype, residual=True)),
           ("layer_norm_bwd", *layer_norm_bwd_launches(rows, n, dtype)),
           ("unpad_gather", *gather_launches(rows, n, dtype))]
    out.append(("pad", *pad_launches(rows, int(rows / PAD_FILL), n, dtype)))
    return out


# Benchmark cases gpu-check compares with (benchmarks/bench_layer_norm.py / bench_padding.py
# CUDA_SHAPES): LayerNorm (rows, N, dtype) for ops fwd, fwd_residual, fwd_bwd_residual; padding
# (B, S, E, dtype) for unpad (the gather kernel only: the benchmark also times mask_to_indices
# and its device-to-host read) and pad. Padding lengths are uniform in [S/8, S]: PAD_FILL of the
# rows are real tokens on average.
BENCH_LAYER_NORM_SHAPES = ((16384, 768, "fp16"), (16384, 1024, "bf16"), (16384, 768, "fp32"))
BENCH_PADDING_SHAPES = ((32, 512, 768, "fp16"), (32, 512, 1024, "bf16"))
PAD_FILL = 0.5625


def memory_predictions(cuda, archs):
    """The memory model at the LayerNorm / padding benchmarks' CUDA cases (what gpu-check sets
    next to the measured GB/s); [] when the CUDA kernels' SASS was not available."""
    out = []
    for arch in archs:
        kernels = cuda[arch]
        for gpu in GPUS_OF_ARCH[arch]:
            for m, n, dtype in BENCH_LAYER_NORM_SHAPES:
                fwd = layer_norm_fwd_launches(m, n, dtype)
                fwd_res = layer_norm_fwd_launches(m, n, dtype, residual=True)
                fwd_res_out = layer_norm_fwd_launches(m, n, dtype, residual=True, residual_out=True)
                bwd = layer_norm_bwd_launches(m, n, dtype)
                cases = [("fwd", fwd), ("fwd_residual", fwd_res),
                         # forward keeping z for the backward, then the backward
                         ("fwd_bwd_residual", (fwd_res_out[0] + bwd[0], fwd_res_out[1] + bwd[1]))]
                for op, (launches, min_bytes) in cases:
                    r = memory_op_model(op, launches, min_bytes, kernels, gpu, dtype=dtype, shape=[m, n], rows=m)
                    if r is not None:
                        out.append(dict(r, impl="bertkern"))
            for B, S, E, dtype in BENCH_PADDING_SHAPES:
                tokens = int(B * S * PAD_FILL)
                for op, (launches, min_bytes), scope in (
                        ("unpad", gather_launches(tokens, E, dtype), "gather only"),
                        ("pad", pad_launches(tokens, B * S, E, dtype), None)):
                    r = memory_op_model(op, launches, min_bytes, kernels, gpu, dtype=dtype, shape=[B, S, E],
                                        rows=tokens)
                    if r is not None:
                        out.append(dict(r, impl="bertkern", scope=scope) if scope else dict(r, impl="bertkern"))
    return out


# ------------------------------------------------------------------------------------------
# Driver and report
# ------------------------------------------------------------------------------------------
def collect(archs=(80, 90), quick=False, workers=2, log=print, cuda_objects=None):
    dtypes = ("fp16",) if quick else ("fp16", "bf16")
    specs = triton_specs(archs, dtypes)
    compiled = compile_triton_kernels(specs, workers, log)
    errors = {str(s): r for s, r in compiled.items() if isinstance(r, str)}
    kernels = [triton_kernel(s, r) for s, r in compiled.items()
               if not isinstance(r, str) and s[0] != "attention_delta_bwd"]
    fa2, fa2_missing = {}, []
    for arch in archs:
        for dtype in dtypes:
            for d in HEAD_DIMS:
                for dropout in (False, True):
                    for kind in ("fa2_fwd", "fa2_bwd"):
                        k = fa2_kernel(kind, arch, dtype, d, dropout)
                        if k is None:
                            fa2_missing.append((kind, arch, dtype, d, dropout))
                        else:
                            fa2[(kind, arch, dtype, d, dropout)] = k
    cuda, sources = {}, {}
    for arch in archs:
        cuda[arch], sources[arch] = cuda_kernels(arch, cuda_objects, log)
    missing = [a for a in archs if not cuda[a]]
    if not missing:
        cuda_source = dict(status="ok", per_arch=sources)
    else:
        how = ("the folder given holds none" if cuda_objects else
               "nvcc could not compile csrc/cuda here and bertkern/_C*.so holds no CUDA device code "
               "(built for the CPU only)")
        cuda_source = dict(status="missing" if len(missing) == len(archs) else "partial", per_arch=sources,
                           note=f"no SASS of the CUDA kernels for sm_{'/'.join(map(str, missing))}: {how} "
                                f"({'; '.join(sources[a]['detail'] for a in missing)}). The memory-bound "
                                "tables leave those archs out. Install a CUDA toolkit (nvcc), build the "
                                "extension with CUDA, or pass --cuda-objects DIR (object files of a CUDA "
                                "build of the current csrc/cuda).")
    return dict(kernels=kernels, fa2=fa2, fa2_missing=fa2_missing, cuda=cuda, errors=errors,
                dtypes=dtypes, archs=archs, cuda_source=cuda_source)


def build(data):
    """All numbers (JSON-able) from collect()'s output."""
    rows = []
    for k in data["kernels"] + list(data["fa2"].values()):
        hw = HW[GPU_OF_ARCH[k.key["arch"]]]
        rows.append(k.row(hw))
    summary = []
    for arch in data["archs"]:
        gpu = GPU_OF_ARCH[arch]
        for dtype in data["dtypes"]:
            for d in HEAD_DIMS:
                for p in DROPOUTS:
                    s = attention_summary(data["kernels"], data["fa2"], gpu, d, dtype, p)
                    if s:
                        summary.append(s)
    memory, used, absent = [], set(), set()
    for arch in data["archs"]:
        kernels = data["cuda"][arch]
        if not kernels:
            continue  # cuda_source says why
        for gpu in GPUS_OF_ARCH[arch]:
            for dtype in data["dtypes"]:
                for n in MEMORY_NS:
                    for rows_ in MEMORY_ROWS:
                        for op, launches, min_bytes in memory_ops(rows_, n, dtype):
                            r = memory_op_model(op, launches, min_bytes, kernels, gpu, dtype=dtype, n=n, rows=rows_)
                            if r is not None:
                                memory.append(r)
                                used.update((arch, launch["key"]) for launch in launches)
                            absent.update(f"sm_{arch} {_kernel_label(launch['key'])}" for launch in launches
                                          if launch["key"] not in kernels)
    cuda_rows = []
    for arch in data["archs"]:
        for key, info in sorted(data["cuda"][arch].items()):
            if (arch, key) not in used:
                continue
            rep = info["report"]
            cuda_rows.append(dict(arch=arch, kernel=_kernel_label(key), regs=info["regs"],
                                  smem=info["smem"], spills=info["spills"],
                                  instructions=rep.total.instructions,
                                  loops=len(rep.loops), name=info["name"], source=info["source"],
                                  source_mtime=info["source_mtime"]))
    csrc = csrc_mtime()
    stale = any(c["source_mtime"] < csrc for c in cuda_rows) if csrc else False
    cuda_source = dict(data.get("cuda_source") or {})
    if absent:
        # Binaries that hold some kernels but not those the current launch plans pick (e.g.
        # objects of an older build): the ops that need them are left out, and said so.
        cuda_source.update(status="partial", missing_kernels=sorted(absent),
                           note=(cuda_source.get("note", "") + " " if cuda_source.get("note") else "") +
                           f"The SASS lacks {len(absent)} kernel(s) the current launch plans pick "
                           f"({', '.join(sorted(absent)[:6])}{', ...' if len(absent) > 6 else ''}); "
                           "the ops that launch them are left out of the tables.")
    return dict(csrc_mtime=csrc, cuda_stale=stale, cuda_source=cuda_source,
                assumptions=dict(hw=HW, latency_warps=LATENCY_WARPS, hmma_sm90_fraction=HMMA_SM90_FRACTION,
                                 memory_latency_ns=MEMORY_LATENCY_NS, bert_shape=BERT, matmuls=MATMULS,
                                 bench_attention_shapes=BENCH_ATTENTION_SHAPES),
                kernels=rows, summary=summary, hmma_sensitivity=hmma_sensitivity(data),
                attention_predictions=attention_predictions(data["kernels"], data["fa2"], data["archs"],
                                                            data["dtypes"]),
                memory=memory, memory_predictions=memory_predictions(data["cuda"], data["archs"]),
                cuda_kernels=cuda_rows,
                fa2_missing=[list(m) for m in data["fa2_missing"]], errors=data["errors"])


def _f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def render(result):
    lines = ["# Static GPU cost model (model, not measurement)", "",
             ("Produced by `python -m bertkern.bench gpu-model` without a GPU: SASS of the compiled "
             "kernels, one throughput model for bertkern and for torch's bundled FlashAttention-2. "
             "Assumptions and limits: the docstring of `bertkern/bench/gpu_model.py`. "
             f"BERT shape: B={BERT['B']}, H={BERT['H']}, S={BERT['S']}, non-causal. "
             "GPUs: sm_90 = H100 SXM (1.83 GHz, 132 SMs), sm_80 = A100 SXM 80GB (1.41 GHz, 108 SMs)."), ""]
    lines += ["## Attention, BERT shape: modeled TFLOP/s (model), bertkern vs FA2", "",
              ("| GPU | dtype | D | dropout | bertkern fwd | FA2 fwd | ratio fwd | bertkern fwd+bwd | "
               "FA2 fwd+bwd | ratio fwd+bwd | bertkern tiles fwd / dkdv / dq |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        b, f = s["bertkern"], s.get("fa2")
        tiles = " / ".join("x".join(map(str, b["picks"][k]["tile"]))
                           for k in ("attention_fwd", "attention_dkdv_bwd", "attention_dq_bwd"))
        lines.append(f"| {s['gpu']} | {s['dtype']} | {s['head_dim']} | {s['dropout']} | {b['fwd_tflops']:.0f} | "
                     f"{_f(f and f['fwd_tflops'], 0)} | {_f(s.get('ratio_fwd'), 2)} | {b['fwdbwd_tflops']:.0f} | "
                     f"{_f(f and f['fwdbwd_tflops'], 0)} | {_f(s.get('ratio_fwdbwd'), 2)} | {tiles} |")
    lines += _render_sensitivity(result)
    lines += ["", "Dropout cost (model): fwd+bwd time with dropout 0.1 / without, same GPU, dtype, D.", "",
              "| GPU | dtype | D | bertkern | FA2 |", "|---|---|---|---|---|"]
    for r in dropout_ratios(result):
        lines.append(f"| {r['gpu']} | {r['dtype']} | {r['head_dim']} | {_f(r['bertkern'], 2)} | {_f(r['fa2'], 2)} |")
    lines += ["", ("## Autotune candidates (model): modeled time of every tile at the BERT shape, us "
                   "(* = the pick)"), "",
              "| GPU | dtype | D | dropout | kernel | tiles MxNxW: us |", "|---|---|---|---|---|---|"]
    for s in result["summary"]:
        for name, pick in s["bertkern"]["picks"].items():
            best = str(pick["tile"])
            cands = ", ".join(f"{'x'.join(t.strip('[]').split(', '))}: {1e6 * us:.0f}{'*' if t == best else ''}"
                              for t, us in pick["all"].items())
            lines.append(f"| {s['gpu']} | {s['dtype']} | {s['head_dim']} | {s['dropout']} | {name} | {cands} |")
    lines += ["", "## Attention kernel configs (model): registers, occupancy, main-loop mix, clocks per score element per SM", "",
              ("Loop mix: warp-instructions per warp per iteration (tensor/mufu/fp32/int/memory/other). "
               "clk/elem: SM clocks per attention-score element per pipe (tensor, mufu, fp32, int, memory, issue). "
               "dup = MMA FLOPs per iteration / minimum for the tile (1.00 = no duplicated matmul work)."), "",
              ("| impl | kernel | sm | dtype | D | drop | tile MxNxW | regs | spill | smem KB | CTA/SM (limit) | "
               "warps/SM | loop instr | mix t/m/f/i/mem/o | clk/elem t/m/f/i/mem/issue | bound | dup |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["kernels"], key=lambda r: (r["impl"], r["kernel"], r["arch"], r["dtype"],
                                                      r["head_dim"], r["dropout"], r["tile"])):
        mix_s = "/".join(str(r["loop_mix"][p]) for p in sass.PIPES)
        clk = "/".join(f"{r['clk_per_elem'][p]:.3f}" for p in ("tensor", "mufu", "fp32", "int", "memory", "issue"))
        lines.append(f"| {r['impl']} | {r['kernel']} | {r['arch']} | {r['dtype']} | {r['head_dim']} | "
                     f"{int(r['dropout'])} | {'x'.join(map(str, r['tile']))} | {r['regs']} | {r['spill_stores']} | "
                     f"{r['smem'] / 1024:.0f} | {r['ctas_per_sm']} ({r['occupancy_limit']}) | {r['warps_per_sm']} | "
                     f"{r['loop_instructions']} | {mix_s} | {clk} | {r['bound']} | {_f(r['duplication'], 2)} |")
    source = result.get("cuda_source") or {}
    if source.get("status") in ("missing", "partial"):
        lines += ["", "## Memory-bound CUDA kernels (model): " + ("skipped" if source["status"] == "missing"
                                                                 else "incomplete"),
                  "", f"**Not modeled:** {source['note']}"]
    if result["memory"]:
        lines += _render_memory(result)
    lines += _render_bench_predictions(result)
    if result["fa2_missing"]:
        lines += ["", f"FA2 kernels not found in libtorch_cuda.so: {result['fa2_missing']}"]
    if result["errors"]:
        lines += ["", "## Compile errors (configs missing from the model)", ""] + [f"- {k}: {v[:300]}" for k, v in result["errors"].items()]
    return "\n".join(lines) + "\n"


def _tensor_ops(result, impl, arch):
    return sorted({op for r in result["kernels"] if r["impl"] == impl and r["arch"] == arch
                   for op in r.get("mma_ops", [])})


def _render_sensitivity(result):
    rows = result.get("hmma_sensitivity") or []
    if not rows:
        return []
    per_kernel = {}
    for r in result["kernels"]:
        if r["arch"] == 90 and r.get("mma_ops"):
            per_kernel.setdefault((r["impl"], r["kernel"]), set()).update(r["mma_ops"])
    bk_ops = "; ".join(f"{k} {' or '.join(sorted(v))}" for (impl, k), v in sorted(per_kernel.items())
                       if impl == "bertkern") or "-"
    fa_ops = ", ".join(_tensor_ops(result, "fa2", 90)) or "-"
    shift = max(max(abs(r["ratio_fwd"] - r["ratio_fwd_full"]), abs(r["ratio_fwdbwd"] - r["ratio_fwdbwd_full"]))
                for r in rows)
    fa2_bounds = sorted({f"{r['kernel']} D{r['head_dim']}{' dropout' if r['dropout'] else ''}: {r['bound']}"
                         for r in result["kernels"] if r["impl"] == "fa2" and r["arch"] == 90})
    moved = (f"Here the ratios move by at most {shift:.2f}: with HMMA at 2/3, FA2's modeled main loops are "
             f"bound by ({'; '.join(fa2_bounds)}), mostly not by the tensor pipe, so the ratios hinge "
             "on the other pipe assumptions (shared-memory data path 128 B/clk/SM, issue 4 warp-"
             "instructions/clk/SM) more than on this factor.")
    lines = ["", "### Sensitivity (model): H100 ratios if mma.sync ran at the full tensor peak", "",
             (f"The sm_90 figures above charge HMMA (mma.sync) at {HMMA_SM90_FRACTION:.2f} of the wgmma (HGMMA) "
             "peak. That factor is an assumption of this model, not a cited measurement. Tensor "
             f"instructions in the main loops on sm_90 (by tile): bertkern {bk_ops}; FA2 {fa_ops}. "
             "Whatever runs HMMA is slowed by the factor; FA2 runs HMMA only, bertkern HGMMA wherever "
             "Triton uses wgmma, so the assumption cuts in bertkern's favour. Below, the same model "
             "with HMMA at the full peak (the most favourable case for FA2): within this model the truth "
             "lies between the two columns. Ratios = bertkern TFLOP/s / FA2 TFLOP/s. " + moved), "",
             ("| GPU | dtype | D | dropout | ratio fwd (HMMA 2/3) | ratio fwd (HMMA full) | ratio fwd+bwd (HMMA 2/3) | "
              "ratio fwd+bwd (HMMA full) | FA2 fwd+bwd TFLOP/s (2/3 / full) | bertkern fwd+bwd TFLOP/s (2/3 / full) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpu']} | {r['dtype']} | {r['head_dim']} | {r['dropout']} | {_f(r['ratio_fwd'], 2)} | "
                     f"{_f(r['ratio_fwd_full'], 2)} | {_f(r['ratio_fwdbwd'], 2)} | {_f(r['ratio_fwdbwd_full'], 2)} | "
                     f"{r['fa2_fwdbwd_tflops']:.0f} / {r['fa2_fwdbwd_tflops_full']:.0f} | "
                     f"{r['bertkern_fwdbwd_tflops']:.0f} / {r['bertkern_fwdbwd_tflops_full']:.0f} |")
    return lines


def _render_bench_predictions(result):
    """What gpu-check sets next to the measurements: the model at the benchmarks' cases."""
    lines = ["", "## At the GPU benchmarks' cases (model; what gpu-check compares with)", "",
             ("Attention: benchmarks/bench_attention_gpu.py shapes [B, H, S, D]; modeled TFLOP/s fwd / "
              "fwd+bwd (in brackets for sm_90: mma.sync at the full peak)."), "",
             "| GPU | dtype | shape | dropout | bertkern fwd / fwd+bwd | FA2 fwd / fwd+bwd |", "|---|---|---|---|---|---|"]

    def fig(p, impl):
        f = p.get(impl)
        if not f:
            return "-"
        text = f"{f['fwd_tflops']:.0f} / {f['fwdbwd_tflops']:.0f}"
        full = (p.get("hmma_full") or {}).get(impl)
        return text + (f" [{full['fwd_tflops']:.0f} / {full['fwdbwd_tflops']:.0f}]" if full else "")
    for p in result.get("attention_predictions", []):
        lines.append(f"| {p['gpu']} | {p['dtype']} | {p['shape']} | {p['dropout']} | {fig(p, 'bertkern')} | "
                     f"{fig(p, 'fa2')} |")
    mem = result.get("memory_predictions") or []
    if mem:
        lines += ["", ("LayerNorm / padding: benchmarks/bench_layer_norm.py and bench_padding.py CUDA shapes "
                       f"(padding: {PAD_FILL} of B x S real tokens, unpad = the gather kernel only)."), "",
                  "| op | dtype | GPU | shape | time us | % of HBM |", "|---|---|---|---|---|---|"]
        for m in mem:
            lines.append(f"| {m['op']} | {m['dtype']} | {m['gpu']} | {m['shape']} | {1e6 * m['time_s']:.1f} | "
                         f"{100 * m['hbm_fraction']:.0f} |")
    return lines


def _render_memory(result):
    lines = ["", "## Memory-bound CUDA kernels (model): % of HBM bandwidth the minimum bytes achieve", "",
             ("Ops as bertkern launches them for 16-byte aligned tensors (the launch plans of "
              "csrc/cuda/*_launch.cuh, mirrored in gpu_model.py): layer_norm_fwd(_residual) and "
              "layer_norm_bwd (with dweight / dbias), unpad_gather (the row gather of unpad, for `rows` "
              f"tokens), pad (`rows` tokens into rows / {PAD_FILL} padded rows). Kernels: grid x threads, "
              "registers, CTAs per SM; time: the launches one after another, launch overhead excluded."), "",
             "| op | dtype | GPU | N | rows | kernels | bound | time us | % of HBM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in result["memory"]:
        ks = "; ".join(f"{k['kernel']} {k['grid']}x{k['threads']} r{k['regs']} c{k['ctas_per_sm']}"
                       for k in m["kernels"])
        lines.append(f"| {m['op']} | {m['dtype']} | {m['gpu']} | {m['n']} | {m['rows']} | {ks} | {m['bound']} | "
                     f"{1e6 * m['time_s']:.1f} | {100 * m['hbm_fraction']:.0f} |")
    sources = sorted({(c["source"], c["source_mtime"]) for c in result["cuda_kernels"]})
    lines += ["", "## CUDA kernels (SASS facts the model uses)", "",
              "SASS from: " + ("; ".join(f"`{src}` ({when})" for src, when in sources) or "nothing") +
              (". **Older than csrc/cuda (edited " + result["csrc_mtime"] + "): rebuild for current "
               "kernels.**" if result.get("cuda_stale") else "."), "",
              "| sm | kernel | regs | smem B | spill (local) B | instructions | loops |",
              "|---|---|---|---|---|---|---|"]
    for c in result["cuda_kernels"]:
        lines.append(f"| {c['arch']} | {c['kernel']} | {c['regs']} | {c['smem']} | "
                     f"{c['spills']} | {c['instructions']} | {c['loops']} |")
    return lines


def dropout_ratios(result):
    out = []
    by = {(s["gpu"], s["dtype"], s["head_dim"], s["dropout"]): s for s in result["summary"]}
    for (gpu, dtype, d, p), s in by.items():
        if p != 0.0 or (gpu, dtype, d, 0.1) not in by:
            continue
        s1 = by[(gpu, dtype, d, 0.1)]
        bk = (s1["bertkern"]["fwd_s"] + s1["bertkern"]["bwd_s"]) / (s["bertkern"]["fwd_s"] + s["bertkern"]["bwd_s"])
        fa = None
        if "fa2" in s and "fa2" in s1:
            fa = (s1["fa2"]["fwd_s"] + s1["fa2"]["bwd_s"]) / (s["fa2"]["fwd_s"] + s["fa2"]["bwd_s"])
        out.append(dict(gpu=gpu, dtype=dtype, head_dim=d, bertkern=bk, fa2=fa))
    return out


# ------------------------------------------------------------------------------------------
# For gpu-check: peaks of a named GPU, the model's figure for one benchmark case
# ------------------------------------------------------------------------------------------
def gpu_key_for_device_name(name):
    """The HW key (H200, H100, A100) a device name (torch.cuda.get_device_name()) belongs to."""
    upper = (name or "").upper()
    for key in ("H200", "H100", "A100"):
        if key in upper:
            return key
    return None


def peaks_for_device_name(name):
    """dict(gpu, tensor_flops (dense fp16/bf16 FLOP/s), hbm_bytes (bytes/s)) from HW for a device
    name containing H100 / H200 / A100, None otherwise. HW holds the SXM parts (H100 SXM5, A100
    SXM4 80GB): for a PCIe / NVL part or an A100 40GB, ``spec_part`` is False and the peaks
    overstate it (fewer SMs or lower clocks, less bandwidth)."""
    key = gpu_key_for_device_name(name)
    if key is None:
        return None
    hw = HW[key]
    upper = name.upper()
    other_part = "PCIE" in upper or "NVL" in upper or (key == "A100" and "40GB" in upper)
    return dict(gpu=key, tensor_flops=hw["sms"] * hw["tensor"] * hw["clock_ghz"] * 1e9,
                hbm_bytes=hw["hbm_tbs"] * 1e12, spec_part=not other_part)


_DTYPE_NAMES = {"float16": "fp16", "half": "fp16", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16",
                "float32": "fp32", "float": "fp32", "fp32": "fp32"}
_ATTN_IMPL = {"bertkern": "bertkern", "sdpa_flash": "fa2"}  # sdpa_efficient: not modeled
_ATTN_OP = {"attention_fwd": "fwd_tflops", "attention_fwd_bwd": "fwdbwd_tflops"}


def prediction_for_benchmark(model, device_name, info):
    """The static model's figure for one CUDA benchmark case, or None when it has none.

    model: a gpu_model.json (dict); device_name: the GPU the benchmark ran on (which HW entry);
    info: the case's pytest-benchmark extra_info. Returns dict(label, value, unit, gpu, ...):
    * attention (op attention_fwd / attention_fwd_bwd, shape [B, H, S, D], dtype, dropout_p):
      the modeled TFLOP/s of bertkern (impl bertkern) or of FA2 (impl sdpa_flash) at that shape
      (``attention_predictions`` in the JSON); sm_90 rows add ``value_hmma_full``, the figure
      with mma.sync at the full tensor peak. sdpa_efficient: None (not modeled).
    * LayerNorm / padding (impl bertkern; op, shape, dtype, gbps, bytes): the matching
      ``memory_predictions`` entry's modeled time, as GB/s in the benchmark's own byte count
      (``bytes`` / modeled time, so that it compares with the measured gbps; without ``bytes``:
      the modeled % of HBM times the spec bandwidth); ``hbm_pct`` is the model's % of HBM. For
      padding the model assumes the benchmark's expected token count (PAD_FILL of B x S), and
      unpad is the gather kernel only. None when the model has no such entry (e.g. no SASS of
      the CUDA kernels when it was built).
    """
    gpu = gpu_key_for_device_name(device_name)
    if gpu is None or not model:
        return None
    op = str(info.get("op") or "")
    dtype = _DTYPE_NAMES.get(str(info.get("dtype")))
    shape = list(info.get("shape") or [])
    if op in _ATTN_OP:
        impl = _ATTN_IMPL.get(info.get("impl"))
        if impl is None:
            return None
        dropout = float(info.get("dropout_p") or 0.0)
        for p in model.get("attention_predictions", []):
            if (p["gpu"], p["dtype"], list(p["shape"])) == (gpu, dtype, shape) and abs(p["dropout"] - dropout) < 1e-9:
                figures = p.get(impl)
                if not figures:
                    return None
                value = figures[_ATTN_OP[op]]
                out = dict(label=f"{value:.0f} TFLOP/s (model)", value=value, unit="TFLOP/s", gpu=gpu,
                           impl=impl)
                full = (p.get("hmma_full") or {}).get(impl)
                if full:
                    out["value_hmma_full"] = full[_ATTN_OP[op]]
                return out
        return None
    if "gbps" not in info:
        return None
    for m in model.get("memory_predictions", []):
        if (m["gpu"], m["op"], m["dtype"], list(m["shape"])) == (gpu, op, dtype, shape) \
                and m.get("impl", "bertkern") == info.get("impl"):
            if info.get("bytes") and m.get("time_s"):
                value = info["bytes"] / m["time_s"] / 1e9  # the benchmark's own bytes, the model's time
            else:
                value = m["hbm_fraction"] * HW[gpu]["hbm_tbs"] * 1e3
            scope = f", {m['scope']}" if m.get("scope") else ""
            return dict(label=f"{value:.0f} GB/s (model{scope})", value=value, unit="GB/s", gpu=gpu,
                        hbm_pct=100 * m["hbm_fraction"])
    return None


def run_cli(archs=(80, 90), out=None, quick=False, workers=2, cuda_objects=None):
    start = time.time()
    out = out or DEFAULT_OUT
    data = collect(tuple(archs), quick=quick, workers=workers, log=lambda m: print(m, file=sys.stderr),
                   cuda_objects=cuda_objects)
    result = build(data)
    result["dropout_ratios"] = dropout_ratios(result)
    result["runtime_s"] = time.time() - start
    os.makedirs(out, exist_ok=True)
    text = render(result)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "gpu_model.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(text)
    print(f"wrote {out}/report.md and gpu_model.json in {result['runtime_s']:.0f} s", file=sys.stderr)
    return 0
