"""The static GPU cost model (bertkern.bench.gpu_model, bertkern.bench.sass), no GPU needed.

* The SASS parser on synthetic listings and on a small real Triton kernel with a known loop (the
  counted loop body carries exactly the MMA FLOPs of the dot in the loop, on sm_80 and sm_90).
* Properties of every attention tile the launchers can pick (non-causal, head dims 64 and 128,
  dropout on and off, fp16; BERTKERN_AOT_FULL=1 adds bf16): zero spills, and no duplicated
  matmul work (MMA FLOPs issued per main-loop iteration == the minimum for the tile).
* The modeled cost of dropout: fwd+bwd with p = 0.1 within 15% of p = 0.
* The FlashAttention-2 anchor: torch's libtorch_cuda.so has the FA2 kernels the model compares
  against, and their SASS parses (1.00 matmul duplication: FA2 issues exactly its tile's work).

Compiles are cached under ~/.cache/bertkern/gpu_model, keyed by the kernel source, so only the
first run after a kernel change pays them (about 2 minutes on 2 cores for the default set).
"""
import os

import pytest

triton = pytest.importorskip("triton")

from bertkern.bench import gpu_model, sass

pytestmark = pytest.mark.aot

FULL = os.environ.get("BERTKERN_AOT_FULL") == "1"
DTYPES = ("fp16", "bf16") if FULL else ("fp16",)
ARCHS = (80, 90)
SPECS = [s for s in gpu_model.triton_specs(ARCHS, DTYPES) if s[0] != "attention_delta_bwd"]


def _spec_id(spec):
    name, arch, dtype, d, _causal, dropout, tile = spec
    return f"{name.removeprefix('attention_')}-sm{arch}-{dtype}-d{d}-{'drop' if dropout else 'nodrop'}-" \
           f"{'x'.join(map(str, tile))}"


# ------------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------------
_LISTING = """
	code for sm_80
		Function : toy
	.headerflags	@"EF_CUDA_SM80"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x0 */
        /*0010*/                   IMAD.MOV.U32 R2, RZ, RZ, RZ ;          /* 0x0 */
        /*0020*/                   LDG.E.128 R4, [R2.64] ;                /* 0x0 */
        /*0030*/                   HMMA.16816.F32 R8, R4, R6, R8 ;        /* 0x0 */
        /*0040*/                   MUFU.EX2 R9, R9 ;                      /* 0x0 */
        /*0050*/                   FFMA R10, R9, R9, R10 ;                /* 0x0 */
        /*0060*/                   LDSM.16.M88.4 R12, [R3] ;              /* 0x0 */
        /*0070*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;    /* 0x0 */
        /*0080*/               @!P0 BRA 0x20 ;                            /* 0x0 */
        /*0090*/                   STG.E [R2.64], R10 ;                   /* 0x0 */
        /*00a0*/                   EXIT ;                                 /* 0x0 */
        /*00b0*/                   BRA 0xb0;                              /* 0x0 */
"""


def test_parse_synthetic_listing():
    (fn,) = sass.parse_sass(_LISTING)
    assert (fn.name, fn.arch, len(fn.instrs)) == ("toy", "sm_80", 12)
    assert fn.instrs[8].predicated and fn.instrs[8].base == "BRA"
    loops = sass.find_loops(fn.instrs)
    assert (2, 8) in loops and (11, 11) in loops  # the loop, and the trailing self-branch
    report = sass.analyse(fn)
    assert report.main_range == (2, 8)
    m = report.main
    assert m.instructions == 7 and m.mma_count == 1 and m.mma_flops == 2 * 16 * 8 * 16
    assert m.per_pipe == dict(tensor=1, mufu=1, fp32=1, int=1, memory=2, other=1)
    assert m.lsu_bytes == 32 * 16 + 512  # LDG.128 + LDSM .4 (four 8x8 16-bit matrices)


# A memory kernel: a row loop holding three independent 16-byte loads, then a use of the second
# (R12..R15: R14 is read), a fourth load, and, inside, an innermost shared-memory fold loop with
# no global load (what a LayerNorm register kernel's innermost loop is). A 4-byte load of a
# per-row scalar (not data: another width) sits between the data loads.
_MEMORY_LISTING = """
	code for sm_90
		Function : toy_memory
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD.WIDE R2, R0, 0x10, R2 ;
        /*0020*/               @P0 LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0030*/                   IADD3 R4, R0, 0x20, RZ ;
        /*0040*/               @P1 LDG.E.128.CONSTANT R12, desc[UR4][R2.64+0x200] ;
        /*0050*/                   LDG.E.CONSTANT R30, desc[UR4][R6.64] ;
        /*0060*/               @P2 LDG.E.128.CONSTANT R16, desc[UR4][R2.64+0x400] ;
        /*0070*/                   HADD2.F32 R20, -RZ, R14.H0_H0 ;
        /*0080*/                   LDG.E.128.CONSTANT R24, desc[UR4][R2.64+0x600] ;
        /*0090*/                   LDS R21, [R5] ;
        /*00a0*/                   FADD R22, R21, R22 ;
        /*00b0*/               @P3 BRA 0x90 ;
        /*00c0*/                   FADD R23, R30, R8 ;
        /*00d0*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*00e0*/               @P4 BRA 0x10 ;
        /*00f0*/                   EXIT ;
"""


def test_memory_main_synthetic_listing():
    """The data loads' loop is the main loop (not the innermost LDS fold loop); the batch stops
    at the first instruction reading a register a counted load writes (R14 of R12..R15)."""
    (fn,) = sass.parse_sass(_MEMORY_LISTING)
    report = sass.analyse(fn)
    assert report.main_range == (9, 11) and "LDG" not in report.main.opcodes  # the fold loop
    mem = sass.memory_main(fn, 16)
    assert mem.main_range == (1, 14) and mem.data_width == 16
    assert mem.first_batch == (2, 4, 6) and mem.loads_in_flight == 3  # not 4: R14 is read first
    assert sass.load_destinations(fn.instrs[4]) == {12, 13, 14, 15}
    # width 4: the scalar load is the data; its first use is the FADD after the fold loop, but
    # the fold loop's closing branch ends the straight run first
    assert sass.memory_main(fn, 4).first_batch == (5,)
    # a 64-bit load writes two registers; a use of the second stops the count
    (fn,) = sass.parse_sass(_MEMORY_LISTING.replace("LDG.E.128.CONSTANT R8,", "LDG.E.64 R8,")
                            .replace("R14.H0_H0", "R9.H0_H0"))
    assert sass.load_destinations(fn.instrs[2]) == {8, 9}
    # 16-byte data: R9 is not theirs, the run goes on to the fold loop's branch
    assert sass.memory_main(fn, 16).first_batch == (4, 6, 8)
    assert sass.memory_main(fn, 8).first_batch == (2,)


def test_classify_and_mma_shapes():
    assert sass.classify("HGMMA.64x128x16.F32.BF16") == "tensor"
    assert sass.classify("MUFU.EX2") == "mufu"
    assert sass.classify("F2FP.F16.F32.PACK_AB") == "fp32"
    assert sass.classify("LOP3.LUT") == "int" and sass.classify("UIADD3") == "int"
    assert sass.classify("LDGSTS.E.BYPASS.128") == "memory"
    assert sass.classify("BAR.SYNC") == "other"
    flops = sass.mma_flops
    assert flops(sass.Instr(0, "HMMA.16816.F32.BF16", "")) == 4096
    assert flops(sass.Instr(0, "HMMA.1688.F32.TF32", "")) == 2048
    # a warpgroup-wide m64n128k16, a quarter per warp
    assert flops(sass.Instr(0, "HGMMA.64x128x16.F32", "")) == 2 * 64 * 128 * 16 // 4


def _toy_kernel():
    import triton.language as tl

    @triton.jit
    def toy_loop_dot(A, B, C, n_iters, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(A + offs[:, None] * BLOCK + offs[None, :])
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for i in range(n_iters):
            b = tl.load(B + i * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :])
            acc = tl.dot(a, b, acc)  # one BLOCK^3 dot per iteration
        tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)

    return toy_loop_dot


def _compile_toy(arch):
    from bertkern.kernels import aot

    fn = _toy_kernel()
    r = aot.compile_triton(fn, {"A": "*fp16", "B": "*fp16", "C": "*fp32", "n_iters": "i32", "BLOCK": "constexpr"},
                           {"BLOCK": 64}, arch, 4, 2, divisible=(0, 1, 2), expected_name="toy_loop_dot")
    return r, sass.disassemble_cubin(r["cubin"])


@pytest.mark.parametrize("arch", ARCHS)
def test_loop_of_a_real_kernel_has_the_dots_mma_flops(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a cold cache: ptxas runs, logs
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    r, listing = _compile_toy(arch)
    (fn,) = [f for f in sass.parse_sass(listing) if f.name == "toy_loop_dot"]
    report = sass.analyse(fn)
    assert report.main is not None, "no loop found"
    # 4 warps together issue exactly one 64 x 64 x 64 dot per iteration
    assert report.main.mma_flops * r["num_warps"] == 2 * 64 ** 3
    expected = "HGMMA" if arch == 90 else "HMMA"
    assert expected in report.main.opcodes


# ------------------------------------------------------------------------------------------
# Properties of every tile
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_data():
    data = gpu_model.collect(ARCHS, quick=not FULL, log=print)
    assert not data["errors"], data["errors"]
    return data


@pytest.fixture(scope="module")
def model_rows(model_data):
    return {(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["dropout"], tuple(r["tile"])): r
            for r in gpu_model.build(model_data)["kernels"] if r["impl"] == "bertkern"}


def _row(model_rows, spec):
    name, arch, dtype, d, _causal, dropout, tile = spec
    return model_rows[(name, arch, dtype, d, dropout, tuple(tile[:3]))]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_zero_spills(spec, model_rows):
    row = _row(model_rows, spec)
    assert row["spill_stores"] == 0, f"{row['regs']} registers, {row['spill_stores']} bytes of spill stores"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_no_duplicated_matmul_work(spec, model_rows):
    """MMA FLOPs per main-loop iteration (all warps) == matmuls x 2 * BLOCK_M * BLOCK_N * BLOCK_D:
    no warp recomputes another's part of a dot (Triton replicates when a tile has fewer rows /
    columns than its warps cover)."""
    row = _row(model_rows, spec)
    assert row["mma_loops"] >= 1
    assert row["mma_flops_per_iter"] == row["min_flops_per_iter"], (
        f"tile {row['tile']} issues {row['duplication']:.2f}x the minimum MMA work per iteration")


# Issue 13's goal, not met on H100: one Philox4x32-10 call feeds 8 score elements (16-bit
# halves, p exact to 2^-17), ~42 INT instructions a call, ~5.3 per element in each of the three
# kernels (the backward redraws the mask twice): 3 x 5.3 / 64 lanes = 0.25 SM clocks per element
# on the INT pipe, against ~0.16 of INT slack in the no-dropout sm_90 loops at D 64 plus 15% of
# their 0.30 clocks per element. FA2 feeds 16 elements a call (8-bit thresholds: p rounded to
# 1/256). Where the goal is known unmet the test asserts exactly that (so meeting it fails the
# test, to be flipped) and only then reports an expected failure; any other error fails.
_DROPOUT_GOAL_UNMET_REASON = (
    "goal not met on H100 (model, 2026-12-03): fwd+bwd with dropout 0.1 is 1.65x (D 64), 1.21x "
    "(D 128) the time without; Philox's INT work in all three kernels exceeds the sm_90 loops' slack")


def _fwd_bwd_s(summary, impl):
    return summary[impl]["fwd_s"] + summary[impl]["bwd_s"]


def _dropout_cost(model_data, gpu, head_dim):
    """(bertkern's modeled fwd+bwd time with dropout 0.1 / without, slow summary, fast summary)."""
    slow = gpu_model.attention_summary(model_data["kernels"], model_data["fa2"], gpu, head_dim, "fp16", 0.1)
    fast = gpu_model.attention_summary(model_data["kernels"], model_data["fa2"], gpu, head_dim, "fp16", 0.0)
    return _fwd_bwd_s(slow, "bertkern") / _fwd_bwd_s(fast, "bertkern"), slow, fast


# Modeled dropout cost of the 8-keys-per-Philox-call kernels (2026-12-03; 4 keys a call before:
# 1.32, 3.32, 1.03, 2.38; one key a call before that: 2.78, 6.90, 1.20, 3.52). A change that
# makes dropout dearer by more than 10% fails here.
DROPOUT_COST_NOW = {(64, "A100"): 1.10, (64, "H100"): 1.65, (128, "A100"): 1.04, (128, "H100"): 1.21}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("head_dim,gpu", sorted(DROPOUT_COST_NOW))
def test_dropout_cost_does_not_regress(gpu, head_dim, model_data):
    ratio, _, _ = _dropout_cost(model_data, gpu, head_dim)
    assert ratio <= DROPOUT_COST_NOW[(head_dim, gpu)] * 1.10, (
        f"{gpu} D={head_dim}: dropout 0.1 now costs {ratio:.2f}x (was {DROPOUT_COST_NOW[(head_dim, gpu)]}x)")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("head_dim,gpu,goal_met", [
    pytest.param(d, gpu_model.GPU_OF_ARCH[a], a != 90, id=f"{d}-{gpu_model.GPU_OF_ARCH[a]}")
    for d in gpu_model.HEAD_DIMS for a in ARCHS])
def test_dropout_costs_less_than_15_percent(gpu, head_dim, goal_met, model_data):
    """Modeled fwd+bwd time (autotune's pick each way) with dropout 0.1 / without <= 1.15."""
    ratio, slow, fast = _dropout_cost(model_data, gpu, head_dim)
    fa2 = ""
    if "fa2" in slow and "fa2" in fast:
        fa2 = f" (FA2: {_fwd_bwd_s(slow, 'fa2') / _fwd_bwd_s(fast, 'fa2'):.2f})"
    print(f"{gpu} D={head_dim}: dropout 0.1 / none, modeled fwd+bwd time {ratio:.2f}{fa2}")
    if goal_met:
        assert ratio <= 1.15, f"modeled fwd+bwd with dropout 0.1 is {ratio:.2f}x the time without{fa2}"
        return
    assert ratio > 1.15, (f"{gpu} D={head_dim}: the goal is met now ({ratio:.2f}x): mark it met "
                          "(goal_met) and update the docs")
    # The reported reason quotes this ratio: a model change that moves it fails here until the
    # reason (and docs/performance.md, which quotes the same figures) is updated.
    assert f"{ratio:.2f}x (D {head_dim})" in _DROPOUT_GOAL_UNMET_REASON, (ratio, _DROPOUT_GOAL_UNMET_REASON)
    pytest.xfail(_DROPOUT_GOAL_UNMET_REASON)


# Issue 13's speed goals against FA2 under the same model, on H100 (bertkern TFLOP/s / FA2's:
# time ratio FA2 / bertkern): fwd >= 1.0; fwd+bwd >= 0.9 without dropout, >= 0.8 with 0.1.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("head_dim", gpu_model.HEAD_DIMS)
@pytest.mark.parametrize("dropout,fwd_goal,fwd_bwd_goal", [(0.0, 1.0, 0.9), (0.1, None, 0.8)])
def test_h100_speed_against_fa2_meets_the_goals(head_dim, dropout, fwd_goal, fwd_bwd_goal, model_data):
    if 90 not in ARCHS:
        pytest.skip("sm_90 not modeled")
    summary = gpu_model.attention_summary(model_data["kernels"], model_data["fa2"], "H100", head_dim, "fp16", dropout)
    if "fa2" not in summary:
        pytest.skip("no FA2 anchor (torch without libtorch_cuda.so)")
    fwd = summary["fa2"]["fwd_s"] / summary["bertkern"]["fwd_s"]
    fwd_bwd = _fwd_bwd_s(summary, "fa2") / _fwd_bwd_s(summary, "bertkern")
    if fwd_goal is not None:
        assert fwd >= fwd_goal, f"D={head_dim} dropout {dropout}: fwd {fwd:.2f}x FA2 (model)"
    assert fwd_bwd >= fwd_bwd_goal, f"D={head_dim} dropout {dropout}: fwd+bwd {fwd_bwd:.2f}x FA2 (model)"


def test_report_headings_say_model(model_data):
    result = gpu_model.build(model_data)
    result["dropout_ratios"] = gpu_model.dropout_ratios(result)
    text = gpu_model.render(result)
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings and all("model" in h.lower() for h in headings), headings
    assert result["summary"], "no BERT-shape summary"


# ------------------------------------------------------------------------------------------
# The FlashAttention-2 anchor
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ("fa2_fwd", "fa2_bwd"))
@pytest.mark.parametrize("head_dim", gpu_model.HEAD_DIMS)
@pytest.mark.parametrize("dropout", (False, True))
def test_fa2_anchor_found_and_parsed(arch, kind, head_dim, dropout):
    if gpu_model.libtorch_cuda() is None:
        pytest.skip("torch has no libtorch_cuda.so (a CPU-only torch): no FA2 anchor")
    if not gpu_model.fa2_index(arch):
        pytest.skip(f"libtorch_cuda.so has no FlashAttention-2 cubin for sm_{arch}")
    k = gpu_model.fa2_kernel(kind, arch, "fp16", head_dim, dropout)
    assert k is not None, f"FA2 {kind} D={head_dim} dropout={dropout} (FA2_PLAN's tile) not in libtorch_cuda.so"
    row = k.row(gpu_model.HW[gpu_model.GPU_OF_ARCH[arch]])
    assert row["loop_mma"] > 0 and row["mma_loops"] >= 1
    assert row["duplication"] == 1.0  # FA2 issues exactly its tile's matmuls


def test_hmma_sensitivity_is_monotonic(model_data):
    """Charging mma.sync at the full tensor peak can only speed kernels up."""
    rows = gpu_model.hmma_sensitivity(model_data)
    if 90 not in ARCHS or not rows:
        pytest.skip("no sm_90 rows with an FA2 anchor")
    for r in rows:
        assert r["fa2_fwdbwd_tflops_full"] >= r["fa2_fwdbwd_tflops"] * (1 - 1e-9), r
        assert r["bertkern_fwdbwd_tflops_full"] >= r["bertkern_fwdbwd_tflops"] * (1 - 1e-9), r


# ------------------------------------------------------------------------------------------
# The memory-bound CUDA kernels: the Python mirror of csrc/cuda's launch plans, the cubins
# ------------------------------------------------------------------------------------------
_PLANS_CU = r"""
#include <cstdio>

#include "cuda/layer_norm_launch.cuh"
#include "cuda/padding_launch.cuh"

using namespace bertkern::cuda;

int main() {
  const long long ms[] = {1, 3, 1000, 16384, 100000, 3000000};
  const long long ns[] = {1, 6, 8, 100, 256, 512, 768, 1000, 1024, 1032, 2048, 4096, 5000, 8192,
                          12288, 16384, 20000, 32768, 65536};
  for (long long m : ms)
    for (long long n : ns)
      for (int elem : {2, 4}) {
        const LayerNormPlan f = layer_norm_fwd_plan(m, n, elem, true);
        std::printf("fwd %lld %lld %d %d %d %d %d %d %lld\n", m, n, elem, int(f.registers), f.vec, f.iters,
                    f.threads_x, f.rows_y, (long long)f.blocks);
        const LayerNormPlan b = layer_norm_bwd_plan(m, n, elem, true, true);
        std::printf("bwd %lld %lld %d %d %d %d %d %d %lld %lld %lld %lld %lld\n", m, n, elem, int(b.registers),
                    b.vec, b.iters, b.threads_x, b.rows_y, (long long)b.blocks, (long long)b.n_partials,
                    (long long)b.loop_dwdb.col_tiles, (long long)b.loop_dwdb.n_chunks,
                    (long long)b.loop_dwdb.rows_per_chunk);
      }
  for (long long rows : {1LL, 100LL, 16384LL, 10000000LL})
    for (long long packs : {1LL, 48LL, 64LL, 100LL, 1000LL}) {
      const RowCopyPlan p = row_copy_plan(rows, packs);
      std::printf("copy %lld %lld %d %d %lld\n", rows, packs, p.threads_x, p.rows_y, (long long)p.blocks);
    }
  return 0;
}
"""


@pytest.fixture(scope="module")
def nvcc():
    path = gpu_model.nvcc_path()
    if path is None or gpu_model.csrc_dir() is None:
        pytest.skip("needs nvcc and the csrc/ of a source checkout")
    return path


def test_cuda_plans_match_cpp(nvcc, tmp_path):
    """cuda_plan's mirror (layer_norm_fwd_plan, layer_norm_bwd_plan, row_copy_plan) == the C++."""
    import subprocess

    src, exe = tmp_path / "plans.cu", tmp_path / "plans"
    src.write_text(_PLANS_CU)
    subprocess.run([nvcc, "-std=c++20", "-I", gpu_model.csrc_dir(), "-o", str(exe), str(src)], check=True,
                   capture_output=True, timeout=600)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout
    checked = 0
    for line in out.splitlines():
        kind, *v = line.split()
        v = [int(x) for x in v]
        if kind == "fwd":
            m, n, elem = v[:3]
            p = gpu_model.layer_norm_fwd_plan(m, n, elem)
            got = [int(p["registers"]), p["vec"], p["iters"], p["threads_x"], p["rows_y"], p["blocks"]]
        elif kind == "bwd":
            m, n, elem = v[:3]
            p = gpu_model.layer_norm_bwd_plan(m, n, elem)
            d = p["loop_dwdb"] or dict(col_tiles=0, n_chunks=0, rows_per_chunk=0)
            got = [int(p["registers"]), p["vec"], p["iters"], p["threads_x"], p["rows_y"], p["blocks"],
                   p["n_partials"], d["col_tiles"], d["n_chunks"], d["rows_per_chunk"]]
        else:
            rows, packs = v[:2]
            p = gpu_model.row_copy_plan(rows, packs)
            got = [p["threads_x"], p["rows_y"], p["blocks"]]
        n_key = 3 if kind in ("fwd", "bwd") else 2
        assert got == v[n_key:], f"{line}: python {got}"
        checked += 1
    assert checked > 400


@pytest.mark.parametrize("arch", ARCHS)
def test_cubin_has_every_kernel_the_plans_pick(nvcc, arch):
    """The generated instantiations compile without torch, and every launch of every modeled
    op (table grid and benchmark cases) finds its kernel's SASS."""
    kernels, source = gpu_model.cuda_kernels(arch)
    assert source["kind"] == "nvcc", source
    ops = [op for dtype in ("fp16", "bf16", "fp32") for n in gpu_model.MEMORY_NS + (1000, 20000)
           for rows in gpu_model.MEMORY_ROWS for op in gpu_model.memory_ops(rows, n, dtype)]
    missing = {launch["key"] for _, launches, _ in ops for launch in launches} - set(kernels)
    assert not missing, missing
    preds = gpu_model.memory_predictions({arch: kernels}, (arch,))
    assert len(preds) == len(gpu_model.GPUS_OF_ARCH[arch]) * (
        3 * len(gpu_model.BENCH_LAYER_NORM_SHAPES) + 2 * len(gpu_model.BENCH_PADDING_SHAPES))
    assert all(0 < p["hbm_fraction"] <= 1.0 + 1e-9 for p in preds), preds


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_norm_loads_in_flight(nvcc, arch):
    """The loads in flight per thread the memory model reads from the real LayerNorm register
    kernels (checked by hand against the SASS): the forward <fp16, 8, 3> issues its 3 x loads
    before the first use (the runtime ``if (residual)`` loads come after a branch, and the SASS
    unpacks x before it: they are not overlapped with x), the backward <fp16, 8, 2> its 2 dy and
    2 z loads (the 4-byte mean / rstd loads are not data). The function's innermost loop, the
    shared-memory fold, holds no global load."""
    kernels, _ = gpu_model.cuda_kernels(arch)
    for key, want in ((("layer_norm_fwd_reg_kernel", "fp16", (8, 3)), 3),
                      # N = 1024: all 4 x loads before the first use, fp16 as bf16 (ptxas had
                      # interleaved half-word copies after the second load of a predicated row)
                      (("layer_norm_fwd_reg_kernel", "fp16", (8, 4)), 4),
                      (("layer_norm_fwd_reg_kernel", "bf16", (8, 4)), 4),
                      (("layer_norm_bwd_reg_kernel", "fp16", (8, 2)), 4)):
        fn = kernels[key]["function"]
        assert "LDG" not in sass.analyse(fn).main.opcodes
        mem = sass.memory_main(fn, 16)
        assert mem.loads_in_flight == want, (key, mem.first_batch)
        assert all(fn.instrs[i].opcode.startswith("LDG.E.128") for i in mem.first_batch)
    m, n = 16384, 768
    fwd = gpu_model.memory_op_model("fwd", *gpu_model.layer_norm_fwd_launches(m, n, "fp16"), kernels,
                                    gpu_model.GPU_OF_ARCH[arch], dtype="fp16", n=n, rows=m)
    assert fwd["kernels"][0]["loads_in_flight"] == 3


def test_layer_norm_meets_issue_13_targets(nvcc):
    """Issue 13's modeled H100 targets where the two-launch backward can reach them: forward (and
    forward + residual) >= 85% of HBM at 16k rows and >= 60% at 1k rows, backward (dweight /
    dbias included) >= 85% at 16k rows and >= 60% at 1k rows for N >= 4096. At 1k rows and
    N <= 1024 the backward's two launches cost at least 2 x 2 x MEMORY_LATENCY_NS in the model
    (each: one round trip and the drain), more than 60% of the bandwidth allows; checked there
    only not to fall below today's figures."""
    kernels, _ = gpu_model.cuda_kernels(90)
    floor_1k_small_n = {768: 0.40, 1024: 0.48}
    for dtype in ("fp16", "bf16"):
        for n in gpu_model.MEMORY_NS:
            for rows in gpu_model.MEMORY_ROWS:
                for op, (launches, min_bytes) in (
                        ("fwd", gpu_model.layer_norm_fwd_launches(rows, n, dtype)),
                        ("fwd_residual", gpu_model.layer_norm_fwd_launches(rows, n, dtype, residual=True)),
                        ("bwd", gpu_model.layer_norm_bwd_launches(rows, n, dtype))):
                    r = gpu_model.memory_op_model(op, launches, min_bytes, kernels, "H100")
                    if rows == 16384:
                        want = 0.85
                    elif op == "bwd" and n in floor_1k_small_n:
                        want = floor_1k_small_n[n]
                    else:
                        want = 0.60
                    assert r["hbm_fraction"] >= want, (op, dtype, n, rows, r["hbm_fraction"], r["kernels"])
