// float16 / bfloat16 <-> float32 conversion of contiguous runs, shared by the CPU kernels
// (layer_norm.cpp, dropout.cpp; defined in convert.cpp). Rounding is torch's (the
// header-only c10::Half / c10::BFloat16): to nearest even, NaN stays a quiet NaN.
#pragma once

#include "torch_api.h"  // Half, BFloat16 (header-only types)

#include <cstdint>
#include <vector>

namespace bertkern {

void to_float(const Half* src, float* dst, int64_t n);
void to_float(const BFloat16* src, float* dst, int64_t n);
void from_float(const float* src, Half* dst, int64_t n);
void from_float(const float* src, BFloat16* dst, int64_t n);

// A float32 copy of n elements of src (e.g. a float16 weight, widened once per call).
template <typename T>
std::vector<float> vector_to_float(const T* src, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  to_float(src, out.data(), n);
  return out;
}

// z = x + residual rounded to the low dtype into z_low (as an unfused low-precision add rounds
// it), and widened again into zf.
void add_round(const Half* x, const Half* residual, Half* z_low, float* zf, int64_t n);
void add_round(const BFloat16* x, const BFloat16* residual, BFloat16* z_low, float* zf,
               int64_t n);

}  // namespace bertkern
