// float16 / bfloat16 <-> float32 conversion of contiguous runs, shared by the CPU kernels
// (layer_norm.cpp, dropout.cpp; defined in convert.cpp). Rounding is c10's: to nearest even,
// NaN stays a quiet NaN.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace bertkern {

void to_float(const c10::Half* src, float* dst, int64_t n);
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void from_float(const float* src, c10::Half* dst, int64_t n);
void from_float(const float* src, c10::BFloat16* dst, int64_t n);

// A float32 copy of n elements of src (e.g. a float16 weight, widened once per call).
template <typename T>
std::vector<float> vector_to_float(const T* src, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  to_float(src, out.data(), n);
  return out;
}

// z = x + residual rounded to the low dtype into z_low (as an unfused low-precision add rounds
// it), and widened again into zf.
void add_round(const c10::Half* x, const c10::Half* residual, c10::Half* z_low, float* zf, int64_t n);
void add_round(const c10::BFloat16* x, const c10::BFloat16* residual, c10::BFloat16* z_low, float* zf,
               int64_t n);

}  // namespace bertkern
