// CPU dropout, optionally fused with the ReLU before it: y = act(x) * keep / (1 - p).
//
// Why a kernel of our own: torch's CPU dropout draws a Bernoulli tensor with mt19937 (serial
// per element), stores it, and multiplies in a second pass; in a BERT train step on 2 cores
// that was ~15% of the time. Here the mask is a counter-based hash of the element index
// (Philox4x32-10, four 32-bit words per counter, so one call decides four elements), computed
// in the same pass as the multiply, on all threads, and never stored: the backward of plain
// dropout regenerates it, and the backward of relu+dropout reads it off the saved output
// (y > 0 exactly where x > 0 and the element was kept).
//
// RNG layout (fixed, independent of the thread count and of the tensor's strides): the
// contiguous tensor is cut in blocks of 64 elements; element i = 64 b + 16 j + l (j < 4,
// l < 16) uses output word j of Philox4x32-10 with counter n = 16 b + l, i.e.
// (lo32(n), hi32(n), 0, 0), and key (lo32(seed), hi32(seed)); it is kept when
// word >= threshold, threshold = round(p * 2^32) (P(drop) = p to within 2^-32).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include "cpu/convert.h"
#include "cpu/cpu_common.h"
#include "cpu/philox.h"
#include "torch_api.h"

namespace bertkern {
namespace {

constexpr uint64_t kLow = 0xffffffffu;
// Counters handled per inner block: enough independent lanes for the vectorizer.
constexpr int64_t kLanes = 16;

// The words of one block of 4 * kLanes elements starting at element i0 (a multiple of the
// block): counter i0 / 4 + l gives word j to element i0 + j * kLanes + l, so each word array
// is contiguous in the elements.
BERTKERN_ALWAYS_INLINE void philox_block(uint64_t i0, uint32_t seed_lo, uint32_t seed_hi, uint32_t* words) {
  const uint64_t n0 = i0 / 4;
  for (int64_t l = 0; l < kLanes; ++l) {
    philox4x32_10(n0 + static_cast<uint64_t>(l), seed_lo, seed_hi, words[l], words[kLanes + l],
                  words[2 * kLanes + l], words[3 * kLanes + l]);
  }
}

constexpr int64_t kBlock = 4 * kLanes;  // elements per philox_block

struct Rng {
  uint32_t seed_lo, seed_hi, threshold;
};

// out[j] = f(in[j], keep(first + j)) for j in [0, count): in and out point at element `first`
// of the tensor, a multiple of kBlock.
template <typename scalar_t, typename F>
BERTKERN_ALWAYS_INLINE void masked_map(const scalar_t* in, scalar_t* out, int64_t count, int64_t first,
                                 const Rng& rng, F f) {
  alignas(64) uint32_t words[kBlock];
  const uint32_t threshold = rng.threshold;
  for (int64_t j0 = 0; j0 < count; j0 += kBlock) {
    philox_block(static_cast<uint64_t>(first + j0), rng.seed_lo, rng.seed_hi, words);
    const scalar_t* src = in + j0;
    scalar_t* dst = out + j0;
    if (count - j0 >= kBlock) {
      for (int64_t j = 0; j < kBlock; ++j) dst[j] = f(src[j], words[j] >= threshold);
    } else {
      for (int64_t j = 0; j < count - j0; ++j) dst[j] = f(src[j], words[j] >= threshold);
    }
  }
}

// The float32 loops, cloned per instruction set (the Philox rounds vectorize on AVX-512).
BERTKERN_MULTIVERSION void dropout_fwd_f32(const float* x, float* y, int64_t count, int64_t first, Rng rng,
                                     float scale, bool relu) {
  if (relu) {
    masked_map(x, y, count, first, rng, [scale](float v, bool k) { return (k & (v > 0.f)) ? v * scale : 0.f; });
  } else {
    masked_map(x, y, count, first, rng, [scale](float v, bool k) { return k ? v * scale : 0.f; });
  }
}

BERTKERN_MULTIVERSION void dropout_bwd_f32(const float* dy, float* dx, int64_t count, int64_t first, Rng rng,
                                     float scale) {
  masked_map(dy, dx, count, first, rng, [scale](float g, bool k) { return k ? g * scale : 0.f; });
}

BERTKERN_MULTIVERSION void relu_dropout_bwd_f32(const float* dy, const float* y, float* dx, int64_t count,
                                          float scale) {
  for (int64_t i = 0; i < count; ++i) dx[i] = y[i] > 0.f ? dy[i] * scale : 0.f;
}

BERTKERN_MULTIVERSION void dropout_fwd_f64(const double* x, double* y, int64_t count, int64_t first, Rng rng,
                                     double scale, bool relu) {
  masked_map(x, y, count, first, rng,
             [scale, relu](double v, bool k) { return (k & (!relu | (v > 0.0))) ? v * scale : 0.0; });
}

BERTKERN_MULTIVERSION void dropout_bwd_f64(const double* dy, double* dx, int64_t count, int64_t first, Rng rng,
                                     double scale) {
  masked_map(dy, dx, count, first, rng, [scale](double g, bool k) { return k ? g * scale : 0.0; });
}

// float16 / bfloat16: widened to float32 a chunk at a time (convert.h), the float32 loop, and
// rounded back (to nearest even, as c10 rounds).
constexpr int64_t kChunk = 32 * kBlock;

template <typename scalar_t, typename F>
void through_f32(const scalar_t* in, const scalar_t* in2, scalar_t* out, int64_t count, int64_t first, F f32_op) {
  alignas(64) float a[kChunk];
  alignas(64) float b[kChunk];
  alignas(64) float c[kChunk];
  for (int64_t j0 = 0; j0 < count; j0 += kChunk) {
    const int64_t m = std::min(kChunk, count - j0);
    to_float(in + j0, a, m);
    if (in2 != nullptr) to_float(in2 + j0, b, m);
    f32_op(a, b, c, m, first + j0);
    from_float(c, out + j0, m);
  }
}

// ---- checks and entry points --------------------------------------------------------------

void check_p(double p, const char* op) {
  BERTKERN_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
}

void check_float(const Tensor& t, const char* op, const char* name) {
  BERTKERN_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto st = t.scalar_type();
  BERTKERN_CHECK_TYPE(st == kFloat || st == kDouble || st == kHalf || st == kBFloat16, op, ": ",
                      name, " must be float32, float64, float16 or bfloat16, got ", st);
}

Rng make_rng(double p, const OptionalTensor& seed, const char* op) {
  Rng rng{0, 0, 0};
  if (p == 0.0) return rng;  // threshold 0: every element kept, the seed is not read
  BERTKERN_CHECK_VALUE(seed.has_value() && seed->defined(), op, ": seed is required when p > 0");
  const Tensor& s = *seed;
  BERTKERN_CHECK_TYPE(s.scalar_type() == kLong, op, ": seed must be int64, got ", s.scalar_type());
  BERTKERN_CHECK_VALUE(s.numel() == 1 && s.dim() == 1, op, ": seed must have shape (1,), got ", s.sizes());
  BERTKERN_CHECK_VALUE(s.device().is_cpu(), op, ": seed must be a CPU tensor, got ", s.device());
  const uint64_t value = static_cast<uint64_t>(const_data<int64_t>(s)[0]);
  rng.seed_lo = static_cast<uint32_t>(value & kLow);
  rng.seed_hi = static_cast<uint32_t>(value >> 32);
  // p < 1, so p * 2^32 < 2^32; rounding up to 2^32 only for p within 2^-33 of 1.
  const double t = std::nearbyint(p * 4294967296.0);
  rng.threshold = t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
  return rng;
}

// Parallel over whole kBlocks so every element's RNG word is the same for any split.
template <typename F>
void parallel_blocks(int64_t n, F f) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(0, blocks, parallel_grain(32768, kBlock), [&](int64_t b0, int64_t b1) {
    f(b0 * kBlock, std::min(n, b1 * kBlock));
  });
}

Tensor dropout_fwd_cpu(const Tensor& x_in, double p, const OptionalTensor& seed, bool relu) {
  constexpr const char* op = "bertkern::dropout_fwd";
  check_float(x_in, op, "x");
  check_p(p, op);
  const Rng rng = make_rng(p, seed, op);
  const Tensor x = as_contiguous(x_in);
  Tensor y = empty(x.sizes(), x.scalar_type(), x.device());
  const int64_t n = x.numel();
  const double scale = 1.0 / (1.0 - p);
  const float scale_f = static_cast<float>(scale);
  switch (x.scalar_type()) {
    case kFloat: {
      const float* xp = const_data<float>(x);
      float* yp = data<float>(y);
      parallel_blocks(n, [&](int64_t b, int64_t e) { dropout_fwd_f32(xp + b, yp + b, e - b, b, rng, scale_f, relu); });
      break;
    }
    case kDouble: {
      const double* xp = const_data<double>(x);
      double* yp = data<double>(y);
      parallel_blocks(n, [&](int64_t b, int64_t e) { dropout_fwd_f64(xp + b, yp + b, e - b, b, rng, scale, relu); });
      break;
    }
    default:
      BERTKERN_DISPATCH_REDUCED_FLOATS(x.scalar_type(), "dropout_fwd", [&] {
        const scalar_t* xp = const_data<scalar_t>(x);
        scalar_t* yp = data<scalar_t>(y);
        parallel_blocks(n, [&](int64_t b, int64_t e) {
          through_f32(xp + b, static_cast<const scalar_t*>(nullptr), yp + b, e - b, b,
                      [&](const float* a, const float*, float* c, int64_t m, int64_t first) {
                        dropout_fwd_f32(a, c, m, first, rng, scale_f, relu);
                      });
        });
      });
  }
  return y;
}

Tensor dropout_bwd_cpu(const Tensor& dy_in, const OptionalTensor& y_in, double p,
                           const OptionalTensor& seed, bool relu) {
  constexpr const char* op = "bertkern::dropout_bwd";
  check_float(dy_in, op, "grad");
  check_p(p, op);
  const double scale = 1.0 / (1.0 - p);
  const float scale_f = static_cast<float>(scale);
  const Tensor dy = as_contiguous(dy_in);
  Tensor dx = empty(dy.sizes(), dy.scalar_type(), dy.device());
  const int64_t n = dy.numel();
  if (relu) {
    // The mask is read off the output: y > 0 exactly where x > 0 and the element was kept.
    BERTKERN_CHECK_VALUE(y_in.has_value() && y_in->defined(), op, ": y (the forward output) is required when relu");
    const Tensor& y_ref = *y_in;
    check_float(y_ref, op, "y");
    BERTKERN_CHECK_TYPE(y_ref.scalar_type() == dy.scalar_type(), op, ": y must have grad's dtype ", dy.scalar_type(),
                        ", got ", y_ref.scalar_type());
    BERTKERN_CHECK_VALUE(same_shape(y_ref, dy), op, ": y must have grad's shape ", dy.sizes(), ", got ",
                         y_ref.sizes());
    const Tensor y = as_contiguous(y_ref);
    switch (dy.scalar_type()) {
      case kFloat: {
        const float* g = const_data<float>(dy);
        const float* yp = const_data<float>(y);
        float* d = data<float>(dx);
        parallel_blocks(n, [&](int64_t b, int64_t e) { relu_dropout_bwd_f32(g + b, yp + b, d + b, e - b, scale_f); });
        break;
      }
      case kDouble: {
        const double* g = const_data<double>(dy);
        const double* yp = const_data<double>(y);
        double* d = data<double>(dx);
        parallel_blocks(n, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) d[i] = yp[i] > 0.0 ? g[i] * scale : 0.0;
        });
        break;
      }
      default:
        BERTKERN_DISPATCH_REDUCED_FLOATS(dy.scalar_type(), "relu_dropout_bwd", [&] {
          const scalar_t* g = const_data<scalar_t>(dy);
          const scalar_t* yp = const_data<scalar_t>(y);
          scalar_t* d = data<scalar_t>(dx);
          parallel_blocks(n, [&](int64_t b, int64_t e) {
            through_f32(g + b, yp + b, d + b, e - b, b,
                        [&](const float* ga, const float* ya, float* c, int64_t m, int64_t) {
                          relu_dropout_bwd_f32(ga, ya, c, m, scale_f);
                        });
          });
        });
    }
    return dx;
  }
  const Rng rng = make_rng(p, seed, op);
  switch (dy.scalar_type()) {
    case kFloat: {
      const float* g = const_data<float>(dy);
      float* d = data<float>(dx);
      parallel_blocks(n, [&](int64_t b, int64_t e) { dropout_bwd_f32(g + b, d + b, e - b, b, rng, scale_f); });
      break;
    }
    case kDouble: {
      const double* g = const_data<double>(dy);
      double* d = data<double>(dx);
      parallel_blocks(n, [&](int64_t b, int64_t e) { dropout_bwd_f64(g + b, d + b, e - b, b, rng, scale); });
      break;
    }
    default:
      BERTKERN_DISPATCH_REDUCED_FLOATS(dy.scalar_type(), "dropout_bwd", [&] {
        const scalar_t* g = const_data<scalar_t>(dy);
        scalar_t* d = data<scalar_t>(dx);
        parallel_blocks(n, [&](int64_t b, int64_t e) {
          through_f32(g + b, static_cast<const scalar_t*>(nullptr), d + b, e - b, b,
                      [&](const float* a, const float*, float* c, int64_t m, int64_t first) {
                        dropout_bwd_f32(a, c, m, first, rng, scale_f);
                      });
        });
      });
  }
  return dx;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bertkern, CPU, m) {
  m.impl("dropout_fwd", TORCH_BOX(&dropout_fwd_cpu));
  m.impl("dropout_bwd", TORCH_BOX(&dropout_bwd_cpu));
}

}  // namespace bertkern
