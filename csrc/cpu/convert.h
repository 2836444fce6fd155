// float16 / bfloat16 <-> float32 conversion of contiguous runs, shared by the CPU kernels
// (csrc/cpu/convert.cpp). Rounding is c10's: to nearest even, NaN stays a quiet NaN.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

// x86-64 with GCC or clang: functions written with intrinsics for one ISA (target attribute) and
// chosen at run time with __builtin_cpu_supports.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define BK_X86_DISPATCH 1
#include <immintrin.h>
#else
#define BK_X86_DISPATCH 0
#endif

namespace bertkern {

void to_float(const c10::Half* src, float* dst, int64_t n);
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void from_float(const float* src, c10::Half* dst, int64_t n);
void from_float(const float* src, c10::BFloat16* dst, int64_t n);

// z = x + residual rounded to the low dtype into z_low (as an unfused low-precision add rounds
// it), and widened again into zf.
void add_round(const c10::Half* x, const c10::Half* residual, c10::Half* z_low, float* zf, int64_t n);
void add_round(const c10::BFloat16* x, const c10::BFloat16* residual, c10::BFloat16* z_low, float* zf,
               int64_t n);

}  // namespace bertkern
