// Launch plans of the fused (residual +) LayerNorm kernels (layer_norm.cuh), written once.
//
// The same code plans and issues the launches on the GPU (layer_norm.cu, with a launcher that
// does `kernel<<<grid, block, 0, stream>>>(args...)`) and in the host emulation
// (tests/emulation/, with a launcher that calls emu::launch), so the emulation tests the real
// plans. No ATen here: callers allocate outputs and the float workspace the plan asks for.
//
// A launcher is any callable `launch(dim3 grid, dim3 block, kernel, args...)`.
//
// Plans (P = N / VEC packs of VEC elements; VEC = 16 / sizeof(T) when N % VEC == 0 and every
// pointer is 16-byte aligned, else 1):
//   register path: ITERS packs per thread, from the instantiated set RegIters<VEC>, with
//     ITERS * VEC <= fwd_max_elems(VEC) (32; 16 unvectorized) in the forward and
//     bwd_max_elems(VEC) (16; 8 unvectorized) in the backward: zero spills under the register
//     caps of layer_norm.cuh (fwd_reg_cap / bwd_reg_cap, <= 128: 512 threads a block fit).
//     * several rows a block, N <= 1024: 32 threads a row if a warp holds the row, else 64;
//       kFwdBlockThreads (128) / kBwdBlockThreads (256) threads a block; ITERS = the smallest
//       in the set >= ceil(P / threads a row);
//     * a block per row otherwise: ITERS = the smallest in the set >= ceil(P / 128) (the
//       largest if none), threads = ceil(P / ITERS) rounded up to whole warps (<= 512).
//     Forward grid: one block per group of rows, at most kMaxRowBlocks (grid-stride beyond).
//     Backward grid: the same, capped at the blocks an H100 holds at once (kBwdSMs x
//     floor(kBwdThreadsPerSM / threads a block)) and at clamp(ceil(M / kBwdMinRowsPerBlock),
//     kBwdMinPartials, kBwdMaxPartials) (128..256; fixed for a given M and N, so the dweight /
//     dbias sums have a fixed order): every block writes one float
//     partial row of dweight and of dbias, and layer_norm_bwd_partials_reduce_kernel sums
//     them in block order.
//     HBM traffic: forward reads x (+ residual) once and writes y (+ residual_out) once;
//     backward reads dy, z (+ dresidual_out) once and writes dz once, plus the partial rows
//     (blocks x N x 8 bytes, written and read once: ~2% of the traffic at M = 16384).
//   loop path (rows longer than 512 threads' registers hold: forward N > 16384 (VEC > 1) /
//     8192 (VEC 1), backward N > 8192 / 4096): a block of layer_norm_threads(P) threads per
//     row looping over it (the forward reads x twice, the second time mostly from L2), and the
//     backward's dweight / dbias from a separate column-tiled pass (layer_norm_dwdb_plan).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/layer_norm.cuh"

namespace bertkern {
namespace cuda {

// ---- Instantiated register-path shapes --------------------------------------------------

template <int... Is>
struct IntList {};

// ITERS (packs per thread) instantiated for each VEC, ascending.
template <int VEC>
struct RegIters;
template <>
struct RegIters<1> {
  using type = IntList<1, 2, 4, 8, 16>;
};
template <>
struct RegIters<4> {
  using type = IntList<1, 2, 3, 4, 6, 8>;
};
template <>
struct RegIters<8> {
  using type = IntList<1, 2, 3, 4>;
};

// Row elements per thread held in registers (zero spills under the register caps of
// layer_norm.cuh, at most 128; scalar elements cost more registers than packed ones).
constexpr int kFwdMaxElems = 32;
constexpr int kBwdMaxElems = 16;  // backward: dy, z and the dweight / dbias sums
constexpr int kBwdMaxScalarElems = 8;
inline int fwd_max_elems(int vec) { return vec == 1 ? 16 : kFwdMaxElems; }
inline int bwd_max_elems(int vec) { return vec == 1 ? kBwdMaxScalarElems : kBwdMaxElems; }
// Rows up to kMultiRowMaxN: several rows a block, 32 or 64 (kMaxMultiRowThreads) threads a row.
constexpr int64_t kMultiRowMaxN = 1024;
constexpr int kFwdBlockThreads = 128;  // threads of a several-rows block
constexpr int kBwdBlockThreads = 256;
constexpr int kMaxRowThreads = kMaxRegRowThreads;  // register path; the loop path: <= 512 too
// Row kernels stride over rows; this many blocks keep every SM of an H100 busy many times over.
constexpr int64_t kMaxRowBlocks = 65536;
// Backward grid: enough threads to keep HBM busy, few enough that the partial rows stay a few
// percent of the traffic (each block owns >= M / blocks rows): the blocks an H100 (kBwdSMs SMs)
// holds at the backward's register cap (bwd_reg_cap: 80 registers, 25 warps an SM), i.e.
// kBwdSMs x floor(kBwdThreadsPerSM / threads a block): 3 blocks of 256 threads an SM, 1 of 512.
// Constants, not read from the device: the grid, hence the order of the dweight / dbias sums,
// depends on M and N only (the same bits on every GPU).
constexpr int64_t kBwdSMs = 132;
constexpr int64_t kBwdThreadsPerSM = 3 * kBwdBlockThreads;  // 768
constexpr int64_t kBwdThreadsInFlight = kBwdSMs * kBwdThreadsPerSM;  // 101376: the cap's bound
// And the partial rows: at most kBwdMaxPartials (256: two batches of the reduction's loads,
// 4 rows x kReduceRowThreads; ~2% of the traffic at M = 16384), and each block owns at least
// kBwdMinRowsPerBlock rows unless that leaves fewer than kBwdMinPartials blocks: at M = 1024
// and N = 4096, 396 blocks of ~2.6 rows wrote partial rows half as large as dy and z, and the
// reduction read them back. Fewer blocks cost memory-level parallelism, more cost partial rows
// and reduction rounds (static model, python -m bertkern.bench gpu-model: 128 at M = 1024,
// 256 at M = 16384 are the best of the grids it tried, A100 and H100).
constexpr int64_t kBwdMaxPartials = 256;
constexpr int64_t kBwdMinPartials = 128;
constexpr int64_t kBwdMinRowsPerBlock = 8;
constexpr int kFinalThreads = 256;  // loop path dweight / dbias stage 2: one thread per column

// Elements per 16-byte access when the row length and every pointer allow it, else 1.
inline int layer_norm_vec(int64_t N, int elem_size, bool all_pointers_16b_aligned) {
  const int vec = 16 / elem_size;
  return (all_pointers_16b_aligned && N % vec == 0) ? vec : 1;
}

// Loop path: threads per row for a row of n_packs packs: a couple of packs per thread, whole
// warps, at most 512.
inline int layer_norm_threads(int64_t n_packs) {
  int64_t threads = (n_packs + 1) / 2;
  threads = ((threads + kWarpSize - 1) / kWarpSize) * kWarpSize;
  if (threads < kWarpSize) threads = kWarpSize;
  if (threads > 512) threads = 512;
  return static_cast<int>(threads);
}

// Loop path dweight/dbias stage 1 grid: column tiles x row chunks, aiming at ~1024 blocks in
// all, with each chunk a whole number of kRowThreads rows (at least 4 per thread).
struct DwDbPlan {
  int64_t col_tiles;
  int64_t n_chunks;
  int64_t rows_per_chunk;
};
inline DwDbPlan layer_norm_dwdb_plan(int64_t M, int64_t N) {
  DwDbPlan plan;
  plan.col_tiles = (N + kColTile - 1) / kColTile;
  int64_t chunks = 1024 / (plan.col_tiles > 0 ? plan.col_tiles : 1);
  const int64_t max_chunks = (M + 4 * kRowThreads - 1) / (4 * kRowThreads);
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks < 1) chunks = 1;
  if (chunks > 65535) chunks = 65535;  // gridDim.y limit
  int64_t rows = (M + chunks - 1) / chunks;
  rows = ((rows + kRowThreads - 1) / kRowThreads) * kRowThreads;
  plan.rows_per_chunk = rows > 0 ? rows : kRowThreads;
  plan.n_chunks = M > 0 ? (M + plan.rows_per_chunk - 1) / plan.rows_per_chunk : 1;
  return plan;
}

namespace detail {

template <int... Is>
int pick_iters(IntList<Is...>, int64_t need, int max_elems, int vec) {
  int best = 0;
  ((best == 0 && Is >= need && Is * vec <= max_elems ? (best = Is) : 0), ...);
  return best;
}

template <int... Is>
int max_iters(IntList<Is...>, int max_elems, int vec) {
  int best = 0;
  ((Is * vec <= max_elems ? (best = Is) : 0), ...);
  return best;
}

// Smallest instantiated ITERS >= need with ITERS * vec <= max_elems (need <= 0: 1); 0 if none.
inline int reg_iters_at_least(int vec, int64_t need, int max_elems) {
  if (need < 1) need = 1;
  switch (vec) {
    case 1: return pick_iters(RegIters<1>::type{}, need, max_elems, vec);
    case 4: return pick_iters(RegIters<4>::type{}, need, max_elems, vec);
    case 8: return pick_iters(RegIters<8>::type{}, need, max_elems, vec);
    default: return 0;
  }
}

inline int reg_iters_max(int vec, int max_elems) {
  switch (vec) {
    case 1: return max_iters(RegIters<1>::type{}, max_elems, vec);
    case 4: return max_iters(RegIters<4>::type{}, max_elems, vec);
    case 8: return max_iters(RegIters<8>::type{}, max_elems, vec);
    default: return 0;
  }
}

// Calls f(std::integral_constant<int, ITERS>{}) for the ITERS of the list equal to iters.
template <typename F, int... Is>
bool dispatch_iters(IntList<Is...>, int iters, F&& f) {
  return ((iters == Is ? (f(std::integral_constant<int, Is>{}), true) : false) || ...);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail

struct LayerNormPlan {
  bool registers = false;  // register path; else the loop path
  int vec = 1;
  int iters = 0;  // register path: packs per thread
  int threads_x = kWarpSize;
  int rows_y = 1;  // rows per block (warp per row), else 1
  int64_t blocks = 0;
  // backward only
  bool dwdb = false;           // dweight and/or dbias wanted
  int64_t n_partials = 0;      // register path: partial rows (= blocks)
  DwDbPlan loop_dwdb{0, 0, 0};  // loop path
  int64_t workspace_floats = 0;
};

// max_blocks: the grid cap (kMaxRowBlocks on the GPU; the emulation's tests lower it to run
// the grid-stride loops on small inputs).
inline LayerNormPlan layer_norm_row_plan(int64_t M, int64_t N, int vec, int max_elems,
                                         int block_threads, int64_t max_blocks) {
  LayerNormPlan plan;
  plan.vec = vec;
  const int64_t P = N / vec;
  int64_t row_groups = M;
  bool several_rows = false;
  if (N <= kMultiRowMaxN) {
    for (int tx = kWarpSize; tx <= kMaxMultiRowThreads && !several_rows; tx *= 2) {
      const int iters = detail::reg_iters_at_least(vec, detail::ceil_div(P, tx), max_elems);
      if (iters > 0) {
        several_rows = true;
        plan.registers = true;
        plan.iters = iters;
        plan.threads_x = tx;
        plan.rows_y = block_threads / tx;
        row_groups = detail::ceil_div(M, plan.rows_y);
      }
    }
  }
  if (!several_rows) {
    int iters = detail::reg_iters_at_least(vec, detail::ceil_div(P, 4 * kWarpSize), max_elems);
    if (iters == 0) iters = detail::reg_iters_max(vec, max_elems);
    const int64_t threads = detail::ceil_div(detail::ceil_div(P, iters), kWarpSize) * kWarpSize;
    if (iters > 0 && threads <= kMaxRowThreads) {
      plan.registers = true;
      plan.iters = iters;
      plan.threads_x = static_cast<int>(threads);
    } else {
      plan.threads_x = layer_norm_threads(P);
    }
    plan.rows_y = 1;
  }
  if (max_blocks < 1) max_blocks = 1;
  plan.blocks = row_groups < max_blocks ? row_groups : max_blocks;
  if (plan.blocks < 1) plan.blocks = 1;
  return plan;
}

// M > 0, N > 0 (callers handle empty inputs without a launch).
inline LayerNormPlan layer_norm_fwd_plan(int64_t M, int64_t N, int elem_size, bool all_aligned,
                                         int64_t max_blocks = kMaxRowBlocks) {
  const int vec = layer_norm_vec(N, elem_size, all_aligned);
  return layer_norm_row_plan(M, N, vec, fwd_max_elems(vec), kFwdBlockThreads, max_blocks);
}

inline LayerNormPlan layer_norm_bwd_plan(int64_t M, int64_t N, int elem_size, bool all_aligned,
                                         bool dwdb, int64_t max_blocks = kMaxRowBlocks) {
  const int vec = layer_norm_vec(N, elem_size, all_aligned);
  LayerNormPlan plan =
      layer_norm_row_plan(M, N, vec, bwd_max_elems(vec), kBwdBlockThreads, max_blocks);
  plan.dwdb = dwdb;
  if (plan.registers) {
    int64_t per_sm = kBwdThreadsPerSM / (static_cast<int64_t>(plan.threads_x) * plan.rows_y);
    if (per_sm < 1) per_sm = 1;
    const int64_t cap = kBwdSMs * per_sm;
    if (plan.blocks > cap) plan.blocks = cap;
    int64_t partials = detail::ceil_div(M, kBwdMinRowsPerBlock);
    if (partials < kBwdMinPartials) partials = kBwdMinPartials;
    if (partials > kBwdMaxPartials) partials = kBwdMaxPartials;
    if (plan.blocks > partials) plan.blocks = partials;
    plan.n_partials = plan.blocks;
    plan.workspace_floats = dwdb ? 2 * plan.n_partials * N : 0;
  } else {
    plan.loop_dwdb = layer_norm_dwdb_plan(M, N);
    plan.workspace_floats = dwdb ? 2 * plan.loop_dwdb.n_chunks * N : 0;
  }
  return plan;
}

// ---- Launches ------------------------------------------------------------------------------

// y = LayerNorm(x (+ residual)) (* weight) (+ bias); residual_out = x + residual when non-null.
// Pointers as in layer_norm_fwd_kernel; plan from layer_norm_fwd_plan with the same pointers'
// alignment.
template <typename T, typename Launch>
void layer_norm_fwd_launch(Launch&& launch, const LayerNormPlan& plan, const T* x, const T* residual,
                           const T* weight, const T* bias, T* y, T* residual_out, float* mean,
                           float* rstd, int64_t M, int64_t N, float eps) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  const dim3 block(static_cast<unsigned>(plan.threads_x), static_cast<unsigned>(plan.rows_y));
  auto with_vec = [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    if (!plan.registers) {
      launch(grid, block, layer_norm_fwd_kernel<T, VEC>, x, residual, weight, bias, y, residual_out,
             mean, rstd, M, N, eps);
      return;
    }
    detail::dispatch_iters(typename RegIters<VEC>::type{}, plan.iters, [&](auto iters_constant) {
      constexpr int ITERS = decltype(iters_constant)::value;
      if constexpr (ITERS * VEC <= (VEC == 1 ? 16 : kFwdMaxElems)) {
        launch(grid, block, layer_norm_fwd_reg_kernel<T, VEC, ITERS>, x, residual, weight, bias, y,
               residual_out, mean, rstd, M, N, eps);
      }
    });
  };
  if (plan.vec == 1) {
    with_vec(std::integral_constant<int, 1>{});
  } else {
    with_vec(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  }
}

// dz (and dweight / dbias when plan.dwdb: either output pointer may be null). workspace:
// plan.workspace_floats floats (uninitialized; null when 0).
template <typename T, typename Launch>
void layer_norm_bwd_launch(Launch&& launch, const LayerNormPlan& plan, float* workspace, const T* dy,
                           const T* dresidual_out, const T* z, const float* mean, const float* rstd,
                           const T* weight, T* dz, T* dweight, T* dbias, int64_t M, int64_t N) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  const dim3 block(static_cast<unsigned>(plan.threads_x), static_cast<unsigned>(plan.rows_y));
  auto with_vec = [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    if (plan.registers) {
      float* partial_dw = plan.dwdb ? workspace : nullptr;
      float* partial_db = plan.dwdb ? workspace + plan.n_partials * N : nullptr;
      detail::dispatch_iters(typename RegIters<VEC>::type{}, plan.iters, [&](auto iters_constant) {
        constexpr int ITERS = decltype(iters_constant)::value;
        if constexpr (ITERS * VEC <= (VEC == 1 ? kBwdMaxScalarElems : kBwdMaxElems)) {
          launch(grid, block, layer_norm_bwd_reg_kernel<T, VEC, ITERS>, dy, dresidual_out, z, mean,
                 rstd, weight, dz, partial_dw, partial_db, M, N);
        }
      });
      if (plan.dwdb) {
        launch(dim3(static_cast<unsigned>(detail::ceil_div(N, kColTile))), dim3(kColTile, kReduceRowThreads),
               layer_norm_bwd_partials_reduce_kernel<T>, static_cast<const float*>(partial_dw),
               static_cast<const float*>(partial_db), dweight, dbias, plan.n_partials, N);
      }
      return;
    }
    launch(grid, block, layer_norm_bwd_dz_kernel<T, VEC>, dy, dresidual_out, z, mean, rstd, weight,
           dz, M, N);
    if (plan.dwdb) {
      const DwDbPlan& p = plan.loop_dwdb;
      float* partial_dw = workspace;
      float* partial_db = workspace + p.n_chunks * N;
      launch(dim3(static_cast<unsigned>(p.col_tiles), static_cast<unsigned>(p.n_chunks)),
             dim3(kColTile, kRowThreads), layer_norm_bwd_dwdb_partial_kernel<T>, dy, z, mean, rstd,
             partial_dw, partial_db, M, N, p.rows_per_chunk);
      launch(dim3(static_cast<unsigned>(detail::ceil_div(N, kFinalThreads))), dim3(kFinalThreads),
             layer_norm_bwd_dwdb_final_kernel<T>, static_cast<const float*>(partial_dw),
             static_cast<const float*>(partial_db), dweight, dbias, p.n_chunks, N);
    }
  };
  if (plan.vec == 1) {
    with_vec(std::integral_constant<int, 1>{});
  } else {
    with_vec(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  }
}

}  // namespace cuda
}  // namespace bertkern
