// CPU LayerNorm over the last dimension, with an optionally fused residual add:
//   z = x (+ residual), y = (z - mean) * rstd * weight + bias.
// Forward and backward for float32, float16, bfloat16 and float64 (float64 for gradcheck).
//
// Work layout: rows are independent, so both directions parallelize over rows with
// bertkern::parallel_for (libtorch's intra-op pool). The row math always runs on float32 rows
// (double for float64): float32 tensors are used in place, float16 / bfloat16 rows are converted
// into a per-thread float32 scratch row and the results converted back, so one set of float
// kernels serves three dtypes.
//
// Vectorization: the extension is compiled without -mavx2 (it must load on any x86-64), which
// would leave portable vector code (such as ATen's at::vec) at SSE2. Instead the float row
// kernels are plain loops that GCC auto-vectorizes, compiled three times with target_clones
// (AVX-512, AVX2 + FMA, baseline) and picked once at load time by an ifunc resolver. The few
// kernels GCC cannot express (float16 conversion: convert.h; non-temporal stores: below) are
// intrinsics in per-ISA functions chosen at run time (cpu_features.h).
//
// Memory: in the forward, x (+ residual) is read from memory once; the statistics passes and
// the normalization pass then run on the row in L1. Rows are prefetched ahead, and outputs much
// larger than the cache are written with non-temporal stores (cache_hints.h).
//
// Numerics: mean and variance are two-pass over the row, accumulated in float32 (double) around
// a shift (the row's first value), so rows with a large mean and a small spread stay accurate.
//
// Determinism: dweight / dbias are reduced over rows in a fixed number of row chunks that
// depends only on the number of rows, each into its own partial row, then summed in chunk
// order: bitwise identical results whatever the number of threads, and no atomics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>


#include "cpu/cache_hints.h"
#include "cpu/convert.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_features.h"
#include "layer_norm_common.h"
#include "torch_api.h"


namespace bertkern {
namespace {

// Rows per parallel_for task: enough elements per task to amortize the task overhead.
constexpr int64_t kGrainElements = 16384;

int64_t row_grain(int64_t n) { return parallel_grain(kGrainElements, n); }

// ---------------------------------------------------------------------------------------------
// Row kernels, written once for float and double (acc_t is the element type of the row).
// Pointers that are null select a variant (no weight, no bias, no residual, ...), chosen outside
// the vectorized loops.
//
// Row sums are blocked: kLanes independent partial sums (lane j takes elements j, j + kLanes,
// ...), which GCC keeps in several vector registers. A plain "simd reduction" keeps one vector
// accumulator, and the add latency of that single chain, not memory, then bounds the row pass.
// The summation order depends on n only (and on the instruction set of the clone).
// ---------------------------------------------------------------------------------------------

constexpr int64_t kLanes = 64;  // 4 AVX-512 / 8 AVX2 registers of floats

template <typename acc_t, int64_t kWidth>
BERTKERN_ALWAYS_INLINE acc_t sum_lanes(const acc_t* __restrict part) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < kWidth; ++j) s += part[j];
  return s;
}

// Statistics of a row, kept as mean = shift + offset (see fwd_row_stats).
template <typename acc_t>
struct RowStats {
  acc_t shift, offset, rstd;
};

// Forward statistics of one row. in: the row when residual is null, else z = in + residual is
// computed into zbuf (an output row or a scratch row) on the way.
template <typename acc_t>
BERTKERN_ALWAYS_INLINE RowStats<acc_t> fwd_row_stats(const acc_t* __restrict in,
                                               const acc_t* __restrict residual,
                                               acc_t* __restrict zbuf, int64_t n, acc_t eps) {
  if (n == 0) return {acc_t(0), acc_t(0), acc_t(1) / std::sqrt(eps)};
  // Accuracy for rows whose mean is large compared with their spread: work on z - shift, with
  // shift = z[0]. Those differences are exact and small, so neither the row sum nor the
  // rounding of the mean to acc_t loses the spread; the variance is two-pass on top of that.
  const acc_t shift = residual != nullptr ? in[0] + residual[0] : in[0];
  const acc_t* z = in;
  alignas(64) acc_t part[kLanes] = {};
  const int64_t n_blocked = n - n % kLanes;
  if (residual != nullptr) {
    for (int64_t i = 0; i < n_blocked; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t v = in[i + j] + residual[i + j];
        zbuf[i + j] = v;
        part[j] += v - shift;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < n - n_blocked; ++j) {
      const acc_t v = in[n_blocked + j] + residual[n_blocked + j];
      zbuf[n_blocked + j] = v;
      part[j] += v - shift;
    }
    z = zbuf;
  } else {
    for (int64_t i = 0; i < n_blocked; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) part[j] += in[i + j] - shift;
    }
#pragma omp simd
    for (int64_t j = 0; j < n - n_blocked; ++j) part[j] += in[n_blocked + j] - shift;
  }
  const acc_t offset = sum_lanes<acc_t, kLanes>(part) / static_cast<acc_t>(n);  // mean - shift
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) part[j] = 0;
  for (int64_t i = 0; i < n_blocked; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = (z[i + j] - shift) - offset;
      part[j] += d * d;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n - n_blocked; ++j) {
    const acc_t d = (z[n_blocked + j] - shift) - offset;
    part[j] += d * d;
  }
  const acc_t sq = sum_lanes<acc_t, kLanes>(part);
  return {shift, offset, acc_t(1) / std::sqrt(sq / static_cast<acc_t>(n) + eps)};
}

// y = (z - mean) * rstd * weight + bias for one row.
template <typename acc_t>
BERTKERN_ALWAYS_INLINE void normalize_row(const acc_t* __restrict z, RowStats<acc_t> st,
                                    const acc_t* __restrict weight, const acc_t* __restrict bias,
                                    acc_t* __restrict y, int64_t n) {
  const acc_t shift = st.shift, offset = st.offset, rstd = st.rstd;
  if (weight != nullptr && bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = ((z[i] - shift) - offset) * rstd * weight[i] + bias[i];
  } else if (weight != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = ((z[i] - shift) - offset) * rstd * weight[i];
  } else if (bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = ((z[i] - shift) - offset) * rstd + bias[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = ((z[i] - shift) - offset) * rstd;
  }
}

// Forward of one row: statistics, then y. Writes y, *mean_out and *rstd_out.
template <typename acc_t>
BERTKERN_ALWAYS_INLINE void fwd_row(const acc_t* __restrict in, const acc_t* __restrict residual,
                              acc_t* __restrict zbuf, acc_t* __restrict y,
                              const acc_t* __restrict weight, const acc_t* __restrict bias,
                              int64_t n, acc_t eps, acc_t* mean_out, acc_t* rstd_out) {
  const RowStats<acc_t> st = fwd_row_stats<acc_t>(in, residual, zbuf, n, eps);
  *mean_out = st.shift + st.offset;
  *rstd_out = st.rstd;
  normalize_row<acc_t>(residual != nullptr ? zbuf : in, st, weight, bias, y, n);
}

// Element i of the first backward pass, summed into lane j.
template <typename acc_t, bool kWeight, bool kDweight, bool kDbias>
BERTKERN_ALWAYS_INLINE void bwd_sums_element(int64_t i, int64_t j, const acc_t* __restrict dy,
                                       const acc_t* __restrict z, acc_t mean, acc_t rstd,
                                       const acc_t* __restrict weight,
                                       acc_t* __restrict dweight_acc, acc_t* __restrict dbias_acc,
                                       acc_t* __restrict part_g, acc_t* __restrict part_gx) {
  const acc_t xhat = (z[i] - mean) * rstd;
  const acc_t g = kWeight ? dy[i] * weight[i] : dy[i];
  part_g[j] += g;
  part_gx[j] += g * xhat;
  if constexpr (kDweight) dweight_acc[i] += dy[i] * xhat;
  if constexpr (kDbias) dbias_acc[i] += dy[i];
}

// First backward pass over a row: sum(g) and sum(g * xhat), and the per-row contributions to
// dweight (dy * xhat) and dbias (dy), in one loop.
template <typename acc_t, bool kWeight, bool kDweight, bool kDbias>
BERTKERN_ALWAYS_INLINE void bwd_row_sums_impl(const acc_t* __restrict dy, const acc_t* __restrict z,
                                        acc_t mean, acc_t rstd, const acc_t* __restrict weight,
                                        acc_t* __restrict dweight_acc,
                                        acc_t* __restrict dbias_acc, int64_t n, acc_t* sums) {
  // Two sums per element: half as many lanes each, to stay within the registers.
  constexpr int64_t kW = kLanes / 2;
  alignas(64) acc_t part_g[kW] = {};
  alignas(64) acc_t part_gx[kW] = {};
  const int64_t n_blocked = n - n % kW;
  for (int64_t i = 0; i < n_blocked; i += kW) {
#pragma omp simd
    for (int64_t j = 0; j < kW; ++j) {
      bwd_sums_element<acc_t, kWeight, kDweight, kDbias>(i + j, j, dy, z, mean, rstd, weight,
                                                         dweight_acc, dbias_acc, part_g, part_gx);
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n - n_blocked; ++j) {
    bwd_sums_element<acc_t, kWeight, kDweight, kDbias>(n_blocked + j, j, dy, z, mean, rstd, weight,
                                                       dweight_acc, dbias_acc, part_g, part_gx);
  }
  sums[0] = sum_lanes<acc_t, kW>(part_g);
  sums[1] = sum_lanes<acc_t, kW>(part_gx);
}

// mean(g) and mean(g * xhat) of a row (n > 0), and its dweight / dbias contributions when
// dweight_acc / dbias_acc are not null.
template <typename acc_t>
struct BwdRowSums {
  acc_t mean_g, mean_gx;
};

template <typename acc_t>
BERTKERN_ALWAYS_INLINE BwdRowSums<acc_t> bwd_row_sums(const acc_t* __restrict dy,
                                                const acc_t* __restrict z, acc_t mean, acc_t rstd,
                                                const acc_t* __restrict weight,
                                                acc_t* __restrict dweight_acc,
                                                acc_t* __restrict dbias_acc, int64_t n) {
  acc_t sums[2];
  const bool has_w = weight != nullptr;
  const bool has_dw = dweight_acc != nullptr, has_db = dbias_acc != nullptr;
  // The variant is picked here, outside the vectorized loop.
#define BERTKERN_SUMS(W, DW, DB) \
  bwd_row_sums_impl<acc_t, W, DW, DB>(dy, z, mean, rstd, weight, dweight_acc, dbias_acc, n, sums)
  if (has_w && has_dw && has_db) {
    BERTKERN_SUMS(true, true, true);
  } else if (has_w && has_dw) {
    BERTKERN_SUMS(true, true, false);
  } else if (has_w && has_db) {
    BERTKERN_SUMS(true, false, true);
  } else if (has_w) {
    BERTKERN_SUMS(true, false, false);
  } else if (has_db) {  // no weight: no dweight either
    BERTKERN_SUMS(false, false, true);
  } else {
    BERTKERN_SUMS(false, false, false);
  }
#undef BERTKERN_SUMS
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  return {sums[0] * inv_n, sums[1] * inv_n};
}

// dz = rstd * (dy * weight - mean_g - xhat * mean_gx) (+ dresidual) for one row. Subtract before
// scaling by rstd: when the row is (nearly) constant, g - mean_g cancels to (nearly) 0, and rstd
// (up to 1/sqrt(eps)) must not amplify the rounding of that difference.
template <typename acc_t>
BERTKERN_ALWAYS_INLINE void dz_row(const acc_t* __restrict dy, const acc_t* __restrict z, acc_t mean,
                             acc_t rstd, const acc_t* __restrict weight,
                             const acc_t* __restrict dresidual, BwdRowSums<acc_t> sums,
                             acc_t* __restrict dz, int64_t n) {
  const acc_t mean_g = sums.mean_g, mean_gx = sums.mean_gx;
  if (weight != nullptr && dresidual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xhat = (z[i] - mean) * rstd;
      dz[i] = rstd * (dy[i] * weight[i] - mean_g - xhat * mean_gx) + dresidual[i];
    }
  } else if (weight != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xhat = (z[i] - mean) * rstd;
      dz[i] = rstd * (dy[i] * weight[i] - mean_g - xhat * mean_gx);
    }
  } else if (dresidual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xhat = (z[i] - mean) * rstd;
      dz[i] = rstd * (dy[i] - mean_g - xhat * mean_gx) + dresidual[i];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xhat = (z[i] - mean) * rstd;
      dz[i] = rstd * (dy[i] - mean_g - xhat * mean_gx);
    }
  }
}

// Backward of one row: dz = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual), with
// xhat = (z - mean) * rstd and g = dy * weight. Adds dy * xhat into dweight_acc and dy into
// dbias_acc when those are not null.
template <typename acc_t>
BERTKERN_ALWAYS_INLINE void bwd_row(const acc_t* __restrict dy, const acc_t* __restrict z, acc_t mean,
                              acc_t rstd, const acc_t* __restrict weight,
                              const acc_t* __restrict dresidual, acc_t* __restrict dz,
                              acc_t* __restrict dweight_acc, acc_t* __restrict dbias_acc,
                              int64_t n) {
  if (n == 0) return;
  if (n == 1) {
    // A single element normalizes to 0 (xhat = 0) whatever its value: dz is exactly 0. The
    // general formula gets there only up to rstd (~1/sqrt(eps)) times a rounding error, because
    // the compiler may fuse dy * weight into a multiply-add differently in its two uses.
    dz[0] = dresidual != nullptr ? dresidual[0] : acc_t(0);
    if (dbias_acc != nullptr) dbias_acc[0] += dy[0];
    if (dweight_acc != nullptr) dweight_acc[0] += dy[0] * ((z[0] - mean) * rstd);
    return;
  }
  const BwdRowSums<acc_t> sums =
      bwd_row_sums<acc_t>(dy, z, mean, rstd, weight, dweight_acc, dbias_acc, n);
  dz_row<acc_t>(dy, z, mean, rstd, weight, dresidual, sums, dz, n);
}

// The float versions are the hot ones: clone them per ISA. (target_clones needs non-template
// functions; the always_inline bodies above are compiled anew inside each clone.)
BERTKERN_MULTIVERSION
void fwd_row_f32(const float* in, const float* residual, float* zbuf, float* y, const float* weight,
                 const float* bias, int64_t n, float eps, float* mean_out, float* rstd_out) {
  fwd_row<float>(in, residual, zbuf, y, weight, bias, n, eps, mean_out, rstd_out);
}

BERTKERN_MULTIVERSION
RowStats<float> fwd_row_stats_f32(const float* in, const float* residual, float* zbuf, int64_t n,
                                  float eps) {
  return fwd_row_stats<float>(in, residual, zbuf, n, eps);
}

BERTKERN_MULTIVERSION
BwdRowSums<float> bwd_row_sums_f32(const float* dy, const float* z, float mean, float rstd,
                                   const float* weight, float* dweight_acc, float* dbias_acc,
                                   int64_t n) {
  return bwd_row_sums<float>(dy, z, mean, rstd, weight, dweight_acc, dbias_acc, n);
}

BERTKERN_MULTIVERSION
void bwd_row_f32(const float* dy, const float* z, float mean, float rstd, const float* weight,
                 const float* dresidual, float* dz, float* dweight_acc, float* dbias_acc,
                 int64_t n) {
  bwd_row<float>(dy, z, mean, rstd, weight, dresidual, dz, dweight_acc, dbias_acc, n);
}

// Sums `chunks` partial rows of length n (chunk-major) into out[0:n], in chunk order.
BERTKERN_MULTIVERSION
void sum_partials_f32(const float* partials, int64_t chunks, int64_t n, int64_t begin, int64_t end,
                      float* out) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) out[i] = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* p = partials + c * n;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] += p[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming (non-temporal) stores for large float32 outputs (why and when: cache_hints.h): a
// third less memory traffic for LayerNorm(x), a quarter less with a residual. Intrinsics, one
// function per ISA, picked at run time (cpu_features.h).
// ---------------------------------------------------------------------------------------------

#if BERTKERN_X86_DISPATCH
// y = (z - mean) * rstd * weight + bias, and z_out = z when z_out is not null; weight and bias
// are never null here. Rows need not be aligned: a scalar head runs up to the alignment of y.
__attribute__((target("avx512f"))) void normalize_row_stream_avx512(
    const float* z, RowStats<float> st, const float* weight, const float* bias, float* y,
    float* z_out, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 63) != 0; ++i) {
    y[i] = ((z[i] - st.shift) - st.offset) * st.rstd * weight[i] + bias[i];
    if (z_out != nullptr) z_out[i] = z[i];
  }
  const bool stream_z = z_out != nullptr && (reinterpret_cast<uintptr_t>(z_out + i) & 63) == 0;
  const __m512 shift = _mm512_set1_ps(st.shift), offset = _mm512_set1_ps(st.offset);
  const __m512 rstd = _mm512_set1_ps(st.rstd);
  for (; i + 16 <= n; i += 16) {
    const __m512 zv = _mm512_loadu_ps(z + i);
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(zv, shift), offset), rstd);
    _mm512_stream_ps(y + i, _mm512_fmadd_ps(xhat, _mm512_loadu_ps(weight + i),
                                            _mm512_loadu_ps(bias + i)));
    if (stream_z) {
      _mm512_stream_ps(z_out + i, zv);
    } else if (z_out != nullptr) {
      _mm512_storeu_ps(z_out + i, zv);
    }
  }
  for (; i < n; ++i) {
    y[i] = ((z[i] - st.shift) - st.offset) * st.rstd * weight[i] + bias[i];
    if (z_out != nullptr) z_out[i] = z[i];
  }
}

__attribute__((target("avx2,fma"))) void normalize_row_stream_avx2(
    const float* z, RowStats<float> st, const float* weight, const float* bias, float* y,
    float* z_out, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 31) != 0; ++i) {
    y[i] = ((z[i] - st.shift) - st.offset) * st.rstd * weight[i] + bias[i];
    if (z_out != nullptr) z_out[i] = z[i];
  }
  const bool stream_z = z_out != nullptr && (reinterpret_cast<uintptr_t>(z_out + i) & 31) == 0;
  const __m256 shift = _mm256_set1_ps(st.shift), offset = _mm256_set1_ps(st.offset);
  const __m256 rstd = _mm256_set1_ps(st.rstd);
  for (; i + 8 <= n; i += 8) {
    const __m256 zv = _mm256_loadu_ps(z + i);
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(zv, shift), offset), rstd);
    _mm256_stream_ps(y + i, _mm256_fmadd_ps(xhat, _mm256_loadu_ps(weight + i),
                                            _mm256_loadu_ps(bias + i)));
    if (stream_z) {
      _mm256_stream_ps(z_out + i, zv);
    } else if (z_out != nullptr) {
      _mm256_storeu_ps(z_out + i, zv);
    }
  }
  for (; i < n; ++i) {
    y[i] = ((z[i] - st.shift) - st.offset) * st.rstd * weight[i] + bias[i];
    if (z_out != nullptr) z_out[i] = z[i];
  }
}

// dz = rstd * (dy * weight - mean_g - xhat * mean_gx) (+ dresidual); weight is never null here.
__attribute__((target("avx512f"))) void dz_row_stream_avx512(
    const float* dy, const float* z, float mean, float rstd, const float* weight,
    const float* dresidual, BwdRowSums<float> sums, float* dz, int64_t n) {
  auto scalar = [&](int64_t i) {
    const float xhat = (z[i] - mean) * rstd;
    dz[i] = rstd * (dy[i] * weight[i] - sums.mean_g - xhat * sums.mean_gx) +
            (dresidual != nullptr ? dresidual[i] : 0.f);
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dz + i) & 63) != 0; ++i) scalar(i);
  const __m512 vmean = _mm512_set1_ps(mean), vrstd = _mm512_set1_ps(rstd);
  const __m512 mean_g = _mm512_set1_ps(sums.mean_g), mean_gx = _mm512_set1_ps(sums.mean_gx);
  for (; i + 16 <= n; i += 16) {
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(z + i), vmean), vrstd);
    const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(dy + i), _mm512_loadu_ps(weight + i));
    __m512 v = _mm512_mul_ps(vrstd, _mm512_fnmadd_ps(xhat, mean_gx, _mm512_sub_ps(g, mean_g)));
    if (dresidual != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(dresidual + i));
    _mm512_stream_ps(dz + i, v);
  }
  for (; i < n; ++i) scalar(i);
}

__attribute__((target("avx2,fma"))) void dz_row_stream_avx2(
    const float* dy, const float* z, float mean, float rstd, const float* weight,
    const float* dresidual, BwdRowSums<float> sums, float* dz, int64_t n) {
  auto scalar = [&](int64_t i) {
    const float xhat = (z[i] - mean) * rstd;
    dz[i] = rstd * (dy[i] * weight[i] - sums.mean_g - xhat * sums.mean_gx) +
            (dresidual != nullptr ? dresidual[i] : 0.f);
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dz + i) & 31) != 0; ++i) scalar(i);
  const __m256 vmean = _mm256_set1_ps(mean), vrstd = _mm256_set1_ps(rstd);
  const __m256 mean_g = _mm256_set1_ps(sums.mean_g), mean_gx = _mm256_set1_ps(sums.mean_gx);
  for (; i + 8 <= n; i += 8) {
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(z + i), vmean), vrstd);
    const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(dy + i), _mm256_loadu_ps(weight + i));
    __m256 v = _mm256_mul_ps(vrstd, _mm256_fnmadd_ps(xhat, mean_gx, _mm256_sub_ps(g, mean_g)));
    if (dresidual != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(dresidual + i));
    _mm256_stream_ps(dz + i, v);
  }
  for (; i < n; ++i) scalar(i);
}
#endif

using NormalizeStreamFn = void (*)(const float*, RowStats<float>, const float*, const float*,
                                   float*, float*, int64_t);

// The streaming row writer for this CPU, or null where there is none.
NormalizeStreamFn normalize_row_stream_fn() {
#if BERTKERN_X86_DISPATCH
  static const NormalizeStreamFn fn = cpu_has_avx512f() ? normalize_row_stream_avx512
                                      : cpu_has_avx2_fma() ? normalize_row_stream_avx2
                                                           : nullptr;
  return fn;
#else
  return nullptr;
#endif
}

using DzStreamFn = void (*)(const float*, const float*, float, float, const float*, const float*,
                           BwdRowSums<float>, float*, int64_t);

DzStreamFn dz_row_stream_fn() {
#if BERTKERN_X86_DISPATCH
  static const DzStreamFn fn = cpu_has_avx512f() ? dz_row_stream_avx512
                               : cpu_has_avx2_fma() ? dz_row_stream_avx2
                                                    : nullptr;
  return fn;
#else
  return nullptr;
#endif
}

// Stream the outputs of an op that moves bytes_moved bytes, where this CPU has the writers.
bool use_streaming_stores(int64_t bytes_moved) {
  return exceeds_cache(bytes_moved) && normalize_row_stream_fn() != nullptr;
}

// ---------------------------------------------------------------------------------------------
// Whole-tensor drivers. Arguments are contiguous; x is viewed as (rows, n).
// ---------------------------------------------------------------------------------------------

struct FwdArgs {
  const void* x;
  const void* residual;  // null: no residual
  const void* weight;    // null: no weight
  const void* bias;      // null: no bias
  void* y;
  void* residual_out;    // null: z is not stored
  void* mean;
  void* rstd;
  int64_t rows, n;
  double eps;
};

template <typename scalar_t>
void layer_norm_fwd_rows(const FwdArgs& a) {
  const int64_t n = a.n;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* residual = static_cast<const scalar_t*>(a.residual);
  auto* y = static_cast<scalar_t*>(a.y);
  auto* residual_out = static_cast<scalar_t*>(a.residual_out);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  const auto* bias = static_cast<const scalar_t*>(a.bias);

  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead = prefetch_rows_ahead(row_bytes);
  // Prefetch the input rows of row r + ahead while row r is computed.
  auto prefetch_inputs = [&](int64_t r, int64_t end) {
    if (ahead > 0 && r + ahead < end) {
      prefetch_row(x + (r + ahead) * n, row_bytes);
      if (residual != nullptr) prefetch_row(residual + (r + ahead) * n, row_bytes);
    }
  };

  if constexpr (std::is_same_v<scalar_t, float>) {
    auto* mean = static_cast<float*>(a.mean);
    auto* rstd = static_cast<float*>(a.rstd);
    const float eps = static_cast<float>(a.eps);
    const int64_t tensors_moved = 2 + (residual != nullptr) + (residual_out != nullptr);
    const bool stream = use_streaming_stores(tensors_moved * a.rows * row_bytes);
    // The streaming writer has no variants without weight / bias: give it ones and zeros.
    std::vector<float> ones, zeros;
    if (stream && weight == nullptr) ones.assign(static_cast<size_t>(n), 1.f);
    if (stream && bias == nullptr) zeros.assign(static_cast<size_t>(n), 0.f);
    const float* weight_s = weight != nullptr ? weight : ones.data();
    const float* bias_s = bias != nullptr ? bias : zeros.data();
    parallel_for(0, a.rows, row_grain(n), [&](int64_t begin, int64_t end) {
      // z goes to a scratch row that stays in cache, or straight to residual_out when it is
      // stored with ordinary stores.
      const bool z_in_scratch = residual != nullptr && (residual_out == nullptr || stream);
      std::vector<float> scratch(z_in_scratch ? n : 0);
      for (int64_t r = begin; r < end; ++r) {
        prefetch_inputs(r, end);
        const int64_t off = r * n;
        const float* res_row = residual != nullptr ? residual + off : nullptr;
        float* z_row = residual_out != nullptr ? residual_out + off : nullptr;
        float* zbuf = z_in_scratch ? scratch.data() : z_row;
        if (stream) {
          const RowStats<float> st = fwd_row_stats_f32(x + off, res_row, zbuf, n, eps);
          mean[r] = st.shift + st.offset;
          rstd[r] = st.rstd;
          normalize_row_stream_fn()(res_row != nullptr ? zbuf : x + off, st, weight_s, bias_s,
                                    y + off, z_row, n);
        } else {
          fwd_row_f32(x + off, res_row, zbuf, y + off, weight, bias, n, eps, mean + r, rstd + r);
        }
      }
      if (stream) store_fence();
    });
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    auto* mean = static_cast<double*>(a.mean);
    auto* rstd = static_cast<double*>(a.rstd);
    parallel_for(0, a.rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(residual != nullptr && residual_out == nullptr ? n : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * n;
        const double* res_row = residual != nullptr ? residual + off : nullptr;
        double* zbuf = residual_out != nullptr ? residual_out + off : scratch.data();
        fwd_row<double>(x + off, res_row, zbuf, y + off, weight, bias, n, a.eps, mean + r,
                        rstd + r);
      }
    });
  } else {
    // float16 / bfloat16: convert each row to float, compute there, convert back.
    auto* mean = static_cast<float*>(a.mean);
    auto* rstd = static_cast<float*>(a.rstd);
    const float eps = static_cast<float>(a.eps);
    const std::vector<float> weight_f = weight ? vector_to_float(weight, n) : std::vector<float>();
    const std::vector<float> bias_f = bias ? vector_to_float(bias, n) : std::vector<float>();
    const float* wf = weight ? weight_f.data() : nullptr;
    const float* bf = bias ? bias_f.data() : nullptr;
    parallel_for(0, a.rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> zf(n), tmp(n);
      std::vector<scalar_t> zlow(residual != nullptr && residual_out == nullptr ? n : 0);
      for (int64_t r = begin; r < end; ++r) {
        prefetch_inputs(r, end);
        const int64_t off = r * n;
        if (residual != nullptr) {
          // z = x + residual rounded to the input dtype, as an unfused add would round it.
          scalar_t* zrow = residual_out != nullptr ? residual_out + off : zlow.data();
          add_round(x + off, residual + off, zrow, zf.data(), n);
        } else {
          to_float(x + off, zf.data(), n);
        }
        fwd_row_f32(zf.data(), nullptr, nullptr, tmp.data(), wf, bf, n, eps, mean + r, rstd + r);
        from_float(tmp.data(), y + off, n);
      }
    });
  }
}

struct BwdArgs {
  const void* dy;
  const void* dresidual;  // null: none
  const void* z;
  const void* mean;
  const void* rstd;
  const void* weight;  // null: no weight
  void* dz;
  void* dweight;  // null: not wanted
  void* dbias;    // null: not wanted
  int64_t rows, n;
};

// dweight / dbias are reduced in a number of row chunks that depends on the shape only, never
// on the thread count, so the summation order (and the bits of the result) are always the same.
// Up to 64 chunks of at least 8 rows, with at most 16 MiB of partial rows.
constexpr int64_t kMaxParamChunks = 64;
constexpr int64_t kMinRowsPerChunk = 8;
constexpr int64_t kMaxPartialBytes = int64_t(16) << 20;

int64_t param_chunks(int64_t rows, int64_t partial_row_bytes) {
  const int64_t by_rows = (rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk;
  const int64_t by_memory = kMaxPartialBytes / std::max<int64_t>(partial_row_bytes, 1);
  return std::clamp<int64_t>(std::min(by_rows, by_memory), 1, kMaxParamChunks);
}

template <typename scalar_t>
void layer_norm_bwd_rows(const BwdArgs& a) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kFloatIO = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
  const int64_t n = a.n, rows = a.rows;
  const auto* dy = static_cast<const scalar_t*>(a.dy);
  const auto* dres = static_cast<const scalar_t*>(a.dresidual);
  const auto* z = static_cast<const scalar_t*>(a.z);
  const auto* mean = static_cast<const acc_t*>(a.mean);
  const auto* rstd = static_cast<const acc_t*>(a.rstd);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  auto* dz = static_cast<scalar_t*>(a.dz);
  const bool want_dw = a.dweight != nullptr, want_db = a.dbias != nullptr;

  std::vector<float> weight_f;
  const acc_t* w = nullptr;
  if constexpr (kFloatIO) {
    w = weight;
  } else {
    if (weight != nullptr) weight_f = vector_to_float(weight, n);
    w = weight != nullptr ? weight_f.data() : nullptr;
  }

  const int64_t partial_row_bytes = (want_dw + want_db) * n * static_cast<int64_t>(sizeof(acc_t));
  const int64_t chunks = (want_dw || want_db) ? param_chunks(rows, partial_row_bytes) : 1;
  const int64_t rows_per_chunk = rows > 0 ? (rows + chunks - 1) / chunks : 0;
  // Partial sums: [chunk][n] for dweight, then the same for dbias.
  std::vector<acc_t> partials((want_dw ? chunks * n : 0) + (want_db ? chunks * n : 0), acc_t(0));
  acc_t* dw_part = want_dw ? partials.data() : nullptr;
  acc_t* db_part = want_db ? partials.data() + (want_dw ? chunks * n : 0) : nullptr;

  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead = prefetch_rows_ahead(row_bytes);
  auto prefetch_inputs = [&](int64_t r, int64_t end) {
    if (ahead > 0 && r + ahead < end) {
      prefetch_row(dy + (r + ahead) * n, row_bytes);
      prefetch_row(z + (r + ahead) * n, row_bytes);
      if (dres != nullptr) prefetch_row(dres + (r + ahead) * n, row_bytes);
    }
  };

  // float32: stream dz past the cache when the op moves a lot of data (see normalize_row_stream).
  // Rows of one element keep the exact special case of bwd_row.
  const int64_t tensors_moved = 3 + (dres != nullptr);
  const bool stream = std::is_same_v<scalar_t, float> && n > 1 &&
                      use_streaming_stores(tensors_moved * rows * row_bytes);
  std::vector<float> ones(stream && w == nullptr ? n : 0, 1.f);
  const float* w_stream = nullptr;
  if constexpr (std::is_same_v<acc_t, float>) w_stream = w != nullptr ? w : ones.data();

  auto run_rows = [&](int64_t begin, int64_t end, acc_t* dw_acc, acc_t* db_acc) {
    if constexpr (kFloatIO) {
      for (int64_t r = begin; r < end; ++r) {
        prefetch_inputs(r, end);
        const int64_t off = r * n;
        const acc_t* dres_row = dres != nullptr ? dres + off : nullptr;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (stream) {
            const BwdRowSums<float> sums =
                bwd_row_sums_f32(dy + off, z + off, mean[r], rstd[r], w, dw_acc, db_acc, n);
            dz_row_stream_fn()(dy + off, z + off, mean[r], rstd[r], w_stream, dres_row, sums,
                               dz + off, n);
          } else {
            bwd_row_f32(dy + off, z + off, mean[r], rstd[r], w, dres_row, dz + off, dw_acc,
                        db_acc, n);
          }
        } else {
          bwd_row<double>(dy + off, z + off, mean[r], rstd[r], w, dres_row, dz + off, dw_acc,
                          db_acc, n);
        }
      }
    } else {
      std::vector<float> dyf(n), zf(n), dresf(dres != nullptr ? n : 0), dzf(n);
      for (int64_t r = begin; r < end; ++r) {
        prefetch_inputs(r, end);
        const int64_t off = r * n;
        to_float(dy + off, dyf.data(), n);
        to_float(z + off, zf.data(), n);
        if (dres != nullptr) to_float(dres + off, dresf.data(), n);
        bwd_row_f32(dyf.data(), zf.data(), mean[r], rstd[r], w,
                    dres != nullptr ? dresf.data() : nullptr, dzf.data(), dw_acc, db_acc, n);
        from_float(dzf.data(), dz + off, n);
      }
    }
    if (stream) store_fence();
  };

  if (!want_dw && !want_db) {
    parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      run_rows(begin, end, nullptr, nullptr);
    });
    return;
  }

  parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    for (int64_t c = cbegin; c < cend; ++c) {
      const int64_t begin = std::min(rows, c * rows_per_chunk);
      const int64_t end = std::min(rows, begin + rows_per_chunk);
      run_rows(begin, end, dw_part != nullptr ? dw_part + c * n : nullptr,
               db_part != nullptr ? db_part + c * n : nullptr);
    }
  });

  // Sum the partials in chunk order; columns are independent, so parallelize over them.
  auto reduce = [&](const acc_t* part, void* out_ptr) {
    auto* out = static_cast<scalar_t*>(out_ptr);
    parallel_for(0, n, kGrainElements / 4, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<acc_t, float>) {
        std::vector<float> acc(std::is_same_v<scalar_t, float> ? 0 : n);
        float* dst = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out) : acc.data();
        sum_partials_f32(part, chunks, n, begin, end, dst);
        if constexpr (!std::is_same_v<scalar_t, float>) {
          from_float(acc.data() + begin, out + begin, end - begin);
        }
      } else {
        for (int64_t i = begin; i < end; ++i) {
          acc_t s = 0;
          for (int64_t c = 0; c < chunks; ++c) s += part[c * n + i];
          out[i] = s;
        }
      }
    });
  };
  if (want_dw) reduce(dw_part, a.dweight);
  if (want_db) reduce(db_part, a.dbias);
}

// ---------------------------------------------------------------------------------------------
// Operators.
// ---------------------------------------------------------------------------------------------

const void* data_or_null(const OptionalTensor& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cpu(
    const Tensor& x_in, const OptionalTensor& residual_in, const OptionalTensor& weight_in,
    const OptionalTensor& bias_in, double eps, bool store_residual) {
  check_layer_norm_fwd(x_in, residual_in, weight_in, bias_in, eps);
  const Tensor x = as_contiguous(x_in);
  const OptionalTensor residual = as_contiguous(residual_in);
  const OptionalTensor weight = as_contiguous(weight_in);
  const OptionalTensor bias = as_contiguous(bias_in);

  const int64_t n = x.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  const bool keep_z = residual.has_value() && store_residual;

  const ScalarType dtype = x.scalar_type();
  const Device device = x.device();
  Tensor y = empty(x.sizes(), dtype, device);
  Tensor residual_out = keep_z ? empty(x.sizes(), dtype, device) : empty({0}, dtype, device);
  const ScalarType stats = stat_dtype(dtype);
  Tensor mean = empty(row_shape(x), stats, device);
  Tensor rstd = empty(row_shape(x), stats, device);

  FwdArgs args{x.const_data_ptr(),
               data_or_null(residual),
               data_or_null(weight),
               data_or_null(bias),
               y.mutable_data_ptr(),
               keep_z ? residual_out.mutable_data_ptr() : nullptr,
               mean.mutable_data_ptr(),
               rstd.mutable_data_ptr(),
               rows,
               n,
               eps};
  BERTKERN_DISPATCH_FLOATS(dtype, "layer_norm_fwd_cpu",
                           [&] { layer_norm_fwd_rows<scalar_t>(args); });
  return {y, residual_out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(
    const Tensor& dy_in, const OptionalTensor& dresidual_out_in, const Tensor& z_in,
    const Tensor& mean_in, const Tensor& rstd_in, const OptionalTensor& weight_in, bool has_bias) {
  check_layer_norm_bwd(dy_in, dresidual_out_in, z_in, mean_in, rstd_in, weight_in);
  const Tensor dy = as_contiguous(dy_in);
  const Tensor z = as_contiguous(z_in);
  const Tensor mean = as_contiguous(mean_in);
  const Tensor rstd = as_contiguous(rstd_in);
  const OptionalTensor dresidual_out = as_contiguous(dresidual_out_in);
  const OptionalTensor weight = as_contiguous(weight_in);

  const int64_t n = z.size(-1);
  const int64_t rows = mean.numel();

  const ScalarType dtype = z.scalar_type();
  const Device device = z.device();
  Tensor dz = empty(z.sizes(), dtype, device);
  Tensor dweight = weight ? empty({n}, weight->scalar_type(), weight->device())
                          : empty({0}, dtype, device);
  Tensor dbias = has_bias ? empty({n}, dtype, device) : empty({0}, dtype, device);

  BwdArgs args{dy.const_data_ptr(),
               data_or_null(dresidual_out),
               z.const_data_ptr(),
               mean.const_data_ptr(),
               rstd.const_data_ptr(),
               data_or_null(weight),
               dz.mutable_data_ptr(),
               weight ? dweight.mutable_data_ptr() : nullptr,
               has_bias ? dbias.mutable_data_ptr() : nullptr,
               rows,
               n};
  BERTKERN_DISPATCH_FLOATS(dtype, "layer_norm_bwd_cpu",
                           [&] { layer_norm_bwd_rows<scalar_t>(args); });
  return {dz, dweight, dbias};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bertkern, CPU, m) {
  m.impl("layer_norm_fwd", TORCH_BOX(&layer_norm_fwd_cpu));
  m.impl("layer_norm_bwd", TORCH_BOX(&layer_norm_bwd_cpu));
}

}  // namespace bertkern
