// Fused (residual +) LayerNorm: CUDA device code only (no ATen, no launches). The launch plans
// (which kernel for which shape) are in layer_norm_launch.cuh.
//
// Two families of kernels:
//   register path (layer_norm_fwd_reg_kernel, layer_norm_bwd_reg_kernel): a row is held in
//     registers, ITERS packs of VEC elements per thread (compile-time, fully unrolled 16-byte
//     loads), so HBM is read once; blockDim.x threads per row and blockDim.y rows per block
//     (32 or 64 threads a row with several rows a block, or one row a block). The backward
//     also sums dweight / dbias per thread over the rows its block owns and writes one float
//     partial row per block, reduced in a fixed order by layer_norm_bwd_partials_reduce_kernel
//     (deterministic, no atomics, no zero-fill).
//   loop path (layer_norm_fwd_kernel, layer_norm_bwd_dz_kernel,
//     layer_norm_bwd_dwdb_partial_kernel, layer_norm_bwd_dwdb_final_kernel): any row length,
//     a block per row looping over it; only for rows longer than the register path holds.
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
#include <cstring>

#include "cuda/common.cuh"

// Storage types with a bit-level float conversion (pack_float); declared only, never used whole.
namespace c10 {
struct BFloat16;
}  // namespace c10
struct __nv_bfloat16;

namespace bertkern {
namespace cuda {


// Tile of the loop-path dweight/dbias kernel (layer_norm_bwd_dwdb_partial_kernel) and of the
// partial-row reduction (layer_norm_bwd_partials_reduce_kernel): kColTile columns x kRowThreads.
constexpr int kColTile = 32;
constexpr int kRowThreads = 8;
// The partial-row reduction's rows of threads (block kColTile x kReduceRowThreads): each
// thread walks n_partials / kReduceRowThreads partial rows (a few hundred partial rows: ~12).
constexpr int kReduceRowThreads = 32;

// Register path: at most this many threads per block (register caps <= 128: fwd_reg_cap),
// and at most kMaxMultiRowThreads threads per row when a block holds several rows.
constexpr int kMaxRegRowThreads = 512;
constexpr int kMaxMultiRowThreads = 64;


// Element j of a pack as float. bf16 packs are unpacked a 32-bit word at a time (the low
// element shifted into a float's upper half, the high one masked): exact, one instruction an
// element, and on sm_90 it keeps ptxas from holding a float copy of every element of the row
// (the element-wise c10::BFloat16 conversion took the forward <8, 4> kernel to 116 registers
// against fp16's 72). Other types: static_cast.
template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<c10::BFloat16> {
  static constexpr bool value = true;
};
template <>
struct IsBf16<__nv_bfloat16> {
  static constexpr bool value = true;
};

template <typename T, int VEC>
__device__ __forceinline__ float pack_float(const Pack<T, VEC>& p, int j) {
  if constexpr (IsBf16<T>::value && VEC % 2 == 0) {
    static_assert(sizeof(T) == 2, "bf16 storage is 16 bits");
    uint32_t word;
    memcpy(&word, reinterpret_cast<const char*>(&p) + 4 * (j / 2), 4);
    const uint32_t bits = (j % 2) ? (word & 0xffff0000u) : (word << 16);
    float f;
    memcpy(&f, &bits, 4);
    return f;
  } else {
    return static_cast<float>(p.v[j]);
  }
}

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

// ---- Loop path (rows too long to hold in registers) ---------------------------------------
//
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

// Register caps of the register-path kernels (BERTKERN_MAXNREG: __maxnreg__, in place of
// __launch_bounds__(kMaxRegRowThreads, 1), which allowed 128 for every shape; the two cannot be
// combined). A block of up to kMaxRegRowThreads threads still fits an SM (cap * 512 <= 65536),
// and the shapes that hold a small slice of a row per thread get a lower cap so more blocks are
// resident: forward 56 (9 blocks of 128 threads an SM) or 72 (7), backward 80 (3 blocks of
// 256). Chosen from ptxas -v on sm_80 / sm_90: zero spills for every instantiated shape
// (tests/test_aot_cuda.py and tests/test_gpu_model.py check).
template <typename T, int VEC, int ITERS>
constexpr int fwd_reg_cap() {
  constexpr int bytes = ITERS * VEC * static_cast<int>(sizeof(T));
  if (VEC == 1) return ITERS <= 4 ? 56 : ITERS <= 8 ? 64 : 128;
  return bytes <= 48 ? 56 : bytes <= 64 ? 72 : 128;
}
template <typename T, int VEC, int ITERS>
constexpr int bwd_reg_cap() {
  return (VEC == 1 || ITERS * VEC * static_cast<int>(sizeof(T)) <= 32) ? 80 : 128;
}

// ---- Register path -----------------------------------------------------------------------

// Sum of v over the threads of one row, in a fixed order (identical in every thread of the
// row). blockDim.x == 32: a warp per row, shuffles only. blockDim.x > 32: several warps per row
// (blockDim.y rows of blockDim.x threads) and every thread of the block must call this
// (block-uniform, inactive rows too): warp sums go to scratch[warp] (kMaxWarps entries), one
// barrier, and every thread adds its row's warp sums in warp order. The caller alternates
// between two scratch arrays from one call to the next: a thread may write the next call's
// scratch while others still read this one's, but it cannot write this one again before
// everybody has passed the next call's barrier, which follows their reads.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float2 warp_sum(float2 v) { return warp_reduce_sum(v); }

__device__ __forceinline__ void add_to(float& a, float b) { a += b; }
__device__ __forceinline__ void add_to(float2& a, float2 b) {
  a.x += b.x;
  a.y += b.y;
}

template <typename V>
__device__ __forceinline__ V row_sum(V v, V* scratch) {
  v = warp_sum(v);
  if (blockDim.x > kWarpSize) {
    const int warps_per_row = blockDim.x / kWarpSize;
    V* row_scratch = scratch + threadIdx.y * warps_per_row;
    if (threadIdx.x % kWarpSize == 0) row_scratch[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    v = row_scratch[0];
    for (int w = 1; w < warps_per_row; ++w) add_to(v, row_scratch[w]);
  }
  return v;
}

// Pack index of a thread's i-th pack: the packs of a row are dealt round-robin to its threads,
// so a warp's loads of one i are consecutive 16-byte words. A row has at most
// kMaxRowThreads * ITERS packs (int).
__device__ __forceinline__ int reg_pack(int i) { return i * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x); }

// Forward, register path. Each row: z = x (+ residual, rounded to T; stored to residual_out
// when non-null) held in registers (as T); mean = sum(z) / N; var = sum((z - mean)^2) / N from
// the registers (two passes over registers, no cancellation); y = (z - mean) * rstd * w + b.
// Requires n_packs = N / VEC <= ITERS * blockDim.x, N % VEC == 0 and, when VEC > 1, every
// pointer 16-byte aligned (the plan checks). Rows are grid-strided in groups of blockDim.y.
template <typename T, int VEC, int ITERS>
__global__ void BERTKERN_MAXNREG((fwd_reg_cap<T, VEC, ITERS>()))
    layer_norm_fwd_reg_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                              const T* __restrict__ weight, const T* __restrict__ bias,
                              T* __restrict__ y, T* __restrict__ residual_out,
                              float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t M,
                              int64_t N, float eps) {
  using P = Pack<T, VEC>;
  __shared__ float scratch[2][kMaxWarps];
  const int n_packs = static_cast<int>(N / VEC);
  const float inv_n = 1.f / static_cast<float>(N);
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < M;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool active = row < M;  // false only in the last group of rows
    if (!active && blockDim.x == kWarpSize) continue;  // a whole warp, no block barrier
    const int lim = active ? n_packs : 0;  // inactive rows of several warps: reductions only
    const int64_t base = active ? row * N : 0;
    const P* x_row = reinterpret_cast<const P*>(x + base);

    // Every pack loaded unconditionally (packs past the row, and inactive rows, re-read pack 0
    // of a valid row: L1 hits, ignored below): a load under `if (p < lim)` leaves the register
    // undefined on the other path, and for fp16 ptxas then merged each 16-bit half into a copy
    // (PRMT) between the loads, so the <fp16, 8, 4> kernel had 2 of its 4 loads in flight.
    P zv[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int p = reg_pack(i);
      zv[i] = x_row[p < lim ? p : 0];
    }
    if (residual) {
      // All loads first, then the math: ITERS independent 16-byte loads in flight per thread.
      const P* r_row = reinterpret_cast<const P*>(residual + base);
      P rv[ITERS];
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int p = reg_pack(i);
        if (p < lim) rv[i] = r_row[p];
      }
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        if (reg_pack(i) < lim) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            zv[i].v[j] = static_cast<T>(pack_float(zv[i], j) + pack_float(rv[i], j));
        }
      }
      if (residual_out) {
        P* z_row = reinterpret_cast<P*>(residual_out + base);
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
          const int p = reg_pack(i);
          if (p < lim) z_row[p] = zv[i];
        }
      }
    }
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      if (reg_pack(i) < lim) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += pack_float(zv[i], j);
      }
    }
    const float mean = row_sum(sum, scratch[0]) * inv_n;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      if (reg_pack(i) < lim) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = pack_float(zv[i], j) - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(row_sum(sq, scratch[1]) * inv_n + eps);
    if (active && threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    const P* w_vec = reinterpret_cast<const P*>(opaque(weight));
    const P* b_vec = reinterpret_cast<const P*>(opaque(bias));
    // weight / bias are L1 / L2 hits, loaded pack by pack (prefetching them all would double
    // the registers of a row).
    P* y_row = reinterpret_cast<P*>(y + base);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int p = reg_pack(i);
      if (p < lim) {
        P wv, bv, out;
        if (weight) wv = w_vec[p];
        if (bias) bv = b_vec[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float o = (pack_float(zv[i], j) - mean) * rstd;
          if (weight) o *= pack_float(wv, j);
          if (bias) o += pack_float(bv, j);
          out.v[j] = static_cast<T>(o);
        }
        y_row[p] = out;
      }
    }
  }
}

// Backward, register path, one pass over dy and z (and dresidual_out):
//   g = dy * weight, xhat = (z - mean) * rstd,
//   dz = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out),
// and, when partial_dw is non-null, per-thread sums of dy * xhat and dy over the rows the block
// owns (rows blockIdx.x * blockDim.y + threadIdx.y, strided by gridDim.x * blockDim.y: a
// fixed set for a fixed grid). At the end the blockDim.y rows of threads of a block fold
// their sums in shared memory in row order, and the block writes partial row blockIdx.x of
// partial_dw / partial_db ((gridDim.x, N) float each; every column written, no zero-fill).
// Same shape requirements as the forward. Registers per thread: dy and z (as T; xhat is
// recomputed in the second pass) and the two sums (float); weight is re-read per row and pass
// (L1 hits).
template <typename T, int VEC, int ITERS>
__global__ void BERTKERN_MAXNREG((bwd_reg_cap<T, VEC, ITERS>()))
    layer_norm_bwd_reg_kernel(const T* __restrict__ dy, const T* __restrict__ dresidual_out,
                              const T* __restrict__ z, const float* __restrict__ mean_in,
                              const float* __restrict__ rstd_in, const T* __restrict__ weight,
                              T* __restrict__ dz, float* __restrict__ partial_dw,
                              float* __restrict__ partial_db, int64_t M, int64_t N) {
  using P = Pack<T, VEC>;
  constexpr int kCols = ITERS * VEC * kMaxMultiRowThreads;  // columns of one row's threads
  __shared__ float2 scratch[2][kMaxWarps];
  __shared__ float fold_dw[kCols];
  __shared__ float fold_db[kCols];
  const int n_packs = static_cast<int>(N / VEC);
  const float inv_n = 1.f / static_cast<float>(N);
  float acc_dw[ITERS][VEC], acc_db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc_dw[i][j] = acc_db[i][j] = 0.f;
  }
  int parity = 0;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < M;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool active = row < M;  // false only in the last group of rows
    if (!active && blockDim.x == kWarpSize) continue;  // a whole warp, no block barrier
    const int lim = active ? n_packs : 0;  // inactive rows of several warps: reductions only
    const int64_t base = active ? row * N : 0;
    const P* dy_row = reinterpret_cast<const P*>(dy + base);
    const P* z_row = reinterpret_cast<const P*>(z + base);
    P dyv[ITERS], zv[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int p = reg_pack(i);
      if (p < lim) {
        dyv[i] = dy_row[p];
        zv[i] = z_row[p];
      }
    }
    const float mean = active ? mean_in[row] : 0.f;
    const float rstd = active ? rstd_in[row] : 0.f;
    const P* w_vec = reinterpret_cast<const P*>(opaque(weight));
    float2 sums = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int p = reg_pack(i);
      if (p < lim) {
        P wv;
        if (weight) wv = w_vec[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = pack_float(dyv[i], j);
          const float xhat = (pack_float(zv[i], j) - mean) * rstd;
          const float g = weight ? d * pack_float(wv, j) : d;
          sums.x += g;
          sums.y += g * xhat;
          acc_dw[i][j] += d * xhat;
          acc_db[i][j] += d;
        }
      }
    }
    sums = row_sum(sums, scratch[parity]);
    parity ^= 1;
    const float mean_g = sums.x * inv_n;
    const float mean_gx = sums.y * inv_n;
    const P* w_vec2 = reinterpret_cast<const P*>(opaque(weight));
    const P* dr_row = dresidual_out ? reinterpret_cast<const P*>(dresidual_out + base) : nullptr;
    P* dz_row = reinterpret_cast<P*>(dz + base);
    P drv[ITERS];  // all loads first: ITERS independent loads in flight
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int p = reg_pack(i);
      if (dr_row && p < lim) drv[i] = dr_row[p];
    }
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int p = reg_pack(i);
      if (p < lim) {
        P wv, out;
        if (weight) wv = w_vec2[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = pack_float(dyv[i], j);
          const float g = weight ? d * pack_float(wv, j) : d;
          // xhat again from z (a pack of T, not VEC floats, stays live between the passes).
          const float xhat = (pack_float(zv[i], j) - mean) * rstd;
          float o = rstd * (g - mean_g - xhat * mean_gx);
          if (dr_row) o += pack_float(drv[i], j);
          out.v[j] = static_cast<T>(o);
        }
        dz_row[p] = out;
      }
    }
  }
  if (partial_dw == nullptr) return;  // kernel-uniform: no dweight / dbias wanted

  // Blocks of several rows (blockDim.x <= kMaxMultiRowThreads): fold the sums of rows
  // 1..blockDim.y-1 into row 0's threads, in row order.
  if (blockDim.y > 1) {
    for (unsigned s = 1; s < blockDim.y; ++s) {
      if (threadIdx.y == s) {
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int c = reg_pack(i) * VEC + j;
            fold_dw[c] = acc_dw[i][j];
            fold_db[c] = acc_db[i][j];
          }
        }
      }
      __syncthreads();
      if (threadIdx.y == 0) {
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int c = reg_pack(i) * VEC + j;
            acc_dw[i][j] += fold_dw[c];
            acc_db[i][j] += fold_db[c];
          }
        }
      }
      __syncthreads();
    }
    if (threadIdx.y != 0) return;
  }
  float* out_dw = partial_dw + static_cast<int64_t>(blockIdx.x) * N;
  float* out_db = partial_db + static_cast<int64_t>(blockIdx.x) * N;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int p = reg_pack(i);
    if (p < n_packs) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out_dw[p * VEC + j] = acc_dw[i][j];
        out_db[p * VEC + j] = acc_db[i][j];
      }
    }
  }
}

// dweight / dbias from n_partials float partial rows ((n_partials, N) each), deterministically:
// block (kColTile, kReduceRowThreads), grid ceil(N / kColTile). Thread (c, r) sums partial rows
// r, r + kReduceRowThreads, ... of column c in order; thread (c, 0) then adds the
// kReduceRowThreads sums in order. Either output may be null.
template <typename T>
__global__ void layer_norm_bwd_partials_reduce_kernel(const float* __restrict__ partial_dw,
                                                      const float* __restrict__ partial_db,
                                                      T* __restrict__ dweight, T* __restrict__ dbias,
                                                      int64_t n_partials, int64_t N) {
  __shared__ float tile_dw[kReduceRowThreads][kColTile];
  __shared__ float tile_db[kReduceRowThreads][kColTile];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  float dw = 0.f, db = 0.f;
  if (col < N) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < n_partials; r += kReduceRowThreads) {
      dw += partial_dw[r * N + col];
      db += partial_db[r * N + col];
    }
  }
  tile_dw[threadIdx.y][threadIdx.x] = dw;
  tile_db[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float sum_dw = 0.f, sum_db = 0.f;
    for (int r = 0; r < kReduceRowThreads; ++r) {
      sum_dw += tile_dw[r][threadIdx.x];
      sum_db += tile_db[r][threadIdx.x];
    }
    if (dweight) dweight[col] = static_cast<T>(sum_dw);
    if (dbias) dbias[col] = static_cast<T>(sum_db);
  }
}

}  // namespace cuda
}  // namespace bertkern
