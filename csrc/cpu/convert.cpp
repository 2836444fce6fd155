// float16 / bfloat16 <-> float32 conversion (declared in convert.h): bfloat16 in loops GCC
// vectorizes, float16 with the F16C instructions where the CPU has them.
#include "cpu/convert.h"

#include <cstring>

#include "cpu/cpu_common.h"
#include "cpu/cpu_features.h"

namespace bertkern {
namespace {

// ---------------------------------------------------------------------------------------------
// float16 / bfloat16 <-> float32 row conversion.
// ---------------------------------------------------------------------------------------------

// bfloat16 is the top half of a float32: widening is a shift, narrowing rounds to nearest even
// (NaN stays a quiet NaN), exactly as c10::BFloat16 does, in loops GCC vectorizes.
BERTKERN_MULTIVERSION
void bf16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

BERTKERN_MULTIVERSION
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

// z = x + residual rounded to bfloat16, as an unfused bfloat16 add rounds it (both operands are
// exact in float32, so the float32 sum rounded once to bfloat16 is that add), stored as bfloat16
// into z_low and widened again into zf.
BERTKERN_MULTIVERSION
void add_round_bf16(const uint16_t* __restrict x, const uint16_t* __restrict residual,
                    uint16_t* __restrict z_low, float* __restrict zf, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t xb = static_cast<uint32_t>(x[i]) << 16;
    const uint32_t rb = static_cast<uint32_t>(residual[i]) << 16;
    float xv, rv;
    std::memcpy(&xv, &xb, sizeof(xv));
    std::memcpy(&rv, &rb, sizeof(rv));
    const float sum = xv + rv;
    uint32_t bits;
    std::memcpy(&bits, &sum, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t zb = (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
    z_low[i] = static_cast<uint16_t>(zb);
    const uint32_t wide = zb << 16;
    std::memcpy(&zf[i], &wide, sizeof(float));
  }
}

// float16 needs the F16C conversion instructions to be fast; GCC does not vectorize _Float16
// conversions by itself, so use the intrinsics where the CPU has them.
#if BERTKERN_X86_DISPATCH
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const Half* src, float* dst,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, Half* dst,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i].x = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx,f16c"))) void add_round_f16_f16c(const Half* x,
                                                            const Half* residual,
                                                            Half* z_low, float* zf,
                                                            int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256 rv =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(residual + i)));
    const __m128i zh = _mm256_cvtps_ph(_mm256_add_ps(xv, rv), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(z_low + i), zh);
    _mm256_storeu_ps(zf + i, _mm256_cvtph_ps(zh));
  }
  for (; i < n; ++i) {
    z_low[i].x = _cvtss_sh(_cvtsh_ss(x[i].x) + _cvtsh_ss(residual[i].x), _MM_FROUND_TO_NEAREST_INT);
    zf[i] = _cvtsh_ss(z_low[i].x);
  }
}
#endif

}  // namespace

void to_float(const Half* src, float* dst, int64_t n) {
#if BERTKERN_X86_DISPATCH
  if (cpu_has_f16c()) return f16_to_f32_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void from_float(const float* src, Half* dst, int64_t n) {
#if BERTKERN_X86_DISPATCH
  if (cpu_has_f16c()) return f32_to_f16_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Half>(src[i]);
}

// z = x + residual rounded to float16 into z_low, and widened again into zf.
void add_round(const Half* x, const Half* residual, Half* z_low, float* zf,
               int64_t n) {
#if BERTKERN_X86_DISPATCH
  if (cpu_has_f16c()) return add_round_f16_f16c(x, residual, z_low, zf, n);
#endif
  for (int64_t i = 0; i < n; ++i) {
    z_low[i] = static_cast<Half>(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
    zf[i] = static_cast<float>(z_low[i]);
  }
}

void add_round(const BFloat16* x, const BFloat16* residual, BFloat16* z_low,
               float* zf, int64_t n) {
  add_round_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(residual),
                 reinterpret_cast<uint16_t*>(z_low), zf, n);
}

void to_float(const BFloat16* src, float* dst, int64_t n) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n);
}

void from_float(const float* src, BFloat16* dst, int64_t n) {
  f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}

}  // namespace bertkern
