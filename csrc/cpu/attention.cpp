// CPU varlen scaled-dot-product attention with causal masking and dropout, forward and backward:
// the CPU kernel of bertkern::attention_fwd / attention_bwd (schemas in csrc/ops.cpp; the CUDA
// kernel of the same operator is the Triton one in bertkern/kernels/attention.py, same math, same
// dropout).
//
// Layout: q, k, v, out (T, H, D) hold the packed real tokens of B sequences; sequence b is rows
// [cu_seqlens[b], cu_seqlens[b + 1]) and attends to itself only. lse (H, T). Only real tokens are
// computed: the cost is H * sum_b L_b^2 * D, not H * B * S^2 * D as for a padded batch.
//
// Work: one task is (sequence, head, block of up to 128 query rows) in the forward and
// (sequence, head) in the backward, so that each backward task owns its dK / dV rows (no atomics,
// deterministic: every output element is computed by one task in a fixed order, whatever the
// number of threads). Tasks are handed out largest first from a shared counter, which balances
// sequences of very different lengths. Inside a task the work is GEMMs on the (sequence, head)
// slices addressed in place (leading dimension = the token stride): S = scale Q_blk K^T, row
// softmax in float32, out = P V; the backward recomputes P from lse per query block, and adds
// that block's share to dV = P^T dO and dK = scale dS^T Q, and writes dQ = scale dS K (with
// FlashAttention's delta summed from the float32 P and dP, not from the rounded out). A
// (query block x keys) score block stays in cache; no online softmax is needed because a task
// sees all keys of its sequence at once.
//
// GEMMs call the BLAS that libtorch_cpu exports (sgemm_ / dgemm_, MKL on x86-64 wheels) directly:
// the cpublas::gemm overloads are not exported, and a matmul through the dispatcher costs
// microseconds per call, a large share of a 100 x 100 x 64 product. The BLAS symbols are weak,
// so a torch build without them still loads this library and falls back to torch::stable::matmul
// on views of the same buffers (blas.h).
// Threads: the tasks are spread over libtorch's intra-op pool (bertkern::parallel_for, through
// the stable ABI; task_runner.h). Each GEMM is sequential (MKL's thread-local setting); calls
// too small to be worth waking a second thread run on one.
//
// Dtypes: float32 and float64 (for gradcheck) are computed in their own precision; float16 and
// bfloat16 inputs are converted to float32 once, computed in float32, and the results converted
// back (lse stays float32). All accumulation is float32 (float64 for float64).
//
// Dropout (dropout_p > 0) must match the Triton kernel bit for bit, so the keep mask is defined
// as the Triton kernel's (bertkern/kernels/attention.py, "Dropout convention"), reproduced
// exactly below (dropout_halves_block):
//   key     = dropout_seed[0] + b * H + h                        (uint64; b sequence, h head)
//   W       = 4 * ceil(max_seqlen / 32)                          (Philox calls per query row)
//   j       = 32 g + 8 n + 2 q + h'                              (local key; n, q < 4, h' < 2)
//   counter = (uint32)(i * W + 4 g + q), c1 = c2 = c3 = 0        (i local query index)
//   u       = bits [16 h', 16 h' + 16) of output word n of Philox4x32-10 with k0 = low 32 bits
//             of key, k1 = high 32 bits (one Philox call serves 8 keys)
//   keep    = u >= T, T = nearbyint(dropout_p * 2^16);  P_drop = keep ? P / (1 - dropout_p) : 0.
// The test-only operator bertkern::_philox_words(int seed, Tensor offsets) -> Tensor (schema in
// csrc/ops.cpp, CPU kernel at the end of this file) returns the four words of each int32 counter (as int32, shape
// offsets.shape + (4,)) so that tests can compare them with the numpy Philox of tests/reference.py.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/blas.h"
#include "cpu/cpu_common.h"
#include "cpu/philox.h"
#include "cpu/task_runner.h"
#include "torch_api.h"


namespace bertkern {
namespace {

// ---------------------------------------------------------------------------------------------
// Dropout RNG: Triton's tl.randint4x (triton/language/random.py: philox_impl, philox) for an
// int32 counter, i.e. counter (c, 0, 0, 0), 10 rounds, all four words used, each word split
// into two 16-bit halves: 8 keys per call.
// ---------------------------------------------------------------------------------------------

// Philox calls per block of keys; 8 keys per call.
constexpr int64_t kRngLanes = 16;
constexpr int64_t kRngBlock = 8 * kRngLanes;  // 128 keys: 4 groups of 32

// u[jj] = the 16-bit random half of key jj of a block of keys whose first call is counter0, as
// float (exact), for the first `groups` (<= 4) groups of 32 keys: key jj = 32 g + 8 n + 2 q + h
// takes half h of word n of the call at counter0 + 4 g + q. The rounds run across
// calls (vectorized); the halves are then converted in key order.
BERTKERN_ALWAYS_INLINE void dropout_halves_block(uint32_t counter0, int64_t groups, uint32_t k0, uint32_t k1,
                                          float* __restrict u) {
  alignas(64) uint32_t w[4][kRngLanes];
#pragma omp simd
  for (int64_t l = 0; l < 4 * groups; ++l) {
    philox4x32_10(counter0 + static_cast<uint32_t>(l), k0, k1, w[0][l], w[1][l], w[2][l], w[3][l]);
  }
  // Little-endian: word w[n][4 g + q] is halves h[n][8 g + 2 q] (low) and h[n][8 g + 2 q + 1]
  // (high), so keys 32 g + 8 n + k (k < 8) are h[n][8 g + k]: contiguous, converted 8 at a time.
  static_assert(std::endian::native == std::endian::little);
  alignas(64) uint16_t h[4][2 * kRngLanes];
  std::memcpy(h, w, sizeof(h));
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t n = 0; n < 4; ++n) {
#pragma omp simd
      for (int64_t k = 0; k < 8; ++k) u[32 * g + 8 * n + k] = static_cast<float>(h[n][8 * g + k]);
    }
  }
}

// Dropout of one (sequence, head): Philox key and counter stride, fixed per task.
struct DropoutRng {
  bool on = false;
  float threshold = 0.f;  // T = nearbyint(p * 2^16): keep iff the 16-bit half >= T
  double inv_keep = 1.0;  // 1 / (1 - p)
  uint32_t k0 = 0, k1 = 0;
  uint32_t calls_per_row = 0;  // W = 4 * ceil(max_seqlen / 32)
  // Call of (query i, keys 0..7); key j's call adds 4 (j >> 5) + ((j >> 1) & 3). Unsigned
  // wraparound == int32 wraparound.
  uint32_t row_counter(int64_t i) const { return static_cast<uint32_t>(i) * calls_per_row; }
};

DropoutRng make_dropout_rng(double p, uint64_t seed, int64_t max_seqlen, int64_t b, int64_t H,
                            int64_t h) {
  DropoutRng d;
  d.on = p > 0;
  if (!d.on) return d;
  d.threshold = static_cast<float>(std::nearbyint(p * 65536.0));
  d.inv_keep = 1.0 / (1.0 - p);
  const uint64_t key = seed + static_cast<uint64_t>(b) * static_cast<uint64_t>(H) +
                       static_cast<uint64_t>(h);
  d.k0 = static_cast<uint32_t>(key & 0xffffffffu);
  d.k1 = static_cast<uint32_t>(key >> 32);
  d.calls_per_row = static_cast<uint32_t>(4 * ((max_seqlen + 31) / 32));
  return d;
}

// ---------------------------------------------------------------------------------------------
// Row kernels, written once for float and double. Rows are score rows of one query block:
// entries [0, valid) are real keys, [valid, n) are keys masked by causality (zero in P).
// ---------------------------------------------------------------------------------------------

// exp for softmax arguments (x <= ~0): Cephes expf, about 1 ulp, plain arithmetic so that GCC
// vectorizes it (glibc's vector expf needs -ffast-math). exp(x) for x < -87 is returned as 0.
BERTKERN_ALWAYS_INLINE float exp_fast(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float er = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float y = er * std::bit_cast<float>(bits);
  return x < -87.0f ? 0.0f : y;
}

BERTKERN_ALWAYS_INLINE double exp_fast(double x) { return std::exp(x); }

// Row reductions over kLanes independent partial results (lane l takes elements l, l + kLanes,
// ...), combined by a fixed tree at the end. GCC turns the fixed-width inner loops into vector
// code; an "omp simd reduction" instead ends every row with a sequential scalar pass over the
// lanes, which costs as much as the vector work on rows of ~100 keys.
constexpr int64_t kLanes = 32;

template <typename T, typename Combine>
BERTKERN_ALWAYS_INLINE T combine_lanes(T* __restrict part, Combine combine) {
#pragma GCC unroll 8
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) part[l] = combine(part[l], part[l + width]);
  }
  return part[0];
}

template <typename T>
BERTKERN_ALWAYS_INLINE T row_max(const T* __restrict x, int64_t n) {
  alignas(64) T part[kLanes];
  const auto max2 = [](T a, T b) { return a > b ? a : b; };
  for (int64_t l = 0; l < kLanes; ++l) part[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) part[l] = max2(part[l], x[j + l]);
  }
  for (int64_t l = 0; l < n - j; ++l) part[l] = max2(part[l], x[j + l]);
  return combine_lanes<T>(part, max2);
}

// x[j] <- exp(x[j] - shift) for j < n; returns the sum of the new x.
template <typename T>
BERTKERN_ALWAYS_INLINE T row_exp_sum(T* __restrict x, int64_t n, T shift) {
  alignas(64) T part[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) part[l] = 0;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T e = exp_fast(x[j + l] - shift);
      x[j + l] = e;
      part[l] += e;
    }
  }
  for (int64_t l = 0; l < n - j; ++l) {
    const T e = exp_fast(x[j + l] - shift);
    x[j + l] = e;
    part[l] += e;
  }
  return combine_lanes<T>(part, [](T a, T b) { return a + b; });
}

// In place: x[0, valid) <- softmax, x[valid, n) <- 0. Returns the logsumexp of x[0, valid).
template <typename T>
BERTKERN_ALWAYS_INLINE T softmax_row(T* __restrict x, int64_t valid, int64_t n) {
  const T mx = row_max<T>(x, valid);
  const T sum = row_exp_sum<T>(x, valid, mx);
  const T inv_sum = T(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < valid; ++j) x[j] *= inv_sum;
  for (int64_t j = valid; j < n; ++j) x[j] = 0;
  return mx + std::log(sum);
}

// y[j] = keep(j) ? x[j] / (1 - p) : 0 for j in [0, valid), row counter counter0; y may be x.
template <typename T>
BERTKERN_ALWAYS_INLINE void dropout_row(const T* x, T* y, int64_t valid, uint32_t counter0,
                                  const DropoutRng& d) {
  const uint32_t k0 = d.k0, k1 = d.k1;
  const float threshold = d.threshold;
  const T inv_keep = static_cast<T>(d.inv_keep);
  alignas(64) float u[kRngBlock];
  for (int64_t j0 = 0; j0 < valid; j0 += kRngBlock) {
    const int64_t m = std::min(kRngBlock, valid - j0);
    dropout_halves_block(counter0 + static_cast<uint32_t>(j0 / 8), (m + 31) / 32, k0, k1, u);
    const T* xb = x + j0;
    T* yb = y + j0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) yb[j] = u[j] >= threshold ? xb[j] * inv_keep : T(0);
  }
}

// Forward, one query block of M rows (local query index row0 + r) against n keys:
// scores -> P (dropped out), lse[r] = logsumexp of row r.
template <typename T>
BERTKERN_ALWAYS_INLINE void fwd_block_body(T* __restrict s, int64_t M, int64_t n, int64_t row0,
                                     bool causal, T* __restrict lse, const DropoutRng& d) {
  for (int64_t r = 0; r < M; ++r) {
    T* x = s + r * n;
    const int64_t valid = causal ? std::min(n, row0 + r + 1) : n;
    lse[r] = softmax_row<T>(x, valid, n);
    if (d.on) dropout_row<T>(x, x, valid, d.row_counter(row0 + r), d);
  }
}

// Backward, one query block: scores s -> P = exp(s - lse) in place, and with dropout
// pd = P * keep / (1 - p) (pd unused without dropout).
template <typename T>
BERTKERN_ALWAYS_INLINE void bwd_probs_body(T* __restrict s, T* __restrict pd, int64_t M, int64_t n,
                                     int64_t row0, bool causal, const T* __restrict lse,
                                     const DropoutRng& d) {
  for (int64_t r = 0; r < M; ++r) {
    T* x = s + r * n;
    const int64_t valid = causal ? std::min(n, row0 + r + 1) : n;
    const T m = lse[r];
#pragma omp simd
    for (int64_t j = 0; j < valid; ++j) x[j] = exp_fast(x[j] - m);
    for (int64_t j = valid; j < n; ++j) x[j] = 0;
    if (d.on) {
      T* y = pd + r * n;
      dropout_row<T>(x, y, valid, d.row_counter(row0 + r), d);
      for (int64_t j = valid; j < n; ++j) y[j] = 0;
    }
  }
}

// Backward, one query block: dp (= dO V^T) -> dS in place, with pd = P * keep / (1 - p):
//   dS = P * (dP * keep / (1 - p) - delta) = pd * dP - P * delta,  delta_r = sum_j pd * dP.
// delta_r equals dO_r . O_r (FlashAttention's form), but is summed here from the float32 P and
// dP of the row, which the block holds in full: dO . O would take O from `out`, rounded to the
// input dtype, and its rounding error is amplified by 1 / (1 - p) and by the cancellation in
// dP - delta (4x torch's own float16 error at dropout 0.9).
template <typename T>
BERTKERN_ALWAYS_INLINE void bwd_ds_body(T* __restrict dp, const T* __restrict p, const T* __restrict pd,
                                  int64_t M, int64_t n) {
  for (int64_t r = 0; r < M; ++r) {
    T* x = dp + r * n;
    const T* prow = p + r * n;
    const T* pdrow = pd != nullptr ? pd + r * n : prow;
    alignas(64) T part[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) part[l] = 0;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) part[l] += pdrow[j + l] * x[j + l];
    }
    for (int64_t l = 0; l < n - j; ++l) part[l] += pdrow[j + l] * x[j + l];
    const T delta = combine_lanes<T>(part, [](T a, T b) { return a + b; });
    if (pd != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) x[c] = pdrow[c] * x[c] - prow[c] * delta;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) x[c] = prow[c] * (x[c] - delta);
    }
  }
}

// Instruction-set clones for float (the hot path); double is for gradcheck and stays generic.
BERTKERN_MULTIVERSION void fwd_block(float* s, int64_t M, int64_t n, int64_t row0, bool causal,
                               float* lse, const DropoutRng& d) {
  fwd_block_body<float>(s, M, n, row0, causal, lse, d);
}
void fwd_block(double* s, int64_t M, int64_t n, int64_t row0, bool causal, double* lse,
               const DropoutRng& d) {
  fwd_block_body<double>(s, M, n, row0, causal, lse, d);
}
BERTKERN_MULTIVERSION void bwd_probs(float* s, float* pd, int64_t M, int64_t n, int64_t row0,
                               bool causal, const float* lse, const DropoutRng& d) {
  bwd_probs_body<float>(s, pd, M, n, row0, causal, lse, d);
}
void bwd_probs(double* s, double* pd, int64_t M, int64_t n, int64_t row0, bool causal,
               const double* lse, const DropoutRng& d) {
  bwd_probs_body<double>(s, pd, M, n, row0, causal, lse, d);
}
BERTKERN_MULTIVERSION void bwd_ds(float* dp, const float* p, const float* pd, int64_t M, int64_t n) {
  bwd_ds_body<float>(dp, p, pd, M, n);
}
void bwd_ds(double* dp, const double* p, const double* pd, int64_t M, int64_t n) {
  bwd_ds_body<double>(dp, p, pd, M, n);
}
// out[4 i + w] = word w of Philox4x32-10 at counter (offsets[i], 0, 0, 0), as int32 bits.
BERTKERN_MULTIVERSION void philox_words_n(const int32_t* offsets, int32_t* out, int64_t n, uint32_t k0,
                                    uint32_t k1) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w0, w1, w2, w3;
    philox4x32_10(static_cast<uint32_t>(offsets[i]), k0, k1, w0, w1, w2, w3);
    const uint32_t w[4] = {w0, w1, w2, w3};
    std::memcpy(out + 4 * i, w, sizeof(w));
  }
}

// ---------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------

// A (T, H, D) tensor seen as one row-major (L x D) matrix per (sequence, head):
// element (token t, head h, e) at ptr[t * ld + h * head_stride + e].
template <typename T>
struct Rows {
  T* ptr = nullptr;
  int64_t ld = 0, head_stride = 0;
  T* at(int64_t token, int64_t head) const { return ptr + token * ld + head * head_stride; }
};

// t itself when its (sequence, head) slices are valid BLAS operands (unit stride along D, token
// stride >= D, e.g. q/k/v views of a packed (T, 3, H, D) qkv), else a contiguous copy.
Tensor as_row_operand(const Tensor& t) {
  const int64_t T = t.size(0), D = t.size(2);
  const bool ok = (D == 1 || t.stride(2) == 1) && (T <= 1 || t.stride(0) >= D);
  return ok ? t : as_contiguous(t);
}

template <typename T>
Rows<T> rows_of(const Tensor& t) {
  Rows<T> r;
  r.ptr = const_cast<T*>(const_data<T>(t));
  // A single token: only row 0 is addressed, and any ld >= D is a valid BLAS leading dimension.
  r.ld = t.size(0) > 1 ? t.stride(0) : t.size(2);
  r.head_stride = t.stride(1);
  return r;
}

// Computation type: float64 for float64 inputs, float32 otherwise.
ScalarType acc_type(ScalarType t) { return t == kDouble ? kDouble : kFloat; }

Tensor to_acc(const Tensor& t) {
  return as_row_operand(to_dtype(t, acc_type(t.scalar_type())));
}

// Query rows per block for a sequence of L tokens: up to 128 (64 when causal, so that blocks skip
// more of the masked upper triangle), fewer for long sequences so that a (rows x L) score block
// stays around 256 KiB of float32 (L2); the blocks of a sequence are equal-sized.
int64_t block_rows(int64_t L, bool causal) {
  constexpr int64_t kScoreElements = 64 * 1024;
  const int64_t max_rows = causal ? 64 : 128;
  const int64_t cap = std::clamp<int64_t>(kScoreElements / std::max<int64_t>(L, 1), 16, max_rows);
  const int64_t n_blocks = (L + cap - 1) / cap;
  return n_blocks == 0 ? 1 : (L + n_blocks - 1) / n_blocks;
}

// ---------------------------------------------------------------------------------------------
// Argument checks (before any compute). ValueError / TypeError naming the argument.
// ---------------------------------------------------------------------------------------------

bool is_supported_dtype(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16 || t == kDouble;
}

void check_qkv_like(const char* op, const char* name, const Tensor& t, const Tensor& q) {
  BERTKERN_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  BERTKERN_CHECK_VALUE(t.device().is_cpu(), op, ": ", name,
                       " must be a CPU tensor here, got device ", t.device());
  BERTKERN_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must have shape (T, H, D), got shape ",
                       t.sizes());
  BERTKERN_CHECK_VALUE(same_shape(t, q), op, ": ", name, " must have q's shape ", q.sizes(),
                       " (self-attention on packed tokens), got ", t.sizes());
  BERTKERN_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                      q.scalar_type(), ", got ", t.scalar_type());
}

struct Problem {
  int64_t T = 0, H = 0, D = 0;
  std::vector<int64_t> cu;  // B + 1 offsets
  uint64_t seed = 0;
};

Problem check_common(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                     double dropout_p, const OptionalTensor& dropout_seed) {
  BERTKERN_CHECK_VALUE(q.defined(), op, ": q is undefined");
  BERTKERN_CHECK_VALUE(q.device().is_cpu(), op, ": q must be a CPU tensor here, got device ",
                       q.device());
  BERTKERN_CHECK_VALUE(q.dim() == 3, op, ": q must have shape (T, H, D), got shape ", q.sizes());
  BERTKERN_CHECK_TYPE(is_supported_dtype(q.scalar_type()), op,
                      ": q must be float32, float16, bfloat16 or float64, got ", q.scalar_type());
  BERTKERN_CHECK_VALUE(q.size(2) >= 1, op,
                       ": head dimension D = q.shape[2] must be >= 1, got shape ", q.sizes());
  check_qkv_like(op, "k", k, q);
  check_qkv_like(op, "v", v, q);
  BERTKERN_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  BERTKERN_CHECK_VALUE(cu_seqlens.defined(), op, ": cu_seqlens is undefined");
  BERTKERN_CHECK_VALUE(cu_seqlens.device().is_cpu(), op,
                       ": cu_seqlens must be a CPU tensor with q on the CPU, got device ",
                       cu_seqlens.device());
  BERTKERN_CHECK_TYPE(cu_seqlens.scalar_type() == kInt, op,
                      ": cu_seqlens must be int32, got dtype ", cu_seqlens.scalar_type());
  BERTKERN_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, op,
                       ": cu_seqlens must have shape (B + 1,) with B >= 0, got shape ",
                       cu_seqlens.sizes());
  Problem pr;
  pr.T = q.size(0);
  pr.H = q.size(1);
  pr.D = q.size(2);
  const Tensor cu_c = as_contiguous(cu_seqlens);
  const int32_t* cu = const_data<int32_t>(cu_c);
  const int64_t B = cu_c.numel() - 1;
  BERTKERN_CHECK_VALUE(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    BERTKERN_CHECK_VALUE(cu[b + 1] >= cu[b], op,
                         ": cu_seqlens must be nondecreasing, got cu_seqlens[", b, "] = ", cu[b],
                         " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
    longest = std::max<int64_t>(longest, int64_t{cu[b + 1]} - cu[b]);
  }
  BERTKERN_CHECK_VALUE(cu[B] == pr.T, op, ": cu_seqlens[-1] = ", cu[B],
                       " must equal the number of tokens T = q.shape[0] = ", pr.T);
  BERTKERN_CHECK_VALUE(max_seqlen >= longest && max_seqlen <= std::numeric_limits<int32_t>::max(),
                       op, ": max_seqlen must be >= the longest sequence (", longest,
                       ") and < 2^31, got ", max_seqlen);
  pr.cu.assign(cu, cu + B + 1);

  BERTKERN_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op,
                       ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    BERTKERN_CHECK_VALUE(dropout_seed.has_value() && dropout_seed->defined(), op,
                         ": dropout_seed is required when dropout_p > 0");
    const Tensor& s = *dropout_seed;
    BERTKERN_CHECK_TYPE(s.scalar_type() == kLong, op, ": dropout_seed must be int64, got dtype ",
                        s.scalar_type());
    BERTKERN_CHECK_VALUE(s.numel() == 1 && s.dim() == 1, op,
                         ": dropout_seed must have shape (1,), got shape ", s.sizes());
    BERTKERN_CHECK_VALUE(s.device().is_cpu(), op,
                         ": dropout_seed must be on q's device (cpu), got ", s.device());
    const int64_t value = const_data<int64_t>(s)[0];
    BERTKERN_CHECK_VALUE(value >= 0 && value < (int64_t{1} << 62), op,
                         ": dropout_seed must be in [0, 2^62), got ", value);
    pr.seed = static_cast<uint64_t>(value);
  }
  return pr;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
void attention_fwd_impl(const Problem& pr, const Tensor& q_t, const Tensor& k_t,
                        const Tensor& v_t, const Tensor& out_t, const Tensor& lse_t,
                        int64_t max_seqlen, double scale_d, bool causal, double dropout_p) {
  const int64_t H = pr.H, D = pr.D, n_tokens = pr.T;
  const int64_t B = static_cast<int64_t>(pr.cu.size()) - 1;
  const Rows<T> q = rows_of<T>(q_t), k = rows_of<T>(k_t), v = rows_of<T>(v_t);
  const Rows<T> out = rows_of<T>(out_t);
  T* lse = data<T>(lse_t);
  const T scale = static_cast<T>(scale_d);

  struct Task {
    int64_t b, h, m0, m1;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  int64_t workspace = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = pr.cu[b + 1] - pr.cu[b];
    if (L == 0) continue;
    const int64_t rows = block_rows(L, causal);
    workspace = std::max(workspace, rows * L);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t m0 = 0; m0 < L; m0 += rows) {
        const int64_t m1 = std::min(L, m0 + rows);
        tasks.push_back({b, h, m0, m1});
        cost.push_back(2 * (m1 - m0) * (causal ? m1 : L) * D);  // 2 GEMMs
      }
    }
  }

  run_tasks<T>(cost, workspace, [&](int64_t i, T* s) {
    const Task& task = tasks[i];
    const int64_t start = pr.cu[task.b], L = pr.cu[task.b + 1] - start;
    const int64_t M = task.m1 - task.m0, n = causal ? task.m1 : L;
    const DropoutRng d = make_dropout_rng(dropout_p, pr.seed, max_seqlen, task.b, H, task.h);
    const int64_t q0 = start + task.m0;
    // S = scale * Q_blk K^T  (M x n)
    gemm<T>(false, true, M, n, D, scale, q.at(q0, task.h), q.ld, k.at(start, task.h), k.ld, T(0),
            s, n);
    fwd_block(s, M, n, task.m0, causal, lse + task.h * n_tokens + q0, d);
    // out_blk = P_drop V  (M x D)
    gemm<T>(false, false, M, D, n, T(1), s, n, v.at(start, task.h), v.ld, T(0),
            out.at(q0, task.h), out.ld);
  });
}

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q_in, const Tensor& k_in,
                                             const Tensor& v_in, const Tensor& cu_seqlens,
                                             int64_t max_seqlen, double scale, bool causal,
                                             double dropout_p,
                                             const OptionalTensor& dropout_seed) {
  const Problem pr = check_common("attention_fwd", q_in, k_in, v_in, cu_seqlens, max_seqlen, scale,
                                  dropout_p, dropout_seed);
  const ScalarType dtype = q_in.scalar_type(), acc = acc_type(dtype);
  const Tensor q = to_acc(q_in), k = to_acc(k_in), v = to_acc(v_in);
  Tensor out = empty({pr.T, pr.H, pr.D}, acc, q_in.device());
  Tensor lse = empty({pr.H, pr.T}, acc, q_in.device());
  if (acc == kDouble) {
    attention_fwd_impl<double>(pr, q, k, v, out, lse, max_seqlen, scale, causal, dropout_p);
  } else {
    attention_fwd_impl<float>(pr, q, k, v, out, lse, max_seqlen, scale, causal, dropout_p);
  }
  return {to_dtype(out, dtype), lse};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename T>
void attention_bwd_impl(const Problem& pr, const Tensor& dout_t, const Tensor& q_t,
                        const Tensor& k_t, const Tensor& v_t,
                        const Tensor& lse_t, const Tensor& dq_t, const Tensor& dk_t,
                        const Tensor& dv_t, int64_t max_seqlen, double scale_d, bool causal,
                        double dropout_p) {
  const int64_t H = pr.H, D = pr.D, n_tokens = pr.T;
  const int64_t B = static_cast<int64_t>(pr.cu.size()) - 1;
  const Rows<T> q = rows_of<T>(q_t), k = rows_of<T>(k_t), v = rows_of<T>(v_t);
  const Rows<T> dout = rows_of<T>(dout_t);
  const Rows<T> dq = rows_of<T>(dq_t), dk = rows_of<T>(dk_t), dv = rows_of<T>(dv_t);
  const T* lse = const_data<T>(lse_t);
  const T scale = static_cast<T>(scale_d);
  const bool dropout = dropout_p > 0;

  std::vector<std::pair<int64_t, int64_t>> tasks;  // (b, h)
  std::vector<int64_t> cost;
  int64_t block_elements = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = pr.cu[b + 1] - pr.cu[b];
    if (L == 0) continue;
    block_elements = std::max(block_elements, block_rows(L, causal) * L);
    for (int64_t h = 0; h < H; ++h) {
      tasks.emplace_back(b, h);
      cost.push_back(5 * L * L * D / (causal ? 2 : 1));  // 5 GEMMs
    }
  }
  // Workspace: P, dP (-> dS) and, with dropout, P_drop; one (rows x L) block each.
  const int64_t workspace = block_elements * (dropout ? 3 : 2);

  run_tasks<T>(cost, workspace, [&](int64_t i, T* ws) {
    const int64_t b = tasks[i].first, h = tasks[i].second;
    const int64_t start = pr.cu[b], L = pr.cu[b + 1] - start;
    const int64_t rows = block_rows(L, causal), n_blocks = (L + rows - 1) / rows;
    T* p = ws;
    T* dp = ws + block_elements;
    T* pd = dropout ? ws + 2 * block_elements : nullptr;
    const DropoutRng d = make_dropout_rng(dropout_p, pr.seed, max_seqlen, b, H, h);
    const T* kb = k.at(start, h);
    const T* vb = v.at(start, h);
    T* dkb = dk.at(start, h);
    T* dvb = dv.at(start, h);
    // Last block first: it sees all L keys even when causal, so it initializes dK / dV (beta 0)
    // and every earlier block accumulates into them.
    for (int64_t blk = n_blocks - 1; blk >= 0; --blk) {
      const int64_t m0 = blk * rows, m1 = std::min(L, m0 + rows), M = m1 - m0;
      const int64_t n = causal ? m1 : L;
      const T beta = blk == n_blocks - 1 ? T(0) : T(1);
      const int64_t t0 = start + m0;
      const T* qb = q.at(t0, h);
      const T* dob = dout.at(t0, h);
      // P = exp(scale * Q_blk K^T - lse), P_drop
      gemm<T>(false, true, M, n, D, scale, qb, q.ld, kb, k.ld, T(0), p, n);
      bwd_probs(p, pd, M, n, m0, causal, lse + h * n_tokens + t0, d);
      // dV += P_drop^T dO_blk
      gemm<T>(true, false, n, D, M, T(1), dropout ? pd : p, n, dob, dout.ld, beta, dvb, dv.ld);
      // dP = dO_blk V^T, then dS
      gemm<T>(false, true, M, n, D, T(1), dob, dout.ld, vb, v.ld, T(0), dp, n);
      bwd_ds(dp, p, pd, M, n);
      // dQ_blk = scale * dS K ; dK += scale * dS^T Q_blk
      gemm<T>(false, false, M, D, n, scale, dp, n, kb, k.ld, T(0), dq.at(t0, h), dq.ld);
      gemm<T>(true, false, n, D, M, scale, dp, n, qb, q.ld, beta, dkb, dk.ld);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
    const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
    const Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool causal, double dropout_p,
    const OptionalTensor& dropout_seed) {
  const char* op = "attention_bwd";
  const Problem pr = check_common(op, q_in, k_in, v_in, cu_seqlens, max_seqlen, scale, dropout_p,
                                  dropout_seed);
  check_qkv_like(op, "dout", dout_in, q_in);
  check_qkv_like(op, "out", out_in, q_in);
  const ScalarType dtype = q_in.scalar_type(), acc = acc_type(dtype);
  BERTKERN_CHECK_VALUE(lse_in.defined() && lse_in.device().is_cpu(), op,
                       ": lse must be a CPU tensor");
  BERTKERN_CHECK_TYPE(lse_in.scalar_type() == acc, op, ": lse must be ", acc, " for ", dtype,
                      " inputs, got ", lse_in.scalar_type());
  BERTKERN_CHECK_VALUE(lse_in.dim() == 2 && lse_in.size(0) == pr.H && lse_in.size(1) == pr.T, op,
                       ": lse must have shape (H, T) = (", pr.H, ", ", pr.T, "), got ",
                       lse_in.sizes());

  const Tensor q = to_acc(q_in), k = to_acc(k_in), v = to_acc(v_in);
  // out is part of the schema (FlashAttention's delta = rowsum(dO * O)) but not read: delta is
  // summed from the recomputed float32 P and dP instead (see bwd_ds_body).
  const Tensor dout = to_acc(dout_in);
  const Tensor lse = as_contiguous(lse_in);
  const Device device = q_in.device();
  Tensor dq = empty({pr.T, pr.H, pr.D}, acc, device);
  Tensor dk = empty({pr.T, pr.H, pr.D}, acc, device);
  Tensor dv = empty({pr.T, pr.H, pr.D}, acc, device);
  if (acc == kDouble) {
    attention_bwd_impl<double>(pr, dout, q, k, v, lse, dq, dk, dv, max_seqlen, scale, causal,
                               dropout_p);
  } else {
    attention_bwd_impl<float>(pr, dout, q, k, v, lse, dq, dk, dv, max_seqlen, scale, causal,
                              dropout_p);
  }
  return {to_dtype(dq, dtype), to_dtype(dk, dtype), to_dtype(dv, dtype)};
}

// ---------------------------------------------------------------------------------------------
// Test-only: the dropout Philox words. r[..., w] = word w of tl.randint4x(seed, offsets) for
// int32 offsets, as int32 bits; shape offsets.shape + (4,).
// ---------------------------------------------------------------------------------------------

Tensor philox_words_cpu(int64_t seed, const Tensor& offsets_in) {
  BERTKERN_CHECK_TYPE(offsets_in.scalar_type() == kInt,
                      "_philox_words: offsets must be int32, got dtype ", offsets_in.scalar_type());
  const Tensor offsets = as_contiguous(offsets_in);
  std::vector<int64_t> words_shape = shape(offsets);
  words_shape.push_back(4);
  Tensor r = empty(words_shape, kInt, offsets.device());
  const uint64_t key = static_cast<uint64_t>(seed);
  philox_words_n(const_data<int32_t>(offsets), data<int32_t>(r), offsets.numel(),
                 static_cast<uint32_t>(key & 0xffffffffu), static_cast<uint32_t>(key >> 32));
  return r;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bertkern, CPU, m) {
  m.impl("attention_fwd", TORCH_BOX(&attention_fwd_cpu));
  m.impl("attention_bwd", TORCH_BOX(&attention_bwd_cpu));
  m.impl("_philox_words", TORCH_BOX(&philox_words_cpu));
}

}  // namespace bertkern
