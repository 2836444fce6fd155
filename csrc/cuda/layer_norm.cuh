// Fused (residual +) LayerNorm: CUDA device code only (no ATen, no launches).
//
// The same source is compiled by nvcc (csrc/cuda/layer_norm.cu) and by g++ against the host
// emulation of the CUDA execution model (tests/emulation/), so it keeps to that subset:
// static __shared__ arrays, __syncthreads, __shfl_xor_sync with a full mask, and block-uniform
// control flow around every barrier.
//
// T is the storage type (float, c10::Half, c10::BFloat16); all math is float. The row count M
// and every element offset are int64: M * N may exceed 2^31.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace bertkern {
namespace cuda {


// ---- Launch shapes, shared by the launcher (layer_norm.cu) and the host emulation ----------

// Elements per 16-byte access when the row length and every pointer allow it, else 1.
inline int layer_norm_vec(int64_t N, int elem_size, bool all_pointers_16b_aligned) {
  const int vec = 16 / elem_size;
  return (all_pointers_16b_aligned && N % vec == 0) ? vec : 1;
}

// Threads per row for a row of n_packs vector packs: enough to give each thread a couple of
// packs, a whole number of warps, at most 512 (two blocks fit an SM at high register counts).
inline int layer_norm_threads(int64_t n_packs) {
  int64_t threads = (n_packs + 1) / 2;
  threads = ((threads + kWarpSize - 1) / kWarpSize) * kWarpSize;
  if (threads < kWarpSize) threads = kWarpSize;
  if (threads > 512) threads = 512;
  return static_cast<int>(threads);
}

// Row kernels stride over rows; this many blocks keep every SM of an H100 busy many times over.
constexpr int64_t kMaxRowBlocks = 65536;
inline int64_t layer_norm_row_blocks(int64_t M) { return M < kMaxRowBlocks ? M : kMaxRowBlocks; }

// dweight/dbias stage 1 grid: column tiles x row chunks, aiming at ~1024 blocks in all, with
// each chunk a whole number of kRowThreads rows (at least 4 per thread).
constexpr int kColTile = 32;
constexpr int kRowThreads = 8;
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
constexpr int kFinalThreads = 256;  // stage 2: one thread per column

// ---- Device code -------------------------------------------------------------------------

// Welford state: running mean and sum of squared deviations of `count` values. Merging with
// Chan's formula keeps the variance exact for rows whose mean is large relative to their spread
// (a sum / sum-of-squares formula loses every digit there).
struct Welford {
  float mean;
  float m2;
  float count;
};

__device__ __forceinline__ Welford welford_merge(Welford a, Welford b) {
  const float count = a.count + b.count;
  if (count == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float b_share = b.count / count;
  Welford out;
  out.mean = a.mean + delta * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  out.count = count;
  return out;
}

__device__ __forceinline__ Welford warp_reduce(Welford w) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    Welford other;
    other.mean = __shfl_xor_sync(kFullMask, w.mean, offset);
    other.m2 = __shfl_xor_sync(kFullMask, w.m2, offset);
    other.count = __shfl_xor_sync(kFullMask, w.count, offset);
    w = welford_merge(w, other);
  }
  return w;
}

__device__ __forceinline__ float2 warp_reduce_sum(float2 v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v.x += __shfl_xor_sync(kFullMask, v.x, offset);
    v.y += __shfl_xor_sync(kFullMask, v.y, offset);
  }
  return v;
}

// Block-wide Welford merge; every thread gets the row's result. blockDim.x is a multiple of 32.
// Two barriers: warp results are complete before warp 0 reads them, and block_result is
// written before anyone reads it. Reuse on the next row is safe without a third: a thread
// reaches the next row's first barrier only after reading block_result, and block_result is
// rewritten only after that barrier.
__device__ __forceinline__ Welford block_reduce(Welford w) {
  __shared__ Welford warp_results[kMaxWarps];
  __shared__ Welford block_result;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  w = warp_reduce(w);
  if (lane == 0) warp_results[warp] = w;
  __syncthreads();
  if (warp == 0) {
    Welford v = lane < n_warps ? warp_results[lane] : Welford{0.f, 0.f, 0.f};
    v = warp_reduce(v);
    if (lane == 0) block_result = v;
  }
  __syncthreads();
  return block_result;
}

__device__ __forceinline__ float2 block_reduce_sum(float2 v) {
  __shared__ float2 warp_sums[kMaxWarps];
  __shared__ float2 block_sum;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  v = warp_reduce_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float2 s = lane < n_warps ? warp_sums[lane] : make_float2(0.f, 0.f);
    s = warp_reduce_sum(s);
    if (lane == 0) block_sum = s;
  }
  __syncthreads();
  return block_sum;
}

// Forward: one block per row (grid-stride over rows).
//   z = x + residual (rounded to T, as the unfused `x + residual` would be), stored to
//   residual_out when it is non-null; y = (z - mean) * rstd * weight + bias.
// N % VEC == 0 and every pointer 16-byte aligned when VEC > 1 (the launcher checks).
template <typename T, int VEC>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                      const T* __restrict__ weight, const T* __restrict__ bias,
                                      T* __restrict__ y, T* __restrict__ residual_out,
                                      float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                      int64_t M, int64_t N, float eps) {
  using P = Pack<T, VEC>;
  const int64_t n_packs = N / VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * N;
    const P* x_row = reinterpret_cast<const P*>(x + base);
    const P* r_row = residual ? reinterpret_cast<const P*>(residual + base) : nullptr;
    P* z_row = residual_out ? reinterpret_cast<P*>(residual_out + base) : nullptr;

    Welford w{0.f, 0.f, 0.f};
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      P xv = x_row[p];
      if (r_row) {
        const P rv = r_row[p];
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          xv.v[i] = static_cast<T>(static_cast<float>(xv.v[i]) + static_cast<float>(rv.v[i]));
        if (z_row) z_row[p] = xv;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float value = static_cast<float>(xv.v[i]);
        w.count += 1.f;
        const float delta = value - w.mean;
        w.mean += delta / w.count;
        w.m2 += delta * (value - w.mean);
      }
    }
    w = block_reduce(w);
    const float mean = w.mean;
    const float rstd = rsqrtf(w.m2 / static_cast<float>(N) + eps);
    if (threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }

    const P* w_vec = reinterpret_cast<const P*>(weight);
    const P* b_vec = reinterpret_cast<const P*>(bias);
    P* y_row = reinterpret_cast<P*>(y + base);
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      // Re-reading x (+ residual) here hits L2: a row is at most a few tens of KB.
      P zv = x_row[p];
      if (r_row) {
        const P rv = r_row[p];
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          zv.v[i] = static_cast<T>(static_cast<float>(zv.v[i]) + static_cast<float>(rv.v[i]));
      }
      P out;
      P wv, bv;
      if (weight) wv = w_vec[p];
      if (bias) bv = b_vec[p];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float v = (static_cast<float>(zv.v[i]) - mean) * rstd;
        if (weight) v *= static_cast<float>(wv.v[i]);
        if (bias) v += static_cast<float>(bv.v[i]);
        out.v[i] = static_cast<T>(v);
      }
      y_row[p] = out;
    }
  }
}

// Backward for dz, one block per row:
//   g = dy * weight, xhat = (z - mean) * rstd,
//   dz = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out).
template <typename T, int VEC>
__global__ void layer_norm_bwd_dz_kernel(const T* __restrict__ dy, const T* __restrict__ dresidual_out,
                                         const T* __restrict__ z, const float* __restrict__ mean_in,
                                         const float* __restrict__ rstd_in, const T* __restrict__ weight,
                                         T* __restrict__ dz, int64_t M, int64_t N) {
  using P = Pack<T, VEC>;
  const int64_t n_packs = N / VEC;
  const P* w_vec = reinterpret_cast<const P*>(weight);
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * N;
    const P* dy_row = reinterpret_cast<const P*>(dy + base);
    const P* z_row = reinterpret_cast<const P*>(z + base);
    const float mean = mean_in[row];
    const float rstd = rstd_in[row];

    float2 sums = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      const P dyv = dy_row[p];
      const P zv = z_row[p];
      P wv;
      if (weight) wv = w_vec[p];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float g = static_cast<float>(dyv.v[i]);
        if (weight) g *= static_cast<float>(wv.v[i]);
        const float xhat = (static_cast<float>(zv.v[i]) - mean) * rstd;
        sums.x += g;
        sums.y += g * xhat;
      }
    }
    sums = block_reduce_sum(sums);
    const float inv_n = 1.f / static_cast<float>(N);
    const float mean_g = sums.x * inv_n;
    const float mean_gx = sums.y * inv_n;

    const P* dr_row = dresidual_out ? reinterpret_cast<const P*>(dresidual_out + base) : nullptr;
    P* dz_row = reinterpret_cast<P*>(dz + base);
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      const P dyv = dy_row[p];
      const P zv = z_row[p];
      P wv, drv, out;
      if (weight) wv = w_vec[p];
      if (dr_row) drv = dr_row[p];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float g = static_cast<float>(dyv.v[i]);
        if (weight) g *= static_cast<float>(wv.v[i]);
        const float xhat = (static_cast<float>(zv.v[i]) - mean) * rstd;
        float d = rstd * (g - mean_g - xhat * mean_gx);
        if (dr_row) d += static_cast<float>(drv.v[i]);
        out.v[i] = static_cast<T>(d);
      }
      dz_row[p] = out;
    }
  }
}

// dweight / dbias, deterministically: no atomics, every sum in a fixed order.
// Stage 1: block (kColTile, kRowThreads), grid (column tiles, row chunks). Each block sums its
// chunk of rows for kColTile columns (consecutive threads read consecutive columns), folds the
// kRowThreads partial sums in shared memory in thread order, and writes one partial row
// per chunk: partial_dw / partial_db are (n_chunks, N) float.
template <typename T>
__global__ void layer_norm_bwd_dwdb_partial_kernel(const T* __restrict__ dy, const T* __restrict__ z,
                                                   const float* __restrict__ mean_in,
                                                   const float* __restrict__ rstd_in,
                                                   float* __restrict__ partial_dw,
                                                   float* __restrict__ partial_db, int64_t M,
                                                   int64_t N, int64_t rows_per_chunk) {
  __shared__ float tile_dw[kRowThreads][kColTile];
  __shared__ float tile_db[kRowThreads][kColTile];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t row_begin = chunk * rows_per_chunk;
  int64_t row_end = row_begin + rows_per_chunk;
  if (row_end > M) row_end = M;

  float dw = 0.f, db = 0.f;
  if (col < N) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowThreads) {
      const float g = static_cast<float>(dy[row * N + col]);
      const float xhat = (static_cast<float>(z[row * N + col]) - mean_in[row]) * rstd_in[row];
      dw += g * xhat;
      db += g;
    }
  }
  tile_dw[threadIdx.y][threadIdx.x] = dw;
  tile_db[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float sum_dw = 0.f, sum_db = 0.f;
    for (int r = 0; r < kRowThreads; ++r) {
      sum_dw += tile_dw[r][threadIdx.x];
      sum_db += tile_db[r][threadIdx.x];
    }
    partial_dw[chunk * N + col] = sum_dw;
    partial_db[chunk * N + col] = sum_db;
  }
}

// Stage 2: one thread per column sums the chunk partials in chunk order. Either output may be
// null (no weight / no bias).
template <typename T>
__global__ void layer_norm_bwd_dwdb_final_kernel(const float* __restrict__ partial_dw,
                                                 const float* __restrict__ partial_db,
                                                 T* __restrict__ dweight, T* __restrict__ dbias,
                                                 int64_t n_chunks, int64_t N) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= N) return;
  float dw = 0.f, db = 0.f;
  for (int64_t c = 0; c < n_chunks; ++c) {
    dw += partial_dw[c * N + col];
    db += partial_db[c * N + col];
  }
  if (dweight) dweight[col] = static_cast<T>(dw);
  if (dbias) dbias[col] = static_cast<T>(db);
}

}  // namespace cuda
}  // namespace bertkern
