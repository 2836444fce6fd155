// CPU LayerNorm over the last dimension, with an optionally fused residual add:
//   z = x (+ residual), y = (z - mean) * rstd * weight + bias.
// Forward and backward for float32, float16, bfloat16 and float64 (float64 for gradcheck).
//
// Layout of the work: rows are independent, so both directions parallelize over rows with
// at::parallel_for. The per-row math always runs on float32 (double for float64) rows: float32
// tensors are used in place, float16 / bfloat16 rows are converted into a per-thread float32
// scratch row first and converted back at the end, so a single set of float kernels does the
// arithmetic for three dtypes.
//
// Vectorization: the extension is compiled without -mavx2 (it must load on any x86-64), so
// at::vec would only give SSE2 here. Instead the float row kernels are plain loops that GCC
// auto-vectorizes, compiled several times with target_clones (AVX-512 / AVX2 / baseline) and
// picked once at load time by an ifunc resolver; the "simd reduction" pragmas let the row sums
// use vector partial sums (setup.py compiles with -fopenmp-simd).
//
// Determinism: dweight / dbias are reduced over rows in a fixed number of row chunks that
// depends only on the number of rows, each into its own partial row, then summed in chunk
// order. The result is bitwise identical whatever the number of threads, and uses no atomics.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "layer_norm_common.h"

// One binary for every x86-64 CPU: clone the hot float loops for AVX-512 and AVX2 (both with
// FMA) and dispatch at load time. GCC-only (clang spells the clone names differently), ELF-only
// (ifunc); elsewhere, or when the whole file is already built for AVX-512, a single version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__AVX512F__)
#define BK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define BK_HAVE_F16C_DISPATCH 1
#else
#define BK_MULTIVERSION
#define BK_HAVE_F16C_DISPATCH 0
#endif

#if defined(__GNUC__)
#define BK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BK_ALWAYS_INLINE inline
#endif

namespace bertkern {
namespace {

// Rows per parallel_for task: enough elements per task to amortize the task overhead.
constexpr int64_t kGrainElements = 16384;

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(n, 1)); }

// ---------------------------------------------------------------------------------------------
// Row kernels, written once for float and double (acc_t is the element type of the row).
// Pointers that are null select a variant (no weight, no bias, no residual, ...); the checks are
// loop-invariant, and GCC unswitches them out of the vectorized loops.
// ---------------------------------------------------------------------------------------------

// Forward of one row. in: the row when residual is null, else z = in + residual is computed
// into zbuf (an output row or a scratch row) first. Writes y, *mean_out and *rstd_out.
template <typename acc_t>
BK_ALWAYS_INLINE void fwd_row(const acc_t* __restrict in, const acc_t* __restrict residual,
                              acc_t* __restrict zbuf, acc_t* __restrict y,
                              const acc_t* __restrict weight, const acc_t* __restrict bias,
                              int64_t n, acc_t eps, acc_t* mean_out, acc_t* rstd_out) {
  const acc_t* z = in;
  acc_t sum = 0;
  if (residual != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = in[i] + residual[i];
      zbuf[i] = v;
      sum += v;
    }
    z = zbuf;
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += in[i];
  }
  // Two passes over the row (the second one hits L1): the variance of the centered values does
  // not cancel catastrophically when the mean is large compared with the spread.
  const acc_t mean = n > 0 ? sum / static_cast<acc_t>(n) : acc_t(0);
  acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = z[i] - mean;
    sq += d * d;
  }
  const acc_t var = n > 0 ? sq / static_cast<acc_t>(n) : acc_t(0);
  const acc_t rstd = acc_t(1) / std::sqrt(var + eps);
  *mean_out = mean;
  *rstd_out = rstd;
  if (weight != nullptr && bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (z[i] - mean) * rstd * weight[i] + bias[i];
  } else if (weight != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (z[i] - mean) * rstd * weight[i];
  } else if (bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (z[i] - mean) * rstd + bias[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (z[i] - mean) * rstd;
  }
}

// Backward of one row: dz = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual), with
// xhat = (z - mean) * rstd and g = dy * weight. Adds dy * xhat into dweight_acc and dy into
// dbias_acc when those are not null.
template <typename acc_t>
BK_ALWAYS_INLINE void bwd_row(const acc_t* __restrict dy, const acc_t* __restrict z, acc_t mean,
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
  acc_t sum_g = 0, sum_gx = 0;
  if (weight != nullptr) {
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t g = dy[i] * weight[i];
      sum_g += g;
      sum_gx += g * ((z[i] - mean) * rstd);
    }
  } else {
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t i = 0; i < n; ++i) {
      sum_g += dy[i];
      sum_gx += dy[i] * ((z[i] - mean) * rstd);
    }
  }
  if (dweight_acc != nullptr && dbias_acc != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      dweight_acc[i] += dy[i] * ((z[i] - mean) * rstd);
      dbias_acc[i] += dy[i];
    }
  } else if (dweight_acc != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dweight_acc[i] += dy[i] * ((z[i] - mean) * rstd);
  } else if (dbias_acc != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dbias_acc[i] += dy[i];
  }
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t mean_g = sum_g * inv_n;
  const acc_t mean_gx = sum_gx * inv_n;
  // Subtract before scaling by rstd: when the row is (nearly) constant, g - mean_g cancels to
  // (nearly) 0, and rstd (up to 1/sqrt(eps)) must not amplify the rounding of that difference.
  if (weight != nullptr) {
    if (dresidual != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t xhat = (z[i] - mean) * rstd;
        dz[i] = rstd * (dy[i] * weight[i] - mean_g - xhat * mean_gx) + dresidual[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t xhat = (z[i] - mean) * rstd;
        dz[i] = rstd * (dy[i] * weight[i] - mean_g - xhat * mean_gx);
      }
    }
  } else {
    if (dresidual != nullptr) {
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
}

// The float versions are the hot ones: clone them per ISA. (target_clones needs non-template
// functions; the always_inline bodies above are compiled anew inside each clone.)
BK_MULTIVERSION
void fwd_row_f32(const float* in, const float* residual, float* zbuf, float* y, const float* weight,
                 const float* bias, int64_t n, float eps, float* mean_out, float* rstd_out) {
  fwd_row<float>(in, residual, zbuf, y, weight, bias, n, eps, mean_out, rstd_out);
}

BK_MULTIVERSION
void bwd_row_f32(const float* dy, const float* z, float mean, float rstd, const float* weight,
                 const float* dresidual, float* dz, float* dweight_acc, float* dbias_acc,
                 int64_t n) {
  bwd_row<float>(dy, z, mean, rstd, weight, dresidual, dz, dweight_acc, dbias_acc, n);
}

// Sums `chunks` partial rows of length n (chunk-major) into out[0:n], in chunk order.
BK_MULTIVERSION
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
// float16 / bfloat16 <-> float32 row conversion.
// ---------------------------------------------------------------------------------------------

// bfloat16 is the top half of a float32: widening is a shift, narrowing rounds to nearest even
// (NaN stays a quiet NaN), exactly as c10::BFloat16 does, in loops GCC vectorizes.
BK_MULTIVERSION
void bf16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

BK_MULTIVERSION
void f32_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
  }
}

// float16 needs the F16C conversion instructions to be fast; GCC does not vectorize _Float16
// conversions by itself, so use the intrinsics where the CPU has them.
#if BK_HAVE_F16C_DISPATCH
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const c10::Half* src, float* dst,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, c10::Half* dst,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i].x = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return has;
}
#endif

void to_float(const c10::Half* src, float* dst, int64_t n) {
#if BK_HAVE_F16C_DISPATCH
  if (cpu_has_f16c()) return f16_to_f32_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void from_float(const float* src, c10::Half* dst, int64_t n) {
#if BK_HAVE_F16C_DISPATCH
  if (cpu_has_f16c()) return f32_to_f16_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
}

void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}

template <typename T>
std::vector<float> vector_to_float(const T* src, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  to_float(src, out.data(), n);
  return out;
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

  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using acc_t = scalar_t;
    auto* mean = static_cast<acc_t*>(a.mean);
    auto* rstd = static_cast<acc_t*>(a.rstd);
    const acc_t eps = static_cast<acc_t>(a.eps);
    at::parallel_for(0, a.rows, row_grain(n), [&](int64_t begin, int64_t end) {
      // z goes to residual_out when it is stored, else to a scratch row that stays in cache.
      std::vector<acc_t> scratch(residual != nullptr && residual_out == nullptr ? n : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * n;
        const acc_t* res_row = residual != nullptr ? residual + off : nullptr;
        acc_t* zbuf = residual_out != nullptr ? residual_out + off : scratch.data();
        if constexpr (std::is_same_v<acc_t, float>) {
          fwd_row_f32(x + off, res_row, zbuf, y + off, weight, bias, n, eps, mean + r, rstd + r);
        } else {
          fwd_row<double>(x + off, res_row, zbuf, y + off, weight, bias, n, eps, mean + r,
                          rstd + r);
        }
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
    at::parallel_for(0, a.rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> zf(n), tmp(n);
      std::vector<scalar_t> zlow(residual != nullptr && residual_out == nullptr ? n : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * n;
        to_float(x + off, zf.data(), n);
        if (residual != nullptr) {
          // z = x + residual rounded to the input dtype, as an unfused add would round it.
          to_float(residual + off, tmp.data(), n);
          float* __restrict zp = zf.data();
          const float* __restrict rp = tmp.data();
          for (int64_t i = 0; i < n; ++i) zp[i] += rp[i];
          scalar_t* zrow = residual_out != nullptr ? residual_out + off : zlow.data();
          from_float(zf.data(), zrow, n);
          to_float(zrow, zf.data(), n);
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

// dweight / dbias are reduced in a number of row chunks that depends on `rows` only, so the
// summation order (and the bits of the result) do not depend on the thread count.
constexpr int64_t kMaxParamChunks = 64;
constexpr int64_t kMinRowsPerChunk = 8;

int64_t param_chunks(int64_t rows) {
  return std::clamp<int64_t>((rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk, 1, kMaxParamChunks);
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

  const int64_t chunks = (want_dw || want_db) ? param_chunks(rows) : 1;
  const int64_t rows_per_chunk = rows > 0 ? (rows + chunks - 1) / chunks : 0;
  // Partial sums: [chunk][n] for dweight, then the same for dbias.
  std::vector<acc_t> partials((want_dw ? chunks * n : 0) + (want_db ? chunks * n : 0), acc_t(0));
  acc_t* dw_part = want_dw ? partials.data() : nullptr;
  acc_t* db_part = want_db ? partials.data() + (want_dw ? chunks * n : 0) : nullptr;

  auto run_rows = [&](int64_t begin, int64_t end, acc_t* dw_acc, acc_t* db_acc) {
    if constexpr (kFloatIO) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * n;
        const acc_t* dres_row = dres != nullptr ? dres + off : nullptr;
        if constexpr (std::is_same_v<acc_t, float>) {
          bwd_row_f32(dy + off, z + off, mean[r], rstd[r], w, dres_row, dz + off, dw_acc, db_acc, n);
        } else {
          bwd_row<double>(dy + off, z + off, mean[r], rstd[r], w, dres_row, dz + off, dw_acc,
                          db_acc, n);
        }
      }
    } else {
      std::vector<float> dyf(n), zf(n), dresf(dres != nullptr ? n : 0), dzf(n);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * n;
        to_float(dy + off, dyf.data(), n);
        to_float(z + off, zf.data(), n);
        if (dres != nullptr) to_float(dres + off, dresf.data(), n);
        bwd_row_f32(dyf.data(), zf.data(), mean[r], rstd[r], w,
                    dres != nullptr ? dresf.data() : nullptr, dzf.data(), dw_acc, db_acc, n);
        from_float(dzf.data(), dz + off, n);
      }
    }
  };

  if (!want_dw && !want_db) {
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      run_rows(begin, end, nullptr, nullptr);
    });
    return;
  }

  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
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
    at::parallel_for(0, n, kGrainElements / 4, [&](int64_t begin, int64_t end) {
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

const void* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& residual_in,
    const c10::optional<at::Tensor>& weight_in, const c10::optional<at::Tensor>& bias_in,
    double eps, bool store_residual) {
  check_layer_norm_fwd(x_in, residual_in, weight_in, bias_in, eps);
  const at::Tensor x = x_in.contiguous();
  const auto contig = [](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
    return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
  };
  const c10::optional<at::Tensor> residual = contig(residual_in);
  const c10::optional<at::Tensor> weight = contig(weight_in);
  const c10::optional<at::Tensor> bias = contig(bias_in);

  const int64_t n = x.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  const bool keep_z = residual.has_value() && store_residual;

  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = keep_z ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const auto stat_options = x.options().dtype(stat_dtype(x.scalar_type()));
  at::Tensor mean = at::empty(row_shape(x), stat_options);
  at::Tensor rstd = at::empty(row_shape(x), stat_options);

  FwdArgs args{x.const_data_ptr(),
               data_or_null(residual),
               data_or_null(weight),
               data_or_null(bias),
               y.data_ptr(),
               keep_z ? residual_out.data_ptr() : nullptr,
               mean.data_ptr(),
               rstd.data_ptr(),
               rows,
               n,
               eps};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu",
                                  [&] { layer_norm_fwd_rows<scalar_t>(args); });
  return {y, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy_in, const c10::optional<at::Tensor>& dresidual_out_in,
    const at::Tensor& z_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const c10::optional<at::Tensor>& weight_in, bool has_bias) {
  check_layer_norm_bwd(dy_in, dresidual_out_in, z_in, mean_in, rstd_in, weight_in);
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const c10::optional<at::Tensor> dresidual_out =
      dresidual_out_in ? c10::optional<at::Tensor>(dresidual_out_in->contiguous()) : c10::nullopt;
  const c10::optional<at::Tensor> weight =
      weight_in ? c10::optional<at::Tensor>(weight_in->contiguous()) : c10::nullopt;

  const int64_t n = z.size(-1);
  const int64_t rows = mean.numel();

  at::Tensor dz = at::empty(z.sizes(), z.options());
  at::Tensor dweight = weight ? at::empty({n}, weight->options()) : at::empty({0}, z.options());
  at::Tensor dbias = has_bias ? at::empty({n}, z.options()) : at::empty({0}, z.options());

  BwdArgs args{dy.const_data_ptr(),
               data_or_null(dresidual_out),
               z.const_data_ptr(),
               mean.const_data_ptr(),
               rstd.const_data_ptr(),
               data_or_null(weight),
               dz.data_ptr(),
               weight ? dweight.data_ptr() : nullptr,
               has_bias ? dbias.data_ptr() : nullptr,
               rows,
               n};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "layer_norm_bwd_cpu",
                                  [&] { layer_norm_bwd_rows<scalar_t>(args); });
  return {dz, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(bertkern, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace bertkern
