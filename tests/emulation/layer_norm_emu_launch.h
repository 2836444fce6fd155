// Host launcher for the LayerNorm kernels of csrc/cuda/layer_norm.cuh through the CUDA host
// emulation: the same launch plan as the real CUDA launcher (csrc/cuda/layer_norm.cu), on raw
// host pointers. Shared by the torch test extension (emulated_ops.cpp) and the standalone
// ThreadSanitizer driver (tsan_main.cpp); no torch dependency.
//
// Launch plan (what layer_norm.cu does on the GPU):
//   VEC   = layer_norm_vec(N, sizeof(T), every data pointer 16-byte aligned), in {1, 16/sizeof(T)}
//   fwd, bwd dz: grid layer_norm_row_blocks(M), block layer_norm_threads(N / VEC)
//   dweight/dbias: plan = layer_norm_dwdb_plan(M, N); partial kernel on grid
//     (plan.col_tiles, plan.n_chunks), block (kColTile, kRowThreads) into float (n_chunks, N)
//     buffers; final kernel on grid ceil(N / kFinalThreads), block kFinalThreads.
// Callers handle M == 0 and N == 0 (no launch) themselves.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_host_emu.h"
#include "cuda/layer_norm.cuh"

namespace emu_layer_norm {

using bertkern::cuda::DwDbPlan;

// Test hook: when > 0, the row kernels use at most this many blocks (instead of
// kMaxRowBlocks), so a small M exercises the grid-stride loop over rows that only M > 65536
// reaches on the GPU. 0: the real plan.
inline int64_t& row_block_cap() {
  static int64_t cap = 0;
  return cap;
}

inline unsigned row_grid(int64_t M) {
  int64_t blocks = bertkern::cuda::layer_norm_row_blocks(M);
  if (row_block_cap() > 0 && blocks > row_block_cap()) blocks = row_block_cap();
  return static_cast<unsigned>(blocks);
}

inline unsigned checked_dim(int64_t v, const char* what) {
  if (v <= 0 || v > 2147483647) throw std::invalid_argument(std::string("grid dimension out of range: ") + what);
  return static_cast<unsigned>(v);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename T>
int pick_vec(int64_t N, std::initializer_list<const void*> pointers) {
  bool aligned = true;
  for (const void* p : pointers) aligned = aligned && aligned16(p);  // nullptr is aligned
  const int vec = bertkern::cuda::layer_norm_vec(N, static_cast<int>(sizeof(T)), aligned);
  if (vec != 1 && vec != static_cast<int>(16 / sizeof(T)))
    throw std::logic_error("layer_norm_vec returned an unexpected VEC " + std::to_string(vec));
  return vec;
}

// Returns the VEC it ran with. M > 0, N > 0.
template <typename T>
int fwd(const T* x, const T* residual, const T* weight, const T* bias, T* y, T* residual_out,
        float* mean, float* rstd, int64_t M, int64_t N, float eps) {
  using namespace bertkern::cuda;
  constexpr int kVec = 16 / sizeof(T);
  const int vec = pick_vec<T>(N, {x, residual, weight, bias, y, residual_out});
  const dim3 grid(row_grid(M));
  const dim3 block(static_cast<unsigned>(layer_norm_threads(N / vec)));
  if (vec == kVec) {
    emu::launch(grid, block, layer_norm_fwd_kernel<T, kVec>, x, residual, weight, bias, y,
                residual_out, mean, rstd, M, N, eps);
  } else {
    emu::launch(grid, block, layer_norm_fwd_kernel<T, 1>, x, residual, weight, bias, y,
                residual_out, mean, rstd, M, N, eps);
  }
  return vec;
}

// dz only. Returns the VEC it ran with. M > 0, N > 0.
template <typename T>
int bwd_dz(const T* dy, const T* dresidual_out, const T* z, const float* mean, const float* rstd,
           const T* weight, T* dz, int64_t M, int64_t N) {
  using namespace bertkern::cuda;
  constexpr int kVec = 16 / sizeof(T);
  const int vec = pick_vec<T>(N, {dy, dresidual_out, z, weight, dz});
  const dim3 grid(row_grid(M));
  const dim3 block(static_cast<unsigned>(layer_norm_threads(N / vec)));
  if (vec == kVec) {
    emu::launch(grid, block, layer_norm_bwd_dz_kernel<T, kVec>, dy, dresidual_out, z, mean, rstd,
                weight, dz, M, N);
  } else {
    emu::launch(grid, block, layer_norm_bwd_dz_kernel<T, 1>, dy, dresidual_out, z, mean, rstd,
                weight, dz, M, N);
  }
  return vec;
}

// dweight = sum over rows of dy * xhat, dbias = sum over rows of dy; either output may be null.
// M > 0, N > 0. Returns the plan it used.
template <typename T>
DwDbPlan bwd_dwdb(const T* dy, const T* z, const float* mean, const float* rstd, T* dweight,
                  T* dbias, int64_t M, int64_t N) {
  using namespace bertkern::cuda;
  const DwDbPlan plan = layer_norm_dwdb_plan(M, N);
  std::vector<float> partial_dw(static_cast<size_t>(plan.n_chunks * N));
  std::vector<float> partial_db(static_cast<size_t>(plan.n_chunks * N));
  emu::launch(dim3(checked_dim(plan.col_tiles, "col_tiles"), checked_dim(plan.n_chunks, "n_chunks")),
              dim3(kColTile, kRowThreads), layer_norm_bwd_dwdb_partial_kernel<T>, dy, z, mean, rstd,
              partial_dw.data(), partial_db.data(), M, N, plan.rows_per_chunk);
  emu::launch(dim3(checked_dim((N + kFinalThreads - 1) / kFinalThreads, "final blocks")),
              dim3(kFinalThreads), layer_norm_bwd_dwdb_final_kernel<T>,
              static_cast<const float*>(partial_dw.data()),
              static_cast<const float*>(partial_db.data()), dweight, dbias, plan.n_chunks, N);
  return plan;
}

}  // namespace emu_layer_norm
